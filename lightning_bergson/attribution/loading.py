"""Load a trained model (and the data it was trained on) for attribution commands.

A model source is one of:

* a Lightning checkpoint (``*.ckpt``) of a LightningModule such as ``CausalLMModule``, or a
  directory holding checkpoints (the newest ``**/*.ckpt`` is used). The checkpoint is read
  with ``torch.load(weights_only=True)``: tensors and plain containers only, no code. The
  data module's hyperparameters saved in it rebuild the tokenizer and the training texts;
* a ``save_pretrained`` directory (with ``config.json``) or a Hugging Face model name.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from ..data import TextDataModule
from ..models import check_model_source

__all__ = ["find_checkpoint", "is_pretrained_source", "load_model", "load_text_data"]


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a file, else the most recently written ``*.ckpt`` below it."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no Lightning checkpoint (*.ckpt) at {path}; pass a checkpoint file, a directory "
            "containing one (e.g. the run's default_root_dir), or a save_pretrained directory"
        )
    return found[-1]


def is_pretrained_source(source: str | Path) -> bool:
    """A ``save_pretrained`` directory or a Hub name (not a Lightning checkpoint)."""
    path = Path(source)
    return (path.is_dir() and (path / "config.json").is_file()) or not path.exists()


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _public(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_model(
    source: str | Path, *, dtype: str = "float32"
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The trained model and, for checkpoints, the data module's saved hyperparameters.

    Args:
        source: A checkpoint, a directory holding checkpoints, a ``save_pretrained``
            directory or a Hugging Face model name.
        dtype: Parameter dtype (``"float32"``, ``"bfloat16"``, ...), or ``"auto"`` to keep
            the saved one.

    Returns:
        ``(LightningModule or Hugging Face model in eval mode, data hparams or None)``.
    """
    path = Path(source)
    check_model_source(source)
    if is_pretrained_source(source):
        from transformers import AutoModelForCausalLM

        kind = dtype if dtype == "auto" else getattr(torch, dtype)
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=kind).eval(), None
    ckpt_path = find_checkpoint(path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    cls = _import(hparams.get("_class_path", "lightning_bergson.CausalLMModule"))
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise TypeError(f"{ckpt_path}: {cls} is not a LightningModule")
    module = cls(**_public(hparams))
    module.load_state_dict(ckpt["state_dict"])
    if dtype != "auto":
        module = module.to(getattr(torch, dtype))
    data = ckpt.get("datamodule_hyper_parameters")
    return module.eval(), dict(data) if data else None


def load_text_data(hparams: dict[str, Any] | None) -> TextDataModule | None:
    """The :class:`TextDataModule` described by saved hyperparameters (None if another class)."""
    if not hparams:
        return None
    class_path = hparams.get("_class_path", "lightning_bergson.TextDataModule")
    if class_path.rsplit(".", 1)[-1] != "TextDataModule":
        return None
    return TextDataModule(**_public(hparams))
