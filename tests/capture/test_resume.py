"""Crashes and faults: SIGKILL + resume gives the uninterrupted store; disk errors are loud."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import lm_batch, tiny_gpt_neox
from recipes import fit_with_capture

import lightning_bergson.store.writer as writer_mod
from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore
from lightning_bergson.store import GradientStoreWriteError, IncompleteStoreWarning, verify_store

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "capture_run.py"
# 16 examples, micro-batches of 2, 2 per optimizer step: 4 steps per epoch, 2 epochs.
ARGS = [
    "--num",
    "16",
    "--batch-size",
    "2",
    "--accumulate",
    "2",
    "--epochs",
    "2",
    "--strategy",
    "bergson",
]


def script(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> GradientStore:
    out = tmp_path_factory.mktemp("full")
    assert script(out).returncode == 0
    return GradientStore.open(out / "grads.zarr")


@pytest.mark.parametrize(
    ("kill_batch", "when", "ckpt_every", "chunk"),
    [
        (6, "end", 1, []),  # mid-epoch, mid accumulation window, rows waiting for their step
        (11, "backward", 2, []),  # inside a backward of epoch 1; last checkpoint at epoch end
        # chunks of 2 rows: step 2's rows are committed after the checkpoint of step 1, so
        # the store holds more rows than the checkpoint says; the resume must drop them
        # (--kill-drain: the background writer commits them before the kill, not by luck)
        (6, "end", 2, ["--chunk-rows", "2", "--kill-drain"]),
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(
    tmp_path, uninterrupted, kill_batch, when, ckpt_every, chunk
):
    common = ["--ckpt-every", str(ckpt_every), *chunk]
    killed = script(tmp_path, *common, "--kill-batch", str(kill_batch), "--kill-when", when)
    assert killed.returncode == -signal.SIGKILL
    with pytest.warns(IncompleteStoreWarning):
        partial = GradientStore.open(tmp_path / "grads.zarr")
    assert not partial.complete and len(partial) < len(uninterrupted)

    if chunk:  # the case this parameter is for: committed rows beyond the checkpoint
        assert len(partial) > 8  # the checkpoint of step 1 holds 2 steps x 4 rows
    resumed = script(tmp_path, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store = GradientStore.open(tmp_path / "grads.zarr")
    assert store.complete
    for column in ("example_ids", "steps", "epochs", "losses", "finite"):
        np.testing.assert_array_equal(getattr(store, column), getattr(uninterrupted, column))
    torch.testing.assert_close(
        store.read(slice(None)), uninterrupted.read(slice(None)), rtol=1e-6, atol=1e-9
    )


def _resume_equals(tmp_path: Path, uninterrupted: GradientStore, *extra: str) -> None:
    # Killed before the first checkpoint: the only way on is a fresh run over the store.
    resume = ["--resume"] if (tmp_path / "ckpt" / "last.ckpt").exists() else []
    resumed = script(tmp_path, *resume, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store = GradientStore.open(tmp_path / "grads.zarr")
    assert store.complete and verify_store(tmp_path / "grads.zarr", progress=False).ok
    for column in ("example_ids", "steps", "epochs", "losses", "finite"):
        np.testing.assert_array_equal(getattr(store, column), getattr(uninterrupted, column))
    torch.testing.assert_close(
        store.read(slice(None)), uninterrupted.read(slice(None)), rtol=1e-6, atol=1e-9
    )


FAULT_SEEDS = [int(s) for s in os.environ.get("LB_FAULT_SEEDS", "").split(",") if s]


def _faults(seeds: list[int]) -> list[tuple[int, str, list[str]]]:
    """Seeded kill moments: a batch end, a backward, a chunk write (torn), or close."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        kind = ["end", "backward", "write", "close"][seed % 4]
        if kind == "write":
            extra = ["--kill-write", str(int(rng.integers(0, 15)))]
        elif kind == "close":
            extra = ["--kill-close"]
        else:
            extra = ["--kill-batch", str(int(rng.integers(0, 16))), "--kill-when", kind]
        out.append((seed, kind, extra))
    return out


