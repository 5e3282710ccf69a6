"""The record of a forward training run that the MAGIC reverse pass replays.

Data order: the trajectory keeps every step's micro-batches themselves (``input_ids``,
``attention_mask``, ``labels``, ``example_id``: a few kilobytes per step, on CPU) and the
step's supervised token count, so the replay reads exactly the batches the forward pass
trained on, in the same order, whatever the loader's shuffling. Kept states (parameters,
optimizer state, RNG state) live in memory or, with a directory, on disk as safetensors
(no pickle)::

    <directory>/
      trajectory.json              manifest: planned and recorded steps, schedule, kept
                                   steps, batch segments, finished flag
      step_<t>.safetensors         state before step t (param.<name>, opt.<i>, rng)
      batches_<t>.safetensors      steps t..: step_<t>.<j>.<key> (micro-batch j),
                                   step_<t>.num_tokens
      final.safetensors            state after the last step (once finished)

Kept states are written when recorded; batches are written in segments whenever the run is
checkpointed (:meth:`Trajectory.flush`) and when it finishes, and the manifest is rewritten
then, so a Lightning checkpoint can name a trajectory prefix that is complete on disk.
Kept states are never modified in place (every step is out of place), so memory
checkpoints are references, not copies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor
from torchopt.pytree import tree_flatten, tree_unflatten

from .functional import Schedule, checkpoint_steps, step_tokens
from .step import TrainState

__all__ = ["BATCH_KEYS", "Trajectory", "load_state", "save_state"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "example_id")
_FORMAT = "lightning_bergson.magic.trajectory"
_VERSION = 2
_MANIFEST = "trajectory.json"


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


def _copy_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Copies, never views: a loader may hand out the same tensors again (or refill a
    # buffer), and the replay must see what this step trained on.
    return {k: batch[k].detach().to("cpu", copy=True) for k in BATCH_KEYS if k in batch}


class Trajectory:
    """Micro-batches, token counts, kept states and the final state of one forward run.

    Args:
        num_steps: Planned number of optimizer steps ``T`` (sets the checkpoint spacing; a
            run that stops early or late is still replayed exactly, only less evenly).
        schedule: ``"all"``, ``"sqrt"`` or ``"log"`` (see
            :func:`~lightning_bergson.magic.functional.checkpoint_steps`).
        directory: Keep states and batches on disk there (safetensors) instead of in
            memory; a manifest left there by an earlier run is removed.

    Example:
        >>> import torch
        >>> from lightning_bergson.magic.step import TrainState
        >>> traj = Trajectory(num_steps=4, schedule="sqrt")
        >>> for t in range(4):
        ...     traj.record(TrainState({"w": torch.ones(1) * t}, (), step=t),
        ...                 {"input_ids": torch.zeros(1, 2), "example_id": torch.tensor([t])})
        >>> traj.finish(TrainState({"w": torch.ones(1) * 4}, (), step=4))
        >>> traj.kept_steps, traj.state(1), traj.tokens
        ([0, 2], None, [1, 1, 1, 1])
    """

    def __init__(
        self, num_steps: int, schedule: Schedule, directory: str | Path | None = None
    ) -> None:
        self.schedule: Schedule = schedule
        self.planned = max(1, num_steps)
        self._planned = set(checkpoint_steps(self.planned, schedule)) | {0}
        self.batches: list[list[dict[str, Tensor]]] = []
        self.tokens: list[int] = []
        self._kept: dict[int, TrainState | Path] = {}
        self._like: TrainState | None = None
        self._segments: list[tuple[int, int]] = []  # on disk: [start, end) steps per file
        self.final: TrainState | None = None
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / _MANIFEST).unlink(missing_ok=True)  # an earlier run's

    @property
    def num_steps(self) -> int:
        """Number of recorded optimizer steps."""
        return len(self.batches)

    @property
    def kept_steps(self) -> list[int]:
        """Steps whose state before the step is kept, ascending."""
        return sorted(self._kept)

    def record(
        self,
        state: TrainState,
        batches: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
        num_tokens: int | None = None,
    ) -> None:
        """Record the state before a step (if the schedule keeps it) and the step's batches.

        Args:
            state: The state before the step.
            batches: The step's batch, or its micro-batches (gradient accumulation).
            num_tokens: Supervised tokens of the whole step (all micro-batches and ranks);
                default: those of ``batches``.
        """
        if state.step != len(self.batches):
            raise RuntimeError(
                f"state.step={state.step} but {len(self.batches)} steps are recorded; the "
                "trajectory must see every step in order (one fit per MagicModule)"
            )
        micro = [batches] if isinstance(batches, Mapping) else list(batches)
        if self._like is None:
            self._like = state
        if state.step in self._planned:
            self._kept[state.step] = self._store(state, f"step_{state.step:06d}")
        self.batches.append([_copy_batch(b) for b in micro])
        self.tokens.append(step_tokens(micro) if num_tokens is None else int(num_tokens))

    def flush(self) -> None:
        """On disk: write the batches recorded since the last flush and the manifest."""
        if self.directory is None:
            return
        start = self._segments[-1][1] if self._segments else 0
        if self.num_steps > start:
            tensors = {}
            for t in range(start, self.num_steps):
                for j, batch in enumerate(self.batches[t]):
                    tensors.update({f"step_{t:06d}.{j}.{k}": v for k, v in batch.items()})
            path = self.directory / f"batches_{start:06d}.safetensors"
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata={"format": _FORMAT})
            tmp.replace(path)
            self._segments.append((start, self.num_steps))
        self._write_manifest()

    def finish(self, final: TrainState) -> None:
        """Keep the final state (on disk: write it, the remaining batches and the manifest)."""
        self.final = final
        if self.directory is not None:
            save_state(self.directory / "final.safetensors", final)
            self.flush()

    def truncate(self, num_steps: int) -> None:
        """Forget every step from ``num_steps`` on (to resume a run from a checkpoint there).

        On disk, ``num_steps`` must be a point the trajectory was flushed at (a checkpoint).
        """
        if num_steps > self.num_steps:
            raise RuntimeError(
                f"cannot resume at step {num_steps}: the trajectory holds {self.num_steps} steps"
            )
        del self.batches[num_steps:], self.tokens[num_steps:]
        self._kept = {t: s for t, s in self._kept.items() if t < num_steps}
        self.final = None
        if self.directory is None:
            return
        self._segments = [s for s in self._segments if s[1] <= num_steps]
        if (self._segments[-1][1] if self._segments else 0) != num_steps:
            raise RuntimeError(
                f"the trajectory at {self.directory} was not written at step {num_steps}; "
                "resume from a checkpoint saved by this run"
            )
        (self.directory / "final.safetensors").unlink(missing_ok=True)
        self._write_manifest()

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

    def _write_manifest(self) -> None:
        assert self.directory is not None
        end = self._segments[-1][1] if self._segments else 0
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "num_steps": end,
            "planned_steps": self.planned,
            "schedule": self.schedule,
            "kept_steps": [t for t in self.kept_steps if t < max(end, 1)],
            "segments": [list(s) for s in self._segments],
            "tokens": self.tokens[:end],
            "finished": self.final is not None and end == self.num_steps,
        }
        path = self.directory / _MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | Path, like: TrainState, *, finished: bool = True) -> Trajectory:
        """Reopen a trajectory written with a ``directory`` (e.g. in another process).

        Args:
            directory: The directory given to the forward run.
            like: A state of the same model and optimizer (e.g. ``trainer.init_state()``),
                which gives devices and the optimizer state's structure.
            finished: Require a finished run (``False``: the prefix written at the last
                checkpoint, to resume training).
        """
        directory = Path(directory)
        meta = _read_manifest(directory)
        if finished and not meta["finished"]:
            raise RuntimeError(
                f"the forward run at {directory} did not finish ({meta['num_steps']} steps "
                "written); resume it with Trainer.fit(..., ckpt_path=<its last checkpoint>)"
            )
        traj = cls(meta["planned_steps"], meta["schedule"])
        traj.directory, traj._like = directory, like
        traj._kept = {t: directory / f"step_{t:06d}.safetensors" for t in meta["kept_steps"]}
        traj._segments = [(int(a), int(b)) for a, b in meta["segments"]]
        for start, end in traj._segments:
            tensors = load_file(str(directory / f"batches_{start:06d}.safetensors"))
            for t in range(start, end):
                traj.batches.append(_step_batches(tensors, t))
        traj.tokens = [int(n) for n in meta["tokens"]]
        if meta["finished"]:
            traj.final = load_state(directory / "final.safetensors", like)
        return traj


def _read_manifest(directory: Path) -> dict:
    path = directory / _MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no trajectory at {directory} ({_MANIFEST} missing); run the forward training "
            "with checkpoint_dir set to it first"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(
            f"{path} is not a version-{_VERSION} MAGIC trajectory (found format "
            f"{meta.get('format')!r}, version {meta.get('version')!r}); rerun the forward fit"
        )
    return meta


def _step_batches(tensors: Mapping[str, Tensor], step: int) -> list[dict[str, Tensor]]:
    """The micro-batches of ``step`` from a batch segment's tensors."""
    batches: list[dict[str, Tensor]] = []
    while any(f"step_{step:06d}.{len(batches)}.{k}" in tensors for k in BATCH_KEYS):
        prefix = f"step_{step:06d}.{len(batches)}."
        batches.append({k: tensors[prefix + k] for k in BATCH_KEYS if prefix + k in tensors})
    return batches
