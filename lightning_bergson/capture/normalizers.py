"""Second-moment normalizers: Adam and Adafactor preconditioning of gradients.

An optimizer-aware gradient is ``G / sqrt(V)``: the direction an adaptive
optimizer actually moves for that example. Two forms:

* :class:`AdamNormalizer`: the full second moment ``v`` (``O x I``); the
  normalized gradient ``G / (sqrt(v) + eps)`` needs each example's full
  gradient ``[O, I]``.
* :class:`AdafactorNormalizer`: row ``r`` (``O``) and column ``c`` (``I``)
  statistics with ``V = r c^T / mean(r)`` (Shazeer & Stern). Because
  ``G / sqrt(V) = diag(r^-1/2) G diag((c / mean r)^-1/2)`` and
  ``G = sum_t g_t a_t^T``, the normalization moves into the per-token output
  gradients ``g`` and activations ``a`` before projection, so no per-example
  ``[O, I]`` matrix is ever formed (the "Adafactor trick").

Both operate on a module's weight in ``[out, in]`` orientation; with a bias column
the second moment has ``in + 1`` columns, the last one the bias.

References:
    Kingma & Ba, "Adam" (arXiv 1412.6980); Shazeer & Stern, "Adafactor"
    (arXiv 1804.04235); Xia et al., "LESS" (arXiv 2402.04333).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "AdafactorNormalizer",
    "AdamNormalizer",
    "Normalizer",
    "NormalizerKind",
    "load_normalizers",
    "normalizer_from_tensors",
    "save_normalizers",
]

_FORMAT = "lightning_bergson.normalizers"

NormalizerKind = Literal["none", "adafactor", "adam"]


@dataclass
class AdamNormalizer:
    """Elementwise normalizer ``G / (sqrt(avg_sq) + eps)``.

    Args:
        avg_sq: Second moment ``[O, I]`` (or ``[O, I + 1]`` with a bias column),
            already bias-corrected.
        eps: Added outside the square root, as in ``torch.optim.AdamW``.

    Example:
        >>> n = AdamNormalizer(torch.full((2, 3), 4.0), eps=0.0)
        >>> n.normalize(torch.ones(1, 2, 3))[0, 0, 0].item()
        0.5
    """

    avg_sq: Tensor
    eps: float = 1e-8

    kind = "adam"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.avg_sq.shape)  # type: ignore[return-value]

    def denominator(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``sqrt(avg_sq) + eps`` as ``[O, I]``."""
        return self.avg_sq.to(device=device, dtype=dtype).sqrt().add(self.eps)

    def normalize(self, grads: Tensor) -> Tensor:
        """Normalize per-example gradients ``[B, O, I]``."""
        return grads / self.denominator(grads.dtype, grads.device)

    def to_adafactor(self) -> AdafactorNormalizer:
        """Row and column means of ``avg_sq``: the rank-one fit that minimizes the
        I-divergence to it, as Adafactor's own estimator does."""
        return AdafactorNormalizer(self.avg_sq.mean(dim=1), self.avg_sq.mean(dim=0))

    def tensors(self) -> dict[str, Tensor]:
        return {"avg_sq": self.avg_sq}


