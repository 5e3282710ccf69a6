"""Seeded two-sided Rademacher projections with Johnson-Lindenstrauss scaling.

A module gradient ``G`` (``O x I``) is compressed to ``L G R^T`` (``p x p``) with
``L`` (``p x O``) and ``R`` (``p x I``) whose entries are ``+-1/sqrt(p)``. Then
``E[<L G1 R^T, L G2 R^T>] = <G1, G2>``, so inner products (and therefore
attribution scores) are preserved in expectation.

Matrices are generated on the CPU from a stable hash of
``"<seed>/<key>/<left|right>"``, so an index built on a GPU and a query computed
on a CPU use identical matrices, whatever the process, device or world size.

References:
    Johnson & Lindenstrauss (1984); Achlioptas, "Database-friendly random
    projections" (2003); Park et al., "TRAK" (arXiv 2303.14186).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["ProjectionCache", "projection_matrix", "stable_seed"]

Side = Literal["left", "right"]


def stable_seed(seed: int, key: str, side: Side) -> int:
    """A 32-bit generator seed from ``"<seed>/<key>/<side>"`` that never changes across runs.

    32 bits because torch's CPU generator (mt19937) keeps only the low 32 bits of a seed:
    a wider value would promise a variety the matrices do not have.
    """
    digest = hashlib.sha256(f"{seed}/{key}/{side}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def projection_matrix(
    dim: int,
    features: int,
    *,
    seed: int,
    key: str,
    side: Side,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``dim x features`` Rademacher matrix for one side of one block.

    Args:
        dim: Projection dimension ``p`` (rows).
        features: Size of the projected axis (``O`` for the left side, ``I`` for the right).
        seed: The run's projection seed.
        key: The block name, e.g. ``"layers.0.mlp.dense_h_to_4h"`` or ``"<module>.head_3"``.
        side: ``"left"`` (output features) or ``"right"`` (input features).
        dtype: Result dtype.
        device: Result device; generation itself always happens on the CPU.

    Returns:
        Tensor ``[dim, features]`` with entries ``+-1/sqrt(dim)``.

    Example:
        >>> P = projection_matrix(4, 10, seed=0, key="fc", side="left")
        >>> P.shape, float(P.abs().max())
        (torch.Size([4, 10]), 0.5)
    """
    if dim <= 0 or features <= 0:
        raise ValueError(f"projection shape must be positive, got dim={dim}, features={features}")
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, key, side))
    # device="cpu": a default device (e.g. ``with torch.device("cuda")``) must not move it
    bits = torch.randint(0, 2, (dim, features), generator=gen, dtype=torch.int8, device="cpu")
    signs = bits.to(dtype).mul_(2).sub_(1)
    return signs.mul_(1.0 / math.sqrt(dim)).to(device)


class ProjectionCache:
    """Builds the projection matrices of a module's blocks once and keeps them.

    The matrices of all blocks of one module (its heads) are kept stacked, so the
    per-step hook does no allocation.

    Args:
        dim: Projection dimension ``p``.
        seed: The run's projection seed.

    Example:
        >>> cache = ProjectionCache(8, seed=0)
        >>> cache.get(["fc.head_0", "fc.head_1"], "right", 32, torch.float32, "cpu").shape
        torch.Size([2, 8, 32])
    """

    def __init__(self, dim: int, *, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(
        self,
        keys: Sequence[str],
        side: Side,
        features: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> torch.Tensor:
        """``[len(keys), dim, features]``: the ``side`` matrix of each block in ``keys``."""
        cache_key = (tuple(keys), side, features, dtype, str(device))
        mats = self._cache.get(cache_key)
        if mats is None:
            mats = torch.stack(
                [
                    projection_matrix(
                        self.dim, features, seed=self.seed, key=k, side=side, dtype=dtype
                    )
                    for k in keys
                ]
            ).to(device)
            self._cache[cache_key] = mats
        return mats
