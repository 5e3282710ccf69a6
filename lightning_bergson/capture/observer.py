"""ScaleObserver: watch one training step and establish each example's scale ``c_i`` exactly.

Pure torch (no Lightning): :class:`~lightning_bergson.GradientCaptureCallback` calls
:meth:`ScaleObserver.begin` when a micro-batch starts, :meth:`ScaleObserver.after_step` with
what ``training_step`` returned (before backward), and :meth:`ScaleObserver.finish` after
backward. Two sources of ``c_i = d loss / d l_i`` (see :mod:`.scaling`):

1. the **per-example loss contract**: ``{"loss": loss, "example_loss": l}`` with ``l`` ``[B]``
   in the graph of ``loss``; a tensor hook on ``l`` receives ``c`` during backward;
2. the **causal-LM rule**, when there is no usable ``example_loss``: the batch is a mapping
   with 2-D ``input_ids`` (and 2-D ``labels`` of the same shape, or none), the hooked network
   ran once and returned logits ``[B, S, V]``; a tensor hook on the logits fits ``c`` and
   proves that the loss depends on each example only through its summed shifted token loss.

Anything else raises :class:`~.scaling.CaptureContractError` naming the contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import lm_fields, supervised_tokens, unstamp
from ..losses import causal_lm_losses
from .scaling import (
    CaptureContractError,
    declared_scales,
    lm_logit_scales,
    residual_tolerance,
    row_scales,
)

__all__ = ["CONTRACT_HINT", "Observation", "ScaleObserver"]

CONTRACT_HINT = """Return each example's own loss next to the batch loss from training_step:

    example_loss = ...  # shape [B]: example i's loss, in the graph of `loss`
    return {"loss": example_loss.mean(), "example_loss": example_loss}

