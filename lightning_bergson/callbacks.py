"""GradientCaptureCallback: store every training example's gradient during ``fit``.

Lightning glue only: the math is in :mod:`lightning_bergson.capture`, the
storage in :mod:`lightning_bergson.store`.

Run: ``python -m lightning_bergson fit --config configs/quickstart.yaml``
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .batch import EXAMPLE_ID, example_ids, unstamp
from .capture import DEFAULT_EXCLUDE, GradientCollector, HeadConfig, normalizers_from_optimizer
from .capture.fingerprint import model_fingerprint
from .capture.normalizers import load_normalizers, save_normalizers
from .capture.observer import ScaleObserver
from .capture.scaling import BATCH_REDUCTIONS
from .capture.settings import CaptureSettings
from .store import GradientStoreWriter, layout_blocks
from .strategy import BergsonStrategyMixin as _registers_strategy_names  # noqa: F401

__all__ = ["GradientCaptureCallback", "NonFiniteGradientError", "capture_example_loss"]

BatchReduction = Literal["auto", "token_mean", "example_mean", "sum"]


@dataclass
class _BatchInfo:
    """What the rows of one micro-batch need besides their gradients."""

    example_id: Tensor  # (B,) int64, CPU
    step: int
    epoch: int
    scale: Tensor | None = None  # (B,) multiplier turning the observed gradient into the row
    loss: Tensor | None = None  # (B,) float32, CPU
    advantage: Tensor | None = None  # (B,) float32, CPU: the batch's `advantage`, if any


class GradientCaptureCallback(Callback):
    """Capture a projected, optionally optimizer-normalized gradient of every training example.

    Each row is the gradient of one example's own loss ``l_i``, whatever the batch, the
    reduction of the training loss, gradient accumulation or AMP loss scaling: the callback
    measures ``c_i = d loss / d l_i`` in every backward pass and divides it out. Where
    ``l_i`` comes from:

    * **the per-example loss contract** (any LightningModule): ``training_step`` returns
      ``{"loss": loss, "example_loss": l}`` with ``l`` ``[B]`` in the graph of ``loss``; the
      row is ``grad l_i`` and ``store.losses`` holds ``l_i``;
    * **the causal-LM rule** (no ``example_loss``): for a dict batch with 2-D ``input_ids``
      (and ``labels`` of the same shape, or none: then ``input_ids`` masked by
      ``attention_mask``), ``l_i`` is the example's summed shifted token loss (its mean with
      ``loss_reduction="mean"``); the gradient at the logits proves each batch that the
      training loss has that form. Anything else stops the fit at the first batch with an
      error that shows the contract.

    Batches carry each example's dataset row: a dict key ``example_id``, or, for batches
    of any type, the Bergson strategies (``strategy="bergson"``) stamp it from the sampler.

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
        include: fnmatch globs of module names to track (``nn.Linear``, HF ``Conv1D``,
            ``nn.Conv1d/2d/3d``); default: every such module whose weight is trainable
            (for PEFT LoRA: the adapters). An explicit list may add frozen modules.
        exclude: fnmatch globs of module names to skip (default: the output embedding).
        head_cfgs: Module name (or glob) -> :class:`HeadConfig` splitting it into heads.
        include_bias: Append each bias gradient as an extra input column.
        loss_reduction: Causal-LM rows: ``"sum"`` stores ``grad sum_t l_t``; ``"mean"`` the
            gradient of the mean over the example's supervised tokens. With the contract
            the row is ``grad example_loss[i]`` (``"mean"`` then needs a module whose
            ``example_loss`` is the summed token loss, as ``CausalLMModule``'s).
        batch_reduction: ``"auto"`` (default) measures how the training loss weights each
            example in every batch; a declared ``"token_mean"`` (Hugging Face's batch
            mean), ``"example_mean"`` or ``"sum"`` is checked against that measurement and a
            mismatch stops the fit.
        dtype: ``"float16"`` (clamped to +-65504, non-finite rows flagged) or ``"float32"``.
        track_order: Record each row's optimizer step and epoch (``-1`` when off).
        root: Attribute of the LightningModule holding the network to hook (module names
            in the store are relative to it, so a query on the bare model matches);
            ``"auto"`` uses ``.model`` when present, ``None`` the LightningModule itself.
        chunk_rows: Rows per Zarr chunk (default about 4 MiB per chunk).
        overwrite: Replace an existing store at ``path``.
        example_id_key: Batch key with each example's dataset row.
        labels_key: Batch key of the causal-LM labels (``-100`` = ignored).
        on_nonfinite: What a row with NaN or inf does: ``"warn"`` stores it flagged
            ``finite=False`` and warns once per epoch with the count and the first ids;
            ``"raise"`` stops the fit at the first one (:class:`NonFiniteGradientError`
            naming the ids and the step); ``"skip"`` stores no row for it and records
            ``(example_id, step, epoch)`` in the store (``GradientStore.skipped``).

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
        batch_reduction: BatchReduction = "auto",
        dtype: Literal["float16", "float32"] = "float16",
        track_order: bool = True,
        root: str | None = "auto",
        chunk_rows: int | None = None,
        overwrite: bool = False,
        example_id_key: str = EXAMPLE_ID,
        labels_key: str = "labels",
        on_nonfinite: Literal["warn", "raise", "skip"] = "warn",
    ) -> None:
        _check_choice("normalizer", normalizer, ("none", "adafactor", "adam"))
        _check_choice("on_nonfinite", on_nonfinite, ("warn", "raise", "skip"))
        _check_choice("normalizer_source", normalizer_source, ("optimizer", "file"))
        _check_choice("loss_reduction", loss_reduction, ("sum", "mean"))
        _check_choice("batch_reduction", batch_reduction, BATCH_REDUCTIONS)
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
        self.include = list(include) if include is not None else None
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
        self.on_nonfinite = on_nonfinite

        self.collector: GradientCollector | None = None
        self.observer: ScaleObserver | None = None
        self._step_owner: L.LightningModule | None = None
        self.writer: GradientStoreWriter | None = None
        self._batch: _BatchInfo | None = None
        self._rows: dict[str, Tensor] = {}
        self._deferred: list[tuple[_BatchInfo, list]] = []
        self._resume_rows: dict[int, int] | None = None
        self._trainer: L.Trainer | None = None
        self._nonfinite: list[int] = []  # example ids of non-finite rows not yet reported

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    @property
    def deferred(self) -> bool:
        """Rows wait for the optimizer step whose state normalizes them."""
        return self.normalizer != "none" and self.normalizer_source == "optimizer"

    @property
    def settings(self) -> CaptureSettings:
        """The capture settings this callback writes into its store."""
        return CaptureSettings(
            projection_dim=self.projection_dim,
            seed=self.seed,
            normalizer=self.normalizer,
            normalizer_source=self.normalizer_source,
            normalizer_path=None if self.normalizer_path is None else str(self.normalizer_path),
            include=self.include,
            exclude=self.exclude,
            head_cfgs=self.head_cfgs,
            include_bias=self.include_bias,
            root=self.root,
            batch_reduction=self.batch_reduction,
            track_order=self.track_order,
            loss_reduction=self.loss_reduction,
        )

    # ------------------------------------------------------------------ lifecycle

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = self._network(pl_module)
        self.collector = GradientCollector(
            network,
            projection_dim=self.projection_dim,
            seed=self.seed,
            include=_effective_include(self.include, pl_module),
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
        self.observer = ScaleObserver(
            network,
            loss_reduction=self.loss_reduction,
            batch_reduction=self.batch_reduction,
            labels_key=self.labels_key,
            example_loss_is_token_sum=getattr(pl_module, "example_loss_is_token_sum", False),
        )
        self._wrap_training_step(pl_module)
        self._warned: set[str] = set()
        self._report_capture(trainer, network)
        self._trainer = trainer

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in on_fit_start: the train dataloader is loaded, so the store can be
        # sized for the rows to come (one right-sized chunk for a short run).
        network = self._network(pl_module)
        expected = trainer.strategy.broadcast(_expected_rows(trainer), src=0)
        # Rank 0 creates (or replaces) the store first; the others then add their groups.
        if trainer.global_rank == 0:
            self.writer = self._open_writer(trainer, network, expected)
        trainer.strategy.barrier("GradientCaptureCallback.open_store")
        if trainer.global_rank != 0:
            self.writer = self._open_writer(trainer, network, expected)

    def _open_writer(
        self, trainer: L.Trainer, network: nn.Module, expected_rows: int | None = None
    ) -> GradientStoreWriter:
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
            expected_rows=expected_rows,
        )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.collector is not None and self.observer is not None
        ids = example_ids(batch, self.example_id_key)
        self._batch = _BatchInfo(
            example_id=ids,
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            advantage=_advantage(batch, len(ids)),
        )
        self._rows = {}
        self.observer.begin(batch, len(ids), watch_now=not pl_module.automatic_optimization)
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
        assert self.observer is not None
        self.collector.enabled = False
        info, self._batch = self._batch, None
        seen = self.observer.finish(
            accumulate=trainer.accumulate_grad_batches, loss_scale=_loss_scale(trainer)
        )
        info.scale, info.loss = seen.scale, seen.loss
        self._warn_once_per_fit(info, seen.source)
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
        self._report_nonfinite(trainer)
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
        prev = self._rows.get(block)
        self._rows[block] = rows if prev is None else prev + rows

    def _write(self, info: _BatchInfo) -> None:
        assert self.collector is not None and self.writer is not None
        rows, self._rows = self._rows, {}
        if not rows:
            return  # no backward through tracked modules (e.g. a skipped batch)
        batch = len(info.example_id)
        assert info.scale is not None
        parts, like = [], next(iter(rows.values()))
        for block in self.collector.blocks:
            part = rows.get(block.name)
            if part is None:  # a module that took no part in this forward
                self._warn_missing(block.name, info.step)
                part = like.new_zeros(batch, math.prod(block.shape))
            parts.append(part.detach())
        grads = torch.cat(parts, dim=1)  # (B, D), in the rows' dtype (float64 stays exact)
        grads = grads.mul_(info.scale.to(grads)[:, None])  # stays on its device: the writer
        # casts to the store's dtype there and copies only what is stored to the host.
        # A finite row sum means a finite row (NaN and inf propagate); only a row whose sum
        # is not finite (or overflowed) needs the elementwise test.
        finite = torch.isfinite(grads.sum(dim=1)).cpu()
        if not bool(finite.all()):
            finite = torch.isfinite(grads).all(dim=1).cpu()
        ids, loss, advantage = info.example_id, info.loss, info.advantage
        if not bool(finite.all()):
            bad = ids[~finite.to(ids.device)].tolist()
            if self.on_nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradients for example ids {bad[:10]} at step {info.step} "
                    f"(epoch {info.epoch}); GradientCaptureCallback(on_nonfinite='raise') stops "
                    f"the fit here. Rows committed so far stay in {self.path}. Look for the "
                    "cause (a loss that overflows, a learning rate too high, bad data), or use "
                    "on_nonfinite='warn' (store them flagged finite=False) or 'skip'."
                )
            self._nonfinite += bad
            if self.on_nonfinite == "skip":
                self.writer.record_skipped(bad, info.step, info.epoch)
                grads, ids, loss, advantage, finite = (
                    None if x is None else x[finite.to(x.device)]
                    for x in (grads, ids, loss, advantage, finite)
                )
                batch = len(ids)
                if batch == 0:
                    return
        step, epoch = (info.step, info.epoch) if self.track_order else (-1, -1)
        self.writer.append(
            grads,
            ids,
            torch.full((batch,), step, dtype=torch.int64),
            torch.full((batch,), epoch, dtype=torch.int32),
            loss,
            advantage,
            finite=finite,
        )

    def _report_nonfinite(self, trainer: L.Trainer) -> None:
        """One warning per rank for the non-finite rows it saw since the last report."""
        if not self._nonfinite:
            return
        bad, self._nonfinite = self._nonfinite, []
        done = {
            "warn": "stored as they are and flagged finite=False (queries skip them)",
            "skip": "not stored; their ids are in GradientStore.skipped",
        }[self.on_nonfinite]
        rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
        warnings.warn(  # every rank: rank 1's bad rows are not rank 0's to report
            f"{rank}{len(bad)} example{'s' if len(bad) != 1 else ''} had non-finite gradients "
            f"in epoch {trainer.current_epoch} (example ids "
            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}): {done}. Set "
            "on_nonfinite='raise' to stop at the first one.",
            stacklevel=2,
        )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report_nonfinite(trainer)

    def _warn_missing(self, block: str, step: int) -> None:
        if f"missing:{block}" not in self._warned:
            self._warned.add(f"missing:{block}")
            rank_zero_warn(
                f"block {block!r} received no gradient at step {step} (its module took no part "
                "in the forward pass, or its forward hook never ran); its rows are stored as "
                "zeros. If that module is never called through its own forward, exclude it. "
                "Shown once."
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

    def _file_normalizers(self) -> dict:
        from .capture.normalizers import convert

        loaded = load_normalizers(self.normalizer_path)  # type: ignore[arg-type]
        return {name: convert(n, self.normalizer) for name, n in loaded.items()}  # type: ignore[arg-type]

    def _metadata(self, network: nn.Module) -> dict[str, Any]:
        return {"model": model_fingerprint(network), **self.settings.to_attrs()}

    def _check_resumable(self, network: nn.Module) -> None:
        """Refuse to append to a store whose model or capture settings differ from this run's."""
        from .store.schema import _open_root_attrs

        assert self.collector is not None
        stored = _open_root_attrs(self.path)
        theirs = CaptureSettings.from_attrs(stored)
        if theirs != self.settings:
            raise ValueError(
                f"cannot resume capture into {self.path}: its capture settings differ from this "
                f"run's ({theirs.describe_diff(self.settings)}, stored != this run); resume with "
                "the settings the store was written with, or start a new store"
            )
        mine = {k: v for k, v in model_fingerprint(network).items() if k != "config"}
        model = {k: v for k, v in stored["model"].items() if k != "config"}
        modules = [b.name for b in self.collector.blocks]
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
        if self.observer is not None:
            self.observer.remove()
            self.observer = None
        if self._step_owner is not None:
            _unobserve_training_step(self._step_owner, self)
            self._step_owner = None

    def _wrap_training_step(self, pl_module: L.LightningModule) -> None:
        """Let the observer see ``training_step``'s output before Lightning backpropagates it."""
        _observe_training_step(pl_module, self)
        self._step_owner = pl_module

    def _after_step(self, pl_module: L.LightningModule, output: Any) -> None:
        if self.observer is not None and self.observer.active:
            self.observer.after_step(output, automatic=pl_module.automatic_optimization)

    def _warn_once_per_fit(self, info: _BatchInfo, source: str) -> None:
        assert self.observer is not None and info.scale is not None
        if self.observer.detached_example_loss and "detached" not in self._warned:
            self._warned.add("detached")
            rank_zero_warn(
                "training_step returned a detached example_loss (no graph to the loss), which "
                "cannot tell each example's scale; the causal-LM rule was applied instead and the "
                "stored losses are its token losses. Return example_loss without .detach() to "
                "store the gradient of your own per-example loss."
            )
        explicit = source == "example_loss" and self.batch_reduction != "auto"
        if explicit and "batch_reduction" not in self._warned:
            self._warned.add("batch_reduction")
            rank_zero_warn(
                f"batch_reduction={self.batch_reduction!r} is not used: training_step returns "
                "example_loss, whose scale in the loss is measured exactly"
            )
        zero = info.scale == 0
        if bool(zero.any()) and "zero" not in self._warned:
            self._warned.add("zero")
            rank_zero_warn(
                f"examples {info.example_id[zero].tolist()[:10]} at step {info.step} did not "
                "enter the training loss (d loss / d l_i = 0: zero weight, or no supervised "
                "token); their rows are stored as zeros. This warning is shown once per fit."
            )

    def _report_capture(self, trainer: L.Trainer, network: nn.Module) -> None:
        """Print, once on rank 0, what is captured and which trainable parameters are not."""
        from .capture.coverage import describe_capture

        assert self.collector is not None
        if trainer.is_global_zero:
            rank_zero_info(describe_capture(network, self.collector).format())


def capture_example_loss(pl_module: L.LightningModule, example_loss: Tensor) -> None:
    """The per-example loss contract for manual optimization: call it before backward.

    With ``automatic_optimization = False`` backward runs inside ``training_step``, before
    the step returns; hand each example's loss to the capture callbacks first::

        def training_step(self, batch, batch_idx):
            example_loss = ...  # [B], in the graph of the loss below
            capture_example_loss(self, example_loss)
            self.manual_backward(example_loss.sum())

    Rows are then the gradients of ``example_loss[i]``, as with ``{"example_loss": ...}``
    under automatic optimization. Without a capture callback attached this does nothing.

    Args:
        pl_module: The LightningModule whose ``training_step`` is running.
        example_loss: ``[B]`` each example's loss, requiring grad.
    """
    wrapper = pl_module.__dict__.get("training_step")
    for cb in getattr(wrapper, "_capture_callbacks", ()):
        if cb.observer is not None:
            cb.observer.use_example_loss(example_loss)


def _effective_include(include: list[str] | None, pl_module: L.LightningModule) -> Any:
    """``include``, or the module's own ``capture_include`` (e.g. IndexModule's frozen layers)."""
    if include is not None:
        return include
    declared = getattr(pl_module, "capture_include", None)
    return None if declared is None else list(declared)


def _advantage(batch: Any, size: int) -> Tensor | None:
    """The batch's ``advantage`` column ``[B]`` (reward-weighted losses), else ``None``."""
    inner = unstamp(batch)
    value = inner.get("advantage") if isinstance(inner, Mapping) else None
    if value is None:
        return None
    value = torch.as_tensor(value).detach().reshape(-1).to("cpu", torch.float32)
    if value.numel() != size:
        raise ValueError(
            f"the batch's 'advantage' has {value.numel()} values for {size} examples; it must "
            "hold one advantage per example"
        )
    return value


def _observe_training_step(pl_module: L.LightningModule, callback: GradientCaptureCallback) -> None:
    """Wrap ``pl_module.training_step`` once; every capture callback sees its output."""
    wrapper = pl_module.__dict__.get("training_step")
    if wrapper is None or not hasattr(wrapper, "_capture_callbacks"):
        step = pl_module.training_step

        @wraps(step)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            for cb in list(wrapper._capture_callbacks):  # type: ignore[attr-defined]
                cb._after_step(pl_module, out)
            return out

        wrapper._capture_callbacks = []  # type: ignore[attr-defined]
        pl_module.training_step = wrapper  # type: ignore[method-assign]
    if callback not in wrapper._capture_callbacks:  # type: ignore[attr-defined]
        wrapper._capture_callbacks.append(callback)  # type: ignore[attr-defined]


def _unobserve_training_step(pl_module: L.LightningModule, callback: Any) -> None:
    wrapper = pl_module.__dict__.get("training_step")
    callbacks = getattr(wrapper, "_capture_callbacks", None)
    if callbacks is None:
        return
    if callback in callbacks:
        callbacks.remove(callback)
    if not callbacks:
        del pl_module.__dict__["training_step"]


def _expected_rows(trainer: L.Trainer) -> int | None:
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


class NonFiniteGradientError(RuntimeError):
    """A captured row had NaN or inf and ``on_nonfinite='raise'`` was set."""


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, valid))}")


def _loss_scale(trainer: L.Trainer) -> float:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0
