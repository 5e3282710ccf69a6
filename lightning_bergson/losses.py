"""Per-example losses: the causal-LM loss, its batch reductions, and the ``loss_fn`` contract.

One home for the shifted causal-LM cross entropy (token ``t`` predicts ``labels[:, t + 1]``,
``-100`` ignored, as in Hugging Face) that training, capture, queries, EK-FAC and MAGIC use.

The query-side contract for any model is :data:`LossFn`: ``loss_fn(model, batch) -> [B]``,
each example's own loss, whose gradient is the query row (the training side's contract is
``training_step`` returning ``{"loss": ..., "example_loss": [B]}``).

Example:
    >>> logits, labels = torch.zeros(2, 3, 4), torch.tensor([[1, 2, 3], [0, 1, -100]])
    >>> sums, counts = causal_lm_losses(logits, labels)
    >>> counts.tolist(), torch.allclose(sums, counts * torch.log(torch.tensor(4.0)))
    ([2, 1], True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .batch import IGNORE_INDEX, causal_lm_labels, lm_fields

__all__ = [
    "LossFn",
    "LossFnContractError",
    "TokenLossFn",
    "batch_losses",
    "causal_lm_loss_fn",
    "causal_lm_losses",
    "causal_lm_token_loss_fn",
    "network_logits",
    "token_losses",
]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(network, batch) -> [B]``: each example's own loss (in the graph of the network)."""

TokenLossFn = Callable[[nn.Module, Any], Tensor]
"""``token_loss_fn(network, batch) -> [B, S]``: each example's loss split over its positions,
summing over ``S`` to the example's loss of :data:`LossFn` (per-token attribution)."""


class LossFnContractError(TypeError):
    """The default causal-LM loss was asked for on a batch that is not a causal-LM batch."""


def _float_logits(logits: Tensor) -> Tensor:
    """Half-precision logits upcast to float32; float32/float64 kept (exact runs)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Token losses aligned with input positions, and the mask of supervised positions.

    Args:
        logits: ``[B, S, V]``; position ``t`` predicts token ``t + 1``.
        labels: ``[B, S]`` with ``-100`` at ignored positions.

    Returns:
        ``(loss [B, S], mask [B, S])``: ``loss[:, t]`` is the loss of predicting
        ``labels[:, t]`` (0 at ``t = 0`` and at ignored positions).
    """
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}: "
            "causal-LM token losses need logits [B, S, V] (the vocabulary last) for labels "
            "[B, S]; transpose a [B, V, S] output or pass a loss_fn of your own"
        )
    batch, seq, vocab = logits.shape
    # Rows of contiguous logits, targets shifted left: 2-3x faster than a class dimension in
    # the middle (``[B, V, S]``), and no copy of the logits (the last position is ignored).
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, S)
    loss = nn.functional.cross_entropy(
        _float_logits(logits).reshape(batch * seq, vocab),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(batch, seq)  # loss[:, t] predicts labels[:, t + 1]
    loss = nn.functional.pad(loss[:, :-1], (1, 0))  # (B, S)
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return loss, mask


def causal_lm_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example summed token losses and supervised-token counts.

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]``.

    Returns:
        ``(sums [B], counts [B])``.
    """
    loss, mask = token_losses(logits, labels)  # (B, S), (B, S)
    return loss.sum(1), mask.sum(1)


def batch_losses(logits: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
    """Hugging Face's batch loss (mean over supervised tokens) and each example's summed loss.

    ``loss`` is a function of ``example_loss`` only (``sum(example_loss) / tokens``), so a
    ``training_step`` returning both fulfils the per-example loss contract.

    Returns:
        ``(loss [], example_loss [B])``, both in the graph of ``logits``.
    """
    sums, counts = causal_lm_losses(logits, causal_lm_labels(batch))  # (B,), (B,)
    return sums.sum() / counts.sum().clamp(min=1), sums


def network_logits(network: nn.Module, batch: Any) -> Tensor:
    """Logits ``[B, S, V]`` of a Hugging Face-style causal LM called on a batch mapping."""
    out = network(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out if isinstance(out, Tensor) else out.logits


def causal_lm_loss_fn(reduction: str = "sum") -> LossFn:
    """The default query loss: each example's summed (or mean) supervised-token loss ``[B]``.

    The network is called as ``network(input_ids=..., attention_mask=...)`` and must return
    logits (a tensor or an object with ``.logits``).

    Raises:
        LossFnContractError: (when called) the batch is not a causal-LM batch; the message
            shows the ``loss_fn`` to pass instead.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss reduction {reduction!r} is not one of 'sum', 'mean'")

    def loss_fn(network: nn.Module, batch: Any) -> Tensor:
        fields = lm_fields(batch)
        if fields is None:
            raise LossFnContractError(_contract_message(batch))
        logits = network_logits(network, batch)  # (B, S, V)
        sums, counts = causal_lm_losses(logits, fields[1].to(logits.device))  # (B,), (B,)
        return sums if reduction == "sum" else sums / counts.clamp(min=1)

    return loss_fn


def causal_lm_token_loss_fn(reduction: str = "sum") -> TokenLossFn:
    """Each example's token losses ``[B, S]``, summing to :func:`causal_lm_loss_fn`'s ``[B]``.

    ``loss[:, t]`` is the loss of predicting token ``t`` (0 at position 0 and wherever the
    label is ``-100``); with ``reduction="mean"`` each is divided by its example's number of
    supervised tokens, so the sum over positions is the example's mean token loss.

    Raises:
        LossFnContractError: (when called) the batch is not a causal-LM batch.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss reduction {reduction!r} is not one of 'sum', 'mean'")

    def token_loss_fn(network: nn.Module, batch: Any) -> Tensor:
        fields = lm_fields(batch)
        if fields is None:
            raise LossFnContractError(_contract_message(batch, token=True))
        logits = network_logits(network, batch)  # (B, S, V)
        loss, mask = token_losses(logits, fields[1].to(logits.device))  # (B, S), (B, S)
        if reduction == "mean":
            loss = loss / mask.sum(1, keepdim=True).clamp(min=1)
        return loss

    return token_loss_fn


def _contract_message(batch: Any, *, token: bool = False) -> str:
    kind = type(batch).__name__
    if isinstance(batch, dict):
        kind += f" with keys {sorted(map(str, batch))}"
    head = (
        f"the default causal-LM {'token' if token else 'query'} loss needs a mapping with 2-D "
        f"'input_ids' and optional 'labels' of the same shape, but got a {kind}. "
    )
    if token:
        return head + (
            "For any other model pass token_loss_fn(model, batch) -> [B, S], each example's "
            "loss split over its positions (summing over S to the example's loss as the store "
            "captured it), e.g. for a token classifier:\n"
            "    token_loss_fn = lambda model, b: torch.nn.functional.cross_entropy(\n"
            "        model(b['input_ids']).logits.transpose(1, 2), b['labels'], reduction='none')"
        )
    return head + (
        "For any other model pass "
        "loss_fn(model, batch) -> [B], each example's own loss, e.g. for a classifier:\n"
        "    loss_fn = lambda model, b: torch.nn.functional.cross_entropy(\n"
        "        model(**{k: v for k, v in b.items() if k != 'labels'}).logits, b['labels'],\n"
        "        reduction='none')"
    )
