"""TrackStar preconditioners: per-block second moments of stored rows, damped and inverted.

For each stored block ``b`` (a module or one head of it, ``d = p*p`` columns) the second
moment ``H_b = (1/N) sum_i g_ib g_ib^T`` is accumulated over the store in chunks (each
chunk's products in the scoring dtype, the totals in float64). Optionally the query set's
own second moment is mixed in, ``H = (1 - w) H_train + w H_query``. ``H`` is
eigendecomposed in float64, ``H = V diag(lambda) V^T``, and its powers are damped:

    H^power = V diag((lambda + c * mean(lambda)) ^ power) V^T,     c = ``damping``

so ``H^-1/2`` applied twice is exactly ``H^-1``. Inner products use ``q^T H^-1 g``
(preconditioner on the query only); cosine uses ``H^-1/2`` on both sides, then unit norm.

Saved as ``<store>/preconditioners/second_moments.safetensors`` (the float64
eigendecomposition of every block, from which ``H`` is rebuilt when needed; JSON
metadata), never pickled. :meth:`SecondMomentPreconditioner.for_store` owns the loading,
fitting and caching beside a store: a saved one is reused only for the rows it was fitted
on (:func:`store_signature`).

The class was called ``Preconditioner`` (a name EK-FAC's preconditioner also had); that
name still imports it.

References:
    Chang et al., "Scalable Influence and Fact Tracing for Large Language Model
    Pretraining" (TrackStar, arXiv 2410.17413); Park et al., "TRAK" (arXiv 2303.14186).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..store import GradientStore, ModuleBlock, StoreScanner
from ..store.location import Location, StorePath
from .store_match import StoreMismatchError

__all__ = [
    "Preconditioner",
    "SecondMomentPreconditioner",
    "accumulate_second_moments",
    "damped_power",
    "eigh64",
    "store_signature",
]

FORMAT = "lightning_bergson.preconditioner"
FILE_NAME = "second_moments.safetensors"
MAX_BLOCK_DIM = 4096


def eigh64(h: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric matrix, in float64."""
    h = h.to(torch.float64)
    evals, evecs = torch.linalg.eigh((h + h.T) / 2)  # (d,), (d, d)
    return evals.clamp(min=0), evecs


def damped_power(evals: Tensor, evecs: Tensor, power: float, damping: float) -> Tensor:
    """``V diag((lambda + damping * mean(lambda)) ^ power) V^T`` ``[d, d]`` in float64.

    A block whose eigenvalues are all 0 (rows never touched it) gets ``delta = 1``.

    Example:
        >>> evals, evecs = eigh64(2 * torch.eye(3))
        >>> damped_power(evals, evecs, -1.0, 0.5)[0, 0].item()   # 1 / (2 + 0.5 * 2)
        0.3333333333333333
    """
    mean = float(evals.mean()) if evals.numel() else 0.0
    delta = damping * mean if mean > 0 else 1.0
    scale = (evals + delta).pow(power)  # (d,)
    return (evecs * scale) @ evecs.T  # (d, d)


