"""Convolutions as Linear layers over patches (``nn.Conv1d``/``Conv2d``/``Conv3d``).

A convolution with weight ``[O, C / groups, k_1, ..., k_n]`` applies the same
matrix ``W = weight.reshape(O, -1)`` to every input patch: with the input unfolded
into patches ``a`` ``[B, P, C * prod(k)]`` (one row per output position) and the
output gradient ``g`` ``[B, P, O]``, example ``i``'s weight gradient is
``G_i = sum_t g_it a_it^T`` exactly as for ``nn.Linear``, so projection,
normalizers and heads apply unchanged. Padding (any ``padding_mode``, also
``padding="same"``), stride and dilation enter only through the unfolding.

With ``groups = G > 1`` output channels ``[j O/G, (j+1) O/G)`` see only input
channels of group ``j``; the block is still the weight's own ``[O, C/G * prod(k)]``,
computed per group without forming a block-diagonal matrix.

Example:
    >>> conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
    >>> patches(conv, torch.randn(4, 2, 5, 5)).shape   # 3 x 3 positions, 2 * 3 * 3 per patch
    torch.Size([4, 9, 18])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONV_TYPES",
    "conv_features",
    "grouped_gradient",
    "grouped_projection",
    "output_gradient",
    "patches",
]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Captured convolutions (transposed convolutions are not: their weight is ``[C, O/G, k]``)."""


def conv_features(module: nn.Module) -> tuple[int, int]:
    """``(out_channels, in_channels // groups * prod(kernel_size))``: the block's shape."""
    weight = module.weight
    return int(weight.shape[0]), int(math.prod(weight.shape[1:]))


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfold a convolution's input ``[B, C, *spatial]`` into ``[B, P, C * prod(k)]``.

    The patch axis is ordered ``(channel, k_1, ..., k_n)`` like ``weight[o].flatten()``,
    positions ``P`` in row-major order of the output's spatial axes. Unbatched input
    ``[C, *spatial]`` is treated as a batch of one.
    """
    kernel, n = module.kernel_size, len(module.kernel_size)
    if x.dim() == n + 1:
        x = x.unsqueeze(0)  # (1, C, *spatial)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)  # (B, C, *padded)
    for dim, (k, s, d) in enumerate(zip(kernel, module.stride, module.dilation, strict=True)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)  # (B, C, ..., P_dim, ..., window)
        if d > 1:
            x = x[..., ::d]  # (B, C, ..., P_dim, ..., k_dim)
    batch, channels = x.shape[:2]
    order = (0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    x = x.permute(order)  # (B, P_1, ..., P_n, C, k_1, ..., k_n)
    return x.reshape(batch, -1, channels * math.prod(kernel))  # (B, P, C * prod(k))


def output_gradient(module: nn.Module, g: Tensor) -> Tensor:
    """A convolution's output gradient ``[B, O, *positions]`` as ``[B, P, O]``."""
    if g.dim() == len(module.kernel_size) + 1:
        g = g.unsqueeze(0)  # (1, O, *positions)
    return g.flatten(2).transpose(1, 2)  # (B, P, O)


def grouped_gradient(a: Tensor, g: Tensor) -> Tensor:
    """Per-example gradients ``[B, O, c]`` of a grouped convolution.

    Args:
        a: Patches split by group, ``[B, P, G, c]`` (``c = C/G * prod(k)``, + 1 with bias).
        g: Output gradient ``[B, P, O]``; group ``j`` owns outputs ``[j O/G, (j+1) O/G)``.
    """
    batch, seq, groups = a.shape[:3]
    gv = g.view(batch, seq, groups, -1)  # (B, P, G, O/G)
    full = torch.einsum("bsjo,bsjc->bjoc", gv, a)  # (B, G, O/G, c)
    return full.reshape(batch, -1, a.shape[-1])  # (B, O, c)


def grouped_projection(a: Tensor, g: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``vec(L G_i R^T)`` ``[B, p * p]`` of a grouped convolution, never forming ``G_i``.

    ``L G R^T = sum_j sum_t (L_j g_jt)(R a_jt)^T`` with ``L_j`` the columns of ``L``
    belonging to group ``j``'s outputs.

    Args:
        a: Patches split by group, ``[B, P, G, c]``.
        g: Output gradient ``[B, P, O]``.
        left: ``L`` ``[p, O]``.
        right: ``R`` ``[p, c]``.
    """
    batch, seq, groups = a.shape[:3]
    p = left.shape[0]
    gv = g.view(batch, seq, groups, -1)  # (B, P, G, O/G)
    gl = torch.einsum("bsjk,pjk->bsjp", gv, left.view(p, groups, -1))  # (B, P, G, p)
    ar = a @ right.T  # (B, P, G, p)
    return torch.einsum("bsjp,bsjq->bpq", gl, ar).reshape(batch, p * p)  # (B, p * p)
