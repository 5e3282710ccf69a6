"""Shared fixtures of the attribution tests: random stores and brute-force float64 oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_bergson.store import GradientStoreWriter, layout_blocks

BLOCKS = [
    ("fc", (3, 4), "fc", None),
    ("attn.head_0", (2, 3), "attn", 0),
    ("attn.head_1", (2, 3), "attn", 1),
]


def random_store(
    path: Path,
    *,
    num: int = 40,
    epochs: int = 2,
    dtype: str = "float32",
    chunk_rows: int = 8,
    seed: int = 0,
    nan_rows: tuple[int, ...] = (),
) -> tuple[Path, np.ndarray, np.ndarray]:
    """A store of ``num * epochs`` random rows (example ids 1000.. repeated per epoch).

    Returns:
        ``(path, rows [N, D] float64 as stored, example_ids [N])``.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = layout_blocks(BLOCKS)
    dim = blocks[-1].offset + blocks[-1].size
    rows = torch.randn(num * epochs, dim, generator=gen, dtype=torch.float64)
    rows *= torch.rand(num * epochs, 1, generator=gen, dtype=torch.float64) + 0.5  # uneven norms
    for r in nan_rows:
        rows[r, 1] = float("nan")
    perm = [torch.randperm(num, generator=gen) for _ in range(epochs)]
    ids = (1000 + torch.cat(perm)).numpy()
    meta = {"projection": {"dim": 0, "seed": 0}, "capture": {}}
    with GradientStoreWriter(
        path, modules=blocks, dtype=dtype, chunk_rows=chunk_rows, metadata=meta
    ) as writer:
        for e in range(epochs):
            sl = slice(e * num, (e + 1) * num)
            writer.append(rows[sl], example_id=ids[sl], step=0, epoch=e)
    stored = rows.numpy().astype(dtype).astype(np.float64)
    return path, stored, ids


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def brute_scores(queries: np.ndarray, rows: np.ndarray, *, cosine: bool) -> np.ndarray:
    """``[Q, N]`` float64 inner products (or cosines)."""
    if cosine:
        return unit(queries) @ unit(rows).T
    return queries @ rows.T


def damped_inverse_power(h: np.ndarray, power: float, damping: float) -> np.ndarray:
    """``(H + c tr(H)/d I) ^ power`` by closed forms: ``inv`` for -1, ``sqrtm(inv)`` for -1/2."""
    from scipy.linalg import sqrtm

    damped = h + damping * np.trace(h) / len(h) * np.eye(len(h))  # mean eigenvalue = tr/d
    inv = np.linalg.inv(damped)
    if power == -1.0:
        return inv
    assert power == -0.5
    return np.real(sqrtm(inv))
