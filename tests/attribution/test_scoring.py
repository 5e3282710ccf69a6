"""Attributor.search / scores / score arrays against brute-force float64 over the whole store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_fixtures import brute_scores, random_store

from lightning_bergson.attribution import Attributor, StoreMismatchError
from lightning_bergson.attribution.score_writer import write_score_array
from lightning_bergson.scores import ScoreArray


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("s") / "g.zarr", dtype="float16")


def queries(num: int = 3, dim: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_scores_and_topk_equal_brute_force(store, cosine, chunk_rows):
    path, rows, ids = store
    q = queries()
    want = brute_scores(q.numpy(), rows, cosine=cosine)  # (Q, N)
    attr = Attributor(path, dtype=torch.float64, unit_norm=cosine, chunk_rows=chunk_rows)
    got, got_ids = attr.scores(q)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-12)
    assert got_ids.tolist() == ids.tolist()
    for reverse in (False, True):
        res = attr.search(q, k=5, reverse=reverse)
        order = np.argsort(-want if not reverse else want, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(res.rows.numpy(), order)
        np.testing.assert_array_equal(res.indices.numpy(), ids[order])
        np.testing.assert_allclose(res.scores.numpy(), np.take_along_axis(want, order, 1), 1e-5)


def test_float32_scoring_matches_float64(store):
    path, rows, _ = store
    q = queries()
    got, _ = Attributor(path, chunk_rows=5).scores(q.float())
    np.testing.assert_allclose(got.numpy(), brute_scores(q.numpy(), rows, cosine=False), rtol=1e-5)


def test_extremes_and_module_subset(store):
    path, rows, _ = store
    q = queries()
    attr = Attributor(path, dtype=torch.float64, unit_norm=True, chunk_rows=6)
    cols = np.r_[12:24]  # the two attn heads: blocks fc (12), attn.head_0 (6), attn.head_1 (6)
    want = brute_scores(q.numpy()[:, cols], rows[:, cols], cosine=True)
    top, bottom = attr.extremes(q, k=4, modules=["attn"])
    np.testing.assert_allclose(top.scores.numpy(), -np.sort(-want, axis=1)[:, :4], rtol=1e-5)
    np.testing.assert_allclose(bottom.scores.numpy(), np.sort(want, axis=1)[:, :4], rtol=1e-5)
    head = attr.search(q, k=3, modules=["attn.head_1"])
    want_head = brute_scores(q.numpy()[:, 18:], rows[:, 18:], cosine=True)
    np.testing.assert_array_equal(head.rows.numpy(), np.argsort(-want_head, axis=1)[:, :3])


def test_dict_queries_equal_flat_queries(store):
    path, _, _ = store
    q = queries()
    attr = Attributor(path, dtype=torch.float64)
    as_dict = {"fc": q[:, :12].reshape(3, 3, 4), "attn.head_0": q[:, 12:18]}
    as_dict["attn.head_1"] = q[:, 18:]
    torch.testing.assert_close(attr.scores(as_dict)[0], attr.scores(q)[0])


@pytest.mark.parametrize("how", ["sum", "mean", "max"])
def test_example_reduce(store, how):
    path, rows, ids = store
    q = queries()
    want_rows = brute_scores(q.numpy(), rows, cosine=False)
    uniq = np.unique(ids)
    reduce = {"sum": np.sum, "mean": np.mean, "max": np.max}[how]
    want = np.stack([reduce(want_rows[:, ids == i], axis=1) for i in uniq], axis=1)  # (Q, U)
    attr = Attributor(path, dtype=torch.float64, example_reduce=how, chunk_rows=9)
    got, got_ids = attr.scores(q)
    assert got_ids.tolist() == uniq.tolist()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    res = attr.search(q, k=3)
    np.testing.assert_array_equal(res.indices.numpy(), uniq[np.argsort(-want, axis=1)[:, :3]])
    assert (res.rows == -1).all()


def test_non_finite_rows_rank_last(make_store):
    """36 finite rows among 40: the top and bottom 30 equal the brute-force order of the finite
    rows (a NaN row ranked anywhere but last shifts them), NaN rows come after all of them."""
    nan = (2, 5, 17, 31)
    path, rows, _ = make_store(num=40, epochs=1, nan_rows=nan)
    finite = np.setdiff1d(np.arange(40), nan)
    q = queries(num=2)
    want = brute_scores(q.numpy(), rows[finite], cosine=False)  # (2, 36)
    attr = Attributor(path, dtype=torch.float64, chunk_rows=7)
    for reverse in (False, True):
        order = finite[np.argsort(want if reverse else -want, axis=1, kind="stable")]
        res = attr.search(q, k=30, reverse=reverse)
        np.testing.assert_array_equal(res.rows.numpy(), order[:, :30])
        full = attr.search(q, k=None, reverse=reverse).rows.numpy()  # (2, 40)
        np.testing.assert_array_equal(full[:, :36], order)
        assert all(set(r[36:]) == set(nan) for r in full)


@pytest.mark.parametrize(("query_reduce", "example_reduce"), [("none", "none"), ("max", "mean")])
def test_score_array_equals_brute_force(store, tmp_path, query_reduce, example_reduce):
    path, rows, ids = store
    q = queries()
    attr = Attributor(path, unit_norm=True, chunk_rows=7, example_reduce=example_reduce)
    out = write_score_array(
        attr, q, tmp_path / "s.zarr", query_reduce=query_reduce, metadata={"queries": ["a"] * 3}
    )
    arr = ScoreArray.open(out)
    want = brute_scores(q.numpy(), rows, cosine=True)
    want_ids = ids
    if example_reduce == "mean":
        want_ids = np.unique(ids)
        want = np.stack([want[:, ids == i].mean(1) for i in want_ids], axis=1)
    if query_reduce == "max":
        want = want.max(axis=0, keepdims=True)
    np.testing.assert_allclose(arr.scores, want, rtol=1e-5, atol=1e-6)
    assert arr.example_ids.tolist() == want_ids.tolist()
    assert arr.convention == "influence" and arr.method == "gradient_cosine"
    assert arr.metadata["queries"] == ["a"] * 3 and arr.settings.query_reduce == query_reduce
    assert arr.settings.store == str(path) and arr.settings.preconditioner == "none"
    if example_reduce == "none":  # columns are the store rows: 40 per epoch
        assert arr.settings.columns == "rows" and arr.epochs.tolist() == [0] * 40 + [1] * 40
    else:
        assert arr.settings.columns == "examples" and arr.epochs is None


def test_bad_queries_are_refused(store):
    path, _, _ = store
    attr = Attributor(path)
    with pytest.raises(StoreMismatchError, match=r"queries have 5 columns but the store's .* 24"):
        attr.search(torch.zeros(2, 5), k=1)
    with pytest.raises(KeyError, match=r"attn\.head_1"):
        attr.search({"fc": torch.zeros(1, 12), "attn.head_0": torch.zeros(1, 6)}, k=1)
    with pytest.raises(ValueError, match="example_reduce='median'"):
        Attributor(path, example_reduce="median")


def test_fast_reader_equals_iter_chunks(tmp_path):
    """Raw chunk reads (reused buffers) equal zarr's reads: two ranks, a never-written chunk."""
    from lightning_bergson.attribution.reading import iter_rows
    from lightning_bergson.store import GradientStore, GradientStoreWriter, layout_blocks

    blocks = layout_blocks([("fc", (2, 3), "fc", None)])
    path = tmp_path / "g.zarr"
    gen = torch.Generator().manual_seed(0)
    for rank, rows in ((0, torch.randn(11, 6, generator=gen)), (1, torch.zeros(7, 6))):
        with GradientStoreWriter(
            path, modules=blocks, rank=rank, world_size=2, chunk_rows=4, dtype="float16"
        ) as w:
            w.append(rows, example_id=range(len(rows)), step=0, epoch=0)
    store = GradientStore.open(path)
    want = store.read(slice(None))
    for chunk_rows in (3, 4, 100):
        got = torch.cat([c.clone() for _, c in iter_rows(store, chunk_rows, ring=2)])
        assert torch.equal(got, want)
        got = [(s, c.clone()) for s, c in iter_rows(store, chunk_rows, dtype=torch.float16)]
        assert torch.equal(torch.cat([c for _, c in got]), want.half())
        assert [s for s, _ in got] == list(range(0, 18, chunk_rows))
