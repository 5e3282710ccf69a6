"""Behaviours side by side: facts, memorized sequences and a style, on one model.

The model and store of ``examples/memorization.py`` (the same run, reused from ``--workdir``
or trained here with the same options) are asked about three behaviours:

* **facts**: ``"<name> was born in"`` -> ``" Lyon"`` (loss on the answer), sourced by the
  2-4 biography documents that state the fact;
* **memorized sequences**: a memorized canary's k-token prefix -> its next m tokens,
  sourced by the canary's exact copies;
* **style**: held-out telegrams (``"ARRIVED LYON STOP ..."``), loss on the ``STOP`` tokens
  only, sourced by the 48 telegram-style documents.

For every method it reports how concentrated each behaviour's attribution is (share of the
helpful mass in the top 10 documents; normalized entropy of that mass), how often the top 10
are near-duplicates of the query (word-trigram Jaccard >= 0.5), and the MRR of the source
documents, in one table and one figure. Run (after ``memorization.py``, about a minute)::

    python examples/behaviours.py

Writes ``examples/results/behaviours.md`` and ``behaviours.png`` beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import study
from memorization import memorized

from lightning_bergson.analysis import (
    near_duplicate_share,
    ngram_jaccard_matrix,
    normalized_entropy,
    reciprocal_rank,
    top_k_share,
)
from lightning_bergson.attribution import query_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLUMNS = ("top-10 share", "entropy", "near-dup share@10", "source MRR")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    study.add_arguments(p)
    p.add_argument("--facts", type=int, default=32, help="fact queries (the first F facts)")
    p.add_argument("--out", default=str(study.ROOT / "examples/results/behaviours.md"))
    return p.parse_args(argv)


def behaviours(run: study.Run, num_facts: int) -> dict[str, tuple[dict, list[str], list[set[int]]]]:
    """Behaviour -> (query batch, query texts, source documents of each query)."""
    tok = run.data.tokenizer
    facts = run.corpus.facts[:num_facts]
    fact_batch = query_batch(tok, [f.query for f in facts], answers=[f.answer for f in facts])
    canaries = memorized(run)[0] or list(range(len(run.corpus.canaries)))
    style = [tok(t, add_special_tokens=False)["input_ids"] for t in run.corpus.style_queries]
    stop = [[tok.decode([t]).strip() == "STOP" for t in ids] for ids in style]
    style_docs = run.corpus.docs_of_kind("style")
    return {
        "facts": (
            fact_batch,
            [f.query + f.answer for f in facts],
            [set(f.doc_ids) for f in facts],
        ),
        "memorized sequences": (
            study.canary_query(run, canaries),
            [run.corpus.canaries[c].text for c in canaries],
            [run.corpus.class_docs(c)["exact"] for c in canaries],
        ),
        "style": (
            study.token_query(style, stop),
            run.corpus.style_queries,
            [style_docs] * len(style),
        ),
    }


def measures(scores: np.ndarray, texts: list[str], docs: list[str], sources) -> dict[str, float]:
    """The table's columns for one behaviour and method (means over queries)."""
    jaccard = ngram_jaccard_matrix(texts, docs, n=3)  # (Q, N)
    return {
        "top-10 share": float(top_k_share(scores, k=10).mean()),
        "entropy": float(normalized_entropy(scores).mean()),
        "near-dup share@10": float(near_duplicate_share(scores, jaccard, 10, 0.5).mean()),
        "source MRR": reciprocal_rank(scores, sources),
    }


def table(results: dict[tuple[str, str], dict[str, float]], counts: dict[str, int]) -> str:
    lines = ["| behaviour | queries | method | " + " | ".join(COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 3) + "|")
    for (behaviour, method), v in results.items():
        cells = " | ".join(f"{v[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {behaviour} | {counts[behaviour]} | {method} | {cells} |")
    return "\n".join(lines)


def plot(results: dict[tuple[str, str], dict[str, float]], path: Path) -> None:
    """One panel per measure: methods on the x axis, one bar per behaviour."""
    names = list(dict.fromkeys(b for b, _ in results))
    methods = list(dict.fromkeys(m for _, m in results))
    panels = ("top-10 share", "near-dup share@10", "source MRR")
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    x, width = np.arange(len(methods)), 0.8 / len(names)
    for ax, col in zip(axes, panels, strict=True):
        for j, b in enumerate(names):
            vals = [results[(b, m)][col] for m in methods]
            ax.bar(x + (j - (len(names) - 1) / 2) * width, vals, width, label=b)
        ax.set_xticks(x, methods, rotation=35, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def findings(results: dict[tuple[str, str], dict[str, float]]) -> str:
    """Sentences read off the table for the TrackStar method and BM25."""
    names = list(dict.fromkeys(b for b, _ in results))
    out = []
    for method in ("cosine, preconditioner", "BM25"):
        share = {b: results[(b, method)]["top-10 share"] for b in names}
        near = {b: results[(b, method)]["near-dup share@10"] for b in names}
        mrr = {b: results[(b, method)]["source MRR"] for b in names}
        most = max(share, key=share.get)  # type: ignore[arg-type]
        least = min(share, key=share.get)  # type: ignore[arg-type]
        out.append(
            f"{method}: most concentrated {most} (top-10 share {share[most]:.3f}), least {least} "
            f"({share[least]:.3f}); near-duplicates of the query among the top 10: "
            + ", ".join(f"{b} {v:.2f}" for b, v in near.items())
            + "; source MRR: "
            + ", ".join(f"{b} {v:.2f}" for b, v in mrr.items())
            + "."
        )
    return " ".join(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    run = study.prepare(study.config_from_args(args))
    results, counts = {}, {}
    for name, (batch, texts, sources) in behaviours(run, args.facts).items():
        counts[name] = len(texts)
        for method, scores in study.method_scores(run, batch, texts).items():
            results[(name, method)] = measures(scores, texts, run.corpus.texts, sources)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_name("behaviours.png"))
    argv_ = argv if argv is not None else sys.argv[1:]
    report = f"""# Behaviours side by side: facts, memorized sequences, a style

Command: `{("python examples/behaviours.py " + shlex.join(argv_)).strip()}`

One model and store (the run of `examples/memorization.py` with the same options, {len(run.corpus)}
documents). Per behaviour and method, means over queries: **top-10 share** = share of the
helpful (positive) score mass held by the 10 highest-scoring documents; **entropy** = entropy
of that mass / log N (1 = spread evenly over all documents); **near-dup share@10** = share of
the top 10 whose word-trigram Jaccard with the query text is >= 0.5; **source MRR** = 1 / rank
of the first source document (facts: the documents stating the fact; memorized sequences:
the canary's exact copies; style: any telegram-style document). Wall time
{time.time() - start:.0f} s.

{table(results, counts)}

![behaviours](behaviours.png)

## Findings

{findings(results)}
"""
    print(report)
    out.write_text(report)


if __name__ == "__main__":
    main()
