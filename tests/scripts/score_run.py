"""Score a generated store with ``score_with_lightning`` on 1 or more processes, as a script
so Lightning's launcher can start the ranks. Used by tests/remote/test_score_loop.py.

    python tests/scripts/score_run.py --store DIR_OR_URL --out OUT --devices 2
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as L
import torch

from lightning_bergson import Attributor
from lightning_bergson.attribution.score_loop import score_with_lightning


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", required=True, help="JSON file the top-k is written to (rank 0)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--unit-norm", action="store_true")
    p.add_argument("--chunk-cols", type=int, default=6)
    args = p.parse_args()
    attr = Attributor(args.store, preconditioner=None, unit_norm=args.unit_norm, chunk_rows=4)
    queries = torch.randn(3, attr.store.dim, generator=torch.Generator().manual_seed(5))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )  # fmt: skip
    got = score_with_lightning(
        attr, queries, args.out, k=5, chunk_cols=args.chunk_cols, trainer=trainer
    )
    if trainer.global_rank == 0:
        top = got.top
        result = {"world": trainer.world_size, "scores": top.scores.tolist()}
        result.update(rows=top.rows.tolist(), ids=top.indices.tolist())
        with open(args.top, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
