"""From block gradients to stored rows: assembly, scaling and the non-finite policy.

Pure torch. During one micro-batch the collector hands over each block's per-example rows
(summed over backward passes); :class:`RowAssembler` turns them into the batch's rows
``[B, D]`` in the store's block order, multiplied by each example's scale (what turns the
observed gradient into the gradient of the example's own loss). :class:`NonFinitePolicy`
decides what a row with NaN or inf does: stored flagged, refused, or skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .hooks import Block

__all__ = [
    "NONFINITE_POLICIES",
    "BatchInfo",
    "BatchRows",
    "NonFiniteGradientError",
    "NonFinitePolicy",
    "RowAssembler",
    "finite_rows",
]

NonFinite = Literal["warn", "raise", "skip"]
NONFINITE_POLICIES: tuple[str, ...] = ("warn", "raise", "skip")


class NonFiniteGradientError(RuntimeError):
    """A captured row had NaN or inf and ``on_nonfinite='raise'`` was set."""


@dataclass
class BatchInfo:
    """What the rows of one micro-batch need besides their gradients."""

    example_id: Tensor  # (B,) int64, CPU
    step: int
    epoch: int
    scale: Tensor | None = None  # (B,) multiplier turning the observed gradient into the row
    loss: Tensor | None = None  # (B,) float32, CPU
    advantage: Tensor | None = None  # (B,) float32, CPU: the batch's `advantage`, if any


@dataclass
class BatchRows:
    """One micro-batch's rows and their columns, as the store takes them."""

    grads: Tensor  # (B, D) on the rows' device, in their dtype (the writer casts and copies)
    example_id: Tensor  # (B,) int64, CPU
    finite: Tensor  # (B,) bool, CPU
    loss: Tensor | None = None  # (B,)
    advantage: Tensor | None = None  # (B,)

    def keep(self, mask: Tensor) -> BatchRows:
        """The rows where ``mask`` is True."""
        return BatchRows(
            *(
                None if x is None else x[mask.to(x.device)]
                for x in (self.grads, self.example_id, self.finite, self.loss, self.advantage)
            )  # type: ignore[arg-type]
        )


def finite_rows(grads: Tensor) -> Tensor:
    """``[B]`` (CPU) whether each row of ``grads`` ``[B, D]`` (on any device) is finite.

    A finite row sum means a finite row (NaN and inf propagate); only a row whose sum is not
    finite (or overflowed) needs the elementwise test.

    Example:
        >>> finite_rows(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3e38, 3e38]])).tolist()
        [True, False, True]
    """
    finite = torch.isfinite(grads.sum(dim=1)).cpu()
    if not bool(finite.all()):
        finite = torch.isfinite(grads).all(dim=1).cpu()
    return finite


class RowAssembler:
    """Collect block rows during a micro-batch, then assemble the batch's rows.

    Args:
        blocks: The collector's blocks, in store order.

    Example:
        >>> blocks = [Block("a", (1, 2), "a", None), Block("b", (1, 1), "b", None)]
        >>> rows = RowAssembler(blocks)
        >>> rows.add("a", torch.ones(2, 2)); rows.add("a", torch.ones(2, 2))  # two passes
        >>> rows.assemble(2, torch.tensor([0.5, 2.0])).tolist()  # b: no pass reached it
        [[1.0, 1.0, 0.0], [4.0, 4.0, 0.0]]
        >>> rows.missing
        ['b']
    """

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = list(blocks)
        self._rows: dict[str, Tensor] = {}
        self.missing: list[str] = []  # blocks the last assembly filled with zeros

    def add(self, block: str, rows: Tensor) -> None:
        """The collector's closure: rows ``[B, d]`` of ``block``, summed over passes."""
        prev = self._rows.get(block)
        self._rows[block] = rows if prev is None else prev + rows

    def clear(self) -> None:
        """Forget the rows collected so far (a new micro-batch starts)."""
        self._rows = {}

    def assemble(self, batch: int, scale: Tensor) -> Tensor | None:
        """Rows ``[B, D]`` times ``scale`` ``[B]``; ``None`` if nothing came.

        The collected rows are consumed; blocks no backward pass reached are zeros (named in
        :attr:`missing`). The rows stay on their device and in their dtype (float64 stays
        exact): the store's writer casts them to the stored dtype there, so only the stored
        bytes cross to the host (half of them for a float16 store on a GPU).
        """
        rows, self._rows = self._rows, {}
        self.missing = []
        if not rows:
            return None  # no backward through tracked modules (e.g. a skipped batch)
        parts, like = [], next(iter(rows.values()))
        for block in self.blocks:
            part = rows.get(block.name)
            if part is None:  # a module that took no part in this forward
                self.missing.append(block.name)
                part = like.new_zeros(batch, math.prod(block.shape))
            parts.append(part.detach())
        grads = torch.cat(parts, dim=1)  # (B, D)
        return grads.mul_(scale.to(grads)[:, None])


class NonFinitePolicy:
    """What a row with NaN or inf does, and the warning that reports them.

    Args:
        mode: ``"warn"`` stores it flagged ``finite=False`` (and warns once per epoch);
            ``"raise"`` stops at the first one with :class:`NonFiniteGradientError`;
            ``"skip"`` stores no row (the caller records ``(id, step, epoch)``).
        path: The store, named in the error.
    """

    def __init__(self, mode: NonFinite, path: str | Path) -> None:
        if mode not in NONFINITE_POLICIES:
            valid = ", ".join(map(repr, NONFINITE_POLICIES))
            raise ValueError(f"on_nonfinite={mode!r} is not one of {valid}")
        self.mode, self.path = mode, Path(path)
        self.pending: list[int] = []  # ids of non-finite rows not yet reported

    def apply(self, rows: BatchRows, step: int, epoch: int) -> tuple[BatchRows, list[int]]:
        """``(rows to store, ids of skipped rows)``; raises under ``"raise"``."""
        if bool(rows.finite.all()):
            return rows, []
        bad = rows.example_id[~rows.finite].tolist()
        if self.mode == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradients for example ids {bad[:10]} at step {step} "
                f"(epoch {epoch}); GradientCaptureCallback(on_nonfinite='raise') stops "
                f"the fit here. Rows committed so far stay in {self.path}. Look for the "
                "cause (a loss that overflows, a learning rate too high, bad data), or use "
                "on_nonfinite='warn' (store them flagged finite=False) or 'skip'."
            )
        self.pending += bad
        if self.mode == "skip":
            return rows.keep(rows.finite), bad
        return rows, []

    def report(self, epoch: int, rank: int | None = None) -> str | None:
        """The warning for the rows seen since the last report (``None`` if none)."""
        if not self.pending:
            return None
        bad, self.pending = self.pending, []
        done = {
            "warn": "stored as they are and flagged finite=False (queries skip them)",
            "skip": "not stored; their ids are in GradientStore.skipped",
        }[self.mode]
        where = "" if rank is None else f"rank {rank}: "
        return (
            f"{where}{len(bad)} example{'s' if len(bad) != 1 else ''} had non-finite gradients "
            f"in epoch {epoch} (example ids "
            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}): {done}. Set "
            "on_nonfinite='raise' to stop at the first one."
        )
