"""Capture under DDP, FSDP2, accumulation and precision equals the single-process store."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from oracles import (
    assert_rows_match,
    lm_batch,
    module_grad,
    oracle_lm_grads,
    rows_by_id,
    tiny_gpt_neox,
)
from safetensors.torch import load_file

from lightning_bergson import GradientStore

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "capture_run.py"
sys.path.insert(0, str(SCRIPT.parent))
import capture_run  # noqa: E402

COMMON = ["--num", "16", "--epochs", "2"]
MODULES = ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.mlp.dense_4h_to_h"]


def run(out: Path, *args: str, processes: int = 1) -> GradientStore:
    """Run the capture script (in a subprocess when it launches several ranks)."""
    argv = ["--out", str(out), *COMMON, *args]
    if processes == 1:
        capture_run.main(argv)
    else:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *argv, "--devices", str(processes)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=out.parent,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return GradientStore.open(out / "grads.zarr")


def rows_by_key(store: GradientStore, id_offset: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """Rows keyed by ``(example id + id_offset, step)``."""
    return {(i + id_offset, s): r for (i, s), r in rows_by_id(store, with_step=True).items()}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> GradientStore:
    """One process, global batch 4: the reference for 2 ranks x batch 2."""
    return run(tmp_path_factory.mktemp("single") / "run", "--batch-size", "4")


@pytest.mark.parametrize("strategy", ["ddp", "bergson_ddp", "bergson_fsdp2"])
def test_two_processes_equal_one(tmp_path, single, strategy):
    extra = ["--no-ids"] if strategy == "bergson_ddp" else []  # the strategy stamps row ids
    store = run(tmp_path / "run", "--batch-size", "2", "--strategy", strategy, *extra, processes=2)
    assert store.complete and store.attrs["world_size"] == 2
    assert sorted(set(store.ranks.tolist())) == [0, 1]
    offset = 100 if extra else 0  # the reference dataset carries ids 100.. in its rows
    assert_rows_match(rows_by_key(store, offset), rows_by_key(single))
    # the optimizer normalizers gathered from sharded state equal the unsharded ones
    name = "normalizers/normalizers.safetensors"
    mine, ref = load_file(store.path / name), load_file(single.path / name)
    assert mine.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("strategy", ["ddp", "bergson_fsdp2"])
def test_ragged_lengths_under_two_processes_equal_the_oracle(tmp_path, strategy):
    """Uneven lengths and masked prompts: each rank's token mean weights its examples by
    1 / (its own supervised tokens), yet every row is the example's own summed-loss gradient
    (lr=0 keeps the parameters; exact rows of two modules; normalizer none)."""
    args = ["--batch-size", "2", "--strategy", strategy, "--ragged", "--lr", "0",
            "--normalizer", "none", "--projection-dim", "0", "--include", *MODULES]  # fmt: skip
    store = run(tmp_path / "run", *args, processes=2)
    assert store.attrs["world_size"] == 2 and sorted(set(store.ranks.tolist())) == [0, 1]
    data = lm_batch(num=16, seq=8, seed=1, prompt=True)  # the script's data
    assert len(set(data["attention_mask"].sum(1).tolist())) > 1  # ragged
    grads = oracle_lm_grads(tiny_gpt_neox(), data, "sum")
    full = torch.cat([module_grad(grads, m).flatten(1) for m in MODULES], dim=1)
    want = {
        (int(i), s): full[int(i) - 100] for i, s in zip(store.example_ids, store.steps, strict=True)
    }
    assert_rows_match(rows_by_id(store, with_step=True), want)
    assert len(want) == 32  # 16 examples x 2 epochs, none missing or doubled


def test_accumulation_one_vs_four(tmp_path, single):
    store = run(tmp_path / "run", "--batch-size", "1", "--accumulate", "4")
    assert_rows_match(rows_by_key(store), rows_by_key(single))


def test_bf16_mixed_rows_near_fp32(tmp_path, single):
    """bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%) in every activation, gradient
    and matmul of the forward and backward pass; the rows (upcast to fp32 before the outer
    product) stay within 5% of the fp32 rows in L2 and at cosine >= 0.998."""
    store = run(tmp_path / "run", "--batch-size", "4", "--precision", "bf16-mixed")
    got, want = rows_by_key(store), rows_by_key(single)
    assert sorted(got) == sorted(want)
    for key, row in want.items():
        assert ((got[key] - row).norm() / row.norm()).item() < 0.05, key
        assert torch.nn.functional.cosine_similarity(got[key], row, dim=0).item() > 0.998, key


def test_float64_rows(tmp_path, single):
    store = run(tmp_path / "run", "--batch-size", "4", "--precision", "64-true")
    assert_rows_match(rows_by_key(store), rows_by_key(single), tol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (GradScaler) needs a GPU")
def test_fp16_mixed_divides_out_the_loss_scale(tmp_path):  # pragma: no cover - GPU only
    ref = run(tmp_path / "ref", "--batch-size", "4", "--accelerator", "gpu")
    store = run(
        tmp_path / "amp", "--batch-size", "4", "--accelerator", "gpu", "--precision", "16-mixed"
    )
    got, want = rows_by_key(store), rows_by_key(ref)
    for key, row in want.items():
        assert ((got[key] - row).norm() / row.norm()).item() < 0.05, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_rows_equal_cpu_rows(tmp_path, single):  # pragma: no cover - GPU only
    """Hooks, projections (generated on CPU) and the writer give the same rows on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = False
    store = run(tmp_path / "gpu", "--batch-size", "4", "--accelerator", "gpu")
    assert_rows_match(rows_by_key(store), rows_by_key(single), tol=1e-4)


def test_strategies_are_registered():
    import lightning.pytorch as L

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in [
            ("bergson", "BergsonSingleDeviceStrategy"),
            ("bergson_ddp", "BergsonDDPStrategy"),
            ("bergson_fsdp2", "BergsonModelParallelStrategy"),
        ]:
            trainer = L.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
            assert type(trainer.strategy).__name__ == cls
