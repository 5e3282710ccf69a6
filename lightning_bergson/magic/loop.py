"""How :class:`~lightning_bergson.MagicModule` fits Lightning's training loop.

MAGIC optimizes manually (the functional step is its optimizer), which leaves three gaps
this module closes:

* **Gradient accumulation.** Lightning refuses ``Trainer(accumulate_grad_batches=k)`` under
  manual optimization. MAGIC accumulates itself: it collects a step's micro-batches and
  runs one functional step on all of them at the step's last micro-batch, at the same
  boundaries as Lightning's automatic optimization (every ``k`` batches and at the last
  batch of an epoch, which may leave a shorter step). :func:`hide_accumulation` hides
  ``k`` from Lightning's configuration check and :func:`restore_accumulation` puts it back
  right after, so the rest of Lightning (``estimated_stepping_batches``, logging steps)
  sees the real value.
* **Step counting.** Lightning counts ``trainer.global_step`` in manual optimization by
  optimizer steps; :class:`StepCounter` is an optimizer that changes nothing and is stepped
  once per MAGIC step, so ``global_step``, ``max_steps`` and
  ``ModelCheckpoint(every_n_train_steps=...)`` count MAGIC steps.
* **Strategies.** :func:`check_strategy` admits one device and DDP launched as processes
  (``strategy="ddp"``/``"bergson_ddp"``, ``torchrun``); sharded or spawned strategies are
  refused with the fix. :func:`check_precision` refuses fp16 loss scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy

__all__ = [
    "StepCounter",
    "check_precision",
    "check_strategy",
    "ends_step",
    "hide_accumulation",
    "restore_accumulation",
]

_HIDDEN = "_magic_accumulate_grad_batches"


class StepCounter(torch.optim.Optimizer):
    """An optimizer that updates nothing; stepping it advances ``trainer.global_step``.

    Example:
        >>> opt = StepCounter()
        >>> opt.step(lambda: 1.0), opt.param_groups[0]["lr"]
        (1.0, 0.0)
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": 0.0})

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Call ``closure`` (Lightning's, which does nothing in manual optimization)."""
        return closure() if closure is not None else None


def hide_accumulation(trainer: L.Trainer) -> None:
    """Set ``trainer.accumulate_grad_batches`` to 1 until :func:`restore_accumulation`.

    Called before Lightning validates the loop configuration (from
    ``configure_callbacks``), during ``fit`` only.
    """
    k = trainer.accumulate_grad_batches
    if trainer.state.fn == "fit" and k != 1 and not hasattr(trainer, _HIDDEN):
        setattr(trainer, _HIDDEN, k)
        trainer.accumulate_grad_batches = 1


def restore_accumulation(trainer: L.Trainer) -> None:
    """Undo :func:`hide_accumulation` (from ``setup``, after Lightning's check)."""
    if hasattr(trainer, _HIDDEN):
        trainer.accumulate_grad_batches = getattr(trainer, _HIDDEN)
        delattr(trainer, _HIDDEN)


def ends_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether batch ``batch_idx`` of the epoch is the last micro-batch of an optimizer step.

    The rule of Lightning's automatic optimization: every ``accumulate_grad_batches``
    batches, and at the epoch's last batch.
    """
    if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
        return True
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or batch_idx + 1 == trainer.num_training_batches


def check_strategy(strategy: Strategy, world_size: int) -> None:
    """Raise unless MAGIC supports ``strategy``: one device, or DDP as separate processes."""
    name = type(strategy).__name__
    if isinstance(strategy, SingleDeviceStrategy) and world_size == 1:
        return
    if isinstance(strategy, DDPStrategy):
        start = getattr(strategy, "_start_method", "popen")
        if start == "popen":
            return
        raise RuntimeError(
            f"MagicModule does not support DDP with start_method={start!r} ({name}): the "
            "trajectory and scores would stay in the worker processes. Use "
            "Trainer(strategy='ddp') (processes launched as scripts, or torchrun)"
        )
    raise RuntimeError(
        f"MagicModule supports one device or data parallel DDP; got {name} with world_size="
        f"{world_size}. Use Trainer(strategy='ddp') (or 'bergson_ddp') for several devices: "
        "MAGIC keeps whole parameters and optimizer state on every rank, so sharded "
        "strategies (FSDP, ModelParallelStrategy, DeepSpeed) are not supported"
    )


def check_precision(plugin: Precision) -> None:
    """Raise for fp16 mixed precision: MAGIC applies no loss scaling (``GradScaler``)."""
    if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise RuntimeError(
            f"MagicModule does not support precision={plugin.precision!r}: it differentiates "
            "each training step twice without fp16 loss scaling (GradScaler). Use "
            "precision='64-true' or '32-true' (float64 for exact metagradients)"
        )
