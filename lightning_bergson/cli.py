"""Command line: ``python -m lightning_bergson fit --config configs/quickstart.yaml``.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands: the model is
any LightningModule (``CausalLMModule`` by default), the data any LightningDataModule
(``TextDataModule`` over the embedded biography corpus by default), and callbacks
such as ``GradientCaptureCallback`` are configured under ``trainer.callbacks``.
``--help`` and ``--print_config`` show every option.
"""

from __future__ import annotations

import sys

import lightning.pytorch as L
from lightning.pytorch.cli import LightningCLI

from .data import TextDataModule
from .models import CausalLMModule

__all__ = ["BergsonCLI", "main"]


class BergsonCLI(LightningCLI):
    """LightningCLI with the package's module and data module as defaults."""


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m lightning_bergson`` and the ``lightning-bergson`` script."""
    BergsonCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args if args is not None else sys.argv[1:],
        parser_kwargs={
            "default_env": False,
            "description": "Training-data attribution for PyTorch Lightning.",
        },
    )


# Importing these registers them for class_path resolution by short name.
_ = (CausalLMModule, TextDataModule)
