"""Capture into ``s3://`` (a local S3 server) equals the same capture into a directory."""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from oracles import Rows, lm_batch, tiny_gpt_neox

from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore
from lightning_bergson.store import verify_store
from lightning_bergson.store.scan import _ObjectArray, _raw_layout

COLUMNS = ("example_ids", "steps", "epochs", "losses", "finite", "ranks")


def fit(path, **options) -> None:
    """Two epochs of a tiny GPT-NeoX with Adafactor-normalized capture into ``path``."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Rows(lm_batch(num=10, seq=6)), batch_size=3)
    cb = GradientCaptureCallback(
        path, projection_dim=4, normalizer="adafactor", dtype="float32", chunk_rows=4, **options
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(CausalLMModule(tiny_gpt_neox(), lr=1e-2), loader)


def assert_same_rows(store: GradientStore, ref: GradientStore) -> None:
    """Row for row: ids, steps, epochs, losses, flags and gradients bit for bit."""
    assert len(store) == len(ref) > 0
    for column in COLUMNS:
        np.testing.assert_array_equal(getattr(store, column), getattr(ref, column))
    np.testing.assert_array_equal(store.read(slice(None)).numpy(), ref.read(slice(None)).numpy())


@pytest.fixture(scope="module")
def local_capture(tmp_path_factory) -> GradientStore:
    path = tmp_path_factory.mktemp("local") / "grads.zarr"
    fit(path)
    return GradientStore.open(path)


def test_capture_into_s3_equals_local(bucket, local_capture):
    url = f"{bucket}/run/grads.zarr"
    fit(url)
    store = GradientStore.open(url)
    assert store.complete and str(store.location) == url
    assert_same_rows(store, local_capture)
    # the normalizers a query needs were saved beside the rows, as locally
    saved = store.aux("normalizers") / "normalizers.safetensors"
    assert saved.read_bytes() == (local_capture.path / saved.parent.name / saved.name).read_bytes()
    assert verify_store(url, progress=False).ok
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
