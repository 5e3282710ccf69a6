"""Preconditioners against closed forms: second moments, damped H^-1 and H^-1/2, scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_fixtures import damped_inverse_power, random_store, unit

from lightning_bergson.attribution import Attributor, Preconditioner, StoreMismatchError
from lightning_bergson.attribution.preconditioners import FILE_NAME, damped_power, eigh64
from lightning_bergson.store import GradientStore, ModuleBlock

OFFSETS = {"fc": (0, 12), "attn.head_0": (12, 18), "attn.head_1": (18, 24)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("p") / "g.zarr", num=30, dtype="float32")


def block_matrix(rows: np.ndarray, power: float, damping: float, extra=None, w=0.0):
    """Block-diagonal closed-form ``H^power`` over all store columns."""
    out = np.zeros((rows.shape[1], rows.shape[1]))
    for lo, hi in OFFSETS.values():
        g = rows[:, lo:hi]
        h = g.T @ g / len(g)
        if extra is not None:
            e = extra[:, lo:hi]
            h = (1 - w) * h + w * e.T @ e / len(e)
        out[lo:hi, lo:hi] = damped_inverse_power(h, power, damping)
    return out


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_known_h_2i_closed_form():
    block = [ModuleBlock("fc", 0, 6, (2, 3), "fc")]
    pre = Preconditioner({"fc": 2 * torch.eye(6, dtype=torch.float64)}, block, damping=0.1)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(pre.apply(x, -1.0), x / (2 + 0.1 * 2))
    torch.testing.assert_close(pre.apply(x, -0.5), x / (2 + 0.1 * 2) ** 0.5)


def test_random_spd_powers():
    h = random_spd(7)
    evals, evecs = eigh64(h)
    inv = damped_power(evals, evecs, -1.0, 0.0)
    torch.testing.assert_close(inv, torch.linalg.inv(h), rtol=1e-8, atol=1e-10)
    half = damped_power(evals, evecs, -0.5, 0.3)
    torch.testing.assert_close(half @ half, damped_power(evals, evecs, -1.0, 0.3))
    want = damped_inverse_power(h.numpy(), -1.0, 0.3)
    np.testing.assert_allclose(damped_power(evals, evecs, -1.0, 0.3).numpy(), want, rtol=1e-8)


def test_fit_streams_second_moments(store):
    path, rows, _ = store
    s = GradientStore.open(path)
    chunks = (c for _, c in s.iter_chunks(7, dtype=torch.float64))
    pre = Preconditioner.fit(chunks, s.modules)
    assert pre.num_rows == len(rows)
    for name, (lo, hi) in OFFSETS.items():
        g = rows[:, lo:hi]
        np.testing.assert_allclose(pre.moment(name).numpy(), g.T @ g / len(g), rtol=1e-10)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("mix", [0.0, 0.4])
def test_preconditioned_scores_closed_form(store, cosine, mix):
    path, rows, _ = store
    q = torch.randn(3, 24, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    attr = Attributor(
        path,
        dtype=torch.float64,
        unit_norm=cosine,
        preconditioner="fit",
        damping=0.2,
        query_mix=mix,
        chunk_rows=11,
    )
    extra = q.numpy() if mix else None
    if cosine:  # H^-1/2 on both sides, then unit norm
        m = block_matrix(rows, -0.5, 0.2, extra, mix)
        want = unit(q.numpy() @ m) @ unit(rows @ m).T
    else:  # H^-1 on the query only
        want = q.numpy() @ block_matrix(rows, -1.0, 0.2, extra, mix) @ rows.T
    got, _ = attr.scores(q)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-10)
    again, _ = attr.scores(q)  # cosine reuses the cached |H^-1/2 g| of the first scan
    np.testing.assert_allclose(again.numpy(), want, rtol=1e-5, atol=1e-10)
    top = attr.search(q, k=4)
    np.testing.assert_array_equal(top.rows.numpy(), np.argsort(-want, axis=1)[:, :4])


def test_saved_beside_the_store_and_reused(store, monkeypatch):
    path, _, _ = store
    first = Attributor(path, preconditioner="fit").preconditioner
    saved = path / "preconditioners" / FILE_NAME
    assert saved.is_file()
    assert b"pickle" not in saved.read_bytes()[:2000]

    def no_refit(*args, **kwargs):
        raise AssertionError("the saved preconditioner should be reused")

    monkeypatch.setattr(Preconditioner, "fit", no_refit)
    again = Attributor(path, preconditioner="fit").preconditioner
    for name in OFFSETS:
        torch.testing.assert_close(again.moment(name), first.moment(name))
        torch.testing.assert_close(again.matrix(name, -1.0), first.matrix(name, -1.0))


def test_preconditioner_from_other_rows_is_refused(store, tmp_path):
    path, _, _ = store
    other, _, _ = random_store(tmp_path / "o.zarr", num=5, epochs=1)
    Attributor(other, preconditioner="fit")
    with pytest.raises(StoreMismatchError, match="fitted on other rows"):
        Attributor(path, preconditioner=other / "preconditioners" / FILE_NAME)


def test_huge_blocks_need_a_projection():
    block = [ModuleBlock("big", 0, 5000, (50, 100), "big")]
    with pytest.raises(ValueError, match="projection_dim > 0"):
        Preconditioner.fit([torch.zeros(1, 5000)], block)


def test_rewritten_store_is_refitted(tmp_path, make_store):
    """Same row count, other rows (a store rewritten in place): the saved file is not reused."""
    old, _, _ = random_store(tmp_path / "old.zarr", num=6, epochs=1, seed=1)
    Attributor(old, preconditioner="fit")
    path, rows, _ = make_store(num=6, epochs=1, seed=2)  # same shape
    (old / "preconditioners").rename(path / "preconditioners")  # a stale file left behind
    pre = Attributor(path, dtype=torch.float64, preconditioner="fit").preconditioner
    g = rows[:, :12]
    np.testing.assert_allclose(pre.moment("fc").numpy(), g.T @ g / len(g), rtol=1e-6)


def test_non_finite_rows_are_left_out_of_the_preconditioner_and_rank_last(make_store):
    """A store with NaN rows: H is the second moment of the finite rows only (eigh of a NaN
    matrix would fail), and the ranking equals the closed form over the finite rows, with the
    NaN rows after every finite one in both directions."""
    nan = (1, 4, 9, 15, 22, 30, 37)
    path, rows, _ = make_store(num=40, epochs=1, nan_rows=nan)
    finite = np.setdiff1d(np.arange(40), nan)
    attr = Attributor(path, dtype=torch.float64, preconditioner="fit", damping=0.2)
    assert attr.preconditioner.num_rows == len(finite)
    for name, (lo, hi) in OFFSETS.items():
        g = rows[finite, lo:hi]
        np.testing.assert_allclose(attr.preconditioner.moment(name).numpy(), g.T @ g / len(g))
    q = torch.randn(2, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = q.numpy() @ block_matrix(rows[finite], -1.0, 0.2) @ rows[finite].T  # (2, 33)
    for reverse in (False, True):
        got = attr.search(q, k=None, reverse=reverse).rows.numpy()  # (2, 40): the whole order
        order = finite[np.argsort(want if reverse else -want, axis=1, kind="stable")]
        np.testing.assert_array_equal(got[:, : len(finite)], order)
        assert all(set(r[len(finite) :]) == set(nan) for r in got)
