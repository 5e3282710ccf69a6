"""Command line: ``python -m lightning_bergson fit --config configs/quickstart.yaml``.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands: the model is
any LightningModule (``CausalLMModule`` by default), the data any LightningDataModule
(``TextDataModule`` over the embedded biography corpus by default), and callbacks
such as ``GradientCaptureCallback`` are configured under ``trainer.callbacks``.
``--help`` and ``--print_config`` show every option.

Other subcommands (``lds``, ...) are plain functions parsed by jsonargparse; they are listed
in ``SUBCOMMANDS`` (name -> ``"module:function"``, called with the remaining arguments).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.cli import LightningCLI

from .data import TextDataModule
from .models import CausalLMModule

__all__ = ["SUBCOMMANDS", "BergsonCLI", "cli_kwargs", "main"]

SUBCOMMANDS: dict[str, str] = {
    "lds": "lightning_bergson.magic.lds:main",
    "attribute": "lightning_bergson.attribution.commands:attribute_main",
    "score": "lightning_bergson.attribution.commands:score_main",
    "report": "lightning_bergson.attribution.commands:report_main",
    "index": "lightning_bergson.attribution.commands:index_main",
    "verify": "lightning_bergson.store.integrity:verify_main",
}
"""Subcommands outside LightningCLI: name -> ``"module:function"`` taking the remaining argv."""


class BergsonCLI(LightningCLI):
    """LightningCLI with the package's module and data module as defaults."""


def cli_kwargs(args: list[str]) -> dict[str, Any]:
    """The ``BergsonCLI`` arguments of ``main`` (also used to rebuild a run, e.g. for LDS)."""
    return {
        "model_class": L.LightningModule,
        "datamodule_class": L.LightningDataModule,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "args": args,
        "parser_kwargs": {
            "default_env": False,
            "description": "Training-data attribution for PyTorch Lightning.",
        },
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m lightning_bergson`` and the ``lightning-bergson`` script."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in SUBCOMMANDS:
        module, _, function = SUBCOMMANDS[args[0]].partition(":")
        getattr(importlib.import_module(module), function)(args[1:])
        return
    BergsonCLI(**cli_kwargs(args))


# Importing these registers them for class_path resolution by short name.
_ = (CausalLMModule, TextDataModule)
