"""The preconditioner's contract against closed forms written out here: the damping rule at
its edges, float64 accumulation, query mixing at its bounds, the size limit, devices, the
saved file and every error message (holes that surviving mutants showed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lightning_bergson.attribution import preconditioners as pc
from lightning_bergson.attribution.preconditioners import (
    Preconditioner,
    accumulate_second_moments,
    damped_power,
    eigh64,
)
from lightning_bergson.store import ModuleBlock

F64 = torch.float64
BLOCKS = [ModuleBlock("fc", 0, 2, (1, 2), "fc"), ModuleBlock("head", 2, 1, (1, 1), "attn", 0)]


def rot(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def test_damped_power_closed_form_and_untouched_blocks():
    """``V diag((l + c mean(l))^p) V^T``: l = (1, 3), c = 0.1 adds 0.2; all-zero l adds 1."""
    v = rot(0.3)
    for p in (-1.0, -0.5):
        want = v @ torch.diag(torch.tensor([1.2, 3.2], dtype=F64) ** p) @ v.T
        got = damped_power(torch.tensor([1.0, 3.0], dtype=F64), v, p, 0.1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    zero = damped_power(torch.zeros(2, dtype=F64), v, -1.0, 0.1)
    torch.testing.assert_close(zero, torch.eye(2, dtype=F64), rtol=1e-12, atol=1e-12)
    assert (
        damped_power(torch.zeros(0, dtype=F64), torch.zeros(0, 0, dtype=F64), -1, 0.1).numel() == 0
    )


def test_eigh64_works_in_float64_whatever_the_input():
    """A float32 matrix with eigenvalues 1 and 1 + 1e-9 keeps them apart only in float64."""
    h = rot(0.4) @ torch.diag(torch.tensor([1.0, 1.0 + 1e-9], dtype=F64)) @ rot(0.4).T
    evals, evecs = eigh64(h.float())
    assert evals.dtype == evecs.dtype == F64
    h32 = h.float().double()  # what the float32 input holds, exactly
    want = np.linalg.eigvalsh(h32.numpy())
    np.testing.assert_allclose(evals.numpy(), want, rtol=0, atol=1e-15)


def test_second_moments_sum_in_float64_and_widen_half_rows():
    """Half-precision rows are widened before their products (a float16 product rounds to
    11 bits); totals are float64."""
    gen = torch.Generator().manual_seed(0)
    half = torch.randn(6, 3, generator=gen).half()  # products need more bits than float16
    full = torch.randn(5, 3, generator=gen)
    sums, count = accumulate_second_moments([half, full], BLOCKS)
    assert count == 11 and set(sums) == {"fc", "head"}
    rows = torch.cat([half.double(), full.double()])
    for name, lo, hi in (("fc", 0, 2), ("head", 2, 3)):
        assert sums[name].dtype == F64
        g = rows[:, lo:hi]
        torch.testing.assert_close(sums[name], g.T @ g, rtol=1e-6, atol=1e-6)


def test_no_rows_give_zero_float64_moments_of_each_block():
    sums, count = accumulate_second_moments([torch.full((2, 3), float("nan"))], BLOCKS)
    assert count == 0
    assert {k: (tuple(v.shape), v.dtype) for k, v in sums.items()} == {
        "fc": ((2, 2), F64),
        "head": ((1, 1), F64),
    }
    assert all(not v.any() for v in sums.values())
    no_chunks, none = accumulate_second_moments([], BLOCKS)
    assert none == 0 and {k: (tuple(v.shape), v.dtype) for k, v in no_chunks.items()} == {
        "fc": ((2, 2), F64),
        "head": ((1, 1), F64),
    }


def moments(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"fc": scale * torch.eye(2, dtype=torch.float32), "head": scale * torch.ones(1, 1)}


def test_defaults_damping_bounds_and_missing_blocks():
    pre = Preconditioner(moments(), BLOCKS)
    assert (pre.num_rows, pre.damping, pre.info) == (0, 0.1, {})
    assert pre.moment("fc").dtype == F64
    Preconditioner(moments(), BLOCKS, damping=0.0)  # no damping is allowed
    with pytest.raises(ValueError, match=r"^damping must be >= 0, got -0\.5$"):
        Preconditioner(moments(), BLOCKS, damping=-0.5)
    many = [ModuleBlock(f"b{i}", i, 1, (1, 1), f"b{i}") for i in range(7)]
    with pytest.raises(KeyError) as err:
        Preconditioner({"b0": torch.ones(1, 1)}, many)
    assert err.value.args[0] == (
        "no second moment for blocks ['b1', 'b2', 'b3', 'b4', 'b5']; refit the preconditioner"
    )


def test_fit_divides_by_the_row_count_even_for_one_row():
    g = torch.tensor([[1.0, 2.0, 3.0]])
    pre = Preconditioner.fit([g], BLOCKS)
    assert pre.num_rows == 1
    torch.testing.assert_close(pre.moment("fc"), torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64))
    torch.testing.assert_close(pre.moment("head"), torch.tensor([[9.0]], dtype=F64))


def test_size_limit_is_inclusive_and_named(monkeypatch):
    monkeypatch.setattr(pc, "MAX_BLOCK_DIM", 2)
    Preconditioner.fit([torch.ones(1, 3)], BLOCKS)  # blocks of 2 and 1 columns: allowed
    big = [ModuleBlock(f"m{i}", 3 * i, 3, (1, 3), f"m{i}") for i in range(5)]
    with pytest.raises(ValueError) as err:
        Preconditioner.fit([torch.ones(1, 15)], big)
    assert str(err.value) == (
        "blocks ['m0', 'm1', 'm2'] have more than 2 columns, so a dense [d, d] preconditioner "
        "is too large; capture with projection_dim > 0 (e.g. 16) or precondition a subset of "
        "modules"
    )


def test_query_mixing_at_its_bounds():
    """``(1 - w) H_train + w H_query``; one query row ``q`` has ``H_query = q q^T``."""
    pre = Preconditioner(moments(2.0), BLOCKS, num_rows=7, damping=0.3, info={"rows": 7})
    assert pre.mixed(torch.ones(1, 3), 0.0) is pre
    q = torch.tensor([[1.0, -1.0, 2.0]])
    only = pre.mixed(q, 1.0)
    torch.testing.assert_close(only.moment("fc"), torch.tensor([[1.0, -1], [-1, 1]], dtype=F64))
    torch.testing.assert_close(only.moment("head"), torch.tensor([[4.0]], dtype=F64))
    half = pre.mixed(q, 0.25)
    torch.testing.assert_close(
        half.moment("head"), torch.tensor([[0.75 * 2 + 0.25 * 4]], dtype=F64)
    )
    assert (half.num_rows, half.damping, half.info) == (7, 0.3, {"rows": 7})
    for bad in (-0.1, 1.5):
        with pytest.raises(
            ValueError, match=rf"^query mixing weight must be in \[0, 1\], got {bad}$"
        ):
            pre.mixed(q, bad)


def test_apply_keeps_dtype_device_and_a_subset_of_blocks():
    pre = Preconditioner(moments(2.0), BLOCKS, damping=0.0)
    x = torch.tensor([[2.0, 4.0, 6.0]])
    out = pre.apply(x, -1.0)
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 2.0, 3.0]]
    only_head = pre.apply(torch.tensor([[6.0]]), -1.0, blocks=[BLOCKS[1]])
    assert only_head.tolist() == [[3.0]]
    assert pre.matrix("fc", -1.0).device.type == "cpu"
    assert pre.matrix("fc", -1.0, "meta").device.type == "meta"  # not the cached CPU one
    assert pre.apply(x.to("meta"), -1.0).device.type == "meta"
    with pytest.raises(ValueError, match=r"^rows have 4 columns but the blocks 3$"):
        pre.apply(torch.ones(1, 4), -1.0)
    with pytest.raises(ValueError, match=r"^rows have 4 columns but the blocks 5$"):
        pre.apply(torch.ones(1, 4), -1.0, blocks=[BLOCKS[0], BLOCKS[1], BLOCKS[0]])


def test_saved_file_round_trips_rows_info_and_damping(tmp_path):
    pre = Preconditioner(moments(2.0), BLOCKS, num_rows=9, info={"store_rows": 9})
    path = pre.save(tmp_path / "pre.safetensors")
    back = Preconditioner.load(path)
    assert (back.num_rows, back.info, back.damping) == (9, {"store_rows": 9}, 0.1)
    assert Preconditioner.load(path, damping=0.5).damping == 0.5
    torch.testing.assert_close(back.moment("fc"), 2 * torch.eye(2, dtype=F64))
    # a file without info (older writer) loads with empty info
    meta = {"format": pc.FORMAT, "num_rows": "3", "blocks": '[{"name": "head", "offset": 0, '
            '"size": 1, "shape": [1, 1], "parent": "attn", "head": 0}]'}  # fmt: skip
    t = {"eigvals/head": torch.ones(1, dtype=F64), "eigvecs/head": torch.ones(1, 1, dtype=F64)}
    save_file(t, str(tmp_path / "old.safetensors"), metadata=meta)
    old = Preconditioner.load(tmp_path / "old.safetensors")
    assert (old.info, old.num_rows) == ({}, 3)
    save_file(t, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
    with pytest.raises(
        ValueError, match=r"other\.safetensors is not a lightning_bergson preconditioner file$"
    ):
        Preconditioner.load(tmp_path / "other.safetensors")
