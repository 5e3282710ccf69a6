"""Resume a MAGIC forward fit from a Lightning checkpoint.

A Lightning checkpoint holds the network's weights, the loops' progress (and, with
``strategy="bergson"``/``"bergson_ddp"``, the loader's place in the epoch, so a fit resumes
mid-epoch). MAGIC adds one record of primitives under ``checkpoint["magic"]``
(:func:`checkpoint_record`): how many steps were taken, where the trajectory lives, the
world size. No trajectory data goes into the checkpoint (it is pickled by Lightning):
an on-disk trajectory (``checkpoint_dir``) is flushed to safetensors when the checkpoint is
saved, and an in-memory one stays in the module.

Resuming (:func:`restore`) takes the trajectory (the module's own, or reopened from
``checkpoint_dir``), cuts it back to the checkpoint's step, and replays from the last kept
state to rebuild the training state (parameters, optimizer state, RNG state), which is
checked bitwise against the checkpoint's weights. A resumed fit therefore records the same
trajectory as an uninterrupted one. Refused, with the fix named:

* an in-memory trajectory in a new module (a new process): the trajectory died with the
  old one; train with ``checkpoint_dir`` to resume across processes;
* a checkpoint saved between the micro-batches of an accumulated step;
* a different world size;
* a trajectory that does not replay to the checkpoint's weights (another run's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .reverse import replay
from .step import FunctionalTrainer, TrainState
from .trajectory import Trajectory

__all__ = ["RECORD_KEY", "checkpoint_record", "restore"]

RECORD_KEY = "magic"
_VERSION = 1


def checkpoint_record(
    traj: Trajectory, pending: int, world_size: int, directory: str | None
) -> dict[str, Any]:
    """What a Lightning checkpoint holds of a MAGIC fit (primitives only); flushes ``traj``.

    Args:
        traj: The trajectory so far.
        pending: Micro-batches collected for a step not taken yet.
        world_size: Number of data-parallel ranks.
        directory: The ``checkpoint_dir`` (``None``: the trajectory is in memory).
    """
    traj.flush()
    return {
        "version": _VERSION,
        "steps": traj.num_steps,
        "pending_micro_batches": pending,
        "world_size": world_size,
        "checkpoint_dir": directory,
    }


def restore(
    record: dict[str, Any],
    *,
    trajectory: Trajectory | None,
    directory: Path | None,
    step_fn: FunctionalTrainer,
    network: nn.Module,
    world_size: int,
    data_weights: Tensor | None,
) -> tuple[Trajectory, TrainState]:
    """The trajectory and training state at a checkpoint (see the module docs).

    Args:
        record: The checkpoint's :func:`checkpoint_record`.
        trajectory: The module's trajectory, if it still has one (same process).
        directory: This rank's trajectory directory (``None``: in memory).
        step_fn: The functional step.
        network: The network holding the checkpoint's weights.
        world_size: The resumed run's number of ranks.
        data_weights: The run's data weights.
    """
    _check_record(record, world_size, trajectory, directory)
    steps = int(record["steps"])
    if trajectory is None:
        assert directory is not None
        trajectory = Trajectory.load(directory, like=step_fn.init_state(), finished=False)
    trajectory.truncate(steps)
    start = max(trajectory.kept_steps)
    state = trajectory.state(start)
    assert state is not None and state.step == start
    state = replay(step_fn, trajectory, state, steps, data_weights)
    _check_weights(state, network, steps, trajectory.directory)
    return trajectory, state


def _check_record(
    record: dict[str, Any],
    world_size: int,
    trajectory: Trajectory | None,
    directory: Path | None,
) -> None:
    if record.get("version") != _VERSION:
        raise ValueError(
            f"the checkpoint's MAGIC record has version {record.get('version')!r}, not "
            f"{_VERSION}; start a new fit (without ckpt_path)"
        )
    if record["pending_micro_batches"]:
        raise ValueError(
            f"the checkpoint was saved after {record['pending_micro_batches']} micro-batches of "
            "an accumulated step that MAGIC had not taken yet, so it cannot resume there; "
            "resume from a checkpoint saved at a step boundary (ModelCheckpoint with "
            "every_n_train_steps or at epoch end)"
        )
    if record["world_size"] != world_size:
        raise ValueError(
            f"the checkpoint was saved with world_size={record['world_size']}, this run has "
            f"{world_size}: every rank replays its own shard, so resume on "
            f"{record['world_size']} devices"
        )
    if trajectory is None and directory is None:
        where = record["checkpoint_dir"]
        raise RuntimeError(
            "cannot resume this MAGIC fit in a new MagicModule: "
            + (
                "its trajectory was kept in memory and died with the module that trained it. "
                "Train with MagicModule(checkpoint_dir=...) to resume across processes, or "
                "start a new fit (without ckpt_path)"
                if where is None
                else f"pass checkpoint_dir={where!r} (where that run kept its trajectory)"
            )
        )


def _check_weights(
    state: TrainState, network: nn.Module, steps: int, directory: Path | None
) -> None:
    """Raise unless the replayed parameters equal the checkpoint's weights bitwise."""
    weights = dict(network.named_parameters())
    for name, value in state.params.items():
        if not _same(value, weights[name].detach()):
            where = f"at {directory}" if directory is not None else "in memory"
            raise RuntimeError(
                f"the MAGIC trajectory {where} replayed to step {steps} does not give this "
                f"checkpoint's weights (first difference: {name}); it belongs to another run. "
                "Resume with the checkpoint_dir of the run that saved the checkpoint, or "
                "start a new fit (without ckpt_path)"
            )


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((a == b.to(a.device)).all())
