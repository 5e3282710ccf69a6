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

An Adam state requested as ``"adafactor"`` is factored by row and column means;
an Adafactor state requested as ``"adam"`` is materialized as ``r c^T / mean(r)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer, convert

__all__ = ["normalizers_from_optimizer"]


def _transposed(module: nn.Module) -> bool:
    """HF ``Conv1D`` stores its weight ``[in, out]``."""
    return type(module).__name__ == "Conv1D"


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
        return AdamNormalizer(v_hat.T if transposed else v_hat, eps=float(group["eps"]))
    for row_key, col_key in (("row_var", "col_var"), ("exp_avg_sq_row", "exp_avg_sq_col")):
        if row_key in state:
            rows = _moment(state[row_key]).reshape(-1)  # over the param's dim -2
            cols = _moment(state[col_key]).reshape(-1)  # over the param's dim -1
            eps1 = group["eps"][0] if isinstance(group["eps"], (tuple, list)) else None
            eps1 = torch.finfo(weight.dtype).eps if eps1 is None else float(eps1)
            r, c = (cols, rows) if transposed else (rows, cols)
            return AdafactorNormalizer(r, c, eps=eps1)
    raise ValueError(
        "the optimizer keeps no second moment for this weight (state keys: "
        f"{sorted(state)}); optimizer normalizers need Adam/AdamW or Adafactor, and the "
        "state exists only after the first optimizer step"
    )


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
        modules: Module name -> ``nn.Linear`` or HF ``Conv1D``.
        kind: ``"adam"`` or ``"adafactor"``: the form of the returned normalizers.
        include_bias: Append the bias second moment as a last column.

    Returns:
        Module name -> normalizer in ``[out, in(+1)]`` orientation.
    """
    result: dict[str, Normalizer] = {}
    for name, module in modules.items():
        try:
            norm = _weight_moment(optimizer, module.weight, _transposed(module))
            if include_bias and module.bias is not None:
                norm = _with_bias(norm, _bias_moment(optimizer, module.bias))
        except (KeyError, ValueError) as err:
            raise ValueError(f"cannot read a normalizer for module {name!r}: {err}") from err
        result[name] = convert(norm, kind)  # type: ignore[arg-type]
    return result
