"""Memorization study: which training documents make a model reproduce a sequence verbatim?

A corpus with known structure (``lightning_bergson.analysis.make_memorization_corpus``):
canaries (random 20-word sequences of one topic) inserted as exact duplicates 1, 2, 4, 8 or
16 times, two near-duplicates of each (2 and 5 words substituted), a synonym paraphrase of
each, related documents of each topic, telegram-style documents and biography facts. A small
GPT-NeoX trains on it with gradient capture on; after every epoch each canary is tested for
k-extractability (greedy decoding from its first k tokens reproduces the next m), which
gives the step from which it stays memorized. Then every memorized canary is attributed
(query: its k-token prefix, loss on its m continuation tokens) with

* captured rows, cosine or inner product, with or without the TrackStar preconditioner
  (``Attributor``, each document's rows averaged over epochs);
* EK-FAC influence of the final model (``EkfacModule``);
* BM25 over the texts and the mean-hidden-state cosine of the final model (baselines);

and recall@10 / recall@50 of each class of documents (exact duplicates, near-duplicates,
paraphrases, related) is reported per method, with early- and late-memorized canaries
compared. Run (about 3-5 minutes on 2 CPU cores; ``--threads 1`` when the cores are shared)::

    python examples/memorization.py

Writes ``examples/results/memorization.md`` (tables, this command, the findings) and
``memorization_curves.png`` / ``memorization_recall.png`` beside it.
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

from lightning_bergson import Attributor
from lightning_bergson.analysis import (
    class_recall_at_k,
    edit_distance,
    memorization_steps,
    ngram_jaccard,
    r_precision,
    token_overlap,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CLASSES = ("exact", "near_duplicate", "paraphrase", "related")
MAIN = "cosine, preconditioner"  # TrackStar
BASELINES = ("BM25", "mean hidden state cosine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    study.add_arguments(p)
    p.add_argument("--out", default=str(study.ROOT / "examples/results/memorization.md"))
    p.add_argument("--top_rows", type=int, default=20, help="rows read for the step analysis")
    return p.parse_args(argv)


# ---------------------------------------------------------------- memorization


def memorized(run: study.Run) -> tuple[list[int], np.ndarray]:
    """Canaries extractable at the end, and every canary's memorization step (-1: never)."""
    steps = memorization_steps(run.history >= run.cfg.m, run.steps)
    return [c for c in range(len(steps)) if steps[c] >= 0], steps


def memorization_table(run: study.Run, steps: np.ndarray) -> str:
    lines = [
        "| copies | canaries | memorized at the end | median step memorized |",
        "|---|---|---|---|",
    ]
    for level in run.cfg.copies:
        ids = [c.canary_id for c in run.corpus.canaries if c.copies == level]
        done = [int(steps[c]) for c in ids if steps[c] >= 0]
        median = f"{np.median(done):.0f}" if done else "-"
        lines.append(f"| {level} | {len(ids)} | {len(done)} | {median} |")
    return "\n".join(lines)


def similarity_table(run: study.Run) -> str:
    """Measured similarity of each class to its canary (word trigrams, tokens, edits)."""
    rows = {cls: [] for cls in CLASSES}
    for c in run.corpus.canaries:
        for cls, docs in run.corpus.class_docs(c.canary_id).items():
            for i in docs:
                t = run.corpus.texts[i]
                rows[cls].append(
                    (
                        ngram_jaccard(c.text, t, 3),
                        token_overlap(c.text, t),
                        edit_distance(c.text, t),
                    )
                )
    lines = [
        "| class | documents per canary | trigram Jaccard | token overlap | word edit distance |"
    ]
    lines.append("|---|---|---|---|---|")
    n = len(run.corpus.canaries)
    for cls, vals in rows.items():
        jac, over, edits = np.array(vals).mean(0)
        lines.append(f"| {cls} | {len(vals) / n:.1f} | {jac:.2f} | {over:.2f} | {edits:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- attribution


def class_docs(run: study.Run, canaries: list[int]) -> dict[str, list[set[int]]]:
    docs = [run.corpus.class_docs(c) for c in canaries]
    return {cls: [d[cls] for d in docs] for cls in CLASSES}


def recall_table(scores: dict[str, np.ndarray], classes, k: int) -> tuple[str, dict]:
    values = {name: class_recall_at_k(s, classes, k) for name, s in scores.items()}
    lines = ["| method | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for name, v in values.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[c]:.2f}" for c in CLASSES) + " |")
    return "\n".join(lines), values


