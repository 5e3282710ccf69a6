"""MAGIC fits and attributions, run as a script so Lightning can launch DDP ranks.
Used by tests/magic/test_data_parallel.py.

    python tests/scripts/magic_run.py --out DIR --devices 2 --batch-size 2 \
        --schedules all,sqrt,log [--accumulate 2]

Each schedule is one fit of a fresh MagicModule (AdamW, clipping, float64) on 8 examples
for 2 epochs, then ``attribute`` on every rank; rank 0 writes ``<schedule>.safetensors``
(the scores and the final parameters).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magic_oracles import tiny_model, tiny_query, tiny_rows

from lightning_bergson import MagicModule

NUM = 8
OPTIONS = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.1}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--batch-size", type=int, default=2, help="per rank")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--schedules", default="sqrt")
    p.add_argument("--granularity", default="example")
    return p.parse_args(argv)


def fit_and_score(args: argparse.Namespace, schedule: str) -> dict[str, torch.Tensor]:
    mm = MagicModule(
        tiny_model(),
        num_examples=NUM,
        checkpoint_schedule=schedule,  # type: ignore[arg-type]
        weight_granularity=args.granularity,
        **OPTIONS,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy if args.devices > 1 else "auto",
        precision="64-true",
        max_epochs=2,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rows = tiny_rows(NUM)
    if args.devices > 1:  # Lightning swaps in DistributedSampler(shuffle=True, seed=0)
        loader = DataLoader(rows, batch_size=args.batch_size)
    else:  # the same epoch permutation, so the global batches match a multi-process run
        sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(rows, batch_size=args.batch_size, sampler=sampler)
    trainer.fit(mm, loader)
    scores = mm.attribute(tiny_query())  # every rank takes part
    assert mm.trajectory is not None and mm.trajectory.final is not None
    out = {"scores": scores.contiguous()}
    out.update({f"param.{k}": v.contiguous() for k, v in mm.trajectory.final.params.items()})
    out["world_size"] = torch.tensor(trainer.world_size)
    out["global_step"] = torch.tensor(trainer.global_step)
    if trainer.is_global_zero:
        save_file(out, str(Path(args.out) / f"{schedule}.safetensors"))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for schedule in args.schedules.split(","):
        fit_and_score(args, schedule)


if __name__ == "__main__":
    main()
