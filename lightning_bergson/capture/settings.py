"""CaptureSettings: the one owner of the capture settings stored with a gradient store.

The callback writes them (:meth:`CaptureSettings.to_attrs`), a resumed run compares them
(:meth:`CaptureSettings.diff`), attribution and EK-FAC read them
(:meth:`CaptureSettings.from_attrs`) and rebuild the query-side collector from them
(:meth:`CaptureSettings.collector_kwargs`). The JSON layout is the store's root attributes::

    {"projection": {"dim", "seed", "kind", "scale"},
     "normalizer": {"kind", "source", "timing"[, "path"]},
     "capture": {"include", "exclude", "include_bias", "head_cfgs", "root",
                 "batch_reduction", "track_order"},
     "loss_reduction": "sum" | "mean"}

Example:
    >>> s = CaptureSettings(projection_dim=8, seed=3, normalizer="adafactor")
    >>> t = CaptureSettings.from_attrs(s.to_attrs())
    >>> t == s, s.diff(CaptureSettings(projection_dim=4, seed=3))
    (True, ['projection_dim', 'normalizer'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .heads import HeadConfig

__all__ = ["SUPPORTED_PROJECTION", "CaptureSettings", "SettingsError"]

SUPPORTED_PROJECTION = {"kind": "rademacher", "scale": "jl"}


class SettingsError(ValueError):
    """Stored capture settings that this version cannot reproduce."""


@dataclass(frozen=True)
class CaptureSettings:
    """How the rows of a gradient store were made.

    Args:
        projection_dim: ``p`` of each block's projection (0 = exact gradients).
        seed: Projection seed.
        normalizer: ``"none"``, ``"adafactor"`` or ``"adam"``.
        normalizer_source: ``"optimizer"`` (live second moments) or ``"file"``.
        normalizer_path: The safetensors file of ``normalizer_source="file"``.
        include: Module globs to track; ``None`` = every module with a trainable weight.
        exclude: Module globs to skip; ``None`` = the collector's default (output embedding).
        head_cfgs: Module name or glob -> :class:`HeadConfig`.
        include_bias: Bias gradients appended as an input column.
        root: Attribute of the LightningModule whose submodules were hooked.
        batch_reduction: The training loss's reduction over examples, as declared
            (``"auto"`` = measured each batch).
        track_order: Rows record their optimizer step and epoch.
        loss_reduction: ``"sum"`` or ``"mean"`` of each example's token losses.
    """

    projection_dim: int
    seed: int = 0
    normalizer: str = "none"
    normalizer_source: str = "optimizer"
    normalizer_path: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    head_cfgs: dict[str, HeadConfig] = field(default_factory=dict)
    include_bias: bool = False
    root: str | None = "auto"
    batch_reduction: str = "auto"
    track_order: bool = True
    loss_reduction: str = "sum"

    @property
    def deferred(self) -> bool:
        """Rows wait for the optimizer step whose state normalizes them."""
        return self.normalizer != "none" and self.normalizer_source == "optimizer"

    def to_attrs(self) -> dict[str, Any]:
        """The store's root-attribute sections (plain JSON types)."""
        normalizer: dict[str, Any] = {
            "kind": self.normalizer,
            "source": self.normalizer_source,
            "timing": "after_step" if self.deferred else "fixed",
        }
        if self.normalizer_source == "file":
            normalizer["path"] = None if self.normalizer_path is None else str(self.normalizer_path)
        return {
            "projection": {"dim": self.projection_dim, "seed": self.seed, **SUPPORTED_PROJECTION},
            "normalizer": normalizer,
            "capture": {
                "include": None if self.include is None else list(self.include),
                "exclude": None if self.exclude is None else list(self.exclude),
                "include_bias": self.include_bias,
                "head_cfgs": {k: asdict(v) for k, v in self.head_cfgs.items()},
                "root": self.root,
                "batch_reduction": self.batch_reduction,
                "track_order": self.track_order,
            },
            "loss_reduction": self.loss_reduction,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> CaptureSettings:
        """Read the settings back from a store's root attributes.

        Raises:
            SettingsError: no projection settings, or a projection this version cannot make.
        """
        proj = dict(attrs.get("projection") or {})
        if "dim" not in proj:
            raise SettingsError(
                "the store records no projection settings (attrs['projection']['dim']); it was "
                "not written by GradientCaptureCallback, so query rows cannot be made to match "
                "it. Pass query gradients to Attributor.search directly."
            )
        for key, want in SUPPORTED_PROJECTION.items():
            if proj.get(key, want) != want:
                raise SettingsError(
                    f"the store's projection {key}={proj[key]!r} cannot be reproduced here (only "
                    f"{want!r}); rebuild the store with this version of lightning_bergson"
                )
        cap = dict(attrs.get("capture") or {})
        norm = dict(attrs.get("normalizer") or {})
        heads = {k: HeadConfig(**v) for k, v in dict(cap.get("head_cfgs") or {}).items()}
        return cls(
            projection_dim=int(proj["dim"]),
            seed=int(proj.get("seed", 0)),
            normalizer=str(norm.get("kind", "none")),
            normalizer_source=str(norm.get("source", "optimizer")),
            normalizer_path=norm.get("path"),
            include=None if cap.get("include") is None else list(cap["include"]),
            exclude=None if cap.get("exclude") is None else list(cap["exclude"]),
            head_cfgs=heads,
            include_bias=bool(cap.get("include_bias", False)),
            root=cap.get("root", "auto"),
            batch_reduction=str(cap.get("batch_reduction", "auto")),
            track_order=bool(cap.get("track_order", True)),
            loss_reduction=str(attrs.get("loss_reduction", "sum")),
        )

    def diff(self, other: CaptureSettings) -> list[str]:
        """Names of the fields whose values differ from ``other``'s, in field order."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def describe_diff(self, other: CaptureSettings) -> str:
        """``"name: mine != other's"`` for every differing field, ``"; "``-separated."""
        return "; ".join(
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in self.diff(other)
        )

    def collector_kwargs(self, modules: Sequence[str] | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`~lightning_bergson.GradientCollector`.

        Args:
            modules: The store's module names: the collector then tracks exactly these
                (whether or not their weights are trainable in the query model).
        """
        include = [_literal(m) for m in modules] if modules is not None else self.include
        kwargs: dict[str, Any] = {
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "include": include,
            "head_cfgs": self.head_cfgs,
            "include_bias": self.include_bias,
        }
        if self.exclude is not None:
            kwargs["exclude"] = self.exclude
        return kwargs


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)
