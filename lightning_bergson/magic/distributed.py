"""Data-parallel MAGIC: the sums that cross ranks, on ``torch.distributed``'s default group.

Every rank holds the same parameters and optimizer state and trains on its shard of each
global batch. A step's loss is the weighted mean over the global batch (its token count
summed over ranks, :func:`~lightning_bergson.magic.functional.step_tokens`), so the global
gradient is the *sum* of the ranks' gradients. The reverse pass mirrors the forward pass:

* forward (and every replay): ``g = sum_r g_r(theta, w_r)`` (one all-reduce per step);
* reverse: with ``c = dL/dg`` (the same on every rank, like everything downstream of
  ``g``), rank ``r`` owns ``dL/dw_r = c . dg_r/dw_r`` and contributes
  ``c . dg_r/dtheta`` to ``dL/dtheta``, which is summed over ranks (one all-reduce per
  step); the scores ``[Q, N]`` are summed over ranks at the end.

Ranks must therefore run the same steps, replays and reverse steps in the same order, which
they do: they record the same number of steps and keep states on the same schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DataParallel"]


class DataParallel:
    """Sums over the ranks of the default process group (Lightning's DDP sets it up).

    Example:
        >>> DataParallel.current() is None  # one process: nothing to reduce
        True
    """

    def __init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "data-parallel MAGIC needs an initialized torch.distributed process group; "
                "run it under Trainer(strategy='ddp', devices=N)"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @classmethod
    def current(cls) -> DataParallel | None:
        """The group of this process, or ``None`` when it runs alone."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls()
        return None

    def sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """Element-wise sums over ranks, as new tensors (one collective for the whole list)."""
        if not tensors:
            return []
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.dtype))
            offset += t.numel()
        return out

    def sum_int(self, value: int) -> int:
        """``value`` summed over ranks."""
        total = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(total)
        return int(total.item())

    def max_int(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        return self._max([value])[0]

    def same_int(self, value: int, what: str) -> None:
        """Raise unless every rank passes the same ``value`` (``what`` names it)."""
        high, neg_low = self._max([value, -value])
        if high != -neg_low:
            raise RuntimeError(
                f"ranks disagree on {what} (from {-neg_low} to {high}); every rank "
                "must train the same number of steps, so give each rank the same number of "
                "batches (Lightning's DistributedSampler does)"
            )

    def _max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    @staticmethod
    def _device() -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
