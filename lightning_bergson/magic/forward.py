"""The forward fit of :class:`~lightning_bergson.MagicModule`: Lightning's training hooks.

:class:`ForwardFit` trains with the functional step (manual optimization) and records the
trajectory the reverse pass replays. It wires Lightning's loop to the pure pieces:

* every ``training_step`` collects a micro-batch; at the step's last one
  (:func:`~.loop.ends_step`) it takes one functional step on all of them, with the step's
  supervised tokens summed over ranks (gradient accumulation and DDP, :mod:`.loop`,
  :mod:`.distributed`);
* ``on_save_checkpoint``/``on_load_checkpoint``/``on_train_start`` save and restore the
  fit's place in the trajectory (:mod:`.resume`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from . import loop, resume
from .distributed import DataParallel
from .functional import Granularity, batch_weights, step_tokens
from .step import FunctionalTrainer, TrainState
from .trajectory import BATCH_KEYS, Trajectory

__all__ = ["ForwardFit", "force_eager_attention"]

_ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
_FUSED = ("sdpa", "flash", "flex", "paged")


def force_eager_attention(model: nn.Module) -> None:
    """Switch fused attention kernels (not twice differentiable) to ``"eager"``, with a warning."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or ""
    if any(name in impl for name in _FUSED):
        warnings.warn(
            f"attn_implementation={impl!r} is not twice differentiable; MAGIC switches the model"
            " to 'eager' (load it with attn_implementation='eager' to silence this)",
            stacklevel=3,
        )
        model.set_attn_implementation("eager")  # type: ignore[operator]


