"""One capture fit, run as a script so Lightning can launch DDP/FSDP2 ranks and so a test
can SIGKILL it. Used by tests/capture/test_distributed.py and tests/capture/test_resume.py.

    python tests/scripts/capture_run.py --out DIR [--devices 2 --strategy bergson_ddp] ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracles import Rows, lm_batch, tiny_gpt_neox

from lightning_bergson import CausalLMModule, GradientCaptureCallback


class Killer(Callback):
    """SIGKILL this process at a given global batch, after its backward or at its end."""

    def __init__(self, batch: int, when: str, drain: GradientCaptureCallback | None = None) -> None:
        self.batch, self.when, self.seen, self.drain = batch, when, -1, drain

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1

    def on_after_backward(self, trainer, pl_module):
        if self.when == "backward" and self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "end" and self.seen == self.batch:
            writer = self.drain.writer if self.drain is not None else None
            if writer is not None and writer._thread is not None:
                # the chunks already handed to the background writer reach the disk first,
                # so a test can rely on which rows are committed at the kill
                writer._queue.join()
            os.kill(os.getpid(), signal.SIGKILL)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--normalizer", default="adafactor")
    p.add_argument("--projection-dim", type=int, default=4)
    p.add_argument("--no-ids", action="store_true", help="dataset without example_id column")
    p.add_argument("--ragged", action="store_true", help="uneven lengths and masked prompts")
    p.add_argument("--include", nargs="*", default=None, help="captured module globs")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-batch", type=int, default=-1)
    p.add_argument("--kill-when", default="end")
    p.add_argument(
        "--kill-drain", action="store_true", help="let queued chunk writes finish before the kill"
    )
    p.add_argument("--kill-write", type=int, default=-1, help="SIGKILL inside the Nth chunk write")
    p.add_argument("--kill-close", action="store_true", help="SIGKILL inside the store's close")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--store", default=None, help="store path or URL (default OUT/grads.zarr)")
    p.add_argument("--num-nodes", type=int, default=1)
    return p.parse_args(argv)


def arm_store_faults(args: argparse.Namespace) -> None:
    """SIGKILL in the middle of a chunk write (gradients written, columns and the committed
    row count not) or in the middle of ``close`` (rows flushed, not yet marked complete)."""
    import lightning_bergson.store.writer as writer_mod

    if args.kill_write >= 0:
        real, calls = writer_mod._write_block, []

        def torn(arrays, start, rows):
            calls.append(start)
            if len(calls) - 1 == args.kill_write:
                real({"gradients": arrays["gradients"]}, start, rows)
                os.kill(os.getpid(), signal.SIGKILL)
            real(arrays, start, rows)

        writer_mod._write_block = torn
    if args.kill_close:
        real_resize = writer_mod._resize_rows
        closing = writer_mod.GradientStoreWriter.close

        def close(self, complete=True):
            def resize_then_die(arrays, num_rows):
                real_resize(arrays, num_rows)
                os.kill(os.getpid(), signal.SIGKILL)

            writer_mod._resize_rows = resize_then_die
            closing(self, complete)

        writer_mod.GradientStoreWriter.close = close


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = Path(args.out)
    data = lm_batch(num=args.num, seq=args.seq, seed=1, prompt=args.ragged)
    if not args.ragged:  # equal lengths: DDP's mean of means == the global mean
        data["attention_mask"].fill_(1)
        data["labels"] = data["input_ids"].clone()
    if args.no_ids:  # a dataset without example_id: the Bergson strategy adds the rows
        del data["example_id"]
    rows = Rows(data)
    if args.devices * args.num_nodes > 1:  # Lightning swaps in DistributedSampler(seed=0)
        loader = DataLoader(rows, batch_size=args.batch_size)
    else:  # the same epoch permutation, so the global batches match a multi-process run
        sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(rows, batch_size=args.batch_size, sampler=sampler)
    callbacks: list[Callback] = [
        GradientCaptureCallback(
            args.store or out / "grads.zarr",
            projection_dim=args.projection_dim,
            normalizer=args.normalizer,
            dtype="float32",
            overwrite=not args.resume,
            chunk_rows=args.chunk_rows,
            include=args.include,
        )
    ]
    arm_store_faults(args)
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                out / "ckpt", every_n_train_steps=args.ckpt_every, save_last=True, save_top_k=-1
            )
        )
    if args.kill_batch >= 0:
        callbacks.append(
            Killer(args.kill_batch, args.kill_when, callbacks[0] if args.kill_drain else None)
        )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=True,
    )
    net = tiny_gpt_neox()
    module = CausalLMModule(net, lr=args.lr, weight_decay=0.0)
    ckpt = str(out / "ckpt" / "last.ckpt") if args.resume else None
    trainer.fit(module, loader, ckpt_path=ckpt)


if __name__ == "__main__":
    main()
