"""GradientCaptureCallback: store every training example's gradient during ``fit``.

Lightning glue only: the math is in :mod:`lightning_bergson.capture`, the
storage in :mod:`lightning_bergson.store`.

Run: ``python -m lightning_bergson fit --config configs/quickstart.yaml``
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .capture import DEFAULT_EXCLUDE, GradientCollector, HeadConfig, normalizers_from_optimizer
from .capture.fingerprint import model_fingerprint
from .capture.normalizers import load_normalizers, save_normalizers
from .store import GradientStoreWriter, layout_blocks

__all__ = ["GradientCaptureCallback"]

BatchReduction = Literal["token_mean", "example_mean", "sum"]


@dataclass
class _BatchInfo:
    """What the rows of one micro-batch need besides their gradients."""

    example_id: Tensor  # (B,) int64, CPU
    scale: Tensor  # (B,) multiplier turning the observed gradient into grad L_i
    step: int
    epoch: int
    loss: Tensor | None = None  # (B,) float32, CPU


class GradientCaptureCallback(Callback):
    """Capture a projected, optionally optimizer-normalized gradient of every training example.

    Each row is the gradient of one example's own loss ``L_i`` (sum of its token
    losses, or their mean with ``loss_reduction="mean"``), whatever the batch,
    gradient accumulation or loss scaling: the callback divides out the factors the
    training loss applied (``batch_reduction``, ``accumulate_grad_batches``, the AMP
    scale).

    Args:
        path: Directory of the Zarr gradient store (``*.zarr``).
        projection_dim: Rows and columns ``p`` of each block's projection (``p*p``
            numbers per block); 0 stores exact gradients.
        seed: Projection seed; a query must use the same one (recorded in the store).
        normalizer: ``"none"``, ``"adafactor"`` (factored, no per-example ``[O, I]``
            tensor) or ``"adam"`` (elementwise, forms ``[B, O, I]``).
        normalizer_source: ``"optimizer"`` reads the live optimizer's second moments
            after each optimizer step and normalizes that step's rows with them (the
            denominator the optimizer applied; AdamW bias-corrected); ``"file"`` uses
            fixed normalizers from ``normalizer_path`` (a safetensors file written by
            ``save_normalizers``).
        normalizer_path: The safetensors file for ``normalizer_source="file"``.
        include: fnmatch globs of module names to track (``nn.Linear``/HF ``Conv1D``).
        exclude: fnmatch globs of module names to skip (default: the output embedding).
        head_cfgs: Module name (or glob) -> :class:`HeadConfig` splitting it into heads.
        include_bias: Append each bias gradient as an extra input column.
        loss_reduction: ``"sum"`` stores ``grad sum_t l_t``; ``"mean"`` the gradient of the
            mean over the example's supervised tokens.
        batch_reduction: How ``training_step``'s loss combines token losses:
            ``"token_mean"`` (Hugging Face's default: mean over all supervised tokens of
            the batch), ``"example_mean"`` (mean over examples of per-example token means)
            or ``"sum"``.
        dtype: ``"float16"`` (clamped to +-65504, non-finite rows flagged) or ``"float32"``.
        track_order: Record each row's optimizer step and epoch (``-1`` when off).
        root: Attribute of the LightningModule holding the network to hook (module names
            in the store are relative to it, so a query on the bare model matches);
            ``"auto"`` uses ``.model`` when present, ``None`` the LightningModule itself.
        chunk_rows: Rows per Zarr chunk (default about 4 MiB per chunk).
        overwrite: Replace an existing store at ``path``.
        example_id_key: Batch key with each example's dataset row.
        labels_key: Batch key of the labels (``-100`` = ignored) used to count tokens.

    Example:
        >>> cb = GradientCaptureCallback("runs/demo/grads.zarr", projection_dim=16,
        ...                              normalizer="adafactor")
        >>> cb.state_key
        "GradientCaptureCallback{'path': 'runs/demo/grads.zarr'}"
    """

    def __init__(
        self,
        path: str | Path,
        *,
        projection_dim: int = 16,
        seed: int = 0,
        normalizer: Literal["none", "adafactor", "adam"] = "none",
        normalizer_source: Literal["optimizer", "file"] = "optimizer",
        normalizer_path: str | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        head_cfgs: dict[str, HeadConfig] | None = None,
        include_bias: bool = False,
        loss_reduction: Literal["sum", "mean"] = "sum",
        batch_reduction: BatchReduction = "token_mean",
        dtype: Literal["float16", "float32"] = "float16",
        track_order: bool = True,
        root: str | None = "auto",
        chunk_rows: int | None = None,
        overwrite: bool = False,
        example_id_key: str = "example_id",
        labels_key: str = "labels",
    ) -> None:
        _check_choice("normalizer", normalizer, ("none", "adafactor", "adam"))
        _check_choice("normalizer_source", normalizer_source, ("optimizer", "file"))
        _check_choice("loss_reduction", loss_reduction, ("sum", "mean"))
        _check_choice("batch_reduction", batch_reduction, ("token_mean", "example_mean", "sum"))
        _check_choice("dtype", dtype, ("float16", "float32"))
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 = exact), got {projection_dim}")
        if normalizer != "none" and normalizer_source == "file" and not normalizer_path:
            raise ValueError("normalizer_source='file' needs normalizer_path=<file.safetensors>")
        self.path = Path(path)
        self.projection_dim = projection_dim
        self.seed = seed
        self.normalizer = normalizer
        self.normalizer_source = normalizer_source
        self.normalizer_path = normalizer_path
        self.include = list(include) if include else ["*"]
        self.exclude = list(exclude) if exclude is not None else list(DEFAULT_EXCLUDE)
        self.head_cfgs = dict(head_cfgs or {})
        self.include_bias = include_bias
        self.loss_reduction = loss_reduction
        self.batch_reduction = batch_reduction
        self.dtype = dtype
        self.track_order = track_order
        self.root = root
        self.chunk_rows = chunk_rows
        self.overwrite = overwrite
        self.example_id_key = example_id_key
        self.labels_key = labels_key

        self.collector: GradientCollector | None = None
        self.writer: GradientStoreWriter | None = None
        self._batch: _BatchInfo | None = None
        self._rows: dict[str, Tensor] = {}
        self._deferred: list[tuple[_BatchInfo, list]] = []
        self._resume_rows: dict[int, int] | None = None
        self._trainer: L.Trainer | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    @property
    def deferred(self) -> bool:
        """Rows wait for the optimizer step whose state normalizes them."""
        return self.normalizer != "none" and self.normalizer_source == "optimizer"

    # ------------------------------------------------------------------ lifecycle

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = self._network(pl_module)
        self.collector = GradientCollector(
            network,
            projection_dim=self.projection_dim,
            seed=self.seed,
            include=self.include,
            exclude=self.exclude,
            head_cfgs=self.head_cfgs,
            include_bias=self.include_bias,
            closure=self._on_rows,
            defer=self.deferred,
        )
        if self.normalizer != "none" and self.normalizer_source == "file":
            self.collector.set_normalizers(self._file_normalizers())
        self.collector.__enter__()
        self.collector.enabled = False
        self._trainer = trainer
        # Rank 0 creates (or replaces) the store first; the others then add their groups.
        if trainer.global_rank == 0:
            self.writer = self._open_writer(trainer, network)
        trainer.strategy.barrier("GradientCaptureCallback.open_store")
        if trainer.global_rank != 0:
            self.writer = self._open_writer(trainer, network)

    def _open_writer(self, trainer: L.Trainer, network: nn.Module) -> GradientStoreWriter:
        assert self.collector is not None
        rank = trainer.global_rank
        if self._resume_rows is not None:
            if len(self._resume_rows) != trainer.world_size:
                raise RuntimeError(
                    f"the checkpoint's gradient store {self.path} was written by "
                    f"{len(self._resume_rows)} ranks but this run has world size "
                    f"{trainer.world_size}; resume with the same number of processes"
                )
            self._check_resumable(network)
            return GradientStoreWriter.reopen(
                self.path, rank=rank, committed_rows=self._resume_rows[rank]
            )
        blocks = [(b.name, b.shape, b.parent, b.head) for b in self.collector.blocks]
        return GradientStoreWriter(
            self.path,
            modules=layout_blocks(blocks),
            dtype=self.dtype,
            rank=rank,
            world_size=trainer.world_size,
            chunk_rows=self.chunk_rows,
            metadata=self._metadata(network),
            overwrite=self.overwrite,
        )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.collector is not None
        ids = _example_ids(batch, self.example_id_key)
        self._batch = _BatchInfo(
            example_id=ids,
            scale=self._scale(trainer, batch, len(ids)),
            step=trainer.global_step,
            epoch=trainer.current_epoch,
        )
        self._rows = {}
        self.collector.enabled = True

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.collector is not None and self._batch is not None
        self.collector.enabled = False
        info, self._batch = self._batch, None
        info.loss = _example_loss(outputs, len(info.example_id))
        if not self.deferred:
            self._write(info)
            return
        self._deferred.append((info, self.collector.take_pending()))
        if self._stepped(trainer, info):
            self._flush_deferred(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferred:
            rank_zero_warn(
                f"{len(self._deferred)} micro-batches were never followed by an optimizer step; "
                "their rows are normalized with the last optimizer state"
            )
            self._flush_deferred(trainer)
        if self.writer is not None:
            # Normalizers first: a store flagged complete has everything a query needs.
            if self.normalizer != "none" and trainer.is_global_zero and self.collector is not None:
                out = self.path / "normalizers"
                out.mkdir(parents=True, exist_ok=True)
                save_normalizers(out / "normalizers.safetensors", self.collector.normalizers)
            self.writer.close(complete=True)
            self._report(trainer, self.writer.committed_rows)
            self.writer = None

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self._remove_hooks()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Rows each rank has committed; called on every rank when a checkpoint is saved."""
        if self.writer is None:
            return {}
        rows = torch.tensor([self.writer.flush()], dtype=torch.int64)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            rows = trainer.strategy.all_gather(rows).reshape(-1).cpu()
        committed = {str(rank): int(n) for rank, n in enumerate(rows)}
        return {"path": str(self.path), "committed_rows": committed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            rows = state_dict["committed_rows"]
            self._resume_rows = {int(k): int(v) for k, v in rows.items()}

    # ------------------------------------------------------------------ helpers

    def _network(self, pl_module: L.LightningModule) -> nn.Module:
        if self.root is None:
            return pl_module
        if self.root == "auto":
            inner = getattr(pl_module, "model", None)
            return inner if isinstance(inner, nn.Module) else pl_module
        inner = getattr(pl_module, self.root, None)
        if not isinstance(inner, nn.Module):
            raise ValueError(
                f"root={self.root!r}: {type(pl_module).__name__} has no nn.Module attribute "
                f"{self.root!r}; pass root=None to hook the LightningModule itself"
            )
        return inner

    def _on_rows(self, block: str, rows: Tensor) -> None:
        assert self._batch is not None
        rows = rows * self._batch.scale.to(rows)[:, None]
        prev = self._rows.get(block)
        self._rows[block] = rows if prev is None else prev + rows

    def _write(self, info: _BatchInfo) -> None:
        assert self.collector is not None and self.writer is not None
        rows, self._rows = self._rows, {}
        if not rows:
            return  # no backward through tracked modules (e.g. a skipped batch)
        batch = len(info.example_id)
        parts = []
        for block in self.collector.blocks:
            part = rows.get(block.name)
            if part is None:  # a module that took no part in this forward
                part = torch.zeros(batch, math.prod(block.shape))
            parts.append(part.detach().to("cpu", torch.float32))
        grads = torch.cat(parts, dim=1)  # (B, D)
        finite = torch.isfinite(grads).all(dim=1)
        if not bool(finite.all()):
            rank_zero_warn(
                f"non-finite gradients for example ids {info.example_id[~finite].tolist()[:10]} "
                f"at step {info.step}: stored as they are and flagged finite=False",
            )
        step, epoch = (info.step, info.epoch) if self.track_order else (-1, -1)
        self.writer.append(
            grads,
            info.example_id,
            torch.full((batch,), step, dtype=torch.int64),
            torch.full((batch,), epoch, dtype=torch.int32),
            info.loss,
        )

    @staticmethod
    def _stepped(trainer: L.Trainer, info: _BatchInfo) -> bool:
        return trainer.global_step > info.step

    def _flush_deferred(self, trainer: L.Trainer) -> None:
        """Normalize every waiting micro-batch with the optimizer state after its step."""
        assert self.collector is not None
        optimizer = trainer.optimizers[0]
        self.collector.set_normalizers(
            normalizers_from_optimizer(
                optimizer, self.collector.modules, self.normalizer, include_bias=self.include_bias
            )
        )
        deferred, self._deferred = self._deferred, []
        for info, pending in deferred:
            self._batch = info
            self.collector.process_pending(pending)
            self._write(info)
        self._batch = None

    def _scale(self, trainer: L.Trainer, batch: Any, size: int) -> Tensor:
        """Per-example multiplier from the observed gradient to ``grad L_i``."""
        tokens = _supervised_tokens(batch, self.labels_key, size)  # (B,)
        if self.batch_reduction == "token_mean":
            weight = 1.0 / tokens.sum().clamp(min=1)
            weight = weight.expand(size)
        elif self.batch_reduction == "example_mean":
            weight = 1.0 / (size * tokens.clamp(min=1))
        else:
            weight = torch.ones(size, dtype=torch.float64)
        weight = weight * _loss_scale(trainer) / trainer.accumulate_grad_batches
        if self.loss_reduction == "mean":
            weight = weight * tokens
        scale = torch.where(weight > 0, 1.0 / weight.clamp(min=1e-300), torch.zeros_like(weight))
        return scale.to(torch.float64)

    def _file_normalizers(self) -> dict:
        from .capture.normalizers import convert

        loaded = load_normalizers(self.normalizer_path)  # type: ignore[arg-type]
        return {name: convert(n, self.normalizer) for name, n in loaded.items()}  # type: ignore[arg-type]

    def _metadata(self, network: nn.Module) -> dict[str, Any]:
        return {
            "model": model_fingerprint(network),
            "projection": {
                "dim": self.projection_dim,
                "seed": self.seed,
                "kind": "rademacher",
                "scale": "jl",
            },
            "normalizer": {
                "kind": self.normalizer,
                "source": self.normalizer_source,
                "timing": "after_step" if self.deferred else "fixed",
                **({"path": str(self.normalizer_path)} if self.normalizer_source == "file" else {}),
            },
            "capture": {
                "include": self.include,
                "exclude": self.exclude,
                "include_bias": self.include_bias,
                "head_cfgs": {k: asdict(v) for k, v in self.head_cfgs.items()},
                "root": self.root,
                "batch_reduction": self.batch_reduction,
                "track_order": self.track_order,
            },
            "loss_reduction": self.loss_reduction,
        }

    def _check_resumable(self, network: nn.Module) -> None:
        """Refuse to append to a store whose model or capture settings differ from this run's."""
        from .store.schema import _open_root_attrs

        stored = _open_root_attrs(self.path)
        mine = self._metadata(network)
        mine["modules"] = [b.name for b in self.collector.blocks]  # type: ignore[union-attr]
        stored = {**stored, "modules": [m["name"] for m in stored["modules"]]}
        stored["model"] = {k: v for k, v in stored["model"].items() if k != "config"}
        mine["model"] = {k: v for k, v in mine["model"].items() if k != "config"}
        for key, value in mine.items():
            if stored.get(key) != value:
                raise ValueError(
                    f"cannot resume capture into {self.path}: its {key!r} is {stored.get(key)!r} "
                    f"but this run's is {value!r}; resume with the settings the store was "
                    "written with, or start a new store"
                )

    def _report(self, trainer: L.Trainer, rows: int) -> None:
        if trainer.is_global_zero:
            rank_zero_info(
                f"Gradient store: {self.path.resolve()} ({rows} rows on rank 0; open it with "
                f"lightning_bergson.GradientStore.open({str(self.path)!r}))"
            )

    def _remove_hooks(self) -> None:
        if self.collector is not None:
            self.collector.remove()
            self.collector = None


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, valid))}")


