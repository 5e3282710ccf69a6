"""Build or load a network: a name | config | ``save_pretrained`` dir | checkpoint | module.

The one home for every way the package gets a network, so ``CausalLMModule``,
``EkfacModule``, ``MagicModule``, ``IndexModule`` and the attribution commands agree:

* :func:`build_network`: a Hugging Face name or ``save_pretrained`` directory (resized to
  ``vocab_size``), a fresh seeded network from config keys, or an ``nn.Module`` as is;
* :func:`can_build_now` and :func:`vocab_from_datamodule`: the "``vocab_size`` arrives in
  ``configure_model``" step of a module built from config without a vocabulary;
* :func:`load_model`: a trained model from a Lightning checkpoint (read with
  ``weights_only=True``: no code runs) or a pretrained source, with the data module's saved
  hyperparameters;
* :func:`load_network`: the bare network to analyse from any of the above;
* :func:`unwrap_network`: the network inside a LightningModule (its ``.model``).

Importing this module loads neither Lightning nor transformers; the functions that need
them import them when called.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "build_network",
    "can_build_now",
    "check_model_source",
    "config_dict",
    "find_checkpoint",
    "is_pretrained_source",
    "load_model",
    "load_network",
    "unwrap_network",
    "vocab_from_datamodule",
]


def check_model_source(source: str | Path, flag: str = "model") -> None:
    """Raise ``FileNotFoundError`` for a local-looking path that does not exist.

    Hugging Face names are ``name`` or ``org/name``; anything absolute, relative
    (``./``, ``../``, ``~``) or deeper is a path, and a missing one would otherwise reach
    the Hub and fail with an unrelated "Repo id must use alphanumeric chars" error.

    Example:
        >>> check_model_source("./no/such/dir")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model=./no/such/dir: no such file or directory. ...
    """
    text = str(source)
    local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if local and not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"{flag}={text}: no such file or directory. Pass a Lightning checkpoint, a "
            "directory holding one, a save_pretrained directory or a Hugging Face model name "
            "(org/name)."
        )


def is_pretrained_source(source: str | Path) -> bool:
    """A ``save_pretrained`` directory or a Hub name (not a Lightning checkpoint)."""
    path = Path(source)
    return (path.is_dir() and (path / "config.json").is_file()) or not path.exists()


def find_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a file, else the most recently written ``*.ckpt`` below it."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no Lightning checkpoint (*.ckpt) at {path}; pass a checkpoint file, a directory "
            "containing one (e.g. the run's default_root_dir), or a save_pretrained directory"
        )
    return found[-1]


# ---------------------------------------------------------------------- building


def can_build_now(
    model: str | nn.Module | None, config: dict[str, Any] | None, vocab_size: int | None
) -> bool:
    """Whether the network can be built in ``__init__`` (else ``configure_model`` builds it
    with the data module's vocabulary: a config without ``vocab_size``)."""
    return model is not None or vocab_size is not None or "vocab_size" in dict(config or {})


def build_network(
    model: str | nn.Module | None,
    config: dict[str, Any] | None,
    vocab_size: int | None = None,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> nn.Module:
    """A causal LM from a name or ``save_pretrained`` directory, from config keys, or as is.

    Args:
        model: A Hugging Face name, a local ``save_pretrained`` directory (its embedding
            resized to ``vocab_size`` when that differs), or an ``nn.Module`` returned as is.
        config: Without ``model``: config keys with ``model_type`` (or a
            ``PretrainedConfig``) of a fresh network, initialized under ``seed``.
        vocab_size: Override the vocabulary size.
        attn_implementation: ``"eager"`` (exact, twice differentiable) or ``"sdpa"``.
        seed: Initialization seed of a network built from ``config``.

    Example:
        >>> net = build_network(None, {"model_type": "gpt_neox", "hidden_size": 8,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
        ...     vocab_size=32)
        >>> net.get_input_embeddings().num_embeddings
        32
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(model, nn.Module):
        return model
    if model is not None:
        check_model_source(model)
        net = AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn_implementation)
        if vocab_size is not None and net.get_input_embeddings().num_embeddings != vocab_size:
            net.resize_token_embeddings(vocab_size)
        return net
    if config is None:
        raise ValueError(
            "CausalLMModule needs `model` (a Hugging Face name or a local directory) or `config` "
            "(a dict with 'model_type', e.g. {'model_type': 'gpt_neox', 'hidden_size': 64})"
        )
    if isinstance(config, PretrainedConfig):
        cfg = config
    else:
        kwargs = dict(config)
        if "model_type" not in kwargs:
            raise ValueError(
                f"config needs a 'model_type' key (e.g. 'gpt_neox'); got {sorted(kwargs)}"
            )
        cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)


def vocab_from_datamodule(module: Any, owner: str, *, given: str = "no vocab_size") -> int:
    """The trainer's ``datamodule.vocab_size``, recorded in ``module.hparams``.

    The step of ``configure_model`` for a network built from a config without a vocabulary:
    the data module (its tokenizer) decides it, and the hyperparameters keep it so a
    checkpoint rebuilds the same network.

    Args:
        module: The LightningModule whose ``configure_model`` runs.
        owner: Its class name, for the error.
        given: What it was given, for the error.
    """
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    vocab_size = getattr(datamodule, "vocab_size", None)
    if vocab_size is None:
        raise ValueError(
            f"{owner} was given {given} and the trainer has no data module with a "
            "`vocab_size`; pass vocab_size=... or config={'vocab_size': ...}"
        )
    module.hparams.vocab_size = int(vocab_size)
    return int(vocab_size)


def config_dict(config: Any) -> dict[str, Any]:
    """A Hugging Face config as plain JSON types, ``model_type`` included (rebuildable by
    :func:`build_network`)."""
    return {"model_type": config.model_type, **json.loads(config.to_json_string(use_diff=True))}


# ---------------------------------------------------------------------- loading


def unwrap_network(model: nn.Module) -> nn.Module:
    """The network a LightningModule holds in ``.model``; any other module as is.

    Only a LightningModule is unwrapped: many Hugging Face causal LMs (Llama, Qwen,
    Mistral) name their backbone ``.model``, which is not the network.
    """
    lightning = sys.modules.get("lightning.pytorch")  # not imported: not a LightningModule
    inner = getattr(model, "model", None)
    is_lightning = lightning is not None and isinstance(model, lightning.LightningModule)
    return inner if is_lightning and isinstance(inner, nn.Module) else model


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _public(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_model(
    source: str | Path, *, dtype: str = "float32"
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The trained model and, for checkpoints, the data module's saved hyperparameters.

    Args:
        source: A Lightning checkpoint (``*.ckpt``) of a LightningModule such as
            ``CausalLMModule``, a directory holding checkpoints (the newest is used), a
            ``save_pretrained`` directory or a Hugging Face model name.
        dtype: Parameter dtype (``"float32"``, ``"bfloat16"``, ...), or ``"auto"`` to keep
            the saved one.

    Returns:
        ``(LightningModule or Hugging Face model in eval mode, data hparams or None)``.
    """
    import lightning.pytorch as L

    check_model_source(source)
    if is_pretrained_source(source):
        from transformers import AutoModelForCausalLM

        kind = dtype if dtype == "auto" else getattr(torch, dtype)
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=kind).eval(), None
    ckpt_path = find_checkpoint(source)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    cls = _import(hparams.get("_class_path", "lightning_bergson.CausalLMModule"))
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise TypeError(f"{ckpt_path}: {cls} is not a LightningModule")
    module = cls(**_public(hparams))
    module.load_state_dict(ckpt["state_dict"])
    if dtype != "auto":
        module = module.to(getattr(torch, dtype))
    data = ckpt.get("datamodule_hyper_parameters")
    return module.eval(), dict(data) if data else None


def load_network(
    model: str | nn.Module | None,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> nn.Module:
    """The bare network to analyse: unwrap a LightningModule, load a ``.ckpt``, else build.

    Args:
        model: A LightningModule holding the network in ``.model``, an ``nn.Module``, a
            ``.ckpt`` of a LightningModule such as ``CausalLMModule``, or what
            :func:`build_network` takes.
        config, vocab_size, attn_implementation, seed: As :func:`build_network`.
    """
    if isinstance(model, nn.Module):
        return unwrap_network(model)
    if isinstance(model, str) and model.endswith(".ckpt"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"checkpoint {model!r} does not exist")
        try:
            loaded, _ = load_model(model, dtype="auto")
        except ValueError as err:
            raise ValueError(
                f"cannot rebuild the network of checkpoint {model!r}: {err}. Checkpoints of a "
                "CausalLMModule given an nn.Module do not record its architecture; build it with "
                "`model=<name or directory>` or `config=...`, or pass the network itself"
            ) from err
        network = unwrap_network(loaded)
        if network is loaded:
            raise ValueError(
                f"checkpoint {model!r} holds a {type(loaded).__name__} without a `.model` "
                "network; pass a CausalLMModule checkpoint or the network itself"
            )
        return network.train()  # as a freshly built network: the caller picks the mode
    return build_network(model, config, vocab_size, attn_implementation, seed)
