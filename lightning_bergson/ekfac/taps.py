"""Linear-layer inputs and output gradients, without touching parameter gradients.

:class:`LinearTaps` keeps every call's input ``a`` and output of the tracked layers during a
forward pass; :meth:`LinearTaps.backward` then asks autograd for ``dL/d output`` with
``torch.autograd.grad(loss, outputs)``. No ``.grad`` is accumulated and no DDP reducer hook
fires, so EK-FAC runs inside a DDP-wrapped ``training_step`` without an optimizer.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> with LinearTaps(net, ["0", "2"]) as taps:
    ...     loss = net(torch.randn(5, 7, 4)).square().sum()
    ...     pairs = taps.backward(loss)
    >>> [(name, tuple(a.shape), tuple(g.shape)) for name, a, g in pairs]
    [('0', (5, 7, 4), (5, 7, 3)), ('2', (5, 7, 3), (5, 7, 2))]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .factors import per_example_gradient, with_bias_column

__all__ = ["LinearTaps", "example_gradients"]

LossFn = Callable[[Any], Tensor]
"""``loss_fn(batch) -> [B]`` per-example losses of a batch."""


class LinearTaps:
    """Context manager recording ``(name, input, output)`` of every call of chosen modules.

    Args:
        model: The network holding the modules.
        names: Qualified names of ``nn.Linear`` / HF ``Conv1D`` modules to record.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"modules {missing} are not in {type(model).__name__}")
        self.modules = {n: modules[n] for n in names}
        self.calls: list[tuple[str, Tensor, Tensor]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LinearTaps:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(partial(self._hook, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.calls.clear()

    def _hook(self, name: str, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled():
            self.calls.append((name, inputs[0].detach(), output))

    def backward(self, loss: Tensor) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, a [B, S, I], g [B, S, O])`` per recorded call; forgets the calls.

        Raises:
            RuntimeError: a tracked module's output does not require grad (frozen weights
                and inputs), so its gradient cannot be taken.
        """
        calls, self.calls = self.calls, []
        frozen = sorted({name for name, _, out in calls if not out.requires_grad})
        if frozen:
            raise RuntimeError(
                f"outputs of modules {frozen} do not require grad (frozen weights?); "
                "enable requires_grad on their weights or exclude them with `exclude=[...]`"
            )
        if not calls:
            return []
        grads = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
        pairs = []
        for (name, a, out), g in zip(calls, grads, strict=True):
            g = torch.zeros_like(out) if g is None else g.detach()
            pairs.append((name, _as_bsd(a, g.shape[0]), _as_bsd(g, g.shape[0])))
        return pairs


def _as_bsd(x: Tensor, batch: int) -> Tensor:
    """View any ``[B, ..., D]`` activation as ``[B, S, D]``."""
    return x.reshape(batch, -1, x.shape[-1])


def example_gradients(
    model: nn.Module,
    tracked: Mapping[str, bool],
    batch: Any,
    loss_fn: LossFn,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Per-example gradients ``{name: [B, O, I(+1)]}`` of ``loss_fn(batch)`` (summed over calls).

    Args:
        model: The network (its ``forward`` is run by ``loss_fn``).
        tracked: Module name -> whether its bias gradient is appended as the last input column.
        batch: A batch understood by ``loss_fn``.
        loss_fn: Returns per-example losses ``[B]``.
        dtype: Dtype of the returned gradients.
    """
    with LinearTaps(model, tracked) as taps, torch.enable_grad():
        pairs = taps.backward(loss_fn(batch).sum())
    out: dict[str, Tensor] = {}
    for name, a, g in pairs:
        a = with_bias_column(a.to(dtype)) if tracked[name] else a.to(dtype)
        grad = per_example_gradient(a, g.to(dtype))  # (B, O, I)
        out[name] = out[name] + grad if name in out else grad
    return out
