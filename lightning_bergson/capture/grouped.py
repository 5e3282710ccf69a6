"""Rows of many same-shaped layers at once: one batched matmul instead of one per layer.

The deferred path (normalizer from the optimizer state after each step) processes every
tracked layer of a step together. On an accelerator the per-layer work is a handful of
small kernels, so a 12-layer model launches the same few kernels 12 times per layer type
and the step becomes bound by Python and kernel launches. Layers whose inputs, output
gradients and projections have the same shapes (every layer's ``query_key_value``, every
``dense_h_to_4h``, ...) are stacked along a leading layer axis ``L`` and projected with
batched matmuls; the math per layer is exactly that of
:meth:`GradientCollector.compute_rows` for a plain (single-head, unpermuted, non-conv)
layer:

    row = vec((g diag(r) L^T)^T ([a, 1] diag(c) R^T))

with the Adafactor scales ``r``, ``c`` folded into the projections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .normalizers import AdafactorNormalizer

__all__ = ["stacked_rows", "stacked_scales"]


def stacked_scales(
    norms: Sequence[AdafactorNormalizer], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``AdafactorNormalizer.scales`` of ``L`` same-shaped normalizers: ``[L, O], [L, I]``."""
    tiny = torch.finfo(torch.float64).tiny
    rows = torch.stack([n.row for n in norms]).to(device=device, dtype=torch.float64)  # (L, O)
    cols = torch.stack([n.col for n in norms]).to(device=device, dtype=torch.float64)  # (L, I)
    eps = torch.tensor([n.eps for n in norms], dtype=torch.float64, device=device)  # (L,)
    mean_r = torch.maximum(rows.mean(dim=1), eps)  # (L,)
    row_scale = rows.clamp(min=tiny).rsqrt()
    col_scale = (cols.clamp(min=tiny) / mean_r[:, None]).rsqrt()
    return row_scale.to(dtype), col_scale.to(dtype)


def stacked_rows(
    a: Sequence[Tensor],
    g: Sequence[Tensor],
    lefts: Tensor,
    rights: Tensor,
    *,
    bias: bool,
    scales: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Projected rows ``[L, B, p * p]`` of ``L`` layers with equal shapes.

    Args:
        a: Each layer's input, ``[B, ..., I]``.
        g: Each layer's output gradient, ``[B, ..., O]``.
        lefts: ``[L, p, O]``, each layer's left projection.
        rights: ``[L, p, I (+1 with bias)]``, each layer's right projection.
        bias: Whether the last column of ``rights`` is the bias column.
        scales: Adafactor ``([L, O], [L, I (+1)])`` row and column scales, or ``None``.
    """
    dtype = lefts.dtype
    batch = g[0].shape[0]
    inputs = torch.stack([x.reshape(batch, -1, x.shape[-1]) for x in a]).to(dtype)  # (L,B,S,I)
    grads = torch.stack([x.reshape(batch, -1, x.shape[-1]) for x in g]).to(dtype)  # (L,B,S,O)
    if scales is not None:
        lefts = lefts * scales[0][:, None, :]  # (L, p, O)
        rights = rights * scales[1][:, None, :]  # (L, p, I(+1))
    offset = None
    if bias:  # [a, 1] R^T = a R[:, :I]^T + R[:, I]
        rights, offset = rights[..., :-1], rights[..., -1]  # (L, p, I), (L, p)
    ar = inputs @ rights.transpose(1, 2)[:, None]  # (L, B, S, p)
    if offset is not None:
        ar = ar + offset[:, None, None, :]
    gl = grads @ lefts.transpose(1, 2)[:, None]  # (L, B, S, p)
    out = gl.transpose(-1, -2) @ ar  # (L, B, p, p)
    return out.reshape(out.shape[0], batch, -1)