@dataclass
class AdafactorNormalizer:
    """Factored normalizer ``G / sqrt(r c^T / mean(r))``.

    Matches ``torch.optim.Adafactor``, whose update is
    ``G / sqrt(max(r c^T / max(mean r, eps), eps^2))`` with ``eps`` its ``eps1``,
    wherever ``r c^T / mean(r) >= eps^2``; below that (numerically zero gradients)
    torch clamps elementwise, which no factored form can, and ``r``, ``c`` are only
    kept away from zero.

    Args:
        row: Row statistic ``r`` ``[O]`` (mean over columns of the squared gradient).
        col: Column statistic ``c`` ``[I]`` (mean over rows), ``[I + 1]`` with a bias column.
        eps: Lower clamp of ``mean(r)`` (Adafactor's ``eps1``).

    Example:
        >>> n = AdafactorNormalizer(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 2.0, 2.0]))
        >>> rs, cs = n.scales(torch.float32, torch.device("cpu"))
        >>> torch.allclose(n.normalize(torch.ones(1, 2, 3))[0], rs[:, None] * cs[None, :])
        True
    """

    row: Tensor
    col: Tensor
    eps: float = 1e-30

    kind = "adafactor"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row.numel(), self.col.numel())

    def scales(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row and column multipliers whose outer product is ``V^-1/2``.

        Returns:
            ``(r^-1/2 [O], (c / mean r)^-1/2 [I])``.
        """
        tiny = torch.finfo(torch.float64).tiny
        r = self.row.to(device=device, dtype=torch.float64).clamp(min=tiny)
        c = self.col.to(device=device, dtype=torch.float64).clamp(min=tiny)
        mean_r = self.row.to(device=device, dtype=torch.float64).mean().clamp(min=self.eps)
        return r.rsqrt().to(dtype), (c / mean_r).rsqrt().to(dtype)

    def normalize(self, grads: Tensor) -> Tensor:
        """Normalize per-example gradients ``[B, O, I]`` explicitly (the reference path)."""
        rs, cs = self.scales(grads.dtype, grads.device)
        return grads * rs[:, None] * cs[None, :]

    def to_adam(self) -> AdamNormalizer:
        """Materialize ``V = r c^T / mean(r)`` as an elementwise normalizer (no eps)."""
        rs, cs = self.scales(torch.float64, self.row.device)
        return AdamNormalizer((rs[:, None] * cs[None, :]).pow(-2).to(self.row.dtype), eps=0.0)

    def tensors(self) -> dict[str, Tensor]:
        return {"row": self.row, "col": self.col}


Normalizer = AdamNormalizer | AdafactorNormalizer


def normalizer_from_tensors(kind: str, tensors: dict[str, Tensor], eps: float) -> Normalizer:
    """Rebuild a normalizer saved with ``tensors()`` (see ``save_normalizers``)."""
    if kind == "adam":
        return AdamNormalizer(tensors["avg_sq"], eps=eps)
    if kind == "adafactor":
        return AdafactorNormalizer(tensors["row"], tensors["col"], eps=eps)
    raise ValueError(f"unknown normalizer kind {kind!r}; expected 'adam' or 'adafactor'")


def convert(normalizer: Normalizer, kind: NormalizerKind) -> Normalizer:
    """``normalizer`` in the requested form (Adam <-> Adafactor)."""
    if kind == normalizer.kind:
        return normalizer
    if kind == "adafactor":
        assert isinstance(normalizer, AdamNormalizer)
        return normalizer.to_adafactor()
    if kind == "adam":
        assert isinstance(normalizer, AdafactorNormalizer)
        return normalizer.to_adam()
    raise ValueError(f"cannot convert a normalizer to {kind!r}")


def save_normalizers(path: str | Path, normalizers: Mapping[str, Normalizer]) -> None:
    """Write normalizers to one safetensors file (tensors ``"<module>/<field>"``, JSON metadata)."""
    tensors = {
        f"{name}/{field}": value.detach().float().cpu().contiguous()
        for name, norm in normalizers.items()
        for field, value in norm.tensors().items()
    }
    meta = {name: {"kind": norm.kind, "eps": norm.eps} for name, norm in normalizers.items()}
    save_file(tensors, str(path), metadata={"format": _FORMAT, "normalizers": json.dumps(meta)})


def load_normalizers(path: str | Path) -> dict[str, Normalizer]:
    """Read normalizers written by :func:`save_normalizers` (no pickle involved)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a lightning_bergson normalizers file")
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    result: dict[str, Normalizer] = {}
    for name, info in json.loads(meta["normalizers"]).items():
        fields = {k.split("/")[-1]: v for k, v in tensors.items() if k.rsplit("/", 1)[0] == name}
        result[name] = normalizer_from_tensors(info["kind"], fields, info["eps"])
    return result
