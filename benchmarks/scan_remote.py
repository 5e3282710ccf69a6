"""Scan throughput from object storage: a store on an S3 server against the same store on
local disk, with and without read-ahead.

Writes a gradient store of random rows on local disk (default 256 MB), uploads the same
files to a bucket, then, alternating, streams every row with ``StoreScanner`` (checksums
verified) from each, with ``prefetch=0`` (reads in the caller's thread) and ``prefetch=2``
(chunks fetched ahead on a background thread). Prints MB/s of stored bytes for each and
the ratios remote / local per prefetch setting, and prefetch / none per location.

The server is moto's (started here on 127.0.0.1, so the figures measure the client and the
local server, not a network) unless ``--endpoint`` names another S3-compatible one (MinIO,
a real bucket: credentials from the usual AWS environment variables).

Run: ``python benchmarks/scan_remote.py`` (``--help`` for sizes). Needs the dev extra
(``moto[server]``, ``s3fs``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_bergson.store import GradientStore, GradientStoreWriter, StoreScanner, layout_blocks


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megabytes", type=float, default=256, help="store size")
    p.add_argument("--dim", type=int, default=2048, help="row width D (16 blocks)")
    p.add_argument("--chunk_rows", type=int, default=1024, help="rows per store chunk")
    p.add_argument("--scan_rows", type=int, default=None, help="rows per scan read (auto)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--endpoint", default=None, help="an S3 endpoint (default: start moto)")
    p.add_argument("--bucket", default="lb-scan-bench", help="bucket (created if missing)")
    return p.parse_args()


def write_store(path: Path, rows: int, dim: int, chunk_rows: int) -> None:
    blocks = layout_blocks([(f"m{i}", (16, dim // 256), f"m{i}", None) for i in range(16)])
    gen = torch.Generator().manual_seed(0)
    with GradientStoreWriter(path, modules=blocks, dtype="float32", chunk_rows=chunk_rows) as w:
        for start in range(0, rows, 4096):
            n = min(4096, rows - start)
            w.append(torch.randn(n, dim, generator=gen), example_id=np.arange(start, start + n),
                     step=0, epoch=0)  # fmt: skip


def start_moto() -> tuple[object, str]:
    """moto's S3 server on a free port of 127.0.0.1, and its endpoint."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def upload(local: Path, endpoint: str, bucket: str) -> str:
    """Copy the store's files to ``s3://bucket/<name>``; returns the URL."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    key = f"{bucket}/{local.name}"
    fs.put(str(local), key, recursive=True)
    return f"s3://{key}"


def scan_seconds(store: GradientStore, prefetch: int, scan_rows: int | None) -> float:
    start = time.perf_counter()
    total = 0.0
    for chunk in StoreScanner(store, chunk_rows=scan_rows, prefetch=prefetch):
        total += float(chunk.rows[0, 0])  # touch the rows
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    rows = max(1, int(args.megabytes * 2**20 // (4 * args.dim)))
    server, endpoint = (None, args.endpoint) if args.endpoint else start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "bench.zarr"
        write_store(local, rows, args.dim, args.chunk_rows)
        url = upload(local, endpoint, args.bucket)
        stores = {"local": GradientStore.open(local), "remote": GradientStore.open(url)}
        np.testing.assert_array_equal(stores["remote"].example_ids, stores["local"].example_ids)
        size = rows * args.dim * 4 / 1e6
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for where, store in stores.items():
                for depth in (0, 2):
                    seconds = scan_seconds(store, depth, args.scan_rows)
                    times.setdefault((where, depth), []).append(seconds)
        rate = {key: size / statistics.median(t) for key, t in times.items()}
        print(f"store: {rows} rows x {args.dim} float32 = {size:.1f} MB, chunks of "
              f"{args.chunk_rows} rows; server {endpoint}")  # fmt: skip
        for (where, depth), mbs in rate.items():
            print(f"  {where:6s} prefetch={depth}: {mbs:9.1f} MB/s")
        for depth in (0, 2):
            ratio = rate[("remote", depth)] / rate[("local", depth)]
            print(f"  remote / local, prefetch={depth}: {ratio:.3f}")
        for where in stores:
            print(f"  {where}: prefetch=2 / prefetch=0: "
                  f"{rate[(where, 2)] / rate[(where, 0)]:.3f}")  # fmt: skip
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
