"""The score array's header: one owner of its attributes (``zarr.json``) and their JSON.

A score array records what made its scores (``method``), their sign (``convention``), how
they were made (:class:`ScoreSettings`: the gradient store, the preconditioner, whether a
column is a stored row or a training example) and free-form ``metadata`` (query texts,
known-relevant documents, ...). Every writer builds a :class:`ScoreHeader` and every reader
parses one, so the attribute dict is written and read in one place::

    {"format": "lightning_bergson.scores", "schema_version": 2, "method": "magic",
     "convention": "metagradient", "settings": {...}, "metadata": {...}, "complete": true}

``convention`` fixes the sign, which differs between methods:

* ``"influence"``: positive = training on the example *lowers* the query loss (helpful);
  gradient inner products, cosine and EK-FAC influence use it.
* ``"metagradient"``: the score is ``d L_query / d w_i``; negative = upweighting the
  example lowers the query loss (helpful). MAGIC uses it.

:func:`helpfulness` turns either into "higher = more helpful".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "CONVENTIONS",
    "FORMAT",
    "SCHEMA_VERSION",
    "Convention",
    "ScoreHeader",
    "ScoreSettings",
    "check_convention",
    "helpfulness",
]

FORMAT = "lightning_bergson.scores"
SCHEMA_VERSION = 2  # 2: crc32c in every chunk, every chunk stored, `complete`
CONVENTIONS = ("influence", "metagradient")
Convention = Literal["influence", "metagradient"]
COLUMN_KINDS = ("rows", "examples")
SIGN_MEANING = {
    "influence": "positive = training on the example lowers the query loss (helpful)",
    "metagradient": "d L_query / d w_i: negative = upweighting the example lowers the query "
    "loss (helpful); reports flip the sign so that higher = more helpful",
}


def check_convention(convention: str) -> None:
    """Raise ``ValueError`` naming the valid set unless ``convention`` is one of them."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")


def helpfulness(scores: np.ndarray | torch.Tensor, convention: str) -> np.ndarray:
    """Flip metagradients so that higher always means "lowers the query loss more".

    Example:
        >>> helpfulness(np.array([0.5, -2.0]), "metagradient").tolist()
        [-0.5, 2.0]
    """
    check_convention(convention)
    arr = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    return -arr if convention == "metagradient" else arr


@dataclass(frozen=True)
class ScoreSettings:
    """How the scores were made, as a report's settings header states it.

    Args:
        store: The gradient store the scores were computed from (``None``: none, or not
            recorded).
        preconditioner: What preconditioned the scores, in words (``"none"``,
            ``"fit (TrackStar second moments, damping 0.1)"``, ``"ekfac"``); ``None``: not
            recorded.
        columns: ``"rows"``: one column per stored row, so an example trained in several
            epochs has a column per epoch; ``"examples"``: one column per training example.
        example_reduce: How an example's rows were reduced to one score (``"mean"``,
            ``"sum"``, ``"max"``); ``None`` where no rows were reduced.
        query_reduce: ``"none"`` (one score row per query) or how queries were reduced
            into one row (``"mean"``, ``"max"``).

    Example:
        >>> ScoreSettings(store="grads.zarr", columns="rows").to_json()["columns"]
        'rows'
    """

    store: str | None = None
    preconditioner: str | None = None
    columns: Literal["rows", "examples"] = "examples"
    example_reduce: str | None = None
    query_reduce: str = "none"

    def __post_init__(self) -> None:
        if self.columns not in COLUMN_KINDS:
            raise ValueError(f"columns={self.columns!r} is not one of {COLUMN_KINDS}")
        if self.columns == "rows" and self.example_reduce not in (None, "none"):
            raise ValueError(
                f"columns='rows' but example_reduce={self.example_reduce!r}: reduced rows are "
                "one column per example; pass columns='examples'"
            )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values, as stored under the array's ``settings`` attribute."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScoreSettings:
        """Inverse of :meth:`to_json` (unknown keys, from a newer writer, are ignored)."""
        known = {k: data[k] for k in ("store", "preconditioner", "example_reduce") if k in data}
        return cls(
            columns=data.get("columns", "examples"),
            query_reduce=data.get("query_reduce", "none"),
            **known,
        )

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ScoreSettings:
        """Settings of an array written before they had their own attribute.

        Such arrays kept ``store``, ``example_reduce``, ``query_reduce`` and either a
        ``preconditioner`` name or a ``preconditioned`` flag among their metadata.
        """
        pre = meta.get("preconditioner")
        if pre is None and "preconditioned" in meta:
            pre = "fit" if meta["preconditioned"] else "none"
        reduce = meta.get("example_reduce")
        return cls(
            store=meta.get("store"),
            preconditioner=None if pre is None else str(pre),
            columns="rows" if reduce == "none" else "examples",
            example_reduce=None if reduce in (None, "none") else str(reduce),
            query_reduce=str(meta.get("query_reduce", "none")),
        )


@dataclass(frozen=True)
class ScoreHeader:
    """The attributes of a score array; :meth:`to_json` and :meth:`from_json` own them.

    Args:
        method: What computed the scores (``"gradient_cosine"``, ``"ekfac"``, ``"magic"``).
        convention: Sign convention, one of :data:`CONVENTIONS`.
        settings: How the scores were made (:class:`ScoreSettings`).
        metadata: Free-form JSON values (query texts, ``relevant`` example ids per query,
            the data module, ...).
        complete: ``True`` once every column is on disk (readers refuse the array before).

    Example:
        >>> h = ScoreHeader("magic", "metagradient", metadata={"queries": ["q"]})
        >>> ScoreHeader.from_json(h.to_json(), where="demo") == h
        True
    """

    method: str
    convention: Convention
    settings: ScoreSettings = field(default_factory=ScoreSettings)
    metadata: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(
                f"method must be a non-empty string naming the method; got {self.method!r}"
            )
        check_convention(self.convention)
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"score array metadata must be plain JSON (str, int, float, bool, None, lists, "
                f"dicts): {err}. Convert tensors and numpy values with .tolist() or float()."
            ) from err

    def to_json(self) -> dict[str, Any]:
        """The ``zarr.json`` attributes of the array."""
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "convention": self.convention,
            "settings": self.settings.to_json(),
            "metadata": dict(self.metadata),
            "complete": self.complete,
        }

    @classmethod
    def from_json(cls, attrs: dict[str, Any], *, where: object) -> ScoreHeader:
        """Parse and check the attributes read at ``where`` (named in errors)."""
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{where} is not a lightning_bergson score array")
        version = int(attrs.get("schema_version", 1))
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{where} is a score array of schema {version}, newer than the "
                f"{SCHEMA_VERSION} supported here; upgrade lightning-bergson"
            )
        meta = dict(attrs.get("metadata") or {})
        raw = attrs.get("settings")
        settings = ScoreSettings.from_json(raw) if raw else ScoreSettings.from_metadata(meta)
        return cls(
            method=str(attrs["method"]),
            convention=attrs["convention"],
            settings=settings,
            metadata=meta,
            complete=attrs.get("complete") is not False,  # schema 1 had no flag
        )
