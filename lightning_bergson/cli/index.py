"""The ``index`` command: Bergson's ``build`` flags on top of ``fit`` with :class:`IndexModule`.

::

    python -m lightning_bergson index --model EleutherAI/pythia-160m \\
        --dataset NeelNanda/pile-10k --truncation --token_batch_size 4096 --store runs/x.zarr
    python -m lightning_bergson index --config configs/index.yaml --projection_dim 0

Without ``--config`` the run starts from :func:`index_config` (Bergson's defaults: the model's
own tokenizer, its special tokens and no extra EOS, no truncation, token-budget batches in
length order); with it, from that file. The flags below then replace the matching entries,
and every other argument (``--trainer.*``, ``--print_config``, ...) goes to ``fit`` as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_STORE", "build_parser", "index_config", "index_main", "resolve_config"]

DEFAULT_STORE = "runs/index/grads.zarr"
CAPTURE_CLASS = "lightning_bergson.GradientCaptureCallback"
FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
FILE_SUFFIXES[".txt"] = "text"


def index_config(
    model: str = "EleutherAI/pythia-160m",
    dataset: str = "NeelNanda/pile-10k",
    store: str = DEFAULT_STORE,
) -> dict[str, Any]:
    """The default ``index`` run as a ``fit`` config (``configs/index.yaml`` is this one)."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "default_root_dir": str(Path(store).parent),
            "callbacks": [
                {
                    "class_path": CAPTURE_CLASS,
                    "init_args": {
                        "path": store,
                        "projection_dim": 16,
                        "normalizer": "none",
                        "loss_reduction": "sum",
                        "dtype": "float16",
                        "overwrite": False,
                    },
                }
            ],
        },
        "model": {
            "class_path": "lightning_bergson.IndexModule",
            "init_args": {"model": model, "dtype": "float32"},
        },
        "data": {
            "class_path": "lightning_bergson.TextDataModule",
            "init_args": {
                "dataset": dataset,
                "split": "train",
                "text_column": "text",
                "tokenizer": model,
                "max_length": None,
                "truncation": False,
                "append_eos": False,
                "token_batch_size": 2048,
                "shuffle": False,
            },
        },
    }


