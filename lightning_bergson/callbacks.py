"""GradientCaptureCallback: store every training example's gradient during ``fit``.

Lightning glue only: the math is in :mod:`lightning_bergson.capture` (hooks, scales, row
assembly and the non-finite policy in :mod:`~lightning_bergson.capture.rows`), the store's
lifecycle across a fit and its resumes in :mod:`lightning_bergson.capture_store`, how
``training_step``'s output reaches the callback in :mod:`lightning_bergson.training_step`.

Run: ``python -m lightning_bergson fit --config configs/quickstart.yaml``
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
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
from .capture.normalizers import load_normalizers
from .capture.observer import ScaleObserver
from .capture.rows import (
    BatchInfo,
    BatchRows,
    NonFiniteGradientError,
    NonFinitePolicy,
    RowAssembler,
    finite_rows,
)
from .capture.scaling import BATCH_REDUCTIONS
from .capture.settings import CaptureSettings
from .capture_store import CaptureStore
from .store import GradientStoreWriter
from .store.location import is_url
from .strategy import BergsonStrategyMixin as _registers_strategy_names  # noqa: F401
from .training_step import capture_example_loss, observe_training_step, unobserve_training_step

__all__ = ["GradientCaptureCallback", "NonFiniteGradientError", "capture_example_loss"]

BatchReduction = Literal["auto", "token_mean", "example_mean", "sum"]


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
        path: Directory of the Zarr gradient store (``*.zarr``), or its URL on object
            storage (``s3://bucket/run.zarr``; every rank of every node writes there).
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
        storage_options: Options of the URL's fsspec filesystem (``endpoint_url``,
            credentials, ...); without them the usual environment variables apply
            (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), which keeps secrets out of
            saved hyperparameters and configs.

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
        storage_options: dict[str, Any] | None = None,
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
        self.path = path if is_url(path) else Path(path)
        self.storage_options = dict(storage_options or {})
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
        self.rows: RowAssembler | None = None
        self.store = CaptureStore(self.path, storage_options=self.storage_options)
        self.nonfinite = NonFinitePolicy(on_nonfinite, self.path)
        self._step_owner: L.LightningModule | None = None
        self._batch: BatchInfo | None = None
        self._deferred: list[tuple[BatchInfo, list]] = []
        self._trainer: L.Trainer | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    @property
    def writer(self) -> GradientStoreWriter | None:
        """This rank's store writer while the fit runs (see :class:`CaptureStore`)."""
        return self.store.writer

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
        self.rows = RowAssembler(self.collector.blocks)
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
        assert self.collector is not None
        self.store.open(
            trainer,
            self._network(pl_module),
            self.collector.blocks,
            self.settings,
            dtype=self.dtype,
            chunk_rows=self.chunk_rows,
            overwrite=self.overwrite,
        )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.collector is not None and self.observer is not None
        ids = example_ids(batch, self.example_id_key)
        self._batch = BatchInfo(
            example_id=ids,
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            advantage=_advantage(batch, len(ids)),
        )
        assert self.rows is not None
        self.rows.clear()
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
        normalized = self.normalizer != "none" and self.collector is not None
        self.store.close(trainer, self.collector.normalizers if normalized else None)  # type: ignore[union-attr]

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.store.abort()
        self._remove_hooks()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Rows each rank has committed; called on every rank when a checkpoint is saved."""
        return self.store.state_dict(self._trainer)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.store.load_state_dict(state_dict)

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
        assert self.rows is not None
        self.rows.add(block, rows)

    def _write(self, info: BatchInfo) -> None:
        assert self.rows is not None and info.scale is not None
        grads = self.rows.assemble(len(info.example_id), info.scale)
        if grads is None:
            return  # no backward through tracked modules (e.g. a skipped batch)
        for block in self.rows.missing:
            self._warn_missing(block, info.step)
        rows = BatchRows(grads, info.example_id, finite_rows(grads), info.loss, info.advantage)
        rows, skipped = self.nonfinite.apply(rows, info.step, info.epoch)
        if skipped:
            self.store.record_skipped(skipped, info.step, info.epoch)
        if len(rows.example_id):
            self.store.append(rows, info, track_order=self.track_order)

    def _report_nonfinite(self, trainer: L.Trainer) -> None:
        """One warning per rank for the non-finite rows it saw since the last report."""
        rank = trainer.global_rank if trainer.world_size > 1 else None
        message = self.nonfinite.report(trainer.current_epoch, rank)
        if message is not None:  # every rank: rank 1's bad rows are not rank 0's to report
            warnings.warn(message, stacklevel=2)

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
    def _stepped(trainer: L.Trainer, info: BatchInfo) -> bool:
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

    def _remove_hooks(self) -> None:
        if self.collector is not None:
            self.collector.remove()
            self.collector = None
        if self.observer is not None:
            self.observer.remove()
            self.observer = None
        if self._step_owner is not None:
            unobserve_training_step(self._step_owner, self)
            self._step_owner = None

    def _wrap_training_step(self, pl_module: L.LightningModule) -> None:
        """Let the observer see ``training_step``'s output before Lightning backpropagates it."""
        observe_training_step(pl_module, self)
        self._step_owner = pl_module

    def _after_step(self, pl_module: L.LightningModule, output: Any) -> None:
        if self.observer is not None and self.observer.active:
            self.observer.after_step(output, automatic=pl_module.automatic_optimization)

    def _warn_once_per_fit(self, info: BatchInfo, source: str) -> None:
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


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, valid))}")


def _loss_scale(trainer: L.Trainer) -> float:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0