def _example_ids(batch: Any, key: str) -> Tensor:
    if not isinstance(batch, dict) or key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(
            f"GradientCaptureCallback needs each training batch to carry {key!r} (the dataset row "
            f"of every example), but the batch has {keys}. Use lightning_bergson.TextDataModule, "
            f"or add it with `dataset.map(lambda ex, i: {{{key!r}: i}}, with_indices=True)` and "
            "keep it through your collate function."
        )
    return torch.as_tensor(batch[key]).detach().to("cpu", torch.int64).reshape(-1)


def _supervised_tokens(batch: dict, labels_key: str, size: int) -> Tensor:
    """Tokens that enter each example's causal-LM loss (labels shifted by one)."""
    labels = batch.get(labels_key)
    if labels is None:
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(batch["input_ids"])
        return mask[:, 1:].sum(1).to("cpu", torch.float64)
    return (labels[:, 1:] != -100).sum(1).to("cpu", torch.float64)


def _loss_scale(trainer: L.Trainer) -> float:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def _example_loss(outputs: Any, size: int) -> Tensor:
    if isinstance(outputs, dict) and isinstance(outputs.get("example_loss"), Tensor):
        return outputs["example_loss"].detach().to("cpu", torch.float32).reshape(size)
    return torch.full((size,), float("nan"))