def build_parser() -> argparse.ArgumentParser:
    """The Bergson-style flags of ``index`` (``--help`` prints them)."""
    p = argparse.ArgumentParser(
        prog="python -m lightning_bergson index",
        description=(
            "Build a gradient store post hoc from a trained model (Bergson's `build`): one "
            "forward and one activation-only backward per batch, no weight gradients. Without "
            "--config the defaults are Bergson's (the model's tokenizer, no extra EOS, no "
            "truncation, token-budget batches). Any other argument is passed to `fit` "
            "(e.g. --trainer.accelerator cpu, --print_config)."
        ),
        allow_abbrev=False,
    )
    a = p.add_argument
    a("--config", help="start from this fit config (YAML) instead of the built-in defaults")
    a("--store", help=f"gradient store directory (default {DEFAULT_STORE})")
    a("--overwrite", action="store_true", default=None, help="replace an existing store")
    a("--model", help="Hub name, save_pretrained directory or Lightning checkpoint")
    a("--tokenizer", help="tokenizer name or directory (default: the model's own)")
    a(
        "--dtype",
        choices=["auto", "float32", "float64", "bfloat16", "float16"],
        help="parameter dtype (default float32)",
    )
    a("--precision", help="Lightning precision, e.g. 32-true, bf16-mixed (default 32-true)")
    a("--devices", help="devices per node (e.g. 2, or 'auto'); >1 uses DDP")
    a(
        "--dataset",
        help="Hub name, save_to_disk directory, or a .json/.jsonl/.parquet/.csv/.txt file",
    )
    a("--split", help="dataset split (default train)")
    a("--text_column", help="column with each document's text (default text)")
    a("--prompt_column", help="prompts; with --completion_column only completions are labelled")
    a("--completion_column", help="completions (their tokens alone carry the loss)")
    a(
        "--conversation_column",
        help="chat messages; the chat template is applied and only assistant tokens are labelled",
    )
    a(
        "--reward_column",
        help="rewards: rows are grad A_i L_i with A_i = r_i - mean reward "
        "of the same prompt (Dr. GRPO)",
    )
    a(
        "--skip_nan_rewards",
        action="store_true",
        default=None,
        help="skip rows whose reward is NaN (default: stop with an error)",
    )
    a(
        "--truncation",
        action="store_true",
        default=None,
        help="truncate documents to --max_length (default: a longer document is an error)",
    )
    a("--max_length", type=int, help="longest document in tokens (default: the model's limit)")
    a(
        "--append_eos",
        action="store_true",
        default=None,
        help="append the tokenizer's EOS to every document (Bergson does not)",
    )
    a("--token_batch_size", type=int, help="tokens per batch, padding included (default 2048)")
    a("--projection_dim", type=int, help="p of the p x p projection per module; 0 = exact")
    a("--normalizer", choices=["none", "adafactor", "adam"], help="preconditioner (default none)")
    a("--normalizer_path", help="normalizers.safetensors for --normalizer adafactor/adam")
    a("--loss_reduction", choices=["sum", "mean"], help="sum (default) or mean over tokens")
    a("--grad_dtype", choices=["float16", "float32"], help="stored row dtype (default float16)")
    return p


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``fit`` config the flags describe: the base config with every given flag applied."""
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    else:
        cfg = index_config(
            model=args.model or index_config()["model"]["init_args"]["model"],
            store=args.store or DEFAULT_STORE,
        )
    trainer = cfg.setdefault("trainer", {})
    model = cfg.setdefault("model", {}).setdefault("init_args", {})
    data = cfg.setdefault("data", {}).setdefault("init_args", {})
    capture = _capture_args(cfg)

    if args.model:
        model["model"] = args.model
        if not args.tokenizer:
            data["tokenizer"] = _model_tokenizer(args.model, trainer)
    if args.tokenizer:
        data["tokenizer"] = args.tokenizer
    _set(model, "dtype", args.dtype)
    if args.store:
        capture["path"] = args.store
        trainer["default_root_dir"] = str(Path(args.store).parent)
    _set(capture, "overwrite", args.overwrite)
    _set(capture, "projection_dim", args.projection_dim)
    _set(capture, "normalizer", args.normalizer)
    _set(capture, "loss_reduction", args.loss_reduction)
    _set(capture, "dtype", args.grad_dtype)
    if args.normalizer_path:
        capture.update(normalizer_source="file", normalizer_path=args.normalizer_path)
    elif capture.get("normalizer", "none") != "none":
        capture.setdefault("normalizer_source", "file")
        if not capture.get("normalizer_path"):
            raise SystemExit(
                f"index: --normalizer {capture['normalizer']} needs --normalizer_path "
                "<normalizers.safetensors> (the index takes no optimizer steps; e.g. "
                "<training store>/normalizers/normalizers.safetensors)"
            )
    if args.dataset:
        data.update(_dataset_args(args.dataset))
    for key in ("split", "text_column", "prompt_column", "completion_column"):
        _set(data, key, getattr(args, key))
    for key in ("conversation_column", "reward_column", "skip_nan_rewards", "append_eos"):
        _set(data, key, getattr(args, key))
    _set(data, "token_batch_size", args.token_batch_size)
    _set(data, "truncation", args.truncation)
    _set(data, "max_length", args.max_length)
    if data.get("max_length") is None and "tokenizer" in data:
        limit = _model_max_length(model.get("model"))
        if limit is not None:
            budget = data.get("token_batch_size")
            truncating = bool(data.get("truncation"))
            data["max_length"] = min(limit, budget) if truncating and budget else limit
    _set(trainer, "precision", args.precision)
    if args.devices is not None:
        trainer["devices"] = int(args.devices) if args.devices.isdigit() else args.devices
        if trainer["devices"] not in (1, "1"):
            trainer.setdefault("strategy", "ddp")
            if data.get("token_batch_size"):  # the token sampler deals batches to ranks itself
                trainer["use_distributed_sampler"] = False
    return cfg


def index_main(argv: list[str]) -> None:
    """``python -m lightning_bergson index [flags] [fit options]``: see the module docs."""
    from .lightning import run_lightning

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.model is not None:
        from ..networks import check_model_source

        check_model_source(args.model, "--model")
    cfg = resolve_config(args)
    root = Path(cfg.get("trainer", {}).get("default_root_dir") or ".")
    root.mkdir(parents=True, exist_ok=True)
    resolved = root / "index_config.yaml"
    resolved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _print_plan(cfg, resolved)
    run_lightning(["fit", "--config", str(resolved), *rest])


# ---------------------------------------------------------------------------- helpers


def _set(section: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        section[key] = value


def _capture_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """``init_args`` of the config's GradientCaptureCallback (added when it has none)."""
    callbacks = cfg["trainer"].setdefault("callbacks", [])
    if isinstance(callbacks, dict):
        callbacks = cfg["trainer"]["callbacks"] = [callbacks]
    for cb in callbacks:
        path = str(cb.get("class_path", ""))
        if path.rsplit(".", 1)[-1] == "GradientCaptureCallback":
            return cb.setdefault("init_args", {})
    callbacks.append({"class_path": CAPTURE_CLASS, "init_args": {"path": DEFAULT_STORE}})
    return callbacks[-1]["init_args"]


