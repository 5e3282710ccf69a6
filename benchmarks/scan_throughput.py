"""Scan throughput: ``Attributor.search`` streaming an on-disk store vs an in-memory matmul.

Writes a gradient store of random rows (default about 0.75 GB), then, alternating, times

* ``Attributor.search(queries, k)``: chunks read from disk on a prefetch thread, cast to
  float32, multiplied with the queries, running top-k merged;
* the baseline: the same rows already in memory as one float32 tensor,
  ``(queries @ rows.T).topk(k)``;

and prints GB/s of stored bytes for both and their ratio (target >= 0.5). The store is
read through the page cache (it was just written), so this measures the scan pipeline,
not the disk.

It also times the same search on a copy of the store whose gradient chunks carry no crc32c
checksum (the checksum bytes stripped, the codec removed from the metadata) and prints the
throughput with checksums over without (target >= 0.9).

Run: ``python benchmarks/scan_throughput.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_bergson import Attributor, GradientStore
from lightning_bergson.store import GradientStoreWriter, layout_blocks


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gigabytes", type=float, default=0.75, help="store size on disk")
    p.add_argument("--dim", type=int, default=4096, help="row width D (16 blocks of 16x16)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--queries", type=int, default=8, help="queries scored at once")
    p.add_argument("--k", type=int, default=10, help="top-k per query")
    p.add_argument("--chunk_rows", type=int, default=None, help="rows per read (default: auto)")
    p.add_argument("--repeats", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--dir", default=None, help="where to write the store (default: a temp dir)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args()


def write_store(path: Path, rows: int, dim: int, dtype: str) -> None:
    blocks = layout_blocks([(f"m{i}", (16, dim // 256), f"m{i}", None) for i in range(16)])
    meta = {"projection": {"dim": 16, "seed": 0}}
    gen = torch.Generator().manual_seed(0)
    batch = 4096
    with GradientStoreWriter(path, modules=blocks, dtype=dtype, metadata=meta) as writer:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            writer.append(
                torch.randn(n, dim, generator=gen),
                example_id=np.arange(start, start + n),
                step=0,
                epoch=0,
            )


def strip_checksums(src: Path, dst: Path) -> None:
    """Copy the store at ``src`` to ``dst`` with the gradients' crc32c removed (baseline)."""
    shutil.copytree(src, dst)
    for rank in dst.glob("rank_*"):
        grads = rank / "gradients"
        meta = json.loads((grads / "zarr.json").read_text())
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"], meta["codecs"]
        meta["codecs"] = meta["codecs"][:1]
        (grads / "zarr.json").write_text(json.dumps(meta))
        for chunk in (grads / "c").rglob("*"):
            if chunk.is_file():
                chunk.write_bytes(chunk.read_bytes()[:-4])


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dim % 256:
        raise SystemExit(f"--dim {args.dim} must be a multiple of 256")
    itemsize = np.dtype(args.dtype).itemsize
    rows = int(args.gigabytes * 1e9 / (args.dim * itemsize))
    root = Path(args.dir or tempfile.mkdtemp(prefix="scan_"))
    path = root / "scan.zarr"
    print(
        f"writing {rows} rows x {args.dim} {args.dtype} ({rows * args.dim * itemsize / 1e9:.2f} GB)"
    )
    write_store(path, rows, args.dim, args.dtype)
    strip_checksums(path, root / "plain.zarr")
    try:
        store = GradientStore.open(path)
        nbytes = rows * args.dim * itemsize
        queries = torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(1))
        attr = Attributor(store, chunk_rows=args.chunk_rows)
        in_memory = store.read(slice(None), dtype=torch.float32)  # (N, D): the baseline's copy

        plain = Attributor(GradientStore.open(root / "plain.zarr"), chunk_rows=args.chunk_rows)

        def scan() -> torch.Tensor:
            return attr.search(queries, k=args.k).rows

        def scan_plain() -> torch.Tensor:
            return plain.search(queries, k=args.k).rows

        def matmul() -> torch.Tensor:
            return (queries @ in_memory.T).topk(args.k, dim=1).indices

        assert torch.equal(scan(), matmul()), "streamed top-k differs from the in-memory top-k"
        assert torch.equal(scan_plain(), matmul()), "the copy without checksums differs"
        times: dict[str, list[float]] = {"scan": [], "matmul": [], "plain": []}
        for _ in range(args.repeats):
            for name, fn in (("scan", scan), ("matmul", matmul), ("plain", scan_plain)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        scan_gbs = nbytes / statistics.median(times["scan"]) / 1e9
        mm_gbs = nbytes / statistics.median(times["matmul"]) / 1e9
        print(f"chunk rows: {attr.chunk_rows}, queries: {args.queries}, k: {args.k}, "
              f"torch threads: {torch.get_num_threads()}")  # fmt: skip
        print(f"Attributor.search (on disk): {scan_gbs:6.2f} GB/s")
        print(f"in-memory matmul + topk:     {mm_gbs:6.2f} GB/s")
        plain_gbs = nbytes / statistics.median(times["plain"]) / 1e9
        print(f"ratio: {scan_gbs / mm_gbs:.2f} (target >= 0.5)")
        print(f"search without checksums:    {plain_gbs:6.2f} GB/s")
        print(f"checksum ratio: {scan_gbs / plain_gbs:.2f} (with / without; target >= 0.9)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
