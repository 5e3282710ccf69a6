"""The ``lds`` command: LDS of score arrays on the same cached retrains of a ``fit`` config.

The math (subsets, predicted losses, Spearman, the table) is in
:mod:`lightning_bergson.scores.lds`; this module rebuilds the run from its config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jsonargparse import CLI
from torch import Tensor

from ..scores import ScoreArray
from ..scores.lds import (
    Retrain,
    format_table,
    linear_datamodeling_score,
    predicted_losses,
    retrain_losses,
    sample_subsets,
)

__all__ = ["lds", "lds_main"]


def _config_retrainer(fit_config: str, overrides: Sequence[str]) -> Retrain:
    """Retrain the ``fit`` configuration (same model, data, trainer) with data weights."""
    from ..magic.module import MagicModule
    from .lightning import run_lightning

    quiet = [
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]

    def retrain(mask: Tensor) -> tuple[np.ndarray, str]:
        cli = run_lightning(["--config", fit_config, *quiet, *overrides], run=False)
        module = cli.model
        if not isinstance(module, MagicModule):
            raise TypeError(
                f"{fit_config} trains a {type(module).__name__}; LDS retrains need "
                "model.class_path: lightning_bergson.MagicModule"
            )
        module.scores_path = None
        module.data_weights = mask.double()
        cli.trainer.fit(module, datamodule=cli.datamodule)
        return module.query_loss(module.default_query_batch()).cpu().numpy(), module.data_order

    return retrain


def lds(
    *,
    scores: list[str] | str,
    fit_config: str,
    num_subsets: int = 32,
    keep_fraction: float = 0.5,
    seed: int = 0,
    retrains: str | None = None,
    output: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, list[float]]:
    """Linear datamodeling score of score arrays on the same retrains of a ``fit`` config.

    Args:
        scores: Score array path(s) (``[Q, N]`` or ``[Q, N, S]``; any method/convention),
            all for the queries of ``fit_config``.
        fit_config: The ``fit`` YAML of a ``MagicModule`` run (its queries are measured).
        num_subsets: ``M``, retrains.
        keep_fraction: Fraction of examples kept per subset.
        seed: Subset sampling seed.
        retrains: Safetensors cache of the retrained losses (reused and extended).
        output: Write ``{path: per-query LDS}`` and the table here as JSON.
        overrides: Extra ``fit`` arguments for the retrains, e.g. ``["--trainer.max_epochs=2"]``.

    Returns:
        Per score path, the per-query LDS.
    """
    paths = [scores] if isinstance(scores, str) else list(scores)
    arrays = [ScoreArray.open(p) for p in paths]
    retrain = _config_retrainer(fit_config, overrides or [])
    orders = {a.metadata.get("data_order", "") for a in arrays} - {""}
    num = max(int(a.example_ids.max()) + 1 for a in arrays)
    masks = sample_subsets(num, num_subsets, keep_fraction, seed)
    key = hashlib.sha256((Path(fit_config).read_text() + repr(overrides)).encode()).hexdigest()
    measured = retrain_losses(retrain, masks, retrains, next(iter(orders), ""), key[:16])
    result, rows = {}, []
    for path, arr in zip(paths, arrays, strict=True):
        if arr.scores.shape[0] != measured.shape[1]:
            raise ValueError(
                f"{path} has {arr.scores.shape[0]} queries but {fit_config} defines "
                f"{measured.shape[1]}; score the same queries"
            )
        pred = predicted_losses(arr.scores, arr.convention, masks, arr.example_ids)
        per_query = linear_datamodeling_score(pred, measured)
        result[path] = per_query.tolist()
        rows.append((arr.method, arr.convention, per_query))
    table = format_table(rows)
    print(f"LDS over {num_subsets} retrains keeping {keep_fraction:.0%} of {num} examples")
    print(table)
    if output is not None:
        Path(output).write_text(json.dumps({"lds": result, "table": table}, indent=1))
    return result


def lds_main(argv: list[str]) -> None:
    """``python -m lightning_bergson lds ...`` (jsonargparse; ``--help`` lists the options)."""
    CLI(lds, args=argv, prog="python -m lightning_bergson lds", exit_on_error=False)
