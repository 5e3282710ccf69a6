"""MAGIC cost in units of a plain training run on the same data (Bergson quotes 3-5 runs).

Plain run: ``CausalLMModule`` (``torch.optim.AdamW``) ``fit``. MAGIC: ``MagicModule`` ``fit``
(the functional AdamW of ``magic/optim.py``, checkpoints kept on the ``sqrt`` schedule), then
the reverse pass for one aggregate query and for ``--queries`` per-query rows. Same model,
data order, seed. Every measurement runs in a fresh subprocess, alternating plain and MAGIC
``--repeats`` times; the median is reported.

Time: wall seconds and CPU seconds (user + system of the run's process, less sensitive to
other jobs on a shared machine), with ``--threads`` torch threads on both sides.

Peak memory: the resident-set high-water mark (``VmHWM``) reset with
``/proc/self/clear_refs`` right before the measured region, minus the resident size at
that point; i.e. the extra memory the run needed (falls back to ``ru_maxrss`` elsewhere).

Run: ``python benchmarks/magic_cost.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from lightning_bergson import CausalLMModule, MagicModule, TextDataModule
from lightning_bergson.magic import query_batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num_people", type=int, default=32, help="corpus size (~12 docs each)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--queries", type=int, default=8, help="per-query reverse pass size")
    p.add_argument("--schedule", default="sqrt", choices=["all", "sqrt", "log"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    p.add_argument("--child", choices=["plain", "magic"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Extra resident memory (MB) of a block: VmHWM after a reset, minus VmRSS before."""

    def __enter__(self) -> PeakMemory:
        self.exact = True
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.before = _status_kb("VmRSS")
        except OSError:
            self.exact, self.before = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        peak = (
            _status_kb("VmHWM")
            if self.exact
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        self.mb = (peak - self.before) / 1024


class Clock:
    """Wall and CPU (user + system, this process) seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def child(args: argparse.Namespace) -> dict[str, float]:
    """One measured run in this process; returns seconds and MB per phase."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dm = TextDataModule(
        num_people=args.num_people,
        max_length=args.seq_len,
        batch_size=args.batch_size,
        tokenizer_vocab_size=512,
    )
    dm.prepare_data()
    dm.setup("fit")
    config = {
        "model_type": "gpt_neox",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * args.hidden,
        "max_position_embeddings": args.seq_len,
    }
    common = {"config": config, "vocab_size": dm.vocab_size, "lr": 1e-3, "seed": 0}
    out: dict[str, float] = {}
    if args.child == "plain":
        module = CausalLMModule(**common)
        with PeakMemory() as mem, Clock() as clock:
            _trainer(args.epochs).fit(module, datamodule=dm)
        return {"fit_s": clock.wall, "fit_cpu": clock.cpu, "fit_mb": mem.mb}
    facts = dm.corpus.facts[: args.queries]  # type: ignore[union-attr]
    query = query_batch(dm.tokenizer, facts=facts)
    mm = MagicModule(
        **common, num_examples=len(dm.train_dataset), checkpoint_schedule=args.schedule
    )
    with PeakMemory() as mem:
        with Clock() as clock:
            _trainer(args.epochs).fit(mm, datamodule=dm)
        out["fit_s"], out["fit_cpu"] = clock.wall, clock.cpu
        with Clock() as clock:
            mm.attribute(query, per_query=False)
        out["reverse1_s"], out["reverse1_cpu"] = clock.wall, clock.cpu
    out["total1_mb"] = mem.mb
    with PeakMemory() as mem, Clock() as clock:
        mm.attribute(query, per_query=True)
    out["reverseq_s"], out["reverseq_cpu"], out["reverseq_mb"] = clock.wall, clock.cpu, mem.mb
    out["steps"] = mm.trajectory.num_steps  # type: ignore[union-attr]
    return out


def spawn(kind: str, argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, *argv, "--child", kind]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = sys.argv[1:]
    plain, magic = [], []
    for _ in range(args.repeats):  # alternate, so machine noise hits both sides alike
        plain.append(spawn("plain", argv))
        magic.append(spawn("magic", argv))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    base_mb = med(plain, "fit_mb")
    print(
        f"{int(magic[0]['steps'])} AdamW steps, GPT-NeoX hidden {args.hidden} x {args.layers} "
        f"layers, batch {args.batch_size} x {args.seq_len} tokens, checkpoints "
        f"'{args.schedule}', {args.threads} torch thread(s), median of {args.repeats} "
        "alternating runs"
    )
    columns = [("wall s", 8), ("x plain", 8), ("cpu s", 8), ("x plain", 8), ("peak MB", 9)]
    print(f"{'run':<36}" + "".join(f"{c:>{w}}" for c, w in columns) + f"{'x plain':>8}")
    rows = [
        ("plain fit (torch AdamW)", "fit", plain, "fit_mb"),
        ("MAGIC forward fit", "fit", magic, None),
        ("MAGIC reverse, 1 aggregate query", "reverse1", magic, None),
        ("MAGIC forward + reverse (1 query)", "total1", magic, "total1_mb"),
        (f"MAGIC reverse, {args.queries} per-query rows", "reverseq", magic, "reverseq_mb"),
    ]
    for name, key, runs, mem_key in rows:
        if key == "total1":
            secs = [r["fit_s"] + r["reverse1_s"] for r in runs]
            cpus = [r["fit_cpu"] + r["reverse1_cpu"] for r in runs]
            wall, cpu = statistics.median(secs), statistics.median(cpus)
        else:
            wall, cpu = med(runs, f"{key}_s"), med(runs, f"{key}_cpu")
        line = f"{name:<36}{wall:>8.2f}{wall / med(plain, 'fit_s'):>8.2f}"
        line += f"{cpu:>8.2f}{cpu / med(plain, 'fit_cpu'):>8.2f}"
        if mem_key is not None:
            mb = med(runs, mem_key)
            line += f"{mb:>9.1f}{mb / base_mb:>8.2f}"
        print(line)
    one, many = med(magic, "reverse1_s"), med(magic, "reverseq_s")
    print(
        f"per query: {many / args.queries:.2f} s of reverse pass with {args.queries} queries "
        f"in one pass ({many / args.queries / one:.2f}x one aggregate query's pass; the "
        "replays and the traced step are shared, only the double backward is per query)"
    )


if __name__ == "__main__":
    main()
