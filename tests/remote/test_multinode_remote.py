"""Two "nodes" of one process each (Lightning's multi-node DDP on 127.0.0.1, gloo) capture
into ``s3://`` on the local server: every global rank writes its own group, and the rows
equal a single-process capture of the same global batches.

Each node is a separate ``tests/scripts/capture_run.py`` process started the way a cluster
launcher starts them: ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment, ``--num-nodes 2 --devices 1`` on the command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file

from lightning_bergson import GradientStore
from lightning_bergson.store import IncompleteStoreWarning, verify_store

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "capture_run.py"
COMMON = ["--num", "16", "--epochs", "2", "--chunk-rows", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(out: Path, node: int, port: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE="2", LOCAL_RANK="0")
    argv = ["--out", str(out / f"node{node}"), *COMMON, *args]
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _rows(store: GradientStore) -> dict[tuple[int, int], torch.Tensor]:
    rows = store.read(slice(None))
    pairs = zip(store.example_ids.tolist(), store.steps.tolist(), strict=True)
    return {pair: rows[k] for k, pair in enumerate(pairs)}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> GradientStore:
    """One process, global batch 4 (2 nodes x batch 2): the reference, on local disk."""
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *COMMON, "--batch-size", "4"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return GradientStore.open(out / "grads.zarr")


def test_two_nodes_into_s3_equal_one_process(tmp_path, bucket, single):
    url, port = f"{bucket}/multi/grads.zarr", _free_port()
    args = ["--store", url, "--num-nodes", "2", "--devices", "1", "--batch-size", "2"]
    nodes = [_node(tmp_path, n, port, *args, "--strategy", "ddp") for n in (0, 1)]
    for proc in nodes:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    store = GradientStore.open(url)
    assert store.complete and store.attrs["world_size"] == 2
    assert verify_store(url, progress=False).ok
    assert sorted(set(store.ranks.tolist())) == [0, 1]  # one group per global rank
    assert {"rank_0", "rank_1"} <= set(store.location.children())
    got, want = _rows(store), _rows(single)
    assert sorted(got) == sorted(want)  # every (example, step) once: none lost or doubled
    for key, row in want.items():  # DDP's all-reduced mean differs in the last bits only
        assert ((got[key] - row).norm() / row.norm()).item() <= 1e-5, key
    saved = load((store.aux("normalizers") / "normalizers.safetensors").read_bytes())
    ref = load_file(single.path / "normalizers" / "normalizers.safetensors")
    assert saved.keys() == ref.keys()
    for name, value in ref.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(np.sort(store.example_ids), np.sort(single.example_ids))


def test_a_dead_node_leaves_committed_rows_readable(tmp_path, bucket, single):
    """Node 1 is SIGKILLed mid-epoch (node 0 is then killed too, as a job scheduler would):
    the store is incomplete, intact, and every committed row equals the reference row."""
    url, port = f"{bucket}/dead/grads.zarr", _free_port()
    args = ["--store", url, "--num-nodes", "2", "--devices", "1", "--batch-size", "2"]
    args += ["--strategy", "ddp", "--chunk-rows", "2"]
    alive = _node(tmp_path, 0, port, *args)
    dying = _node(tmp_path, 1, port, *args, "--kill-batch", "6", "--kill-when", "end")
    dying.communicate(timeout=300)
    assert dying.returncode == -signal.SIGKILL
    alive.send_signal(signal.SIGKILL)
    alive.communicate(timeout=60)
    with pytest.warns(IncompleteStoreWarning):
        store = GradientStore.open(url)
    assert not store.complete and verify_store(url, progress=False).ok
    assert 0 < len(store) < len(single) and 1 in store.ranks.tolist()
    got, want = _rows(store), _rows(single)
    assert set(got) <= set(want)
    for key, row in got.items():
        assert ((row - want[key]).norm() / want[key].norm()).item() <= 1e-5, key
