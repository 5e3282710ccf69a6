"""Former home of the LDS math, now :mod:`lightning_bergson.scores.lds` (any method's scores).

Kept so that ``from lightning_bergson.magic.lds import ...`` goes on working.
"""

from ..scores.lds import (
    Retrain,
    format_table,
    linear_datamodeling_score,
    predicted_losses,
    rank,
    retrain_losses,
    sample_subsets,
    spearman,
)

__all__ = [
    "Retrain",
    "format_table",
    "linear_datamodeling_score",
    "predicted_losses",
    "rank",
    "retrain_losses",
    "sample_subsets",
    "spearman",
]