def _dataset_args(dataset: str) -> dict[str, Any]:
    """``TextDataModule`` arguments of a ``--dataset`` value (a file gets its format)."""
    path = Path(dataset)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in FILE_SUFFIXES:
        return {"dataset": FILE_SUFFIXES[suffix], "data_files": str(path)}
    if path.is_file():
        raise SystemExit(
            f"index: --dataset {dataset} is a file of unknown type {suffix!r}; use one of "
            f"{', '.join(sorted(FILE_SUFFIXES))}, a save_to_disk directory or a Hub name"
        )
    return {"dataset": dataset, "data_files": None}


def _model_tokenizer(model: str, trainer: dict[str, Any]) -> str:
    """The tokenizer of ``--model``: its own (save_pretrained dir, Hub name) or its run's."""
    from ..networks import find_checkpoint, is_pretrained_source

    if is_pretrained_source(model):
        return model
    import torch

    from ..data import load_text_data

    ckpt = torch.load(find_checkpoint(model), map_location="cpu", weights_only=True)
    data = load_text_data(ckpt.get("datamodule_hyper_parameters"))
    if data is None:
        raise SystemExit(
            f"index: the checkpoint {model} saved no TextDataModule to rebuild its tokenizer "
            "from; pass --tokenizer <name or directory>"
        )
    out = Path(trainer.get("default_root_dir") or ".") / "tokenizer"
    data.tokenizer.save_pretrained(str(out))  # the run's own tokenizer, trained or named
    return str(out)


def _model_max_length(model: Any) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``) of a pretrained model's config."""
    if not isinstance(model, str):
        return None
    from ..networks import is_pretrained_source

    if not is_pretrained_source(model):
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _print_plan(cfg: dict[str, Any], resolved: Path) -> None:
    data = cfg.get("data", {}).get("init_args", {})
    model = cfg.get("model", {}).get("init_args", {})
    capture = _capture_args(cfg)
    lines = [
        "index:",
        f"  model      {model.get('model')} (dtype {model.get('dtype', 'float32')})",
        f"  tokenizer  {data.get('tokenizer') or 'trained on the texts'}",
        f"  dataset    {data.get('dataset')}"
        + (f" ({data['data_files']})" if data.get("data_files") else "")
        + f", split {data.get('split', 'train')}",
        f"  columns    {_columns(data)}",
        f"  tokens     max_length {data.get('max_length')}, truncation "
        f"{bool(data.get('truncation'))}, append_eos {bool(data.get('append_eos'))}, "
        f"token_batch_size {data.get('token_batch_size')}",
        f"  rows       projection_dim {capture.get('projection_dim', 16)}, normalizer "
        f"{capture.get('normalizer', 'none')}, "
        f"loss_reduction {capture.get('loss_reduction', 'sum')}",
        f"  store      {capture.get('path')}",
        f"  config     {resolved}",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _columns(data: dict[str, Any]) -> str:
    if data.get("conversation_column"):
        text = f"conversation {data['conversation_column']!r} (assistant tokens labelled)"
    elif data.get("completion_column"):
        text = (
            f"prompt {data.get('prompt_column')!r} + completion "
            f"{data['completion_column']!r} (completion tokens labelled)"
        )
    else:
        text = f"text {data.get('text_column', 'text')!r}"
    if data.get("reward_column"):
        text += f", reward {data['reward_column']!r}"
    return text
