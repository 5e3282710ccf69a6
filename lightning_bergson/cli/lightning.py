"""``fit``/``validate``/``test``/``predict``: LightningCLI over any LightningModule.

The model is any LightningModule (``CausalLMModule`` by default), the data any
LightningDataModule (``TextDataModule`` over the embedded biography corpus by default), and
callbacks such as ``GradientCaptureCallback`` are configured under ``trainer.callbacks``.
``--help`` and ``--print_config`` show every option.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..data import TextDataModule
from ..models import CausalLMModule
from ..strategy import BergsonStrategyMixin

__all__ = ["BergsonCLI", "cli_kwargs", "run_lightning"]

PROG = "python -m lightning_bergson"
DEFAULT_MODEL = "lightning_bergson.CausalLMModule"
DEFAULT_DATA = "lightning_bergson.TextDataModule"


class BergsonCLI(LightningCLI):
    """LightningCLI with ``CausalLMModule`` and ``TextDataModule`` as default model and data.

    Any other LightningModule or LightningDataModule is chosen by ``class_path``;
    ``fit --print_config`` shows the defaults with every option.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})


def cli_kwargs(args: list[str], *, exit_on_error: bool = True) -> dict[str, Any]:
    """The ``BergsonCLI`` arguments of a run (also used to rebuild a run, e.g. for LDS)."""
    return {
        "model_class": L.LightningModule,
        "datamodule_class": L.LightningDataModule,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "args": args,
        "parser_kwargs": {
            "default_env": False,
            "prog": PROG,
            "exit_on_error": exit_on_error,
            "description": "Training-data attribution for PyTorch Lightning.",
        },
    }


def run_lightning(args: list[str], **kwargs: Any) -> BergsonCLI:
    """Run ``fit``/``validate``/``test``/``predict`` with ``args`` (the whole argv).

    ``args`` is always the argv here, so LightningCLI's warning about passing both ``args``
    and a command line does not apply and is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return BergsonCLI(**cli_kwargs(args, exit_on_error=False), **kwargs)


# Importing these registers them for class_path resolution by short name.
# Importing the strategies registers their names (bergson_ddp, ...) with Lightning.
_ = (CausalLMModule, TextDataModule, BergsonStrategyMixin)
