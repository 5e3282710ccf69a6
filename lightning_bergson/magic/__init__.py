"""MAGIC: exact metagradient attribution through checkpointed training (arXiv:2504.16430).

:class:`MagicModule` trains a causal LM with a functional optimizer while keeping what the
reverse pass needs, then :meth:`MagicModule.attribute` returns ``d L_query / d w`` for every
training example (or token). :mod:`.lds` measures the linear datamodeling score of any score
array by retraining on random subsets with the same module.

Layout: the math is pure torch (:mod:`.functional`, :mod:`.step` one training step,
:mod:`.vjp` one reverse step, :mod:`.reverse` the reverse pass, :mod:`.trajectory` what it
replays, :mod:`.distributed` the sums across data-parallel ranks); :mod:`.module` and
:mod:`.forward` are the LightningModule, :mod:`.loop` fits it to Lightning's loop
(accumulation, step counting, strategies) and :mod:`.resume` restores a fit from a
Lightning checkpoint.
"""

from .functional import OptimizerConfig, checkpoint_steps, clip_by_global_norm, weighted_lm_loss
from .module import MagicModule
from .queries import query_batch
from .reverse import ReverseState, metagradients
from .step import FunctionalTrainer, TrainState
from .trajectory import Trajectory

__all__ = [
    "FunctionalTrainer",
    "MagicModule",
    "OptimizerConfig",
    "ReverseState",
    "TrainState",
    "Trajectory",
    "checkpoint_steps",
    "clip_by_global_norm",
    "metagradients",
    "query_batch",
    "weighted_lm_loss",
]
