"""SIGKILL during a capture into ``s3://`` (the local server), then resume from the last
Lightning checkpoint: the store ends with exactly the rows of an uninterrupted run.

The capture runs in a subprocess (``tests/scripts/capture_run.py``, the local fault
machinery of ``tests/capture/test_resume.py``) that inherits the server's AWS environment
variables; checkpoints stay on local disk, the store is on the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_bergson import GradientStore
from lightning_bergson.store import IncompleteStoreWarning, verify_store

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "capture_run.py"
# 16 examples, micro-batches of 2, 2 per optimizer step, 2 epochs; chunks of 2 rows
ARGS = ["--num", "16", "--batch-size", "2", "--accumulate", "2", "--epochs", "2"]
ARGS += ["--strategy", "bergson", "--chunk-rows", "2", "--ckpt-every", "1"]


def script(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> GradientStore:
    out = tmp_path_factory.mktemp("full")
    done = script(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return GradientStore.open(out / "grads.zarr")


@pytest.mark.parametrize(
    "fault",
    [
        ["--kill-batch", "6", "--kill-when", "end"],  # mid-epoch, rows waiting for their step
        ["--kill-write", "3"],  # inside a chunk write: gradients PUT, columns and count not
    ],
    ids=["batch-end", "torn-write"],
)
def test_sigkill_then_resume_on_s3_equals_uninterrupted(tmp_path, bucket, uninterrupted, fault):
    url = f"{bucket}/grads.zarr"
    killed = script(tmp_path, "--store", url, *fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    with pytest.warns(IncompleteStoreWarning):
        partial = GradientStore.open(url)
    assert not partial.complete and len(partial) < len(uninterrupted)
    assert verify_store(url, progress=False).ok  # the committed rows are intact
    resumed = script(tmp_path, "--store", url, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store = GradientStore.open(url)
    assert store.complete and verify_store(url, progress=False).ok
    for column in ("example_ids", "steps", "epochs", "losses", "finite"):
        np.testing.assert_array_equal(getattr(store, column), getattr(uninterrupted, column))
    np.testing.assert_array_equal(
        store.read(slice(None)).numpy(), uninterrupted.read(slice(None)).numpy()
    )
