"""The scaling rule: how much of each example's own gradient a backward pass carried.

Backward propagates a training loss ``loss`` that combines examples somehow (Hugging Face's
token mean, a mean of example means, a sum, weights, advantages), divided by Lightning's
``accumulate_grad_batches`` and multiplied by an AMP loss scale. The gradient a hook
observes for example ``i`` is ``c_i * grad l_i`` with ``c_i = d loss / d l_i``; the stored
row is the observed gradient times ``1 / c_i``. Two ways to know ``c_i`` exactly:

* **the per-example loss contract**: ``training_step`` returns ``example_loss`` ``[B]`` in the
  graph of ``loss``; a tensor hook on it receives ``c`` during backward
  (:func:`contract_scales` checks it);
* **the causal-LM rule**: for a causal LM with labels ``y``, the gradient of the backpropagated
  loss with respect to the logits ``G [B, S, V]`` must equal ``c_i * D_i`` with
  ``D_i = softmax(z_i) - onehot(y_i)`` at every supervised (shifted) position and 0 elsewhere,
  if and only if the loss is a function of each example's summed token loss.
  :func:`lm_logit_scales` fits ``c_i`` by least squares and returns the relative residual;
  a residual above tolerance means the rule does not hold (no shift, label smoothing,
  another target) and the callback refuses.

Example:
    >>> logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    >>> labels = torch.tensor([[1, 2, 3, -100], [0, 1, 2, 3]])
    >>> sums = torch.stack([torch.nn.functional.cross_entropy(
    ...     logits[i, :-1], labels[i, 1:], ignore_index=-100, reduction="sum") for i in range(2)])
    >>> (0.5 * sums[0] + 3.0 * sums[1]).backward()
    >>> c, residual = lm_logit_scales(logits.detach(), labels, logits.grad)
    >>> [round(x, 9) for x in c.tolist()], bool(residual.max() < 1e-12)
    ([0.5, 3.0], True)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..batch import IGNORE_INDEX

__all__ = [
    "BATCH_REDUCTIONS",
    "CaptureContractError",
    "declared_scales",
    "lm_logit_scales",
    "residual_tolerance",
    "row_scales",
]

BATCH_REDUCTIONS: tuple[str, ...] = ("auto", "token_mean", "example_mean", "sum")

_CHUNK = 256  # positions per chunk of the [S, V] logit gradient


class CaptureContractError(RuntimeError):
    """The scale of each example's gradient in the training loss cannot be established."""


def residual_tolerance(dtype: torch.dtype) -> float:
    """Largest relative residual of the causal-LM rule accepted for logits of ``dtype``."""
    return 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def _residual_direction(logits: Tensor, target: Tensor) -> Tensor:
    """``D = softmax(z) - onehot(y)`` at supervised rows, 0 elsewhere: ``[n, V]`` float32+."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    d = torch.softmax(logits.to(dtype), dim=-1)  # (n, V)
    keep = target != IGNORE_INDEX  # (n,)
    rows = torch.nonzero(keep).squeeze(1)
    d[rows, target[rows]] -= 1.0
    return d * keep[:, None].to(dtype)


def _chunks(logits: Tensor, labels: Tensor, grad: Tensor, i: int):
    """``(G, D)`` chunks of example ``i`` over positions ``0 .. S-1``."""
    seq = logits.shape[1]
    target = torch.cat([labels[i, 1:], labels.new_full((1,), IGNORE_INDEX)])  # (S,)
    for start in range(0, seq, _CHUNK):
        stop = min(start + _CHUNK, seq)
        d = _residual_direction(logits[i, start:stop], target[start:stop])  # (n, V)
        yield grad[i, start:stop].to(d.dtype), d


def lm_logit_scales(logits: Tensor, labels: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Each example's scale ``c_i`` in the causal-LM loss, and how well the rule fits.

    Args:
        logits: ``[B, S, V]`` (detached); position ``t`` predicts ``labels[:, t + 1]``.
        labels: ``[B, S]``, ``-100`` ignored.
        grad: ``[B, S, V]`` gradient of the backpropagated loss with respect to ``logits``.

    Returns:
        ``(c [B], residual [B])`` float64 on the CPU: ``c_i = <G_i, D_i> / <D_i, D_i>``
        (0 for an example without supervised tokens) and
        ``residual_i = |G_i - c_i D_i| / |G_i|`` (0 where ``G_i = 0``).
    """
    batch = logits.shape[0]
    c = torch.zeros(batch, dtype=torch.float64)
    residual = torch.zeros(batch, dtype=torch.float64)
    for i in range(batch):
        gd = dd = 0.0
        for g, d in _chunks(logits, labels, grad, i):
            gd += float((g * d).sum(dtype=torch.float64))
            dd += float((d * d).sum(dtype=torch.float64))
        c[i] = gd / dd if dd > 0 else 0.0
        rr = gg = 0.0
        for g, d in _chunks(logits, labels, grad, i):
            rr += float((g - float(c[i]) * d).square().sum(dtype=torch.float64))
            gg += float(g.square().sum(dtype=torch.float64))
        residual[i] = (rr / gg) ** 0.5 if gg > 0 else 0.0
    return c, residual


def declared_scales(
    batch_reduction: str, tokens: Tensor, *, accumulate: int = 1, loss_scale: float = 1.0
) -> Tensor:
    """The ``c_i`` a declared ``batch_reduction`` implies for summed token losses ``[B]``.

    Args:
        batch_reduction: ``"token_mean"`` (``sum_i l_i / sum_i n_i``), ``"example_mean"``
            (``mean_i l_i / n_i``) or ``"sum"``.
        tokens: ``[B]`` supervised tokens ``n_i`` of each example.
        accumulate: Lightning's ``accumulate_grad_batches`` (the loss is divided by it).
        loss_scale: The AMP loss scale (the loss is multiplied by it).

    Example:
        >>> declared_scales("example_mean", torch.tensor([2, 4]), accumulate=2).tolist()
        [0.125, 0.0625]
    """
    tokens = tokens.to(torch.float64)
    size = tokens.numel()
    if batch_reduction == "token_mean":
        weight = (1.0 / tokens.sum().clamp(min=1)).expand(size)
    elif batch_reduction == "example_mean":
        weight = 1.0 / (size * tokens.clamp(min=1))
    elif batch_reduction == "sum":
        weight = torch.ones(size, dtype=torch.float64)
    else:
        raise ValueError(
            f"batch_reduction={batch_reduction!r} is not one of "
            f"{', '.join(map(repr, BATCH_REDUCTIONS[1:]))}"
        )
    return weight * loss_scale / accumulate


def row_scales(c: Tensor, tokens: Tensor | None = None) -> Tensor:
    """Multipliers ``[B]`` from observed gradients to stored rows.

    Args:
        c: ``[B]`` scale of each example's loss in the backpropagated loss.
        tokens: ``[B]`` supervised tokens when the stored loss is the mean token loss
            (``loss_reduction="mean"`` of a summed causal-LM loss), else ``None``.

    Returns:
        ``1 / c_i`` (``1 / (c_i n_i)`` with tokens), and 0 where ``c_i = 0``: an example that
        did not enter the loss leaves a zero row (the caller warns).

    Example:
        >>> row_scales(torch.tensor([0.5, 0.0]), torch.tensor([2, 3])).tolist()
        [1.0, 0.0]
    """
    c = c.to(torch.float64)
    if tokens is not None:
        c = c * tokens.to(torch.float64)
    return torch.where(c != 0, 1.0 / torch.where(c != 0, c, 1.0), torch.zeros_like(c))
