"""Which parameters a :class:`~.hooks.GradientCollector` captures, and why the others are not.

Attribution scores only see the captured blocks, so a silent gap (an embedding, a
bypassed attention projection, a frozen base model) changes what an influence means.
:func:`describe_capture` lists every captured module with its stored width and every
trainable parameter (``requires_grad``) that is *not* captured, with the reason.

Example:
    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    >>> report = describe_capture(net, GradientCollector(net, projection_dim=2))
    >>> report.width, [s.reason for s in report.skipped][:2]
    (4, ['embedding (nn.Embedding is not captured)', 'bias (include_bias=False)'])
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from torch import nn

from .hooks import GradientCollector
from .selection import BYPASSING_PARENTS, bypassed_modules, trackable_modules

__all__ = ["CaptureReport", "CapturedModule", "SkippedParameter", "describe_capture"]

FROZEN_NOTE = "frozen modules are not captured by default"


@dataclass(frozen=True)
class CapturedModule:
    """One captured module.

    Args:
        name: Qualified name relative to the collector's model.
        kind: Its class name (``Linear``, ``Conv1D``, ``Conv2d``, ...).
        weight_shape: Shape of its weight parameter.
        block_shape: ``(O, I)`` of its gradient block (``I`` counts the bias column).
        heads: Number of stored blocks (heads); 1 when not split.
        width: Numbers per row stored for this module (all its blocks).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    block_shape: tuple[int, int]
    heads: int
    width: int


@dataclass(frozen=True)
class SkippedParameter:
    """A trainable parameter whose gradient is not stored, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CaptureReport:
    """What a collector stores per row and which trainable parameters it leaves out.

    Args:
        model: Class name of the described network.
        settings: One-line summary of the collector's selection settings.
        captured: Captured modules in row order.
        skipped: Trainable parameters that are not captured.
        notes: Extra lines for the header (e.g. how many frozen modules were left out).
    """

    model: str
    settings: str
    captured: list[CapturedModule]
    skipped: list[SkippedParameter]
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        """Row width ``D``: numbers per example over all captured blocks."""
        return sum(m.width for m in self.captured)

    @property
    def num_blocks(self) -> int:
        return sum(m.heads for m in self.captured)

    @property
    def skipped_numel(self) -> int:
        return sum(s.numel for s in self.skipped)

    def format(self) -> str:
        """A plain-text table: header, captured modules, skipped parameters, totals."""
        lines = [f"capture of {self.model}: {self.settings}", *self.notes, ""]
        rows = [
            (m.name, m.kind, str(m.weight_shape), str(m.block_shape), str(m.heads), str(m.width))
            for m in self.captured
        ]
        lines += _table(("captured module", "type", "weight", "block", "heads", "width"), rows)
        if self.skipped:
            rows = [(s.name, str(s.shape), str(s.numel), s.reason) for s in self.skipped]
            lines += [
                "",
                *_table(("skipped trainable parameter", "shape", "numel", "reason"), rows),
            ]
        lines += [
            "",
            f"total: {len(self.captured)} modules, {self.num_blocks} blocks captured, row width "
            f"D = {self.width}; {len(self.skipped)} trainable parameters not captured "
            f"({self.skipped_numel} numbers)",
        ]
        return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _captured(collector: GradientCollector) -> list[CapturedModule]:
    result = []
    for name, plan in collector.plans.items():
        weight = collector.modules[name].weight
        width = sum(math.prod(b.shape) for b in plan.blocks)
        kind = type(collector.modules[name]).__name__
        block = (plan.out_f, plan.in_f)
        result.append(
            CapturedModule(name, kind, tuple(weight.shape), block, len(plan.blocks), width)
        )
    return result


def _trackable_reason(name: str, collector: GradientCollector) -> str:
    for pattern in collector.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if collector.include is not None:
        return "not matched by include"
    return "weight frozen (include=None selects modules whose weight requires grad)"


class _Selection:
    """The collector's selection facts, computed once per report."""

    def __init__(self, collector: GradientCollector) -> None:
        self.collector = collector
        self.trackable = trackable_modules(collector.model)
        self.bypassed = bypassed_modules(collector.model)

    def reason(self, name: str, attr: str, module: nn.Module) -> str | None:
        """Why parameter ``attr`` of ``module`` (named relative to the collector) is skipped."""
        collector = self.collector
        if name in collector.modules:
            if attr == "weight" or (attr == "bias" and collector.include_bias):
                return None
            return "bias (include_bias=False)" if attr == "bias" else _bare(module)
        if name in self.bypassed or isinstance(module, BYPASSING_PARENTS):
            kind = self.bypassed.get(name, type(module)).__name__
            return f"inside nn.{kind} (forward bypasses submodules)"
        if name in self.trackable:
            return _trackable_reason(name, collector)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return f"embedding (nn.{type(module).__name__} is not captured)"
        if attr in ("weight", "bias") and next(module.children(), None) is None:
            return f"module type {type(module).__name__} is not supported"
        return _bare(module)

    def frozen_notes(self) -> list[str]:
        if self.collector.include is not None:
            return []
        frozen = [m for m in self.trackable.values() if not m.weight.requires_grad]
        note = f"note: {FROZEN_NOTE} (include=None)"
        if not frozen:
            return [note]
        numel = sum(m.weight.numel() for m in frozen)
        return [
            f"{note}; {len(frozen)} frozen trackable modules ({numel} weight numbers) left out, "
            "pass include=[...] to capture them"
        ]


def _bare(module: nn.Module) -> str:
    return f"bare nn.Parameter of {type(module).__name__}"


def describe_capture(network: nn.Module, collector: GradientCollector) -> CaptureReport:
    """Captured modules and the trainable parameters of ``network`` left out, with reasons.

    Args:
        network: The model, or a module holding the collector's model (e.g. the
            LightningModule); all its parameters with ``requires_grad`` are accounted for.
        collector: The collector whose selection is described (hooks need not be attached).

    Returns:
        A :class:`CaptureReport`; ``print(report.format())`` shows the table.
    """
    selection = _Selection(collector)
    relative = {id(m): n for n, m in collector.model.named_modules()}
    modules = dict(network.named_modules())
    skipped = []
    for pname, param in network.named_parameters():
        if not param.requires_grad:
            continue
        owner, _, attr = pname.rpartition(".")
        rel = relative.get(id(modules[owner]))
        if rel is None:
            reason: str | None = "outside the collector's model"
        else:
            reason = selection.reason(rel, attr, modules[owner])
        if reason is not None:
            skipped.append(SkippedParameter(pname, tuple(param.shape), reason))
    include = "None (trainable modules)" if collector.include is None else list(collector.include)
    settings = (
        f"projection_dim={collector.projection_dim}, include={include}, "
        f"exclude={list(collector.exclude)}, include_bias={collector.include_bias}"
    )
    captured = _captured(collector)
    notes = selection.frozen_notes()
    return CaptureReport(type(network).__name__, settings, captured, skipped, notes)