def _offsets(blocks: Sequence[ModuleBlock]) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` of each block within a row made of just these blocks."""
    out, start = [], 0
    for b in blocks:
        out.append((b.name, start, start + b.size))
        start += b.size
    return out


def accumulate_second_moments(
    chunks: Iterable[Tensor], blocks: Sequence[ModuleBlock]
) -> tuple[dict[str, Tensor], int]:
    """Per-block ``sum_i g_i g_i^T`` over rows ``[n, D]`` and the number of rows.

    Each chunk's products are formed in the chunk's dtype (float32 or float64) and summed
    into float64 totals. Non-finite rows are skipped. ``blocks`` describe the columns of
    every chunk in order.
    """
    sums: dict[str, Tensor] = {}
    count = 0
    for chunk in chunks:
        x = chunk if chunk.dtype in (torch.float32, torch.float64) else chunk.float()
        x = x[torch.isfinite(x).all(dim=1)]  # (n', D)
        count += x.shape[0]
        for name, lo, hi in _offsets(blocks):
            g = x[:, lo:hi]  # (n', d)
            gram = (g.T @ g).to(torch.float64)  # (d, d)
            sums[name] = sums[name] + gram if name in sums else gram
    if not sums:
        sums = {b.name: torch.zeros(b.size, b.size, dtype=torch.float64) for b in blocks}
    return sums, count


class SecondMomentPreconditioner:
    """Per-block second moments ``H_b`` and their damped powers, applied to rows ``[n, D]``.

    Args:
        moments: Block name -> ``H_b`` ``[d, d]`` (already divided by the number of rows);
            may be omitted (``None``) when ``eigen`` gives every block.
        blocks: The store's blocks (names and sizes; order does not matter here).
        num_rows: Rows ``H`` was estimated from (finite rows only).
        damping: ``c`` in ``1 / (lambda + c * mean(lambda))``.
        eigen: Precomputed eigendecompositions (as :meth:`load` reads them).
        info: JSON-able facts about the source (e.g. the store's row count), saved too.

    Example:
        >>> blocks = [ModuleBlock("fc", 0, 4, (2, 2), "fc")]
        >>> pre = SecondMomentPreconditioner({"fc": 2 * torch.eye(4, dtype=torch.float64)},
        ...                                  blocks, damping=0.0)
        >>> pre.apply(torch.ones(1, 4), -1.0).tolist()
        [[0.5, 0.5, 0.5, 0.5]]
    """

    def __init__(
        self,
        moments: Mapping[str, Tensor] | None,
        blocks: Sequence[ModuleBlock],
        *,
        num_rows: int = 0,
        damping: float = 0.1,
        eigen: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        known = set(moments or {}) | set(eigen or {})
        missing = [b.name for b in blocks if b.name not in known]
        if missing:
            raise KeyError(f"no second moment for blocks {missing[:5]}; refit the preconditioner")
        self.blocks = list(blocks)
        self._moments = {k: v.to(torch.float64) for k, v in (moments or {}).items()}
        self.num_rows, self.damping = num_rows, damping
        self.info = dict(info or {})
        self._eigen: dict[str, tuple[Tensor, Tensor]] = dict(eigen or {})
        self._powers: dict[tuple[str, float, str], Tensor] = {}

    @classmethod
    def fit(
        cls, chunks: Iterable[Tensor], blocks: Sequence[ModuleBlock], **kwargs: Any
    ) -> SecondMomentPreconditioner:
        """Estimate ``H_b`` from all rows ``[n, D]`` of ``chunks`` (laid out as ``blocks``)."""
        too_big = [b.name for b in blocks if b.size > MAX_BLOCK_DIM]
        if too_big:
            raise ValueError(
                f"blocks {too_big[:3]} have more than {MAX_BLOCK_DIM} columns, so a dense "
                "[d, d] preconditioner is too large; capture with projection_dim > 0 (e.g. 16) "
                "or precondition a subset of modules"
            )
        sums, count = accumulate_second_moments(chunks, blocks)
        moments = {k: v / max(count, 1) for k, v in sums.items()}
        return cls(moments, blocks, num_rows=count, **kwargs)

    def moment(self, name: str) -> Tensor:
        """``H_b`` ``[d, d]`` (float64); rebuilt as ``V diag(lambda) V^T`` after :meth:`load`."""
        if name not in self._moments:
            evals, evecs = self._eigen[name]
            self._moments[name] = (evecs * evals) @ evecs.T  # (d, d)
        return self._moments[name]

    def eigen(self, name: str) -> tuple[Tensor, Tensor]:
        """``(lambda [d], V [d, d])`` of block ``name`` (computed once)."""
        if name not in self._eigen:
            self._eigen[name] = eigh64(self._moments[name])
        return self._eigen[name]

    def mixed(self, query_rows: Tensor, weight: float) -> SecondMomentPreconditioner:
        """``(1 - weight) H_train + weight H_query`` with ``H_query`` from rows ``[Q, D]``."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"query mixing weight must be in [0, 1], got {weight}")
        if weight == 0.0:
            return self
        sums, count = accumulate_second_moments([query_rows], self.blocks)
        moments = {
            b.name: (1 - weight) * self.moment(b.name) + weight * sums[b.name] / max(count, 1)
            for b in self.blocks
        }
        return type(self)(
            moments, self.blocks, num_rows=self.num_rows, damping=self.damping, info=self.info
        )

    def matrix(self, name: str, power: float, device: torch.device | str = "cpu") -> Tensor:
        """Damped ``H_b ^ power`` ``[d, d]`` (float64) of block ``name``."""
        key = (name, float(power), str(device))
        if key not in self._powers:
            evals, evecs = self.eigen(name)
            self._powers[key] = damped_power(evals, evecs, power, self.damping).to(device)
        return self._powers[key]

    def apply(self, x: Tensor, power: float, blocks: Sequence[ModuleBlock] | None = None) -> Tensor:
        """``H^power`` applied to each row of ``x`` ``[n, D]`` block by block.

        Args:
            x: Rows made of ``blocks`` in order (default: all of the store's blocks).
            power: ``-1`` (inner products) or ``-0.5`` (cosine, both sides).
            blocks: Which blocks, in which order, make up the columns of ``x``.
        """
        layout = _offsets(self.blocks if blocks is None else blocks)
        if layout[-1][2] != x.shape[1]:
            raise ValueError(f"rows have {x.shape[1]} columns but the blocks {layout[-1][2]}")
        out = torch.empty_like(x)
        for name, lo, hi in layout:
            mat = self.matrix(name, power, x.device).to(x.dtype)  # (d, d), symmetric
            out[:, lo:hi] = x[:, lo:hi] @ mat  # (n, d)
        return out

    def save(self, path: StorePath) -> Path | Location:
        """Write every block's eigendecomposition (float64) to one safetensors file (a local
        path or a URL: one PUT of the whole file)."""
        where = Location.of(path)
        tensors = {}
        for b in self.blocks:
            evals, evecs = self.eigen(b.name)
            tensors[f"eigvals/{b.name}"] = evals.contiguous()
            tensors[f"eigvecs/{b.name}"] = evecs.contiguous()
        meta = {
            "format": FORMAT,
            "num_rows": str(self.num_rows),
            "blocks": json.dumps([b.to_json() for b in self.blocks]),
            "info": json.dumps(self.info),
        }
        with where.writing() as local:
            save_file(tensors, str(local), metadata=meta)
        return where.path

    @classmethod
    def load(cls, path: StorePath, *, damping: float = 0.1) -> SecondMomentPreconditioner:
        """Read a file written by :meth:`save` (no pickle involved; local or a URL)."""
        with Location.of(path).reading() as local, safe_open(str(local), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a lightning_bergson preconditioner file")
            blocks = [ModuleBlock.from_json(b) for b in json.loads(meta["blocks"])]
            eigen = {
                b.name: (f.get_tensor(f"eigvals/{b.name}"), f.get_tensor(f"eigvecs/{b.name}"))
                for b in blocks
            }
        info = json.loads(meta.get("info", "{}"))
        num_rows = int(meta["num_rows"])
        return cls(None, blocks, num_rows=num_rows, damping=damping, eigen=eigen, info=info)

    def matches(self, blocks: Sequence[ModuleBlock], info: Mapping[str, Any]) -> bool:
        """Whether this preconditioner was fitted on a source with these blocks and ``info``."""
        mine = [(b.name, b.size) for b in self.blocks]
        same = all(self.info.get(k) == v for k, v in info.items())
        return mine == [(b.name, b.size) for b in blocks] and same

    @classmethod
    def for_store(
        cls,
        store: GradientStore,
        spec: Literal["fit"] | str | Path | SecondMomentPreconditioner | None,
        *,
        damping: float = 0.1,
        chunk_rows: int = 65536,
        dtype: torch.dtype = torch.float32,
    ) -> SecondMomentPreconditioner | None:
        """The preconditioner ``spec`` names for ``store``, loaded, fitted or given.

        Args:
            store: The gradient store scored against.
            spec: ``None``; an instance (returned as is); ``"fit"`` (load
                ``<store>/preconditioners/second_moments.safetensors`` when it was fitted on
                these rows, else fit it from the store's rows and save it there); or a path
                written by :meth:`save`, refused unless fitted on these rows.
            damping: ``c`` in ``1 / (lambda + c * mean(lambda))``.
            chunk_rows: Rows per read of a fit (each read is a Gram matrix per block).
            dtype: Dtype of the rows' products in a fit.

        Raises:
            StoreMismatchError: a preconditioner file fitted on other rows.
        """
        if spec is None or isinstance(spec, cls):
            return spec
        info = store_signature(store)
        if spec != "fit":
            pre = cls.load(spec, damping=damping)
            if not pre.matches(store.modules, info):
                raise StoreMismatchError(
                    f"the preconditioner {spec} was fitted on other rows (blocks or row count "
                    f"{pre.info.get('store_rows')} != {len(store)}); refit it with "
                    "preconditioner='fit'"
                )
            return pre
        path = store.aux("preconditioners") / FILE_NAME
        if path.is_file():
            pre = cls.load(path, damping=damping)
            if pre.matches(store.modules, info):
                return pre
        chunks = (c.rows for c in StoreScanner(store, chunk_rows=chunk_rows, dtype=dtype))
        pre = cls.fit(chunks, store.modules, damping=damping, info=info)
        pre.save(path)
        return pre


Preconditioner = SecondMomentPreconditioner  # the old name, kept importable


def store_signature(store: GradientStore) -> dict[str, Any]:
    """Row count and a hash of the first and last rows: a saved preconditioner is reused
    only for the rows it was fitted on (a store rewritten in place changes them)."""
    ends = [0, len(store) - 1] if len(store) else []
    digest = hashlib.sha256(store.read(ends).numpy().tobytes()).hexdigest()[:16]
    return {"store_rows": len(store), "rows_sha256": digest}