def harmful_shares(scores: dict[str, np.ndarray], classes) -> dict[str, dict[str, float]]:
    """Share of each class's documents that a gradient method scores below zero (harmful:
    a step on them raises the query loss); BM25 and the embedding cosine have no sign."""
    out = {}
    for name, s in scores.items():
        if name in BASELINES:
            continue
        out[name] = {}
        for cls in CLASSES:
            vals = [s[q, i] < 0 for q, docs in enumerate(classes[cls]) for i in docs]
            out[name][cls] = float(np.mean(vals)) if vals else float("nan")
    return out


def harmful_table(harmful: dict[str, dict[str, float]]) -> str:
    lines = ["| method | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for name, v in harmful.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[c]:.2f}" for c in CLASSES) + " |")
    return "\n".join(lines)


def rows_before(run: study.Run, batch, canaries: list[int], steps: np.ndarray, k: int):
    """Per canary, over its top-k rows under TrackStar (rows not reduced): the share that are
    rows of its exact copies, the share captured before it was memorized, and that share
    among all rows of its copies (what the top rows would show without any preference)."""
    attr = Attributor(run.store, unit_norm=True, preconditioner="fit", damping=run.cfg.damping,
                      check_model="shapes")  # fmt: skip
    res = attr.search(attr.query_gradients(run.model, batch), k=k)
    row_steps, row_ids = attr.store.steps, attr.store.example_ids
    out = np.zeros((len(canaries), 3))  # exact share, before share, before share of all rows
    for q, c in enumerate(canaries):
        exact = list(run.corpus.class_docs(c)["exact"])
        out[q, 0] = np.isin(res.indices[q].numpy(), exact).mean()
        out[q, 1] = (row_steps[res.rows[q].numpy()] < steps[c]).mean()
        out[q, 2] = (row_steps[np.isin(row_ids, exact)] < steps[c]).mean()
    return out


def early_late(run, scores, canaries, steps, rows: np.ndarray, classes) -> dict[str, dict]:
    """Per group (memorized at or before / after the median step): the values of the table."""
    mem_steps = steps[canaries]
    cut = float(np.median(mem_steps))
    out = {}
    for name, mask in (("early", mem_steps <= cut), ("late", mem_steps > cut)):
        idx = [q for q in range(len(canaries)) if mask[q]]
        if not idx:
            continue
        sub = {cls: [classes[cls][q] for q in idx] for cls in CLASSES}
        v = {"canaries": len(idx), "cut": cut}
        v["mean copies"] = np.mean([run.corpus.canaries[canaries[q]].copies for q in idx])
        for method in (MAIN, "EK-FAC"):
            if method in scores:
                v[f"exact R-precision, {method}"] = r_precision(scores[method][idx], sub["exact"])
        v["near-dup recall@50"] = class_recall_at_k(scores[MAIN][idx], sub, 50)["near_duplicate"]
        v["top rows: exact copies"], v["top rows: before"], v["all rows: before"] = rows[idx].mean(
            0
        )
        out[name] = v
    return out


