"""Damaged or missing chunk objects of a store on the S3 server are refused like local ones:
by ``GradientStore`` (columns at open, gradients at read), by the scan behind ``Attributor``
and ``score``, and by ``verify`` (the API and the command); ``verify --truncate`` keeps the
rows before the damage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_bergson.cli.verify import verify_main
from lightning_bergson.store import (
    GradientStore,
    GradientStoreWriter,
    StoreIntegrityError,
    StoreScanner,
    layout_blocks,
    verify_store,
)
from lightning_bergson.store.location import Location

BLOCKS = layout_blocks([("a", (2, 3), "a", None), ("b", (1, 4), "b", None)])
ROWS, CHUNK = 27, 8  # chunks 0..3, the last one partial


def write(url: str) -> np.ndarray:
    grads = torch.randn(ROWS, 10, generator=torch.Generator().manual_seed(0))
    with GradientStoreWriter(url, modules=BLOCKS, dtype="float32", chunk_rows=CHUNK) as w:
        for start in range(0, ROWS, 5):
            stop = min(start + 5, ROWS)
            w.append(grads[start:stop], example_id=range(start, stop), step=start, epoch=0)
    return grads.numpy()


def damage(url: str, array: str, chunk: int, how: str) -> None:
    """Delete, overwrite a byte of, or cut one chunk object, as a faulty copy would."""
    key = Location(url) / "rank_0" / array / "c" / str(chunk)
    key = key / "0" if array == "gradients" else key
    data = key.read_bytes()
    if how == "deleted":
        key.fs.rm(key.key)
    elif how == "overwritten":
        key.write_bytes(data[:5] + bytes([data[5] ^ 0xFF]) + data[6:])
    else:  # cut
        key.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["deleted", "overwritten", "cut"])
def test_damaged_gradient_chunk_is_refused(bucket, how):
    url = f"{bucket}/run.zarr"
    grads = write(url)
    store = GradientStore.open(url)  # opened before the damage: reads must still see it
    damage(url, "gradients", 1, how)
    rows = "rows 8-15 of rank 0"
    with pytest.raises(StoreIntegrityError, match=f"rank_0/gradients chunk 1 \\({rows}"):
        store.read(slice(None))
    with pytest.raises(StoreIntegrityError, match="chunk 1"):
        for _ in StoreScanner(GradientStore.open(url), chunk_rows=5):
            pass
    # rows in other chunks stay readable, and equal what was written
    np.testing.assert_array_equal(store.read(slice(16, 27)).numpy(), grads[16:27])
    report = verify_store(url, progress=False)
    assert not report.ok and report.damaged_ranges() == {0: [(8, 16)]}


def test_missing_column_chunk_is_refused_at_open(bucket):
    url = f"{bucket}/run.zarr"
    write(url)
    damage(url, "example_id", 2, "deleted")
    with pytest.raises(StoreIntegrityError, match=r"rank_0/example_id chunk 2 .* is missing"):
        GradientStore.open(url)


def test_verify_command_on_s3(bucket, s3_env, capsys):
    url = f"{bucket}/run.zarr"
    grads = write(url)
    options = json.dumps({"endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    verify_main([url, "--no-progress", "--storage_options", options])
    assert "no damage found" in capsys.readouterr().out
    damage(url, "gradients", 2, "overwritten")
    with pytest.raises(SystemExit) as exit_:
        verify_main([url, "--no-progress"])
    assert exit_.value.code == 1 and "rank 0: damaged rows 16-23" in capsys.readouterr().out
    verify_main([url, "--no-progress", "--truncate"])
    assert "the store now verifies" in capsys.readouterr().out
    store = GradientStore.open(url)
    assert store.complete and len(store) == 16
    np.testing.assert_array_equal(store.read(slice(None)).numpy(), grads[:16])


def test_verify_refuses_bad_storage_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        verify_main(["s3://bucket/run.zarr", "--storage_options", "[1]"])
    assert exit_.value.code == 2 and "is not a JSON object" in capsys.readouterr().err
