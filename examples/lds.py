"""Every attribution method on one LDS table: the same model, queries and cached retrains.

    python examples/lds.py                       # ~ minutes on a 2-core CPU
    python examples/lds.py --keep_fraction 0.5 --num_subsets 32 --epochs 2

1. Train a tiny GPT-NeoX with ``MagicModule`` (AdamW, clipping) on the corpus documents,
   keeping every step's state (``checkpoint_schedule="all"``: MAGIC's scores are the same
   under every schedule, and the kept states give the captured rows below).
2. Score every document for ``--num_queries`` facts ("<name> was born in" -> " Lyon", loss on
   the answer) with every method of :mod:`lds_methods`: MAGIC metagradients; TrackStar over
   rows captured along the same trajectory (optimizer normalizer, cosine or inner product,
   with or without the preconditioner); inner product and cosine of exact gradients of the
   final model; EK-FAC; mean hidden-state cosine; Bergson's TrackStar and EK-FAC when
   ``bergson`` is importable.
3. Retrain ``--num_subsets`` times with 0/1 data weights (the same ``MagicModule`` code path,
   ``--keep_fraction`` of the documents kept), measure the query losses, and print each
   method's LDS (Spearman over subsets, mean ± sd over queries), its tail-patch score (one
   more optimizer step on each query's top ``--tail_k`` documents; drop of the query loss,
   mean ± sd over queries) and the fit's metasmoothness (``MagicModule.metasmoothness``).

Writes ``runs/lds/<method>.zarr`` (score arrays the ``lds`` command also reads), the
retrains cache, and appends the table and this command to ``examples/results/lds.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from lds_methods import (
    bergson_scores,
    ekfac_scores,
    exact_gradient_scores,
    helpful_of,
    hidden_scores,
    ordered_batches,
    random_helpfulness,
    tail_patch,
    trackstar_scores,
    trajectory_store,
)
from torch import Tensor

from lightning_bergson import MagicModule, TextDataModule
from lightning_bergson.magic import query_batch
from lightning_bergson.magic.functional import DEFAULT_EPS_ROOT
from lightning_bergson.scores import write_scores
from lightning_bergson.scores.lds import (
    linear_datamodeling_score,
    predicted_losses,
    retrain_losses,
    sample_subsets,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "model_type": "gpt_neox",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
# options that change only how the trained model is scored, not the retrains' cache key
SCORING_ONLY = ("out", "report", "num_subsets", "projection_dim", "tail_k", "bergson", "threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num_people", type=int, default=16, help="biography corpus size")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    p.add_argument(
        "--eps_root",
        type=float,
        default=DEFAULT_EPS_ROOT,
        help="Adam epsilon inside the sqrt (default: MagicModule's)",
    )
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--num_queries", type=int, default=8, help="facts 0..Q-1 are the queries")
    p.add_argument("--num_subsets", type=int, default=64)
    p.add_argument("--keep_fraction", type=float, default=0.5)
    p.add_argument("--projection_dim", type=int, default=16, help="TrackStar row projection")
    p.add_argument("--tail_k", type=int, default=8, help="documents of a tail-patch step")
    p.add_argument(
        "--bergson", default="auto", choices=["auto", "off"], help="Bergson's methods if importable"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/lds", help="score arrays and the retrains cache")
    p.add_argument("--report", default=str(ROOT / "examples" / "results" / "lds.md"))
    return p.parse_args(argv)


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def all_scores(args, mm: MagicModule, dm: TextDataModule, query, out: Path) -> tuple[dict, str]:
    """``{method: (convention, [Q, N] scores)}`` for every method, and a note on Bergson."""
    ds, pad = dm.train_dataset, dm.pad_token_id

    def docs():
        return ordered_batches(ds, pad)

    steps_per_epoch = -(-len(ds) // args.batch_size)
    store = trajectory_store(mm, out / "trajectory.zarr", args.projection_dim, steps_per_epoch)
    scores: dict[str, tuple[str, np.ndarray]] = {
        "MAGIC": ("metagradient", mm.attribute(query).numpy())
    }
    for cosine in (True, False):
        for pre in (True, False):
            name = f"TrackStar rows, {'cosine' if cosine else 'inner product'}, " + (
                "preconditioner" if pre else "no preconditioner"
            )
            s = trackstar_scores(store, mm.model, query, cosine=cosine, preconditioner=pre)
            scores[name] = ("influence", s)
    for name, s in exact_gradient_scores(mm.model, docs(), query).items():
        scores[f"gradient {name} (exact, final model)"] = ("influence", s)
    scores["EK-FAC"] = (
        "influence",
        ekfac_scores(mm.model, dm.train_dataloader(), docs(), query, out / "ekfac"),
    )
    scores["mean hidden state cosine"] = ("influence", hidden_scores(mm.model, docs(), query))
    note = "Bergson's methods: not run (--bergson off)."
    if args.bergson == "auto":
        found, note = bergson_scores(
            mm, dm.tokenizer, ds, query, out / "bergson", args.projection_dim
        )
        scores.update({k: ("influence", v) for k, v in found.items()})
    return scores, note


def data(args: argparse.Namespace) -> tuple[TextDataModule, dict[str, Tensor]]:
    """The biography documents and the fact queries."""
    dm = TextDataModule(
        num_people=args.num_people,
        max_length=32,
        batch_size=args.batch_size,
        tokenizer_vocab_size=512,
        seed=args.seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm, query_batch(dm.tokenizer, facts=dm.corpus.facts[: args.num_queries])  # type: ignore[union-attr]


def magic_module(args, dm: TextDataModule, weights: Tensor | None = None, schedule: str = "sqrt"):
    """The forward run (``schedule="all"``) or a retrain on 0/1 ``weights``."""
    return MagicModule(
        config=MODEL,
        vocab_size=dm.vocab_size,
        num_examples=len(dm.train_dataset),
        optimizer=args.optimizer,
        lr=args.lr,
        eps=args.eps,
        eps_root=args.eps_root,
        momentum=args.momentum,
        max_grad_norm=args.max_grad_norm,
        data_weights=weights,
        checkpoint_schedule=schedule,  # type: ignore[arg-type]
        seed=args.seed,
    )


def measured_losses(args, dm: TextDataModule, query, mm: MagicModule, masks: Tensor, out: Path):
    """``[M, Q]`` query losses of the retrains, cached by the training setup."""

    def retrain(mask: Tensor) -> tuple[np.ndarray, str]:
        retrained = magic_module(args, dm, mask.double())
        trainer(args.epochs).fit(retrained, datamodule=dm)
        return retrained.query_loss(query).numpy(), retrained.data_order

    setup = {k: v for k, v in vars(args).items() if k not in SCORING_ONLY}
    key = hashlib.sha256(repr(sorted(setup.items())).encode()).hexdigest()[:16]
    cache = out / f"retrains_{key}.safetensors"
    return retrain_losses(retrain, masks, cache, data_order=mm.data_order, key=key)


def tail_patches(args, mm: MagicModule, dm: TextDataModule, query, scores) -> dict[str, np.ndarray]:
    """Every method's tail-patch scores ``[Q]``, and those of random documents."""
    ds, pad = dm.train_dataset, dm.pad_token_id
    helpful = {name: helpful_of(s, conv) for name, (conv, s) in scores.items()}
    rand = random_helpfulness(len(query["input_ids"]), len(ds), args.seed)
    helpful["random documents (reference)"] = rand
    return {name: tail_patch(mm, query, h, ds, pad, args.tail_k) for name, h in helpful.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm, query = data(args)
    n, ids = len(dm.train_dataset), np.arange(len(dm.train_dataset))
    t0 = time.perf_counter()
    mm = magic_module(args, dm, schedule="all")  # every state kept: the captured rows replay them
    trainer(args.epochs).fit(mm, datamodule=dm)
    t_fit = time.perf_counter() - t0
    scores, note = all_scores(args, mm, dm, query, out)
    t_scores = time.perf_counter() - t0 - t_fit
    for name, (conv, s) in scores.items():
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        write_scores(out / f"{slug}.zarr", s, ids, method=slug, convention=conv, overwrite=True)
    masks = sample_subsets(n, args.num_subsets, args.keep_fraction, args.seed)
    measured = measured_losses(args, dm, query, mm, masks, out)  # (M, Q)
    t_retrain = time.perf_counter() - t0 - t_fit - t_scores
    rows = [
        (name, conv, linear_datamodeling_score(predicted_losses(s, conv, masks, ids), measured))
        for name, (conv, s) in scores.items()
    ]
    smooth = mm.metasmoothness(h=0.1)  # two more forward trainings; warns below 0.9
    header = (
        f"{n} documents, {mm.trajectory.num_steps} {args.optimizer} steps (lr {args.lr}, "  # type: ignore[union-attr]
        f"eps_root {args.eps_root}, eps {args.eps}, clip {args.max_grad_norm}), "
        f"{args.num_queries} fact queries, {args.num_subsets} retrains keeping "
        f"{args.keep_fraction:.0%}; metasmoothness (h = 0.1) {smooth:.3f}; tail-patch on the "
        f"top {args.tail_k} documents"
    )
    table = format_rows(rows, tail_patches(args, mm, dm, query, scores))
    print(f"{header}\n{table}\n{note}\nfit {t_fit:.1f}s, scores {t_scores:.1f}s, retrains "
          f"{t_retrain:.1f}s")  # fmt: skip
    _report(Path(args.report), argv, header, table, note, (t_fit, t_scores, t_retrain))


def format_rows(rows, patch: dict[str, np.ndarray]) -> str:
    """Markdown: method, convention, LDS mean ± sd, tail-patch mean ± sd (over queries)."""
    lines = [
        "| method | convention | LDS | tail-patch (nats/token) |",
        "|---|---|---|---|",
    ]
    for name, conv, lds in rows:
        tp = patch[name]
        lines.append(
            f"| {name} | {conv} | {np.nanmean(lds):.3f} ± {np.nanstd(lds):.3f} | "
            f"{tp.mean():+.4f} ± {tp.std():.4f} |"
        )
    ref = patch["random documents (reference)"]
    lines.append(f"| random documents (reference) | - | - | {ref.mean():+.4f} ± {ref.std():.4f} |")
    return "\n".join(lines)


def _report(path: Path, argv, header: str, table: str, note: str, times) -> None:
    """Append the command, the setup and the table to the markdown report."""
    command = "python examples/lds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"\n### `{command.strip()}`\n\n{header}.\n\n{table}\n\n{note}\n\n"
        f"Wall time (2-core CPU, shared): forward fit {times[0]:.1f} s, every method's scores "
        f"{times[1]:.1f} s, retrains {times[2]:.1f} s.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