Rows are then the gradients of example_loss[i], whatever reduction `loss` applies (see the
README section "Your own LightningModule"). Without example_loss, capture needs a causal LM:
a dict batch with 2-D `input_ids` (and `labels` of the same shape, -100 = ignored) whose loss
is the shifted token cross entropy (Hugging Face's convention)."""


@dataclass
class Observation:
    """What one micro-batch's rows need from its step.

    Attributes:
        source: ``"example_loss"`` (the contract) or ``"causal_lm"`` (the rule).
        scale: ``[B]`` float64 multipliers from observed gradients to rows.
        loss: ``[B]`` float32 each example's loss as stored (``l_i``, or the causal-LM loss
            summed or averaged like ``loss_reduction``).
        c: ``[B]`` float64 ``d loss / d l_i`` as observed (includes accumulation and AMP).
    """

    source: str
    scale: Tensor
    loss: Tensor
    c: Tensor


class ScaleObserver:
    """Establish the per-example scale of every micro-batch (see module docs).

    Args:
        network: The hooked network; its output's logits are watched for the causal-LM rule.
        loss_reduction: ``"sum"`` or ``"mean"`` token losses per example (causal LM).
        batch_reduction: ``"auto"`` or a declared reduction, checked against the measurement.
        labels_key: Batch key of the labels.
        example_loss_is_token_sum: The LightningModule's ``example_loss`` is each example's
            summed causal-LM token loss (so ``loss_reduction="mean"`` can divide it).
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        loss_reduction: str = "sum",
        batch_reduction: str = "auto",
        labels_key: str = "labels",
        example_loss_is_token_sum: bool = False,
    ) -> None:
        self.network = network
        self.loss_reduction = loss_reduction
        self.batch_reduction = batch_reduction
        self.labels_key = labels_key
        self.example_loss_is_token_sum = example_loss_is_token_sum
        self.active = False
        self._handle = network.register_forward_hook(self._on_output)
        self._reset(None, 0)

    def remove(self) -> None:
        """Remove the network hook (idempotent)."""
        self._handle.remove()
        self.active = False

    def _reset(self, batch: Any, size: int) -> None:
        self._batch, self._size = batch, size
        self._calls, self._logits = 0, None
        self._source: str | None = None
        self._c: Tensor | None = None
        self._residual: Tensor | None = None
        self._loss: Tensor | None = None
        self._tokens: Tensor | None = None
        self._dtype = torch.float32
        self.detached_example_loss = False

    # ------------------------------------------------------------------ step

    def begin(self, batch: Any, size: int, *, watch_now: bool = False) -> None:
        """A micro-batch of ``size`` examples starts.

        Args:
            watch_now: Watch the logits as soon as the network returns them (manual
                optimization runs backward inside ``training_step``).
        """
        self._reset(batch, size)
        self._watch_now = watch_now
        self.active = True

    def _on_output(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not (self.active and torch.is_grad_enabled()):
            return
        self._calls += 1
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        self._logits = logits if isinstance(logits, Tensor) and logits.requires_grad else None
        if self._watch_now and self._calls == 1 and self._rule_reason() is None:
            self._watch_logits()

    def use_example_loss(self, example_loss: Tensor) -> None:
        """Take ``example_loss`` ``[B]`` as this step's per-example losses (before backward).

        The per-example loss contract for manual optimization, where backward runs inside
        ``training_step``: see :func:`~lightning_bergson.capture_example_loss`.
        """
        if not self.active:
            return
        if not (isinstance(example_loss, Tensor) and example_loss.requires_grad):
            raise CaptureContractError(
                "capture_example_loss(...) needs each example's loss [B] in the graph of the "
                "loss that will be backpropagated; got "
                + (
                    f"a tensor that does not require grad (shape {tuple(example_loss.shape)})"
                    if isinstance(example_loss, Tensor)
                    else type(example_loss).__name__
                )
            )
        self._use_contract(example_loss)

    def after_step(self, output: Any, *, automatic: bool = True) -> None:
        """``training_step`` returned ``output``; choose the source before backward."""
        if not self.active or (not automatic and self._source == "example_loss"):
            return  # manual optimization: capture_example_loss was called before backward
        ex = output.get("example_loss") if isinstance(output, Mapping) else None
        if isinstance(ex, Tensor) and ex.requires_grad and automatic:
            self._use_contract(ex)
            return
        self.detached_example_loss = automatic and isinstance(ex, Tensor)
        reason = self._rule_reason()  # also for manual steps: the network must have run once
        if reason is not None:
            if not automatic:
                reason += " (with manual optimization the rule must hold at the forward pass)"
            raise CaptureContractError(
                f"GradientCaptureCallback cannot tell how much of each example's gradient the "
                f"training loss carries: {reason}.\n\n{CONTRACT_HINT}"
            )
        if self._source != "causal_lm":  # manual optimization watched at the forward pass
            self._watch_logits()

    def _use_contract(self, ex: Tensor) -> None:
        if ex.numel() != self._size:
            raise CaptureContractError(
                f"training_step returned example_loss of shape {tuple(ex.shape)} for a batch of "
                f"{self._size} examples; it must hold one loss per example, shape [{self._size}]"
            )
        self._source = "example_loss"
        self._loss = ex.detach().reshape(-1).to("cpu", torch.float32)
        if self.loss_reduction == "mean":
            fields = lm_fields(self._batch, self.labels_key)
            if not self.example_loss_is_token_sum or fields is None:
                raise CaptureContractError(
                    "loss_reduction='mean' divides each example's summed causal-LM token loss by "
                    "its supervised tokens, but this training_step's example_loss is its own "
                    "per-example loss: the row is its gradient as returned. Use "
                    "loss_reduction='sum' and return the loss you want per example."
                )
            self._tokens = supervised_tokens(fields[1]).to("cpu", torch.float64)
            self._loss = (self._loss / self._tokens.clamp(min=1)).float()
        ex.register_hook(self._on_example_grad)

    def _on_example_grad(self, grad: Tensor) -> None:
        self._c = grad.detach().reshape(-1).to("cpu", torch.float64)

    def _rule_reason(self) -> str | None:
        """Why the causal-LM rule cannot be applied to this step (``None`` if it can)."""
        fields = lm_fields(self._batch, self.labels_key)
        if fields is None:
            batch = unstamp(self._batch)
            kind = type(batch).__name__
            if isinstance(batch, Mapping):
                keys = sorted(map(str, batch))
                return (
                    f"training_step returned no example_loss, and the {kind} batch (keys {keys}) "
                    "is not a causal-LM batch (2-D input_ids, labels absent or of the same shape)"
                )
            return f"training_step returned no example_loss, and a {kind} batch has no labels rule"
        if self._calls != 1:
            return (
                f"training_step returned no example_loss, and the hooked network "
                f"{type(self.network).__name__} ran {self._calls} times with gradients in this "
                "step (the causal-LM rule needs exactly one forward pass)"
            )
        ids, _ = fields
        logits = self._logits
        if logits is None or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            shape = None if logits is None else tuple(logits.shape)
            return (
                f"training_step returned no example_loss, and the network's output has no logits "
                f"of shape [B, S, V] matching input_ids {tuple(ids.shape)} (got {shape})"
            )
        return None

    def _watch_logits(self) -> None:
        logits = self._logits
        assert logits is not None
        labels = lm_fields(self._batch, self.labels_key)[1].to(logits.device)  # type: ignore[index]
        self._source = "causal_lm"
        self._dtype = logits.dtype
        detached = logits.detach()

        def on_grad(grad: Tensor) -> None:
            if self._source != "causal_lm":  # capture_example_loss took over after forward
                return
            self._c, self._residual = lm_logit_scales(detached, labels, grad)
            with torch.no_grad():
                sums = _token_sums(detached, labels)
            self._tokens = supervised_tokens(labels).to("cpu", torch.float64)
            if self.loss_reduction == "mean":
                sums = sums / self._tokens.clamp(min=1)
            self._loss = sums.float()

        logits.register_hook(on_grad)

    def finish(self, *, accumulate: int = 1, loss_scale: float = 1.0) -> Observation:
        """After backward: the micro-batch's scales; raises if they cannot be established."""
        self.active = False
        self._logits = None  # the step's logits die with the step, not at the next one
        if self._source is None:
            raise CaptureContractError(
                "the training step's example losses were never seen: training_step must run "
                f"between the batch start and end hooks.\n\n{CONTRACT_HINT}"
            )
        if self._c is None:
            what = "example_loss" if self._source == "example_loss" else "the network's logits"
            raise CaptureContractError(
                f"{what} received no gradient in backward: it is not in the graph of the loss "
                f"that was backpropagated.\n\n{CONTRACT_HINT}"
            )
        if self._source == "causal_lm":
            self._check_rule(accumulate, loss_scale)
        else:
            self._check_declared_contract(accumulate, loss_scale)
        tokens = self._tokens if self.loss_reduction == "mean" else None
        assert self._loss is not None
        return Observation(self._source, row_scales(self._c, tokens), self._loss, self._c)

    def _check_declared_contract(self, accumulate: int, loss_scale: float) -> None:
        """A declared ``batch_reduction`` must match the ``c_i`` the contract measured."""
        if self.batch_reduction == "auto":
            return
        assert self._c is not None
        # Token sums are weighted per token; any other example_loss counts as one unit.
        fields = lm_fields(self._batch, self.labels_key)
        if self.example_loss_is_token_sum and fields is not None:
            tokens = supervised_tokens(fields[1]).to("cpu", torch.float64)
        elif self.batch_reduction == "token_mean":
            raise CaptureContractError(
                "batch_reduction='token_mean' weights summed causal-LM token losses, but this "
                "training_step's example_loss is its own per-example loss; declare 'sum' or "
                "'example_mean', or leave batch_reduction='auto' (the contract measures each "
                "example's weight exactly)"
            )
        else:
            tokens = torch.ones_like(self._c)
        self._compare_declared(tokens, accumulate, loss_scale, torch.isfinite(self._c), 1e-4)

    def _compare_declared(
        self, tokens: Tensor, accumulate: int, loss_scale: float, finite: Tensor, tol: float
    ) -> None:
        assert self._c is not None
        want = declared_scales(
            self.batch_reduction, tokens, accumulate=accumulate, loss_scale=loss_scale
        )
        seen = (tokens > 0) & finite
        if not torch.allclose(self._c[seen], want[seen], rtol=max(tol, 1e-4), atol=0.0):
            raise CaptureContractError(
                f"batch_reduction={self.batch_reduction!r} does not match the training loss: "
                f"it implies d loss / d L_i = {want[seen][:4].tolist()} but the loss weights "
                f"the examples by {self._c[seen][:4].tolist()} (accumulate_grad_batches="
                f"{accumulate}, loss scale {loss_scale:g} included). Leave batch_reduction='auto' "
                "(measured exactly every batch) or declare the reduction the loss applies."
            )

    def _check_rule(self, accumulate: int, loss_scale: float) -> None:
        assert self._residual is not None and self._c is not None and self._tokens is not None
        tol = residual_tolerance(self._dtype)
        finite = torch.isfinite(self._c) & torch.isfinite(self._residual)
        # Non-finite examples are stored as they are and flagged finite=False by the writer.
        worst = float(self._residual[finite].max()) if bool(finite.any()) else 0.0
        if worst > tol:
            raise CaptureContractError(
                "training_step returned no example_loss, and its loss is not a function of each "
                "example's summed shifted causal-LM token loss: the gradient of the loss with "
                f"respect to the logits departs from that form by {worst:.3g} (relative; "
                f"tolerance {tol:g}). Typical causes: labels not shifted (each position predicts "
                "its own label), label smoothing, a z-loss, or another target.\n\n" + CONTRACT_HINT
            )
        if self.batch_reduction == "auto":
            return
        self._compare_declared(self._tokens, accumulate, loss_scale, finite, tol)


def _token_sums(logits: Tensor, labels: Tensor) -> Tensor:
    return causal_lm_losses(logits, labels)[0].to("cpu", torch.float64)
