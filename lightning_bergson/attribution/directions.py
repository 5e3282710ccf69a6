"""Directions in parameter space that a row-space vector stands for: the adjoint of capture.

A stored row is a linear function of its example's parameter gradient. For a module with
weight gradient ``G`` (``[O, I]``, ``[O, I + 1]`` with a bias column) the collector
(:class:`~lightning_bergson.capture.GradientCollector`) normalizes it, ``N(G)``
(Adafactor ``diag(r) G diag(c)``, Adam ``G / (sqrt(v) + eps)``), splits it into heads
(blocks of rows or columns, after a fixed permutation) and projects each head,
``vec(L_h N(G)_h R_h^T)`` (``p = 0``: ``vec(N(G)_h)``). Call that linear map ``P``; then for
any vector ``u`` over the rows' columns

    u . P(G) = < P^T u, G >,      P^T u = N^T( heads^T( L_h^T U_h R_h ) ),

with ``U_h`` the ``[p, p]`` slice of ``u`` of head ``h``. :func:`parameter_directions`
computes ``P^T u`` for every tracked module, shaped like its parameters (``nn.Linear``
``[O, I]``, HF ``Conv1D`` ``[I, O]``, ``ConvNd`` ``[O, C / groups, *k]``, bias ``[O]``), so
``u . row`` of any loss equals the directional derivative of that loss along ``P^T u``: one
forward-mode pass gives it for every token of a batch (:mod:`.token_scores`).

Example:
    >>> from lightning_bergson.capture import GradientCollector
    >>> net = nn.Sequential(nn.Linear(3, 2, bias=False))
    >>> col = GradientCollector(net, projection_dim=0)
    >>> u = torch.arange(6.0)[None]                        # a row-space vector [1, 6]
    >>> parameter_directions(col, u, ["0"])["0.weight"][0]  # [O, I] = u reshaped
    tensor([[0., 1., 2.],
            [3., 4., 5.]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..capture import GradientCollector
from ..capture.conv import CONV_TYPES
from ..capture.normalizers import AdafactorNormalizer, AdamNormalizer
from ..capture.selection import is_hf_conv1d

__all__ = ["parameter_directions"]

_CPU = torch.device("cpu")


def parameter_directions(
    collector: GradientCollector, u: Tensor, blocks: Sequence[str]
) -> dict[str, Tensor]:
    """``P^T u`` of every module with a block in ``blocks``: parameter name -> ``[Q, *shape]``.

    Args:
        collector: A collector configured like the store (:meth:`QueryEncoder.collector`);
            only its settings are read (its hooks need not be attached).
        u: ``[Q, D_sel]`` row-space vectors whose columns are ``blocks`` in order.
        blocks: Names of the blocks making up ``u``'s columns (a subset of the collector's,
            in the collector's order); blocks not named count as zero.

    Returns:
        Parameter names relative to ``collector.model`` (``"<module>.weight"``, and
        ``"<module>.bias"`` when biases are captured) -> float64 directions on the CPU.
    """
    sizes = {b.name: b.shape[0] * b.shape[1] for b in collector.blocks}
    u = u.to(_CPU, torch.float64)
    parts, start = {}, 0
    for name in blocks:
        parts[name] = u[:, start : start + sizes[name]]  # (Q, d)
        start += sizes[name]
    if start != u.shape[1]:
        raise ValueError(f"u has {u.shape[1]} columns but the blocks {list(blocks)} {start}")
    out: dict[str, Tensor] = {}
    for name, plan in collector.plans.items():
        if not any(b.name in parts for b in plan.blocks):
            continue
        full = _module_direction(collector, name, parts, len(u))  # (Q, O, I[+1])
        module = collector.modules[name]
        out[f"{name}.weight"] = _weight_shaped(module, full[..., : full.shape[-1] - plan.bias])
        if plan.bias:
            out[f"{name}.bias"] = full[..., -1]  # (Q, O)
    return out


def _module_direction(
    collector: GradientCollector, name: str, parts: dict[str, Tensor], num: int
) -> Tensor:
    """``P^T u`` of one module as ``[Q, O, I (+1)]`` in the weight's ``[out, in]`` orientation."""
    plan, p = collector.plans[name], collector.projection_dim
    names = [b.name for b in plan.blocks]
    if p:
        lefts = collector.projections.get(names, "left", plan.head_out, torch.float64, _CPU)
        rights = collector.projections.get(names, "right", plan.head_in, torch.float64, _CPU)
    heads = []
    for h, block in enumerate(names):
        part = parts.get(block)
        if part is None:
            heads.append(torch.zeros(num, plan.head_out, plan.head_in, dtype=torch.float64))
        elif p:  # <U, L M R^T> = <L^T U R, M>
            heads.append(lefts[h].T @ part.reshape(num, p, p) @ rights[h])  # (Q, o, i)
        else:
            heads.append(part.reshape(num, plan.head_out, plan.head_in))  # (Q, o, i)
    axis = 1 if plan.split_output else 2
    full = torch.cat(heads, dim=axis)  # (Q, O, I[+1]) in head order
    if plan.perm is not None:  # the block took index_select(perm): scatter back
        full = torch.zeros_like(full).index_copy(axis, plan.permutation(_CPU), full)
    norm = collector.normalizers.get(name)
    if isinstance(norm, AdafactorNormalizer):
        rows, cols = norm.scales(torch.float64, _CPU)  # (O,), (I[+1],)
        full = full * rows[:, None] * cols[None, :]
    elif isinstance(norm, AdamNormalizer):
        full = full / norm.denominator(torch.float64, _CPU)
    return full


def _weight_shaped(module: nn.Module, direction: Tensor) -> Tensor:
    """A direction ``[Q, O, I]`` laid out like ``module.weight`` (``[Q, *weight.shape]``)."""
    if is_hf_conv1d(module):
        return direction.transpose(1, 2)  # HF Conv1D stores [in, out]
    if isinstance(module, CONV_TYPES):
        return direction.reshape(len(direction), *module.weight.shape)
    return direction