def _has_dropout(model: nn.Module) -> bool:
    """Whether an ``nn.Dropout`` or the attention dropout of the model's config is positive."""
    config = getattr(model, "config", None)
    probs = [getattr(config, key, 0.0) or 0.0 for key in _ATTENTION_DROPOUT]
    probs += [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    return any(p > 0 for p in probs)


class ForwardFit(L.LightningModule):
    """Training hooks of :class:`~lightning_bergson.MagicModule` (which sets the attributes)."""

    model: nn.Module | None
    num_examples: int | None
    granularity: Granularity
    trajectory: Trajectory | None
    _state: TrainState | None
    _pending: list[dict[str, Tensor]]  # micro-batches of the step in progress
    _resume_record: dict[str, Any] | None

    @property
    def step_fn(self) -> FunctionalTrainer:  # pragma: no cover - MagicModule's
        raise NotImplementedError

    @property
    def data_weights(self) -> Tensor | None:  # pragma: no cover - MagicModule's
        raise NotImplementedError

    @override
    def configure_callbacks(self) -> list:
        """No callbacks; hides ``accumulate_grad_batches`` from Lightning's manual-optimization
        check (MAGIC accumulates itself, see :mod:`.loop`)."""
        loop.hide_accumulation(self.trainer)
        return []

    @override
    def setup(self, stage: str) -> None:
        loop.restore_accumulation(self.trainer)
        if stage == "fit":
            loop.check_strategy(self.trainer.strategy, self.trainer.world_size)
            loop.check_precision(self.trainer.precision_plugin)

    @override
    def teardown(self, stage: str) -> None:
        loop.restore_accumulation(self.trainer)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """A :class:`~.loop.StepCounter`: the functional optimizer lives in :attr:`step_fn`."""
        return loop.StepCounter()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trajectory is not None:
            checkpoint[resume.RECORD_KEY] = resume.checkpoint_record(
                self.trajectory,
                len(self._pending),
                self.trainer.world_size,
                self.hparams.checkpoint_dir,
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_record = checkpoint.get(resume.RECORD_KEY, {})  # {}: none (checked at fit)

    @override
    def on_train_start(self) -> None:
        self.step_fn.group = DataParallel.current()
        record, self._resume_record = self._resume_record, None
        if record == {}:
            raise ValueError(
                "the checkpoint given to fit holds no MAGIC record (saved by another module or "
                "before MagicModule trained); start a new fit without ckpt_path"
            )
        if record is not None and (record["steps"] > 0 or record["pending_micro_batches"]):
            self._resume(record)
        elif self.trajectory is not None and record is None:
            raise RuntimeError(
                "this MagicModule already trained once; its trajectory is what attribute() "
                "differentiates. Build a new MagicModule for another run (or resume this one "
                "with Trainer.fit(..., ckpt_path=...))"
            )
        else:
            self._start()

    def _start(self) -> None:
        """A new trajectory from the network's current weights."""
        steps = self.trainer.estimated_stepping_batches
        steps = int(steps) if steps != float("inf") else 1024
        self.trajectory = Trajectory(
            steps, self.hparams.checkpoint_schedule, self._trajectory_dir()
        )
        self._state = self.step_fn.init_state(torch.get_rng_state())
        if self.device.type != "cpu" and _has_dropout(self.step_fn.model):
            warnings.warn(
                "MAGIC replays the CPU RNG only; dropout on an accelerator is not replayed exactly."
                " Set the model's dropout probabilities to 0 for exact metagradients",
                stacklevel=3,
            )

    def _resume(self, record: dict[str, Any]) -> None:
        """The trajectory and training state at the checkpoint (see :mod:`.resume`)."""
        self.trajectory, self._state = resume.restore(
            record,
            trajectory=self.trajectory,
            directory=self._trajectory_dir(),
            step_fn=self.step_fn,
            network=self.model,  # type: ignore[arg-type]
            world_size=self.trainer.world_size,
            data_weights=self.data_weights,
        )
        self._pending = []

    def _trajectory_dir(self) -> Path | None:
        """This rank's trajectory directory (``None``: in memory)."""
        if self.hparams.checkpoint_dir is None:
            return None
        root = Path(self.hparams.checkpoint_dir)
        world = self.trainer.world_size
        return root if world == 1 else root / f"rank_{self.trainer.global_rank}"

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """Collect the micro-batch; at the step's last one, take the MAGIC step on all."""
        self._check_batch(batch)
        self._pending.append({k: batch[k].clone() for k in BATCH_KEYS if k in batch})
        if not loop.ends_step(self.trainer, batch_idx):
            return None
        batches, self._pending = self._pending, []
        loss = self._take_step(batches)
        self.optimizers().step()  # type: ignore[union-attr]  # counts trainer.global_step
        size = sum(len(b["example_id"]) for b in batches)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _take_step(self, batches: list[dict[str, Tensor]]) -> Tensor:
        """Record the state and this rank's micro-batches, then step on them all."""
        assert self.trajectory is not None and self._state is not None
        like = next(iter(self._state.params.values()))
        weights = [
            batch_weights(
                self.data_weights, b["example_id"], b["input_ids"].shape[1], self.granularity, like
            )
            for b in batches
        ]
        group = self.step_fn.group
        tokens = step_tokens(batches) if group is None else group.sum_int(step_tokens(batches))
        self.trajectory.record(self._state, batches, tokens)
        self._state, loss = self.step_fn.step(self._state, batches, weights, num_tokens=tokens)
        self._sync_network()
        return loss

    def _check_batch(self, batch: dict[str, Tensor]) -> None:
        if "example_id" not in batch:
            raise KeyError(
                "MAGIC needs batch['example_id'] (the dataset row of every example); TextDataModule"
                " adds it, or dataset.map(lambda ex, i: {'example_id': i}, with_indices=True)"
            )
        ids = batch["example_id"]
        if self.num_examples is not None and int(ids.max()) >= self.num_examples:
            raise ValueError(
                f"example_id {int(ids.max())} >= num_examples={self.num_examples}; pass the "
                "training set's length as num_examples"
            )

    def _sync_network(self) -> None:
        """Copy the functional parameters into ``self.model`` (checkpoints, validation, users)."""
        assert self.model is not None and self._state is not None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self._state.params.items():
                params[name].copy_(value)

    @override
    def on_train_end(self) -> None:
        assert self.trajectory is not None and self._state is not None
        if self._pending:  # stopped (max_steps, should_stop) inside an accumulated step
            rank_zero_warn(
                f"training stopped inside an accumulated step: its {len(self._pending)} "
                "micro-batches so far were never stepped on, so they are not in the trajectory"
            )
            self._pending = []
        self.trajectory.finish(self._state)
