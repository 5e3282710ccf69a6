"""Normalizers read from a live optimizer's second moments.

Which state normalizes which gradient: the rows of optimizer step ``t`` (the
gradients that step ``t`` applies) are normalized with the state *after* step
``t``, i.e. the second moment that already includes step ``t``'s batch gradient.
That is the denominator the optimizer itself used for that update:

* ``torch.optim.Adam``/``AdamW``: ``sqrt(v_t / (1 - beta2^t)) + eps`` (bias-corrected;
  ``max_exp_avg_sq`` with ``amsgrad=True``).
* ``torch.optim.Adafactor``: ``sqrt(r_t c_t^T / mean(r_t))`` from ``row_var``/``col_var``
  (no bias correction: Adafactor's ``beta2_t = 1 - t^-0.8`` schedule needs none).
* ``transformers.optimization.Adafactor``: ``exp_avg_sq_row``/``exp_avg_sq_col``.

Convolution weights ``[O, C, k_1, ..., k_n]`` are read as their block ``[O, C * prod(k)]``.
Adam's ``exp_avg_sq`` is simply reshaped. Adafactor factors a ``>2``-D weight over its
*last two* dims (``row_var`` ``[O, C, ..., k_{n-1}, 1]``, ``col_var`` ``[O, C, ..., 1, k_n]``),
which is not a factorization of the block, so its full estimate is rebuilt exactly as
the optimizer forms it for its update (torch: ``max(r c / max(mean r, eps1), eps1^2)``;
transformers: ``r c / mean r``) and reshaped to ``[O, C * prod(k)]``.

An Adam state requested as ``"adafactor"`` is factored by row and column means;
an Adafactor state requested as ``"adam"`` is materialized as ``r c^T / mean(r)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer, convert
from .selection import is_hf_conv1d

__all__ = ["normalizers_from_optimizer"]


def _transposed(module: nn.Module) -> bool:
    """HF ``Conv1D`` stores its weight ``[in, out]``."""
    return is_hf_conv1d(module)


def _as_block(x: Tensor, transposed: bool) -> Tensor:
    """A weight-shaped tensor as its ``[O, I]`` block.

    HF Conv1D stores ``[in, out]``; a convolution ``[O, C, *k]`` flattens to ``[O, C * prod(k)]``.
    """
    return x.T if transposed else x.reshape(x.shape[0], -1)


def _moment(x: Tensor) -> Tensor:
    """A detached, unsharded copy of optimizer state at float32 precision or better.

    FSDP2 keeps state as a sharded ``DTensor``; ``full_tensor()`` all-gathers it, a
    collective that every rank reaches at the same point (the callback reads the state
    after every optimizer step on all ranks, modules in the same order).
    """
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    x = x.detach()
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x.clone()


def _param_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise KeyError("parameter is not handled by the optimizer")


def _weight_moment(
    optimizer: torch.optim.Optimizer, weight: Tensor, transposed: bool
) -> Normalizer:
    state = optimizer.state.get(weight, {})
    group = _param_group(optimizer, weight)
    if "exp_avg_sq" in state:
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        v_hat = _moment(v) / (1.0 - group["betas"][1] ** step)
        return AdamNormalizer(_as_block(v_hat, transposed), eps=float(group["eps"]))
    for row_key, col_key in (("row_var", "col_var"), ("exp_avg_sq_row", "exp_avg_sq_col")):
        if row_key in state:
            eps1 = group["eps"][0] if isinstance(group["eps"], (tuple, list)) else None
            eps1 = torch.finfo(weight.dtype).eps if eps1 is None else float(eps1)
            row, col = _moment(state[row_key]), _moment(state[col_key])
            if weight.dim() > 2:
                return AdamNormalizer(_full_adafactor(row, col, row_key, eps1), eps=0.0)
            rows = row.reshape(-1)  # over the param's dim -2
            cols = col.reshape(-1)  # over the param's dim -1
            r, c = (cols, rows) if transposed else (rows, cols)
            return AdafactorNormalizer(r, c, eps=eps1)
    raise ValueError(
        "the optimizer keeps no second moment for this weight (state keys: "
        f"{sorted(state)}); optimizer normalizers need Adam/AdamW or Adafactor, and the "
        "state exists only after the first optimizer step"
    )


def _full_adafactor(row: Tensor, col: Tensor, row_key: str, eps1: float) -> Tensor:
    """The second-moment estimate Adafactor divides a ``>2``-D weight's gradient by, as a block.

    Args:
        row: torch ``row_var`` ``[..., R, 1]`` or transformers ``exp_avg_sq_row`` ``[..., R]``.
        col: torch ``col_var`` ``[..., 1, C]`` or transformers ``exp_avg_sq_col`` ``[..., C]``.
        row_key: Which optimizer's state this is (``"row_var"``: torch).
        eps1: torch's clamp of ``mean(r)`` and of the estimate (``eps1^2``).
    """
    if row_key == "row_var":  # torch.optim.Adafactor
        full = row @ col  # (O, ..., R, C)
        full = full / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
        full = full.clamp(min=eps1 * eps1)
    else:  # transformers Adafactor: r / mean(r) over the last dim, times c
        r_hat = row / row.mean(dim=-1, keepdim=True)  # (O, ..., R)
        full = r_hat[..., None] * col[..., None, :]  # (O, ..., R, C)
    return full.reshape(full.shape[0], -1)  # (O, C * prod(k))


def _bias_moment(optimizer: torch.optim.Optimizer, bias: Tensor) -> Tensor:
    state = optimizer.state.get(bias, {})
    group = _param_group(optimizer, bias)
    if "exp_avg_sq" in state and "betas" in group:
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        return _moment(v) / (1.0 - group["betas"][1] ** float(state["step"]))
    for key in ("variance", "exp_avg_sq"):
        if key in state:
            return _moment(state[key])
    raise ValueError(
        f"the optimizer keeps no second moment for a bias (state keys: {sorted(state)})"
    )


def _with_bias(norm: Normalizer, bias_v: Tensor) -> Normalizer:
    """Append the bias second moment as the last column."""
    if isinstance(norm, AdamNormalizer):
        return AdamNormalizer(torch.cat([norm.avg_sq, bias_v[:, None]], dim=1), eps=norm.eps)
    # The column statistic that best fits bias_v given the rows (I-divergence) is its mean.
    col = torch.cat([norm.col, bias_v.mean().reshape(1)])
    return AdafactorNormalizer(norm.row, col, eps=norm.eps)


def _check_handled(optimizer: torch.optim.Optimizer, name: str, module: nn.Module) -> None:
    """Refuse a module whose weight the optimizer does not update (frozen, or another group)."""
    weight = module.weight
    if any(p is weight for group in optimizer.param_groups for p in group["params"]):
        return
    why = "is frozen (requires_grad=False)" if not weight.requires_grad else "is in no param group"
    raise ValueError(
        f"module {name!r}: its weight {why}, so the optimizer keeps no state to normalize it "
        "with. Frozen modules need normalizer='none' or normalizer_source='file' (or drop them "
        "from include; include=None selects only modules whose weight requires grad)"
    )


def normalizers_from_optimizer(
    optimizer: torch.optim.Optimizer,
    modules: Mapping[str, nn.Module],
    kind: str,
    *,
    include_bias: bool = False,
) -> dict[str, Normalizer]:
    """Normalizers for ``modules`` from ``optimizer``'s current state.

    Args:
        optimizer: A torch optimizer (not Lightning's wrapper) after at least one step.
        modules: Module name -> ``nn.Linear``, HF ``Conv1D`` or ``nn.Conv1d/2d/3d``.
        kind: ``"adam"`` or ``"adafactor"``: the form of the returned normalizers.
        include_bias: Append the bias second moment as a last column.

    Returns:
        Module name -> normalizer in ``[out, in(+1)]`` orientation.

    Raises:
        ValueError: naming the module, when its weight is not handled by ``optimizer``
            (frozen) or the optimizer keeps no second moment for it.
    """
    result: dict[str, Normalizer] = {}
    for name, module in modules.items():
        _check_handled(optimizer, name, module)
        try:
            norm = _weight_moment(optimizer, module.weight, _transposed(module))
            if include_bias and module.bias is not None:
                norm = _with_bias(norm, _bias_moment(optimizer, module.bias))
        except (KeyError, ValueError) as err:
            raise ValueError(f"cannot read a normalizer for module {name!r}: {err}") from err
        result[name] = convert(norm, kind)  # type: ignore[arg-type]
    return result