def early_late_table(groups: dict[str, dict]) -> str:
    if not groups:
        return "(no memorized canary)"
    cut = next(iter(groups.values()))["cut"]
    cols = [c for c in next(iter(groups.values())) if c != "cut"]
    lines = [f"| group (memorized at step <= / > {cut:.0f}) | " + " | ".join(cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, v in groups.items():
        cells = [f"{v[c]}" if c == "canaries" else f"{v[c]:.2f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots and report


def plot_curves(run: study.Run, path: Path) -> None:
    """Share of canaries k-extractable after each epoch, one line per duplicate count."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ok = run.history >= run.cfg.m  # (T, C)
    for level in run.cfg.copies:
        ids = [c.canary_id for c in run.corpus.canaries if c.copies == level]
        ax.plot(run.steps, ok[:, ids].mean(1), marker="o", ms=3, label=f"{level} copies")
    ax.set(xlabel="optimizer step", ylabel=f"({run.cfg.k}, {run.cfg.m})-extractable share")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(values: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    """Recall@k per class (bars) per method, one panel per k."""
    fig, axes = plt.subplots(1, len(values), figsize=(6 * len(values), 3.8), sharey=True)
    for ax, (k, per_method) in zip(np.atleast_1d(axes), values.items(), strict=True):
        names = list(per_method)
        x = np.arange(len(names))
        for j, cls in enumerate(CLASSES):
            ax.bar(x + (j - 1.5) * 0.2, [per_method[n][cls] for n in names], 0.2, label=cls)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"recall@{k} of each class, memorized canaries", fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def findings(run, steps, recall, canaries, harmful, groups) -> str:
    """A few sentences read off the tables (so they stay true when the numbers change)."""
    done = {lvl: sum(1 for c in run.corpus.canaries if c.copies == lvl and steps[c.canary_id] >= 0)
            for lvl in run.cfg.copies}  # fmt: skip
    per = run.cfg.canaries_per_level
    r10, r50 = recall[10], recall[50]
    grads = [m for m in r50 if m not in BASELINES]
    text = [
        "Memorized at the end, by duplicate count: "
        + ", ".join(f"{lvl} copies {n}/{per}" for lvl, n in done.items())
        + f" ({len(canaries)} canaries attributed).",
        f"Exact copies: recall@50 {min(r50[m]['exact'] for m in r50):.2f}-"
        f"{max(r50[m]['exact'] for m in r50):.2f} across all methods.",
        f"Near-duplicates: recall@50 {min(r50[m]['near_duplicate'] for m in grads):.2f}-"
        f"{max(r50[m]['near_duplicate'] for m in grads):.2f} for the gradient methods against "
        f"{r50['BM25']['near_duplicate']:.2f} for BM25; {MAIN} scores "
        f"{harmful[MAIN]['near_duplicate']:.0%} of them harmful (paraphrases "
        f"{harmful[MAIN]['paraphrase']:.0%}, related {harmful[MAIN]['related']:.0%}).",
        "Paraphrases and related documents: recall@10 at most "
        f"{max(max(r10[m]['paraphrase'], r10[m]['related']) for m in r10):.2f} for any method.",
    ]
    if len(groups) == 2:
        e, late = groups["early"], groups["late"]
        key = f"exact R-precision, {MAIN}"
        text.append(
            f"Early-memorized canaries ({e['canaries']}, {e['mean copies']:.1f} copies on average) "
            f"against late ones ({late['canaries']}, {late['mean copies']:.1f}): exact R-precision "
            f"{e[key]:.2f} vs {late[key]:.2f}; their top rows were captured before the "
            f"memorization step {e['top rows: before']:.0%} vs {late['top rows: before']:.0%} of "
            f"the time, against {e['all rows: before']:.0%} vs {late['all rows: before']:.0%} of "
            "all rows of their copies."
        )
    return " ".join(text)


def analyse(run: study.Run, top_rows: int) -> dict:
    """Attribute the memorized canaries (every canary if none is) with every method."""
    canaries, steps = memorized(run)
    note = ""
    if not canaries:  # e.g. a smoke run: attribute every canary instead
        canaries = list(range(len(run.corpus.canaries)))
        note = "No canary was memorized, so every canary is attributed.\n\n"
    batch = study.canary_query(run, canaries)
    scores = study.method_scores(run, batch, [run.corpus.canaries[c].text for c in canaries])
    classes = class_docs(run, canaries)
    tables, recall = {}, {}
    for k in (10, 50):
        tables[k], recall[k] = recall_table(scores, classes, k)
    k_rows = min(top_rows, len(run.corpus))
    rows = rows_before(run, batch, canaries, steps, k_rows)
    groups = early_late(run, scores, canaries, steps, rows, classes)
    return {"canaries": canaries, "steps": steps, "note": note, "tables": tables,
            "recall": recall, "k_rows": k_rows, "groups": groups,
            "harmful": harmful_shares(scores, classes)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = study.prepare(study.config_from_args(args))
    start = time.time()
    r = analyse(run, args.top_rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(run, out.with_name("memorization_curves.png"))
    plot_recall(r["recall"], out.with_name("memorization_recall.png"))
    argv = argv if argv is not None else sys.argv[1:]
    r["command"] = ("python examples/memorization.py " + shlex.join(argv)).strip()
    r["seconds"] = time.time() - start
    text = report(run, r)
    print(text)
    out.write_text(text)


def report(run: study.Run, r: dict) -> str:
    """The results file: setup, memorization, recall by class, early vs late, findings."""
    cfg, steps = run.cfg, r["steps"]
    return f"""# Memorization study: duplicates, near-duplicates, paraphrases, related documents

Command: `{r["command"]}`

{len(run.corpus)} documents: {len(run.corpus.canaries)} canaries ({cfg.canaries_per_level} per
duplicate count {", ".join(map(str, cfg.copies))}), their near-duplicates, paraphrases, related
documents, {len(run.corpus.docs_of_kind("style"))} telegram-style documents and
{len(run.corpus.docs_of_kind("biography"))} biography documents. GPT-NeoX hidden {cfg.hidden} x
{cfg.layers} layers, AdamW lr {cfg.lr}, {cfg.epochs} epochs ({run.steps[-1]} steps), capture with
projection {cfg.projection_dim}, per-head q/k/v blocks and the Adafactor-form normalizer from
AdamW's state after each row's step. Memorized = ({cfg.k}, {cfg.m})-extractable: greedy decoding
from the first {cfg.k} tokens reproduces the next {cfg.m}, at every evaluation from that step
to the end (evaluated after every epoch). Training {run.train_seconds:.0f} s (a fresh run; reused
from --workdir when the settings match),
attribution and analysis {r["seconds"]:.0f} s (2-core CPU, shared).

![memorization curves](memorization_curves.png)

{memorization_table(run, steps)}

Similarity of each class to its canary (mean over documents; words):

{similarity_table(run)}

## Recall by class

{r["note"]}Queries: each memorized canary's first {cfg.k + cfg.m} tokens, loss on the last {cfg.m}.
recall@k = share of the class's documents among the top k of all {len(run.corpus)} documents
(exact: the canary's copies, so recall@10 of a 16-copy canary is at most 10/16).

recall@10:

{r["tables"][10]}

recall@50:

{r["tables"][50]}

![recall by class](memorization_recall.png)

Share of each class scored harmful (score < 0: a training step on the document raises the
query's loss), attribution methods only:

{harmful_table(r["harmful"])}

## Early- vs late-memorized canaries

Memorized canaries split at the median memorization step. "Top rows": the query's
{r["k_rows"]} highest-scoring captured rows under TrackStar (rows, not documents: a document has
one row per epoch); the share that are rows of the canary's exact copies, and the share
captured at an optimizer step before the canary became extractable, beside that share among
all rows of its copies (the value without any preference for early or late rows).

{early_late_table(r["groups"])}

## Findings

{findings(run, steps, r["recall"], r["canaries"], r["harmful"], r["groups"])}
"""


if __name__ == "__main__":
    main()
