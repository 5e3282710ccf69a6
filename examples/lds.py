"""LDS of MAGIC against gradient cosine on the embedded biography corpus, on the same retrains.

    python examples/lds.py                       # ~ minutes on a 2-core CPU
    python examples/lds.py --keep_fraction 0.5 --num_subsets 32 --epochs 2

1. Train a tiny GPT-NeoX with ``MagicModule`` (AdamW, clipping) on the corpus documents.
2. Score every document for ``--num_queries`` facts ("<name> was born in" -> " Lyon", loss on
   the answer): MAGIC metagradients (``[Q, N]``, convention ``metagradient``) and gradient
   cosine (exact per-example gradients of every Linear layer of the final model, from
   ``GradientCollector(projection_dim=0)``; convention ``influence``).
3. Retrain ``--num_subsets`` times with 0/1 data weights (the same ``MagicModule`` code path,
   ``--keep_fraction`` of the documents kept), measure the query losses, and print each
   method's LDS (Spearman over subsets, mean ± sd over queries), and the fit's
   metasmoothness (``MagicModule.metasmoothness``, no retrain bank needed).

Writes ``runs/lds/{magic,cosine}.zarr`` (score arrays the ``lds`` command also reads), the
retrains cache, and ``examples/results/lds.md`` with the table and this command.
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
from torch import Tensor

from lightning_bergson import GradientCollector, MagicModule, TextDataModule
from lightning_bergson.magic import query_batch
from lightning_bergson.magic.functional import DEFAULT_EPS_ROOT, example_losses, token_losses
from lightning_bergson.scores import write_scores
from lightning_bergson.scores.lds import (
    format_table,
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


def parse_args() -> argparse.Namespace:
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lds", help="score arrays and the retrains cache")
    p.add_argument("--report", default=str(ROOT / "examples" / "results" / "lds.md"))
    return p.parse_args()


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


def gradient_cosine(model: torch.nn.Module, dm: TextDataModule, query: dict[str, Tensor]) -> Tensor:
    """``[Q, N]`` cosine of exact per-example Linear-layer gradients (summed token losses)."""

    def rows(batch: dict[str, Tensor], per_query: bool) -> Tensor:
        blocks: dict[str, Tensor] = {}
        with GradientCollector(model, projection_dim=0, closure=blocks.__setitem__):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss, _ = token_losses(logits.logits, batch["labels"])
            (example_losses(logits.logits, batch["labels"]) if per_query else loss).sum().backward()
        model.zero_grad(set_to_none=True)
        return torch.cat([blocks[k] for k in sorted(blocks)], dim=1)  # (B, D)

    model.eval()
    train = torch.cat([rows(b, False) for b in _ordered_loader(dm)])  # (N, D)
    q = rows(query, True)  # (Q, D)
    train = train / train.norm(dim=1, keepdim=True)
    return (q / q.norm(dim=1, keepdim=True)) @ train.T  # (Q, N)


def _ordered_loader(dm: TextDataModule):
    from lightning_bergson.data import collate_batch

    ds = dm.train_dataset
    for start in range(0, len(ds), dm.batch_size):
        rows = [ds[i] for i in range(start, min(start + dm.batch_size, len(ds)))]
        yield collate_batch(rows, dm.pad_token_id)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm = TextDataModule(
        num_people=args.num_people,
        max_length=32,
        batch_size=args.batch_size,
        tokenizer_vocab_size=512,
        seed=args.seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    n = len(dm.train_dataset)
    query = query_batch(dm.tokenizer, facts=dm.corpus.facts[: args.num_queries])  # type: ignore[union-attr]

    def module(weights: Tensor | None = None) -> MagicModule:
        return MagicModule(
            config=MODEL,
            vocab_size=dm.vocab_size,
            num_examples=n,
            optimizer=args.optimizer,
            lr=args.lr,
            eps=args.eps,
            eps_root=args.eps_root,
            momentum=args.momentum,
            max_grad_norm=args.max_grad_norm,
            data_weights=weights,
            seed=args.seed,
        )

    t0 = time.perf_counter()
    mm = module()
    trainer(args.epochs).fit(mm, datamodule=dm)
    t_fit = time.perf_counter() - t0
    magic = mm.attribute(query)  # (Q, N)
    t_magic = time.perf_counter() - t0 - t_fit
    cosine = gradient_cosine(mm.model, dm, query)  # (Q, N)
    mm.write_scores(out / "magic.zarr", magic)
    ids = np.arange(n)
    write_scores(
        out / "cosine.zarr",
        cosine,
        ids,
        method="gradient_cosine",
        convention="influence",
        overwrite=True,
    )

    def retrain(mask: Tensor) -> tuple[np.ndarray, str]:
        retrained = module(mask.double())
        trainer(args.epochs).fit(retrained, datamodule=dm)
        return retrained.query_loss(query).numpy(), retrained.data_order

    masks = sample_subsets(n, args.num_subsets, args.keep_fraction, args.seed)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "report", "num_subsets")}
    key = hashlib.sha256(repr(sorted(setup.items())).encode()).hexdigest()[:16]
    cache = out / f"retrains_{key}.safetensors"
    t1 = time.perf_counter()
    measured = retrain_losses(retrain, masks, cache, data_order=mm.data_order, key=key)  # (M, Q)
    t_retrain = time.perf_counter() - t1
    rows = [
        (name, conv, linear_datamodeling_score(predicted_losses(s, conv, masks, ids), measured))
        for name, conv, s in [
            ("magic", "metagradient", magic.numpy()),
            ("gradient_cosine", "influence", cosine.numpy()),
        ]
    ]
    steps = mm.trajectory.num_steps  # type: ignore[union-attr]
    smooth = mm.metasmoothness(h=0.1)  # two more forward trainings; warns below 0.9
    header = (
        f"{n} documents, {steps} {args.optimizer} steps (lr {args.lr}, eps_root "
        f"{args.eps_root}, eps {args.eps}, clip {args.max_grad_norm}), {args.num_queries} fact "
        f"queries, {args.num_subsets} retrains keeping {args.keep_fraction:.0%}; "
        f"metasmoothness (h = 0.1) {smooth:.3f}"
    )
    print(header)
    print(format_table(rows))
    print(f"fit {t_fit:.1f}s, MAGIC reverse {t_magic:.1f}s, retrains {t_retrain:.1f}s")
    _report(Path(args.report), header, rows, (t_fit, t_magic, t_retrain))


def _report(path: Path, header: str, rows, times) -> None:
    """Append (or create) the markdown report: the command, the setup and the table."""
    command = "python examples/lds.py " + " ".join(sys.argv[1:])
    text = (
        f"\n### `{command.strip()}`\n\n{header}.\n\n{format_table(rows, markdown=True)}\n\n"
        f"Wall time (2-core CPU): forward fit {times[0]:.1f} s, MAGIC reverse pass "
        f"{times[1]:.1f} s, retrains {times[2]:.1f} s.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
