"""``score_with_lightning``: scoring as a Lightning predict loop over whole score chunks.

A store on the local S3 server is scored into a score array on the server by 1 and by 2
processes (Lightning DDP, gloo): the arrays are equal bit for bit, both equal the explicit
``queries @ rows.T`` of the stored rows, and the top-k merged across ranks equals
``torch.topk`` of that full matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_bergson import Attributor, GradientStore
from lightning_bergson.attribution.score_loop import score_with_lightning
from lightning_bergson.scores import ScoreArray
from lightning_bergson.store import GradientStoreWriter, StoreScanner, layout_blocks

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "score_run.py"
ROWS = 30


def _store(url: str) -> GradientStore:
    """30 random rows in two blocks, chunks of 4 rows, steps and ids of a 2-epoch run."""
    gen = torch.Generator().manual_seed(0)
    blocks = layout_blocks([("a", (2, 3), "a", None), ("b", (1, 4), "b", None)])
    meta = {"projection": {"dim": 0, "seed": 0}}  # rows as they are: queries need no model
    with GradientStoreWriter(
        url, modules=blocks, metadata=meta, dtype="float32", chunk_rows=4
    ) as w:
        for step in range(6):
            rows = torch.randn(5, 10, generator=gen)
            ids = [(5 * step + i) % 15 for i in range(5)]
            w.append(rows, example_id=ids, step=step, epoch=step // 3)
    return GradientStore.open(url)


def _queries(dim: int) -> torch.Tensor:
    return torch.randn(3, dim, generator=torch.Generator().manual_seed(5))  # as score_run.py


def _run(store: str, out: str, top: Path, devices: int) -> dict:
    argv = ["--store", store, "--out", out, "--top", str(top), "--devices", str(devices)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=top.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(top.read_text())


def test_two_processes_equal_one_and_the_explicit_scores(bucket, tmp_path):
    store = _store(f"{bucket}/grads.zarr")
    want = _queries(store.dim) @ store.read(slice(None)).T  # (3, 30): the oracle
    one = _run(str(store.location), f"{bucket}/one.zarr", tmp_path / "one.json", 1)
    two = _run(str(store.location), f"{bucket}/two.zarr", tmp_path / "two.json", 2)
    a, b = ScoreArray.open(f"{bucket}/one.zarr"), ScoreArray.open(f"{bucket}/two.zarr")
    np.testing.assert_array_equal(b.scores, a.scores)  # exactly, not approximately
    np.testing.assert_allclose(a.scores, want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b.example_ids, store.example_ids)
    assert (one.pop("world"), two.pop("world")) == (1, 2)
    assert one == two  # the top-k merged across ranks
    vals, rows = want.topk(5, dim=1)
    assert two["rows"] == rows.tolist()
    np.testing.assert_allclose(two["scores"], vals.numpy(), rtol=1e-5, atol=1e-5)
    assert two["ids"] == store.example_ids[rows.numpy()].tolist()


def test_one_process_in_place(tmp_path):
    """The default one-process trainer, cosine scores, query_reduce, refusals."""
    store = _store(str(tmp_path / "g.zarr"))
    attr = Attributor(store.path, unit_norm=True, chunk_rows=4)
    q = _queries(store.dim)
    got = score_with_lightning(attr, q, tmp_path / "s.zarr", query_reduce="max", chunk_cols=8)
    rows = store.read(slice(None))
    cos = (q / q.norm(dim=1, keepdim=True)) @ (rows / rows.norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(
        ScoreArray.open(got.path).scores, cos.amax(dim=0, keepdim=True).numpy(), atol=1e-5
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        score_with_lightning(attr, q, tmp_path / "s.zarr")
    by_example = Attributor(store.path, example_reduce="sum")
    with pytest.raises(ValueError, match="example_reduce='none'"):
        score_with_lightning(by_example, q, tmp_path / "t.zarr")


@pytest.mark.parametrize("modules", [None, ["b"]], ids=["raw", "columns"])
def test_scanner_streams_one_share_of_the_rows(tmp_path, modules):
    """A rank's share ``span=(begin, end)``: exactly those rows, chunk starts in store rows."""
    store = _store(str(tmp_path / "g.zarr"))
    scan = StoreScanner(store, chunk_rows=3, span=(5, 17), modules=modules)
    chunks = [c._replace(rows=c.rows.clone()) for c in scan]  # rows are reused buffers
    assert [c.start for c in chunks] == [5, 8, 11, 14] and len(scan) == 4
    got = torch.cat([c.rows for c in chunks])
    cols = slice(None) if modules is None else torch.from_numpy(store.columns(modules))
    torch.testing.assert_close(got, store.read(slice(5, 17))[:, cols], rtol=0, atol=0)
    np.testing.assert_array_equal(np.concatenate([c.example_ids for c in chunks]),
                                  store.example_ids[5:17])  # fmt: skip
    with pytest.raises(ValueError, match="not within the store's 30 committed rows"):
        StoreScanner(store, span=(20, 31))
