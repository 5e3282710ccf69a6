"""Capture into ``s3://`` (a local S3 server) equals the same capture into a directory."""

from __future__ import annotations

import pytest
import torch
from captures import assert_same_rows, fit
from safetensors.torch import load, load_file

from lightning_bergson import GradientCaptureCallback, GradientStore
from lightning_bergson.store import verify_store
from lightning_bergson.store.scan import _ObjectArray, _raw_layout


def test_capture_into_s3_equals_local(remote_capture, local_capture):
    store = remote_capture
    assert store.complete and str(store.location).startswith("s3://")
    assert_same_rows(store, local_capture)
    # the normalizers a query needs were saved beside the rows, as locally
    saved = store.aux("normalizers") / "normalizers.safetensors"
    mine, ref = load(saved.read_bytes()), load_file(local_capture.path / "normalizers" / saved.name)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert verify_store(store.location, progress=False).ok
    layout = _raw_layout(store)  # scans fetch whole objects, not the generic fallback
    assert layout is not None and all(isinstance(a, _ObjectArray) for a, _ in layout)


def test_storage_options_reach_the_filesystem(bucket, local_capture, s3_env, monkeypatch):
    """Credentials and endpoint given as storage_options instead of environment variables."""
    options = {
        "endpoint_url": s3_env["AWS_ENDPOINT_URL"],
        "key": s3_env["AWS_ACCESS_KEY_ID"],
        "secret": s3_env["AWS_SECRET_ACCESS_KEY"],
        "skip_instance_cache": True,
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    url = f"{bucket}/opts.zarr"
    fit(url, storage_options=options)
    assert_same_rows(GradientStore.open(url, storage_options=options), local_capture)


def test_storage_options_with_a_local_path_are_refused(tmp_path):
    with pytest.raises(ValueError, match="apply to URLs only"):
        GradientCaptureCallback(tmp_path / "g.zarr", storage_options={"anon": True})


def test_a_cached_listing_is_refused_and_off_by_default(remote_capture):
    """A listing cached before another process wrote a chunk would read that chunk as
    missing (the fill value): stores ask the server every time, and refuse the cache."""
    from lightning_bergson.store.location import Location

    url = str(remote_capture.location)
    with pytest.raises(ValueError, match="use_listings_cache=True is refused"):
        GradientStore.open(url, storage_options={"use_listings_cache": True})
    fs = Location(url).fs
    assert fs.dircache.listings_expiry_time is None and not fs.dircache.use_listings_cache
