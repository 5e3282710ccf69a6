"""EK-FAC factor fits run as a script, so Lightning can launch DDP ranks.

Used by tests/ekfac/test_factors_ddp.py:

    python tests/scripts/ekfac_fit.py --out DIR [--devices 2]

Writes ``DIR/<fisher>`` factors for the empirical and the true Fisher of the tiny GPT-NeoX
on ``NUM_EXAMPLES`` documents (a multiple of world size x batch size: the distributed
sampler pads nothing), and with several devices ``DIR/padded`` on one document fewer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracles import batch_rows, lm_batch, tiny_gpt_neox

from lightning_bergson import EkfacModule

NUM_EXAMPLES, BATCH_SIZE = 8, 2
FISHERS = ("empirical", "true")


def rows(num: int = NUM_EXAMPLES, seq: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Documents of ``lm_batch`` as dataset rows (default collate stacks them back)."""
    return batch_rows(lm_batch(num, seq, seed=seed))


def fit(out: Path, fisher: str, devices: int, num: int = NUM_EXAMPLES) -> EkfacModule:
    """Fit float64 factors of ``tiny_gpt_neox(0)`` on ``num`` documents into ``out``."""
    ek = EkfacModule(
        tiny_gpt_neox(0, dtype=torch.float64),
        factors_dir=str(out),
        fisher=fisher,  # type: ignore[arg-type]
        factor_dtype="float64",
        overwrite=True,
    )
    trainer = L.Trainer(
        max_epochs=ek.num_phases,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ek, DataLoader(rows(num), batch_size=BATCH_SIZE))
    return ek


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    for fisher in FISHERS:
        fit(args.out / fisher, fisher, args.devices)
    if args.devices > 1:  # an odd dataset: the sampler pads with a repeat, which is warned about
        fit(args.out / "padded", "empirical", args.devices, num=NUM_EXAMPLES - 1)


if __name__ == "__main__":
    main()
