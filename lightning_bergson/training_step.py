"""How capture callbacks see a LightningModule's ``training_step``.

Under automatic optimization Lightning backpropagates what ``training_step`` returns, so
the callbacks must see that output (``{"loss", "example_loss"}``) before the backward:
:func:`observe_training_step` wraps the module's ``training_step`` once, for every capture
callback attached. Under manual optimization the backward runs inside ``training_step``;
:func:`capture_example_loss` hands each example's loss over before it.
"""

from __future__ import annotations

from functools import wraps
from typing import Any

from torch import Tensor

__all__ = ["capture_example_loss", "observe_training_step", "unobserve_training_step"]


def capture_example_loss(pl_module: Any, example_loss: Tensor) -> None:
    """The per-example loss contract for manual optimization: call it before backward.

    With ``automatic_optimization = False`` backward runs inside ``training_step``, before
    the step returns; hand each example's loss to the capture callbacks first::

        def training_step(self, batch, batch_idx):
            example_loss = ...  # [B], in the graph of the loss below
            capture_example_loss(self, example_loss)
            self.manual_backward(example_loss.sum())

    Rows are then the gradients of ``example_loss[i]``, as with ``{"example_loss": ...}``
    under automatic optimization. Without a capture callback attached this does nothing.

    Args:
        pl_module: The LightningModule whose ``training_step`` is running.
        example_loss: ``[B]`` each example's loss, requiring grad.
    """
    wrapper = pl_module.__dict__.get("training_step")
    for cb in getattr(wrapper, "_capture_callbacks", ()):
        if cb.observer is not None:
            cb.observer.use_example_loss(example_loss)


def observe_training_step(pl_module: Any, callback: Any) -> None:
    """Wrap ``pl_module.training_step`` once; ``callback._after_step`` sees every output."""
    wrapper = pl_module.__dict__.get("training_step")
    if wrapper is None or not hasattr(wrapper, "_capture_callbacks"):
        step = pl_module.training_step

        @wraps(step)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            for cb in list(wrapper._capture_callbacks):  # type: ignore[attr-defined]
                cb._after_step(pl_module, out)
            return out

        wrapper._capture_callbacks = []  # type: ignore[attr-defined]
        pl_module.training_step = wrapper
    if callback not in wrapper._capture_callbacks:  # type: ignore[attr-defined]
        wrapper._capture_callbacks.append(callback)  # type: ignore[attr-defined]


def unobserve_training_step(pl_module: Any, callback: Any) -> None:
    """Undo :func:`observe_training_step` for ``callback`` (the last one removes the wrapper)."""
    wrapper = pl_module.__dict__.get("training_step")
    callbacks = getattr(wrapper, "_capture_callbacks", None)
    if callbacks is None:
        return
    if callback in callbacks:
        callbacks.remove(callback)
    if not callbacks:
        del pl_module.__dict__["training_step"]
