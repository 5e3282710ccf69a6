"""Capture overhead: ``fit`` with GradientCaptureCallback vs the same ``fit`` without it.

Same model, data, seed and process; runs alternate (plain, capture, plain, ...) so
machine noise hits both sides alike, in ABBA order (the side that runs first in a pair
alternates). The ratio printed is the median over ``--repeats`` pairs of each pair's
capture / plain time (a pair runs back to back, so slow drifts of a shared machine
cancel); the ratio of the median times is printed beside it.

Run: ``python benchmarks/capture_overhead.py`` (``--help`` for sizes). Prints the
wall-time ratio (target <= 1.05), rows/s and MB/s written, and the floor: the time of the
projection matmuls alone (no hooks) as a ratio to a plain step. ``--short`` is a short fit
(32 steps of a small model, the callback's defaults: projection 16, no normalizer) where
the fixed costs per fit (store creation, writer thread, close) weigh most.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore, HeadConfig
from lightning_bergson.data import collate_batch


def make_loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    ids = torch.randint(1, args.vocab, (n, args.seq_len), generator=gen)
    rows = [{"input_ids": ids[i].tolist(), "example_id": i} for i in range(n)]
    return torch.utils.data.DataLoader(
        rows, batch_size=args.batch_size, collate_fn=lambda b: collate_batch(b, pad_token_id=0)
    )


def make_module(args: argparse.Namespace) -> CausalLMModule:
    config = {
        "model_type": "gpt_neox",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.hidden,
        "max_position_embeddings": args.seq_len,
    }
    return CausalLMModule(config=config, lr=1e-3, seed=0)


class StepClock(L.Callback):
    """Seconds per step in the steady state: from the start of step ``first`` to the end of
    the last step (device synchronized at both ends), so the fixed costs of a fit (store
    creation, the writer's close, teardown) are left out."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.start, self.per_step = first, last, 0.0, float("nan")

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last:
            self.per_step = (self._now() - self.start) / (self.last + 1 - self.first)


def run(args: argparse.Namespace, capture_dir: Path | None) -> tuple[float, float, float]:
    """``(wall s, CPU s of this process, steady-state s per step)`` of one ``fit``."""
    callbacks = []
    if capture_dir is not None:
        head = 3 * args.hidden // args.heads
        if args.short:
            callbacks.append(GradientCaptureCallback(capture_dir / "grads.zarr", overwrite=True))
        else:
            callbacks.append(
                GradientCaptureCallback(
                    capture_dir / "grads.zarr",
                    projection_dim=args.projection_dim,
                    normalizer="adafactor",
                    head_cfgs={"*.query_key_value": HeadConfig(args.heads, head)}
                    if args.heads_split
                    else None,
                    overwrite=True,
                )
            )
    clock = StepClock(args.steps // 4, args.steps - 1)  # last: after the capture callback's
    callbacks.append(clock)
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module, loader = make_module(args), make_loader(args)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    return time.perf_counter() - start, time.process_time() - cpu, clock.per_step


def projection_floor(args: argparse.Namespace, parents: list[str], repeats: int = 9) -> float:
    """Seconds per step of the projection matmuls alone, no hooks: for each captured module,
    ``x @ R^T``, ``g @ L^T`` and the per-example ``(g L^T)^T (x R^T)`` on random tensors of
    the step's shapes, as the collector computes them (median of ``repeats`` steps).

    The projected row of a module is ``L G_i R^T`` with ``G_i = sum_t g_t x_t^T``; this
    factorized form is the cheapest exact one (``2 p (in + out)`` multiply-adds per token
    and module), so this time is a floor of any exact capture on this hardware.
    """
    net = make_module(args).model
    assert net is not None
    linears = dict(net.named_modules())
    b, s, p = args.batch_size, args.seq_len, args.projection_dim if not args.short else 16
    shapes = [(linears[n].in_features, linears[n].out_features) for n in parents]
    gen = torch.Generator().manual_seed(0)
    tensors = [
        (
            torch.randn(b, s, i, generator=gen),
            torch.randn(b, s, o, generator=gen),
            torch.randn(p, i, generator=gen),
            torch.randn(p, o, generator=gen),
        )
        for i, o in shapes
    ]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, g, right, left in tensors:
            torch.bmm((g @ left.T).transpose(1, 2), x @ right.T)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--projection-dim", type=int, default=16)
    parser.add_argument("--heads-split", action="store_true", help="split q/k/v per head")
    parser.add_argument("--repeats", type=int, default=None, help="pairs (default 5, --short 15)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's, one per core); 1 makes a shared machine's "
        "noise much smaller (no OpenMP threads competing with the writer thread)",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="32 steps of hidden 128, 2 layers, sequence 64, batch 8, callback defaults",
    )
    parser.add_argument("--accelerator", default="cpu", help="cpu (default) or gpu")
    parser.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed")
    args = parser.parse_args()
    if args.short:
        args.hidden, args.layers, args.seq_len, args.batch_size, args.steps = 128, 2, 64, 8, 32
    args.repeats = args.repeats or (15 if args.short else 5)
    torch.set_num_threads(args.threads or torch.get_num_threads())

    tmp = Path(tempfile.mkdtemp())
    try:
        run(args, None)  # warm-up: imports, allocator, kernels (both sides)
        run(args, tmp)
        plain, capture, cpu_plain, cpu_cap, step_plain, step_cap = [], [], [], [], [], []
        sides = [(plain, cpu_plain, step_plain, None), (capture, cpu_cap, step_cap, tmp)]
        for i in range(args.repeats):
            # ABBA order: whichever side runs second in a pair (after the other's teardown)
            # alternates, so an order effect cancels instead of biasing the ratio.
            for times, cpus, steps, where in sides if i % 2 == 0 else sides[::-1]:
                gc.collect()
                wall, cpu, per_step = run(args, where)
                times.append(wall)
                cpus.append(cpu)
                steps.append(per_step)
        store = GradientStore.open(tmp / "grads.zarr")
        t_plain, t_cap = statistics.median(plain), statistics.median(capture)
        c_plain, c_cap = statistics.median(cpu_plain), statistics.median(cpu_cap)
        mb = len(store) * store.dim * store.dtype.itemsize / 2**20
        print(
            f"model: GPT-NeoX hidden={args.hidden} layers={args.layers} seq={args.seq_len} "
            f"batch={args.batch_size} steps={args.steps} {args.accelerator} {args.precision}; "
            + (
                "callback defaults (projection 16, no normalizer)"
                if args.short
                else f"projection {args.projection_dim}, Adafactor normalizer from the optimizer"
            )
        )
        print(f"plain fit       median {t_plain:.2f} s  ({', '.join(f'{t:.2f}' for t in plain)})")
        print(f"fit + capture   median {t_cap:.2f} s  ({', '.join(f'{t:.2f}' for t in capture)})")
        pairs = statistics.median(c / p for c, p in zip(capture, plain, strict=True))
        cpu_pairs = statistics.median(c / p for c, p in zip(cpu_cap, cpu_plain, strict=True))
        print(f"overhead ratio  {pairs:.3f}  (median of per-pair ratios; target <= 1.05)")
        print(f"median ratio    {t_cap / t_plain:.3f}  (ratio of the median times)")
        print(
            f"CPU time ratio  {cpu_pairs:.3f}  (process CPU seconds, per pair; medians "
            f"{c_plain:.2f} / {c_cap:.2f})"
        )
        steady = statistics.median(c / p for c, p in zip(step_cap, step_plain, strict=True))
        print(
            f"per-step ratio  {steady:.3f}  (steady state, steps {args.steps // 4}-"
            f"{args.steps - 1}, per pair; medians {statistics.median(step_plain) * 1e3:.1f} / "
            f"{statistics.median(step_cap) * 1e3:.1f} ms per step)"
        )
        parents = list(dict.fromkeys(m.parent for m in store.modules))
        floor = projection_floor(args, parents)
        step = statistics.median(step_plain)
        print(
            f"projection floor {floor * 1e3:.1f} ms per step = {1 + floor / step:.3f} of a plain "
            f"step (the {len(parents)} modules' projection matmuls alone, no hooks)"
        )
        print(
            f"written         {len(store)} rows x {store.dim} ({store.dtype}), "
            f"{len(store) / t_cap:.0f} rows/s, {mb / t_cap:.2f} MB/s"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
