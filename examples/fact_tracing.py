"""Fact tracing on the embedded biography corpus: which documents taught the model a fact?

Every document of the corpus states one fact (person, relation, value), so the documents
that state a queried fact are known exactly. This study trains a small GPT-NeoX on the
corpus with gradient capture on, checks that it learned the facts, then ranks all training
documents for every fact query (``"<person> was born in"`` + ``" <city>"``; the loss is on
the answer tokens only, as in TrackStar) and reports recall@1/5/10 and MRR of the
documents that state the fact, for

* gradient cosine without preconditioner (rows captured during training, averaged over
  the epochs of each document);
* the same with the TrackStar preconditioner (``H^-1/2`` on both sides), fitted on the
  stored rows alone or mixed with the queries' own second moment (``query_mix``);
* a post-hoc index of the final model (``IndexModule``, one row per document, normalized
  with the final optimizer state: TrackStar's own setting), without and with preconditioner;
* two baselines that need no gradients: BM25 over the texts, and cosine of the final
  model's mean last hidden states.

Run (under 2 minutes on 2 CPU cores; pass ``--threads 1`` when other jobs share the cores,
whose OpenMP spin-waits otherwise slow torch down many times over)::

    python examples/fact_tracing.py

It prints one table and writes it, with this command, to ``examples/results/fact_tracing.md``.
recall@k = |top k ∩ relevant| / |relevant| (a fact has 2-4 documents, so recall@1 <= 1/2);
MRR = mean over facts of 1 / rank of the first relevant document.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch

from lightning_bergson import (
    Attributor,
    CausalLMModule,
    GradientCaptureCallback,
    HeadConfig,
    IndexModule,
    TextDataModule,
)
from lightning_bergson.analysis import bm25_scores, mean_hidden_states, recall_at_k, reciprocal_rank
from lightning_bergson.attribution import query_batch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--people", type=int, default=50, help="people in the corpus (4 facts each)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--hidden", type=int, default=128, help="GPT-NeoX hidden size")
    p.add_argument("--layers", type=int, default=2, help="GPT-NeoX layers")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    p.add_argument("--batch_size", type=int, default=32, help="documents per batch")
    p.add_argument("--projection_dim", type=int, default=32, help="capture projection p")
    p.add_argument("--damping", type=float, default=0.1, help="preconditioner damping c")
    p.add_argument("--query_mix", type=float, default=0.5, help="weight of the queries' H")
    p.add_argument("--workdir", default="runs/fact_tracing", help="stores and checkpoints")
    p.add_argument("--out", default=str(ROOT / "examples/results/fact_tracing.md"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- training and capture


def capture_callback(path: Path, args: argparse.Namespace, **kwargs) -> GradientCaptureCallback:
    heads = HeadConfig(num_heads=4, head_size=3 * args.hidden // 4)
    return GradientCaptureCallback(
        path,
        projection_dim=args.projection_dim,
        head_cfgs={"*.attention.query_key_value": heads},
        overwrite=True,
        **kwargs,
    )


def train(args: argparse.Namespace, data: TextDataModule) -> CausalLMModule:
    """Fit with capture: rows normalized by the AdamW state after their step (Adafactor form)."""
    config = {
        "model_type": "gpt_neox",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * args.hidden,
        "max_position_embeddings": 64,
    }
    module = CausalLMModule(config=config, vocab_size=data.vocab_size, lr=args.lr, warmup_steps=20)
    cb = capture_callback(Path(args.workdir) / "train.zarr", args, normalizer="adafactor")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return module


def post_hoc_index(args: argparse.Namespace, module: CausalLMModule, data: TextDataModule) -> Path:
    """One row per document from the final model, with the final optimizer normalizers."""
    path = Path(args.workdir) / "final.zarr"
    norms = Path(args.workdir) / "train.zarr" / "normalizers" / "normalizers.safetensors"
    cb = capture_callback(
        path, args, normalizer="adafactor", normalizer_source="file", normalizer_path=str(norms)
    )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(IndexModule(module.model), data)  # rows are keyed by example id
    return path


# ---------------------------------------------------------------- scores per method


def answer_accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Share of facts whose every answer token is the model's greedy prediction."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]  # (Q, S-1)
    return float(((pred == target) | (target == -100)).all(dim=1).float().mean())


def hidden_scores(model: torch.nn.Module, tok, queries: list[str], docs: list[str]) -> np.ndarray:
    """Cosine of mean last hidden states (over each text's tokens) ``[Q, N]``."""

    def embed(texts: list[str]) -> torch.Tensor:
        parts = [
            mean_hidden_states(model, query_batch(tok, texts[start : start + 64], max_length=64))
            for start in range(0, len(texts), 64)
        ]  # (B, H) each
        return torch.nn.functional.normalize(torch.cat(parts), dim=1)

    return (embed(queries) @ embed(docs).T).numpy()


def gradient_scores(store: Path, model, batch, *, preconditioner: bool, damping=0.1, mix=0.0):
    """Cosine of query and stored rows ``[Q, N_docs]``, each document's rows averaged."""
    attr = Attributor(
        store,
        unit_norm=True,
        preconditioner="fit" if preconditioner else None,
        damping=damping,
        query_mix=mix,
        example_reduce="mean",
    )
    scores, ids = attr.scores(attr.query_gradients(model, batch))
    assert ids.tolist() == list(range(len(ids))), "every document has rows"
    return scores.numpy()


# ---------------------------------------------------------------- evaluation


def retrieval_metrics(scores: np.ndarray, relevant: list[set[int]]) -> dict[str, float]:
    """Mean recall@1/5/10 and MRR of the relevant documents over queries."""
    out = {f"recall@{k}": recall_at_k(scores, relevant, k) for k in (1, 5, 10)}
    return {**out, "MRR": reciprocal_rank(scores, relevant)}


def table(rows: dict[str, dict[str, float]]) -> str:
    cols = ["recall@1", "recall@5", "recall@10", "MRR"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def summary(rows: dict[str, dict[str, float]]) -> str:
    """Which method wins, and by how much (MRR), from the table's own numbers."""
    mrr = {name: m["MRR"] for name, m in rows.items()}
    best = max(mrr, key=mrr.get)  # type: ignore[arg-type]
    grads = {k: v for k, v in mrr.items() if k.startswith("gradient")}
    best_grad = max(grads, key=grads.get)  # type: ignore[arg-type]
    plain = mrr["gradient cosine, captured rows, no preconditioner"]
    pre = mrr["gradient cosine, captured rows, preconditioner"]
    return (
        f"Best overall: {best} (MRR {mrr[best]:.3f}). Best gradient method: {best_grad} "
        f"(MRR {grads[best_grad]:.3f}, {grads[best_grad] - mrr[best]:+.3f} against the best). "
        f"The preconditioner adds {pre - plain:+.3f} MRR to captured-row cosine "
        f"({plain:.3f} -> {pre:.3f}); mean hidden states reach "
        f"{mrr['mean hidden state cosine']:.3f}."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    if args.threads:  # 1 avoids OpenMP spin-waits when the cores are shared with other jobs
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    data = TextDataModule(num_people=args.people, batch_size=args.batch_size, max_length=48)
    data.setup("fit")
    corpus, tok = data.corpus, data.tokenizer
    assert corpus is not None
    module = train(args, data)
    net = module.model
    net.save_pretrained(Path(args.workdir) / "model")  # safetensors, for `attribute --model`
    tok.save_pretrained(Path(args.workdir) / "model")
    final_store = post_hoc_index(args, module, data)
    net.eval()
    facts = corpus.facts
    batch = query_batch(tok, [f.query for f in facts], answers=[f.answer for f in facts])
    accuracy = answer_accuracy(net, batch)

    relevant = [set(f.doc_ids) for f in facts]
    texts = [f.query + f.answer for f in facts]
    train_store = Path(args.workdir) / "train.zarr"
    rows: dict[str, dict[str, float]] = {}
    mix = args.query_mix
    variants = [  # (label, store, preconditioner, query mix)
        ("captured rows, no preconditioner", train_store, False, 0.0),
        ("captured rows, preconditioner", train_store, True, 0.0),
        (f"captured rows, preconditioner mixed with queries (w={mix})", train_store, True, mix),
        ("post-hoc final model, no preconditioner", final_store, False, 0.0),
        (f"post-hoc final model, preconditioner (w={mix})", final_store, True, mix),
    ]
    for label, store, pre, w in variants:
        s = gradient_scores(store, net, batch, preconditioner=pre, damping=args.damping, mix=w)
        rows[f"gradient cosine, {label}"] = retrieval_metrics(s, relevant)
    rows["BM25 (query + answer text)"] = retrieval_metrics(bm25_scores(texts, data.texts), relevant)
    rows["mean hidden state cosine"] = retrieval_metrics(
        hidden_scores(net, tok, texts, data.texts), relevant
    )

    command = "python examples/fact_tracing.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    report = "\n".join(
        [
            "# Fact tracing on the embedded biography corpus",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"{len(facts)} facts, {len(data.texts)} documents ({args.people} people), "
            f"GPT-NeoX hidden {args.hidden} x {args.layers} layers, {args.epochs} epochs; "
            f"the model predicts the full answer of {accuracy:.1%} of the facts. Capture: "
            f"projection {args.projection_dim}, per-head q/k/v blocks, Adafactor-form "
            f"normalizer from AdamW; damping c = {args.damping}; each document's rows (one per "
            "epoch) averaged. Wall time "
            f"{time.time() - start:.0f} s.",
            "",
            table(rows),
            "",
            summary(rows),
            "",
        ]
    )
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
