"""Which submodules are captured: trackable layer types, frozen weights, include/exclude globs.

Trackable: ``nn.Linear``, HF ``Conv1D`` (weight stored ``[in, out]``) and
``nn.Conv1d``/``Conv2d``/``Conv3d``, except layers whose parent's forward uses their
weights without calling them: ``nn.MultiheadAttention`` hands ``out_proj.weight`` to
``F.multi_head_attention_forward`` directly, so a hook on ``out_proj`` never fires.

Selection (``include=None``, the default): trackable modules whose weight requires
grad, minus ``exclude``; with PEFT LoRA that is the ``lora_A``/``lora_B`` adapters,
not the frozen ``base_layer``. An explicit ``include`` list selects every trackable
module matching one of its globs, frozen or not (``("*",)``: all of them).

Example:
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.MultiheadAttention(3, 1), nn.Linear(3, 2))
    >>> list(trackable_modules(net))
    ['0', '2']
    >>> _ = net[0].weight.requires_grad_(False)
    >>> list(select_modules(net, None, ())), list(select_modules(net, ["*"], ()))
    (['2'], ['0', '2'])
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from .conv import CONV_TYPES, conv_features

__all__ = [
    "BYPASSING_PARENTS",
    "DEFAULT_EXCLUDE",
    "bypassed_modules",
    "features",
    "is_hf_conv1d",
    "select_modules",
    "trackable_modules",
]

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*.lm_head", "embed_out", "*.embed_out")
"""Output embeddings are skipped by default: vocabulary-sized, and tied to the input embedding."""

BYPASSING_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
"""Modules whose forward reads their submodules' weights without calling the submodules."""


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF ``transformers.pytorch_utils.Conv1D``: a Linear with its weight stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *CONV_TYPES)) or is_hf_conv1d(module)


def bypassed_modules(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Layers inside a :data:`BYPASSING_PARENTS` module -> that parent's type."""
    parents = {n: type(m) for n, m in model.named_modules() if isinstance(m, BYPASSING_PARENTS)}
    result = {}
    for name, module in model.named_modules():
        for parent, kind in parents.items():
            inside = name != parent and (parent == "" or name.startswith(parent + "."))
            if inside and _is_layer(module):
                result[name] = kind
    return result


def trackable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """All capturable layers (Linear, HF Conv1D, Conv1d/2d/3d), by qualified name."""
    bypassed = bypassed_modules(model)
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and _is_layer(mod) and name not in bypassed
    }


def features(module: nn.Module) -> tuple[int, int]:
    """``(O, I)`` of a trackable layer's gradient block (``I = C/groups * prod(k)`` for conv)."""
    if is_hf_conv1d(module):
        return int(module.nf), int(module.weight.shape[0])
    if isinstance(module, CONV_TYPES):
        return conv_features(module)
    return int(module.out_features), int(module.in_features)


def _available(candidates: Sequence[str]) -> str:
    names = list(candidates)
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def select_modules(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str]
) -> dict[str, nn.Module]:
    """Trackable modules selected by ``include`` (``None``: trainable ones) minus ``exclude``.

    Args:
        model: The network; names are relative to it.
        include: fnmatch globs of qualified names (frozen modules too), or ``None`` for
            every trackable module whose weight requires grad.
        exclude: fnmatch globs of names to skip.

    Raises:
        ValueError: an include pattern matches no trackable module, or nothing is left.
    """
    candidates = trackable_modules(model)
    for pattern in include or ():
        if not fnmatch.filter(candidates, pattern):
            raise ValueError(
                f"module pattern {pattern!r} matches no nn.Linear/Conv1D/ConvNd module of "
                f"{type(model).__name__}; available modules include: {_available(candidates)}. "
                "Patterns are fnmatch globs over qualified names, e.g. '*.mlp.*'."
            )
    if include is None:
        chosen = {n: m for n, m in candidates.items() if m.weight.requires_grad}
    else:
        chosen = {
            n: m for n, m in candidates.items() if any(fnmatch.fnmatchcase(n, p) for p in include)
        }
    selected = {
        n: m for n, m in chosen.items() if not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    }
    if not selected:
        frozen = (
            ""
            if include is not None or not candidates
            else (
                " (include=None selects only modules whose weight requires grad; pass "
                "include=['*'] to capture frozen modules too)"
            )
        )
        raise ValueError(
            f"include={None if include is None else list(include)} and exclude={list(exclude)} "
            f"leave no module to track{frozen}; available modules include: "
            f"{_available(candidates)}"
        )
    return selected
