"""The record of a forward training run that the MAGIC reverse pass replays.

Data order: the trajectory keeps every step's batch itself (``input_ids``,
``attention_mask``, ``labels``, ``example_id``: a few kilobytes per step, on CPU), so the
replay reads exactly the batches the forward pass trained on, in the same order, whatever
the loader's shuffling. Kept states (parameters, optimizer state, RNG state) live in memory
or, with a directory, on disk as safetensors (no pickle)::

    <directory>/
      trajectory.json              num_steps, schedule, kept steps, batch keys
      step_<t>.safetensors         state before step t (param.<name>, opt.<i>, rng)
      final.safetensors            state after the last step
      batches.safetensors          step_<t>.<key> for every step

Kept states are never modified in place (every step is out of place), so memory
checkpoints are references, not copies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor
from torchopt.pytree import tree_flatten, tree_unflatten

from .functional import Schedule, checkpoint_steps
from .step import TrainState

__all__ = ["BATCH_KEYS", "Trajectory", "load_state", "save_state"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "example_id")
_FORMAT = "lightning_bergson.magic.trajectory"


def save_state(path: Path, state: TrainState) -> None:
    """Write ``state`` to one safetensors file (atomically, via a temporary name)."""
    tensors = {f"param.{k}": v.detach().contiguous().cpu() for k, v in state.params.items()}
    for i, leaf in enumerate(state.opt_leaves()):
        tensors[f"opt.{i}"] = leaf.detach().contiguous().cpu()
    tensors["rng"] = state.rng.cpu()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": _FORMAT, "step": str(state.step)})
    tmp.replace(path)


def load_state(path: Path, like: TrainState) -> TrainState:
    """Read a state written by :func:`save_state`; ``like`` gives devices and pytree structure."""
    tensors = load_file(str(path))
    params = {k: tensors[f"param.{k}"].to(v.device) for k, v in like.params.items()}
    leaves, spec = tree_flatten(like.opt_state)
    opt = tree_unflatten(spec, [tensors[f"opt.{i}"].to(t.device) for i, t in enumerate(leaves)])
    with open(path, "rb") as f:  # the step is in the header's metadata
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len))["__metadata__"]
    return TrainState(params, opt, tensors["rng"], int(meta["step"]))


class Trajectory:
    """Batches, kept states and the final state of one forward training run.

    Args:
        num_steps: Planned number of optimizer steps ``T`` (sets the checkpoint spacing; a
            run that stops early or late is still replayed exactly, only less evenly).
        schedule: ``"all"``, ``"sqrt"`` or ``"log"`` (see
            :func:`~lightning_bergson.magic.functional.checkpoint_steps`).
        directory: Keep states on disk there (safetensors) instead of in memory.

    Example:
        >>> import torch
        >>> from lightning_bergson.magic.step import TrainState
        >>> traj = Trajectory(num_steps=4, schedule="sqrt")
        >>> for t in range(4):
        ...     traj.record(TrainState({"w": torch.ones(1) * t}, (), step=t),
        ...                 {"input_ids": torch.zeros(1, 2), "example_id": torch.tensor([t])})
        >>> traj.finish(TrainState({"w": torch.ones(1) * 4}, (), step=4))
        >>> traj.kept_steps, traj.state(1)
        ([0, 2], None)
    """

    def __init__(
        self, num_steps: int, schedule: Schedule, directory: str | Path | None = None
    ) -> None:
        self.schedule: Schedule = schedule
        self.directory = Path(directory) if directory is not None else None
        self._planned = set(checkpoint_steps(max(1, num_steps), schedule)) | {0}
        self.batches: list[dict[str, Tensor]] = []
        self._kept: dict[int, TrainState | Path] = {}
        self._like: TrainState | None = None
        self.final: TrainState | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def num_steps(self) -> int:
        """Number of recorded optimizer steps."""
        return len(self.batches)

    @property
    def kept_steps(self) -> list[int]:
        """Steps whose state before the step is kept, ascending."""
        return sorted(self._kept)

    def record(self, state: TrainState, batch: Mapping[str, Tensor]) -> None:
        """Record the state before a step (if the schedule keeps it) and the step's batch."""
        if state.step != len(self.batches):
            raise RuntimeError(
                f"state.step={state.step} but {len(self.batches)} steps are recorded; the "
                "trajectory must see every step in order (one fit per MagicModule)"
            )
        if self._like is None:
            self._like = state
        if state.step in self._planned:
            self._kept[state.step] = self._store(state, f"step_{state.step:06d}")
        # Copies, never views: a loader may hand out the same tensors again (or refill a
        # buffer), and the replay must see what this step trained on.
        self.batches.append(
            {k: batch[k].detach().to("cpu", copy=True) for k in BATCH_KEYS if k in batch}
        )

    def finish(self, final: TrainState) -> None:
        """Keep the final state (and, on disk, write the batches and ``trajectory.json``)."""
        self.final = final
        if self.directory is None:
            return
        save_state(self.directory / "final.safetensors", final)
        tensors = {f"step_{t:06d}.{k}": v for t, b in enumerate(self.batches) for k, v in b.items()}
        save_file(tensors, str(self.directory / "batches.safetensors"))
        meta = {
            "format": _FORMAT,
            "num_steps": self.num_steps,
            "schedule": self.schedule,
            "kept_steps": self.kept_steps,
        }
        (self.directory / "trajectory.json").write_text(json.dumps(meta, indent=1))

    def state(self, step: int) -> TrainState | None:
        """The kept state before ``step`` (loaded from disk if needed), or ``None``."""
        kept = self._kept.get(step)
        if isinstance(kept, Path):
            assert self._like is not None
            return load_state(kept, self._like)
        return kept

    def _store(self, state: TrainState, name: str) -> TrainState | Path:
        if self.directory is None:
            return state
        path = self.directory / f"{name}.safetensors"
        save_state(path, state)
        return path

    @classmethod
    def load(cls, directory: str | Path, like: TrainState) -> Trajectory:
        """Reopen a trajectory written with a ``directory`` (e.g. in another process).

        Args:
            directory: The directory given to the forward run.
            like: A state of the same model and optimizer (e.g. ``trainer.init_state()``),
                which gives devices and the optimizer state's structure.
        """
        directory = Path(directory)
        meta_path = directory / "trajectory.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no finished trajectory at {directory} ({meta_path.name} missing); run the "
                "forward training with checkpoint_dir set to it first"
            )
        meta = json.loads(meta_path.read_text())
        traj = cls(meta["num_steps"], meta["schedule"], directory)
        traj._like = like
        traj._kept = {t: directory / f"step_{t:06d}.safetensors" for t in meta["kept_steps"]}
        tensors = load_file(str(directory / "batches.safetensors"))
        for t in range(meta["num_steps"]):
            prefix = f"step_{t:06d}."
            traj.batches.append(
                {k: tensors[prefix + k] for k in BATCH_KEYS if prefix + k in tensors}
            )
        traj.final = load_state(directory / "final.safetensors", like)
        return traj