@pytest.fixture(scope="module")
def uninterrupted_chunked(tmp_path_factory) -> GradientStore:
    out = tmp_path_factory.mktemp("full_chunked")
    assert script(out, "--chunk-rows", "2").returncode == 0
    return GradientStore.open(out / "grads.zarr")


def _run_fault(tmp_path, uninterrupted_chunked, seed, kind, extra):
    print(f"fault seed {seed}: {kind} {extra} (replay: LB_FAULT_SEEDS={seed})")
    common = ["--ckpt-every", "1", "--chunk-rows", "2"]
    killed = script(tmp_path, *common, *extra)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    with pytest.warns(IncompleteStoreWarning):
        partial = GradientStore.open(tmp_path / "grads.zarr")
    assert len(partial) <= len(uninterrupted_chunked)
    assert verify_store(tmp_path / "grads.zarr", progress=False).ok  # committed rows intact
    _resume_equals(tmp_path, uninterrupted_chunked, *common)


@pytest.mark.parametrize(("seed", "kind", "extra"), _faults(FAULT_SEEDS or [1, 2, 3]))
def test_fault_then_resume_equals_uninterrupted(tmp_path, uninterrupted_chunked, seed, kind, extra):
    """Killed at a seeded moment (a torn chunk write and close included), then resumed."""
    _run_fault(tmp_path, uninterrupted_chunked, seed, kind, extra)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LB_FAULT_LONG"), reason="set LB_FAULT_LONG=1 (about 8 min)")
@pytest.mark.parametrize(("seed", "kind", "extra"), _faults(list(range(100, 120))))
def test_fault_suite_long(tmp_path, uninterrupted_chunked, seed, kind, extra):
    """The long variant: 20 seeded moments.

    ``LB_FAULT_LONG=1 python -m pytest tests/capture/test_resume.py``
    """
    _run_fault(tmp_path, uninterrupted_chunked, seed, kind, extra)


def _fit(tmp_path: Path, callback: GradientCaptureCallback, steps: int = 4) -> None:
    data = lm_batch(num=8, seq=6)
    fit_with_capture(CausalLMModule(tiny_gpt_neox(), lr=0.0), data, callback, batch_size=2,
                     max_steps=steps)  # fmt: skip


def test_full_disk_fails_the_fit_and_keeps_committed_rows(tmp_path, monkeypatch):
    real, calls = writer_mod._write_block, []

    def fail_on_third_chunk(arrays, start, rows):
        calls.append(start)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(arrays, start, rows)

    monkeypatch.setattr(writer_mod, "_write_block", fail_on_third_chunk)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2, chunk_rows=2)
    with pytest.raises(GradientStoreWriteError, match=r"No space left.*Free disk space"):
        _fit(tmp_path, cb)
    with pytest.warns(IncompleteStoreWarning):
        store = GradientStore.open(tmp_path / "g.zarr")
    assert len(store) == 4  # the two chunks written before the failure, no hole, no garbage
    assert store.example_ids.tolist() == [100, 101, 102, 103]


def test_unwritable_path_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cb = GradientCaptureCallback(tmp_path / "file" / "g.zarr", projection_dim=2)
    with pytest.raises(GradientStoreWriteError, match="Choose a writable path"):
        _fit(tmp_path, cb)


def test_resume_with_another_world_size_is_refused(tmp_path):
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2)
    cb.load_state_dict({"path": str(tmp_path / "g.zarr"), "committed_rows": {"0": 4, "1": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="written by 2 ranks but this run has world size 1"):
            _fit(tmp_path, cb)


def test_resume_with_other_capture_settings_is_refused(tmp_path):
    _fit(tmp_path, GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2))
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=4)
    cb.load_state_dict({"path": str(tmp_path / "g.zarr"), "committed_rows": {"0": 4}})
    mismatch = r"capture settings differ.*projection_dim: 2 != 4, stored != this run"
    with pytest.raises(ValueError, match=mismatch):
        _fit(tmp_path, cb)
    assert len(GradientStore.open(tmp_path / "g.zarr")) == 8  # untouched
