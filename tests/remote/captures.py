"""Shared by the remote tests: one small capture fit, and a row-for-row comparison."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from oracles import Rows, lm_batch, tiny_gpt_neox

from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore

COLUMNS = ("example_ids", "steps", "epochs", "losses", "finite", "ranks")
QUERY = {"num": 2, "seq": 6, "seed": 7}  # lm_batch arguments of the query batch


def fit(path: Any, **options: Any) -> None:
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
    """Row for row: ids, steps, epochs, losses, flags, ranks and gradients bit for bit."""
    assert len(store) == len(ref) > 0
    for column in COLUMNS:
        np.testing.assert_array_equal(getattr(store, column), getattr(ref, column))
    np.testing.assert_array_equal(store.read(slice(None)).numpy(), ref.read(slice(None)).numpy())
