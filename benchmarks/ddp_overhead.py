"""Capture overhead under 2-process DDP on CPU, beside the single-process overhead.

Four runs on the same model, data and global batch: {1 process, 2 DDP processes (gloo)}
x {plain fit, fit + GradientCaptureCallback (projection 16, Adafactor normalizer from the
optimizer)}. Each run is its own subprocess (DDP needs a launcher); the fit wall time is
measured inside it on rank 0. Pairs alternate (plain, capture) and the median over
``--repeats`` is used.

Run: ``python benchmarks/ddp_overhead.py`` (``--help`` for sizes). Prints both ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """One fit; rank 0 prints {"seconds": ...} as the last line."""
    import lightning.pytorch as L
    import torch

    from lightning_bergson import CausalLMModule, GradientCaptureCallback
    from lightning_bergson.data import collate_batch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.devices))
    n = args.batch_size * args.steps
    ids = torch.randint(
        1, args.vocab, (n, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    rows = [{"input_ids": ids[i].tolist(), "example_id": i} for i in range(n)]
    per_rank = args.batch_size // args.devices
    loader = torch.utils.data.DataLoader(
        rows, batch_size=per_rank, collate_fn=lambda b: collate_batch(b, pad_token_id=0)
    )
    config = {
        "model_type": "gpt_neox",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * args.hidden,
        "max_position_embeddings": args.seq_len,
    }
    callbacks = []
    if args.capture:
        callbacks.append(
            GradientCaptureCallback(
                Path(args.out) / "grads.zarr",
                projection_dim=16,
                normalizer="adafactor",
                overwrite=True,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = CausalLMModule(config=config, lr=1e-3, seed=0)
    start = time.perf_counter()
    trainer.fit(module, loader)
    if trainer.is_global_zero:
        print(json.dumps({"seconds": time.perf_counter() - start}))
    if torch.distributed.is_initialized():
        # leave gloo's threads stopped, not destroyed at interpreter exit ("terminate called
        # without an active exception" and exit 1 in a run that did finish)
        torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, devices: int, capture: bool, out: Path) -> float:
    cmd = [sys.executable, __file__, "--worker", "--devices", str(devices), "--out", str(out)]
    cmd += ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
    cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    cmd += ["--steps", str(args.steps)] + (["--capture"] if capture else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(tempfile.mkdtemp())
    results: dict[int, tuple[list[float], list[float]]] = {1: ([], []), 2: ([], [])}
    for _ in range(args.repeats):
        for devices in (1, 2):
            results[devices][0].append(launch(args, devices, False, out))
            results[devices][1].append(launch(args, devices, True, out))
    print(
        f"GPT-NeoX hidden={args.hidden} layers={args.layers} seq={args.seq_len} global batch="
        f"{args.batch_size} steps={args.steps}; capture: projection 16, Adafactor from optimizer"
    )
    for devices, (plain, capture) in results.items():
        p, c = statistics.median(plain), statistics.median(capture)
        label = "1 process    " if devices == 1 else "2 DDP (gloo) "
        print(f"{label} plain {p:6.2f} s  capture {c:6.2f} s  overhead ratio {c / p:.3f}")


if __name__ == "__main__":
    main()
