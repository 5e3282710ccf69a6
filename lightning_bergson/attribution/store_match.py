"""Does a model (and its query settings) match a gradient store? Refuse clearly if not.

(Formerly ``attribution/compat.py``, which still re-exports these names.)

A store records how its rows were made (:meth:`CaptureSettings.to_attrs`): the model
fingerprint, the projection ``{dim, seed, kind, scale}``, the normalizer ``{kind, source}``,
the capture options ``{include, exclude, include_bias, head_cfgs, root}`` and the
``loss_reduction``. Query rows are made from exactly these settings
(:func:`capture_settings`), so both sides match by construction; what can still differ is
the model, which :func:`check_model` compares field by field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..capture.fingerprint import model_fingerprint
from ..capture.hooks import Block
from ..capture.normalizers import Normalizer, convert, load_normalizers
from ..capture.settings import CaptureSettings, SettingsError
from ..networks import unwrap_network
from ..store import ModuleBlock
from ..store.location import Location, StorePath

__all__ = [
    "CaptureSettings",
    "StoreMismatchError",
    "capture_settings",
    "check_blocks",
    "check_model",
    "resolve_network",
    "store_normalizers",
]

# Config entries that describe how a model runs, not what it computes.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "_name_or_path",
        "architectures",
        "attn_implementation",
        "dtype",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "use_cache",
    }
)


class StoreMismatchError(ValueError):
    """A query model or setting does not match the gradient store it is scored against."""


def capture_settings(attrs: Mapping[str, Any]) -> CaptureSettings:
    """Read :class:`CaptureSettings` from a store's root attributes.

    Example:
        >>> s = capture_settings({"projection": {"dim": 8, "seed": 3}, "capture": {}})
        >>> s.projection_dim, s.seed, s.normalizer, s.loss_reduction
        (8, 3, 'none', 'sum')

    Raises:
        StoreMismatchError: the store was projected in a way this version cannot reproduce.
    """
    try:
        return CaptureSettings.from_attrs(attrs)
    except SettingsError as err:
        raise StoreMismatchError(str(err)) from err


def resolve_network(model: nn.Module, root: str | None) -> nn.Module:
    """The module whose names the store uses, as ``GradientCaptureCallback(root=...)`` chose it.

    ``"auto"`` takes ``model.model`` of a LightningModule (such as ``CausalLMModule``) and
    any other module itself (the bare Hugging Face model, even one whose backbone is called
    ``.model`` as Llama's), so the query may pass either.

    Example:
        >>> class Wrapper(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = nn.Linear(2, 2)
        >>> type(resolve_network(Wrapper(), "model")).__name__
        'Linear'
        >>> type(resolve_network(Wrapper(), "auto")).__name__   # not a LightningModule
        'Wrapper'
    """
    if root is None:
        return model
    if root == "auto":
        return unwrap_network(model)
    inner = getattr(model, root, None)
    if isinstance(inner, nn.Module):
        return inner
    raise StoreMismatchError(
        f"the store was captured with root={root!r} but {type(model).__name__} has no "
        f"nn.Module attribute {root!r}; pass the LightningModule it was captured from, or "
        f"its `{root}` attribute"
    )


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


CHECK_MODEL_MODES = ("strict", "shapes", "off")


def _eval_invariant(key: str) -> bool:
    """Config entries that cannot change a gradient taken in eval mode (or at all)."""
    return key in VOLATILE_CONFIG_KEYS or "dropout" in key or key.endswith("pdrop")


def check_model(
    attrs: Mapping[str, Any],
    network: nn.Module,
    *,
    store: str | Path = "",
    mode: str = "strict",
) -> None:
    """Raise :class:`StoreMismatchError` unless ``network`` is the model the store describes.

    ``mode="strict"`` compares the class, the hash of parameter names and shapes and the
    Hugging Face config, ignoring entries that cannot change a gradient in eval mode
    (dropout probabilities, ``use_cache``, the attention implementation,
    ``torch_dtype``, ``transformers_version``); ``"shapes"`` compares the class and the
    parameter shapes only; ``"off"`` checks nothing. Weights are never compared (a store
    describes a whole training run).

    Example:
        >>> attrs = {"model": model_fingerprint(nn.Linear(3, 2))}
        >>> check_model(attrs, nn.Linear(3, 2))
        >>> check_model(attrs, nn.Linear(4, 2))
        Traceback (most recent call last):
        ...
        lightning_bergson.attribution.store_match.StoreMismatchError: model.num_parameters ...
    """
    if mode not in CHECK_MODEL_MODES:
        raise ValueError(f"check_model={mode!r} is not one of {CHECK_MODEL_MODES}")
    want = attrs.get("model")
    if mode == "off" or not isinstance(want, Mapping):
        return  # a store written without a fingerprint cannot be checked
    have = model_fingerprint(network)
    config = list(_flat(want.get("config", {}), "config.")) if mode == "strict" else []
    want_flat, have_flat = _flat(want), _flat(have)
    for name in ["class", *config, "num_parameters", "parameter_shapes_sha256"]:
        if name.startswith("config.") and _eval_invariant(name.rsplit(".", 1)[-1]):
            continue
        if name not in want_flat:
            continue
        if want_flat[name] != have_flat.get(name):
            where = f" at {store}" if store else ""
            relax = (
                " If you know the difference cannot change a gradient, pass "
                "check_model='shapes' (class and parameter shapes only) or 'off'."
                if name.startswith("config.")
                else " (check_model='off' skips this check; rows would be meaningless.)"
            )
            raise StoreMismatchError(
                f"model.{name} is {have_flat.get(name)!r} for the query model but "
                f"{want_flat[name]!r} in the gradient store{where}: query rows would not be "
                "comparable with its rows. Query with the model the store was captured from "
                "(same class, config and parameter shapes), or capture a store for this model."
                + relax
            )


def check_blocks(stored: Sequence[ModuleBlock], blocks: Sequence[Block]) -> None:
    """Raise unless the collector's blocks equal the store's blocks, in order and shape."""
    want = [(b.name, tuple(b.shape)) for b in stored]
    have = [(b.name, tuple(b.shape)) for b in blocks]
    if want != have:
        diff = next(
            (i for i, (w, h) in enumerate(zip(want, have, strict=False)) if w != h),
            min(len(want), len(have)),
        )
        w = want[diff] if diff < len(want) else None
        h = have[diff] if diff < len(have) else None
        raise StoreMismatchError(
            f"block {diff} of the query rows is {h} but the store has {w} "
            f"({len(have)} query blocks, {len(want)} stored): the model's modules do not match "
            "the store's include/exclude/head_cfgs. Query with the model the store was built from."
        )


def store_normalizers(
    store_path: StorePath, settings: CaptureSettings, path: StorePath | None = None
) -> dict[str, Normalizer]:
    """Normalizers for query rows: the ones the store's last rows were normalized with.

    Looked up in order: ``path``, ``<store>/normalizers/normalizers.safetensors`` (written
    at the end of ``fit``: the final optimizer state, or the fixed file), the file recorded
    in the store's metadata (``normalizer.path``).

    Raises:
        StoreMismatchError: the store is normalized but no normalizer file is found.
    """
    if settings.normalizer == "none":
        return {}
    saved = Location.of(store_path) / "normalizers" / "normalizers.safetensors"
    candidates = [path, saved, settings.normalizer_path]
    found = next((Location.of(c) for c in candidates if c and Location.of(c).is_file()), None)
    if found is None:
        raise StoreMismatchError(
            f"the store at {store_path} is normalized ({settings.normalizer!r}, source "
            f"{settings.normalizer_source!r}) but no normalizers were found at {saved}; pass "
            "normalizers=<file.safetensors> (the file the store was captured with)"
        )
    with found.reading() as local:
        loaded = load_normalizers(local)
    return {k: convert(n, settings.normalizer) for k, n in loaded.items()}  # type: ignore[arg-type]
