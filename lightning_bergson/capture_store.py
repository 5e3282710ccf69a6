"""CaptureStore: the gradient store of one capture callback, across a fit and its resumes.

Lightning glue for :class:`~lightning_bergson.store.GradientStoreWriter`: rank 0 creates
(or replaces) the store before the other ranks add their groups; a resumed fit reopens
it at the rows its checkpoint committed (after checking that the model and the capture
settings are the store's); checkpoints record each rank's committed rows; the end of the
fit saves the normalizers and flags the store complete, an exception leaves it
incomplete.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .capture.fingerprint import model_fingerprint
from .capture.hooks import Block
from .capture.normalizers import Normalizer, save_normalizers
from .capture.rows import BatchInfo, BatchRows
from .capture.settings import CaptureSettings
from .store import GradientStoreWriter, layout_blocks
from .store.location import Location, StorePath

__all__ = ["CaptureStore", "expected_rows"]


class CaptureStore:
    """Open, append to, checkpoint and close one callback's store on every rank.

    Args:
        path: Directory of the Zarr gradient store, or its URL (``s3://bucket/run.zarr``).
        storage_options: Options of a URL's fsspec filesystem.
    """

    def __init__(self, path: StorePath, storage_options: dict[str, Any] | None = None) -> None:
        self.location = Location.of(path, storage_options)
        self.path = self.location.path  # a Path for local stores, the Location of a remote one
        self.writer: GradientStoreWriter | None = None
        self.resume_rows: dict[int, int] | None = None  # from a checkpoint: rank -> rows

    def open(
        self,
        trainer: L.Trainer,
        network: nn.Module,
        blocks: list[Block],
        settings: CaptureSettings,
        *,
        dtype: str,
        chunk_rows: int | None = None,
        overwrite: bool = False,
    ) -> None:
        """Open the store on every rank, rank 0 first (it creates or replaces it).

        Args:
            trainer: The fit's trainer (rank, world size, collectives).
            network: The hooked network (its fingerprint goes into the store).
            blocks: The collector's blocks, in store order.
            settings: The capture settings written into (or checked against) the store.
            dtype: ``"float16"`` or ``"float32"`` rows.
            chunk_rows: Rows per Zarr chunk (default: the writer's).
            overwrite: Replace an existing store.
        """
        expected = trainer.strategy.broadcast(expected_rows(trainer), src=0)
        kwargs = {"dtype": dtype, "chunk_rows": chunk_rows, "overwrite": overwrite}
        if trainer.global_rank == 0:
            self.writer = self._writer(trainer, network, blocks, settings, expected, **kwargs)
        trainer.strategy.barrier("GradientCaptureCallback.open_store")
        if trainer.global_rank != 0:
            self.writer = self._writer(trainer, network, blocks, settings, expected, **kwargs)

    def _writer(
        self,
        trainer: L.Trainer,
        network: nn.Module,
        blocks: list[Block],
        settings: CaptureSettings,
        expected: int | None,
        **kwargs: Any,
    ) -> GradientStoreWriter:
        rank = trainer.global_rank
        if self.resume_rows is not None:
            if len(self.resume_rows) != trainer.world_size:
                raise RuntimeError(
                    f"the checkpoint's gradient store {self.path} was written by "
                    f"{len(self.resume_rows)} ranks but this run has world size "
                    f"{trainer.world_size}; resume with the same number of processes"
                )
            self.check_resumable(network, blocks, settings)
            return GradientStoreWriter.reopen(
                self.location, rank=rank, committed_rows=self.resume_rows[rank]
            )
        return GradientStoreWriter(
            self.location,
            modules=layout_blocks([(b.name, b.shape, b.parent, b.head) for b in blocks]),
            rank=rank,
            world_size=trainer.world_size,
            metadata={"model": model_fingerprint(network), **settings.to_attrs()},
            expected_rows=expected,
            **kwargs,
        )

    def check_resumable(
        self, network: nn.Module, blocks: list[Block], settings: CaptureSettings
    ) -> None:
        """Refuse to append to a store whose model or capture settings differ from this run's."""
        from .store.schema import _open_root_attrs

        stored = _open_root_attrs(self.location)
        theirs = CaptureSettings.from_attrs(stored)
        if theirs != settings:
            raise ValueError(
                f"cannot resume capture into {self.path}: its capture settings differ from this "
                f"run's ({theirs.describe_diff(settings)}, stored != this run); resume with "
                "the settings the store was written with, or start a new store"
            )
        mine = {k: v for k, v in model_fingerprint(network).items() if k != "config"}
        model = {k: v for k, v in stored["model"].items() if k != "config"}
        modules = [b.name for b in blocks]
        for key, (have, want) in {
            "model": (model, mine),
            "modules": ([m["name"] for m in stored["modules"]], modules),
        }.items():
            if have != want:
                raise ValueError(
                    f"cannot resume capture into {self.path}: its {key!r} is {have!r} but this "
                    f"run's is {want!r}; resume with the model the store was written with, or "
                    "start a new store"
                )

    def append(self, rows: BatchRows, info: BatchInfo, *, track_order: bool) -> None:
        """Append one micro-batch's rows (step and epoch ``-1`` without ``track_order``)."""
        assert self.writer is not None, "the store opens in on_train_start"
        step, epoch = (info.step, info.epoch) if track_order else (-1, -1)
        self.writer.append(
            rows.grads,
            rows.example_id,
            step,  # a scalar: the writer broadcasts it to every row
            epoch,
            rows.loss,
            rows.advantage,
            finite=rows.finite,
        )

    def record_skipped(self, ids: list[int], step: int, epoch: int) -> None:
        """Record rows deliberately not stored (``GradientStore.skipped``)."""
        assert self.writer is not None, "the store opens in on_train_start"
        self.writer.record_skipped(ids, step, epoch)

    def close(self, trainer: L.Trainer, normalizers: dict[str, Normalizer] | None) -> None:
        """Save the normalizers (rank 0), then flag this rank's rows complete."""
        if self.writer is None:
            return
        # Normalizers first: a store flagged complete has everything a query needs.
        if normalizers is not None and trainer.is_global_zero:
            with (self.location / "normalizers" / "normalizers.safetensors").writing() as out:
                save_normalizers(out, normalizers)
        self.writer.close(complete=True)
        if trainer.is_global_zero:
            options = ", storage_options=..." if self.location.storage_options else ""
            rank_zero_info(
                f"Gradient store: {self.location.resolve()} ({self.writer.committed_rows} rows "
                f"on rank 0; open it with lightning_bergson.GradientStore.open("
                f"{str(self.location)!r}{options}))"
            )
        self.writer = None

    def abort(self) -> None:
        """Stop writing after an exception: committed rows stay, the store stays incomplete."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def state_dict(self, trainer: L.Trainer | None) -> dict[str, Any]:
        """Rows each rank has committed; called on every rank when a checkpoint is saved."""
        if self.writer is None:
            return {}
        rows = torch.tensor([self.writer.flush()], dtype=torch.int64)
        if trainer is not None and trainer.world_size > 1:
            rows = trainer.strategy.all_gather(rows).reshape(-1).cpu()
        committed = {str(rank): int(n) for rank, n in enumerate(rows)}
        return {"path": str(self.location), "committed_rows": committed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the rows a checkpoint's :meth:`state_dict` recorded."""
        if state_dict:
            rows = state_dict["committed_rows"]
            self.resume_rows = {int(k): int(v) for k, v in rows.items()}


def expected_rows(trainer: L.Trainer) -> int | None:
    """Rows this rank will capture if the fit runs to its end, when that is known.

    Every micro-batch gives ``batch_size`` rows; ``None`` for an unsized loader (a batch
    sampler, an iterable dataset), an open-ended fit or several train loaders.
    """
    loader = trainer.train_dataloader
    size = getattr(loader, "batch_size", None)
    batches = trainer.num_training_batches
    if not isinstance(size, int) or not math.isfinite(batches) or trainer.max_epochs in (None, -1):
        return None
    micro = int(batches) * max(trainer.max_epochs, 1)
    if trainer.max_steps != -1:
        micro = min(micro, trainer.max_steps * trainer.accumulate_grad_batches)
    return micro * size
