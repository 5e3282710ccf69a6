"""Optional FAISS index over a store, for stores too large to scan (``pip install faiss-cpu``).

The index holds the stored rows as the scan would see them: unit-normalized for cosine
(after ``H^-1/2`` when preconditioned), raw for inner products (the query carries ``H^-1``).
Any FAISS factory string works (``"Flat"`` is exact; ``"IVF1024,Flat"`` or ``"IVF4096,PQ64"``
trade accuracy for speed and memory); the metric is always the inner product. The index is
written with ``faiss.write_index`` (FAISS's own format, no pickle) to
``<store>/faiss/<name>.index`` beside a JSON description, and reused when it matches.

Uses only faiss-cpu APIs (Bergson's FAISS path assumes faiss-gpu).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..store import GradientStore, StoreScanner
from ..store.location import Location, StorePath
from .preconditioners import SecondMomentPreconditioner
from .scoring import unit_rows

__all__ = ["FaissIndex"]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the FAISS index needs faiss-cpu: pip install faiss-cpu "
            "(or the extra: pip install 'lightning-bergson[compare]')"
        ) from err
    return faiss


class FaissIndex:
    """A FAISS inner-product index of a store's rows, searched like :meth:`Attributor.search`.

    Args:
        index: The FAISS index (rows in store order).
        info: Its JSON description (store rows, dim, similarity, factory).

    Example:
        >>> import tempfile
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> path = f"{tempfile.mkdtemp()}/g.zarr"
        >>> with GradientStoreWriter(path, modules=layout_blocks([("fc", (1, 2), "fc", None)]),
        ...                          dtype="float32") as w:
        ...     w.append(torch.eye(2), example_id=[5, 6], step=0, epoch=0)
        >>> index = FaissIndex.build(GradientStore.open(path))     # doctest: +SKIP
        >>> index.search(torch.tensor([[0.0, 1.0]]), k=1)[1].tolist()  # doctest: +SKIP
        [[1]]
    """

    def __init__(self, index: Any, info: dict[str, Any]) -> None:
        self.index, self.info = index, info

    @classmethod
    def build(
        cls,
        store: GradientStore,
        *,
        factory: str = "Flat",
        unit_norm: bool = False,
        preconditioner: SecondMomentPreconditioner | None = None,
        chunk_rows: int = 65536,
        train_rows: int = 100_000,
    ) -> FaissIndex:
        """Add every stored row (transformed as the scan would) to a new index."""
        faiss = _faiss()
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)

        def prepared(x: Tensor) -> np.ndarray:
            x = x.to(torch.float64)
            if preconditioner is not None and unit_norm:
                x = preconditioner.apply(x, -0.5)
            x = unit_rows(x) if unit_norm else x
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite rows: zeros
            return np.ascontiguousarray(x.numpy(), dtype=np.float32)

        if not index.is_trained:
            sample = np.linspace(0, len(store) - 1, min(train_rows, len(store))).astype(np.int64)
            index.train(prepared(store.read(np.unique(sample), dtype=torch.float64)))
        for chunk in StoreScanner(store, chunk_rows=chunk_rows, dtype=torch.float32):
            index.add(prepared(chunk.rows))
        return cls(index, _describe(store, factory, unit_norm, preconditioner))

    @classmethod
    def for_store(
        cls,
        store: GradientStore,
        *,
        factory: str = "Flat",
        unit_norm: bool = False,
        preconditioner: SecondMomentPreconditioner | None = None,
        chunk_rows: int = 65536,
    ) -> FaissIndex:
        """The index saved in ``<store>/faiss/`` when it matches, else built and saved there.

        Args:
            store, factory, unit_norm, chunk_rows: As :meth:`build`.
            preconditioner: Applied (``H^-1/2``) to the rows only for cosine; inner products
                carry ``H^-1`` on the query, so the index then holds raw rows.
        """
        pre = preconditioner if unit_norm else None
        info = _describe(store, factory, unit_norm, pre)
        path = cls.path_for(store, info)
        index = cls.load(path) if path.is_file() else None
        if index is None or not index.matches(info):
            index = cls.build(
                store, factory=factory, unit_norm=unit_norm, preconditioner=pre,
                chunk_rows=chunk_rows,
            )  # fmt: skip
            index.save(path)
        return index

    @staticmethod
    def path_for(store: GradientStore, info: dict[str, Any]) -> Location:
        """``<store>/faiss/<factory>_<ip|cos>[_pre].index``."""
        name = info["factory"].replace(",", "_").replace("/", "_")
        name += "_cos" if info["unit_norm"] else "_ip"
        name += "_pre" if info["preconditioned"] else ""
        return store.aux("faiss") / f"{name}.index"

    def save(self, path: StorePath) -> Path | Location:
        """Write the index and its JSON description (``.json`` beside it; local or a URL)."""
        where = Location.of(path)
        with where.writing() as local:
            _faiss().write_index(self.index, str(local))
        _describing(where).write_json(self.info)
        return where.path

    @classmethod
    def load(cls, path: StorePath) -> FaissIndex:
        """Read an index written by :meth:`save`."""
        where = Location.of(path)
        info = _describing(where).read_json()
        with where.reading() as local:
            return cls(_faiss().read_index(str(local)), info)

    def matches(self, info: dict[str, Any]) -> bool:
        """Whether this index was built from the same rows with the same transformation."""
        return all(self.info.get(k) == v for k, v in info.items())

    def search(self, queries: Tensor, k: int, *, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """``(scores [Q, k], rows [Q, k])`` for processed queries ``[Q, D]``.

        ``reverse`` searches with ``-q`` and negates the scores back (the lowest scores).
        """
        q = queries.detach().to("cpu", torch.float32)
        q = -q if reverse else q
        scores, rows = self.index.search(np.ascontiguousarray(q.numpy()), k)
        scores = torch.from_numpy(scores)
        return (-scores if reverse else scores), torch.from_numpy(rows).to(torch.int64)


def _describe(
    store: GradientStore,
    factory: str,
    unit_norm: bool,
    preconditioner: SecondMomentPreconditioner | None,
) -> dict[str, Any]:
    """What an index holds: the rows it was built from and how they were transformed."""
    pre = preconditioner is not None and unit_norm
    return {
        "factory": factory,
        "unit_norm": unit_norm,
        "preconditioned": pre,
        "damping": preconditioner.damping if pre else None,  # type: ignore[union-attr]
        "store_rows": len(store),
        "dim": store.dim,
    }


def _describing(index: Location) -> Location:
    """The JSON description saved beside an index (``<name>.json``)."""
    return index.parent / (index.name.rsplit(".", 1)[0] + ".json")
