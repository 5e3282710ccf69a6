"""The ``verify`` command: read every chunk of a store once, report damage, optionally truncate.

Exit status: 0 when the store is undamaged (or was truncated to its undamaged rows), 1 when
damage is found, 2 for a path that is not a store or cannot be changed.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..store.integrity import truncate_damaged, verify_store
from ..store.schema import GradientStoreWriteError, StoreIntegrityError

__all__ = ["verify_main"]

PROG = "python -m lightning_bergson verify"


def verify_main(argv: list[str] | None = None) -> None:
    """``python -m lightning_bergson verify STORE [--truncate]``; exits 1 on damage."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read every chunk of a gradient store once and report damaged row ranges "
        "per rank (missing chunks, checksum mismatches, cut chunks). Exits 1 when any chunk "
        "is damaged, 2 when the path is not a store or cannot be changed, 0 otherwise.",
    )
    parser.add_argument(
        "store", help="path or URL (s3://bucket/run.zarr) of the gradient store (a *.zarr)"
    )
    parser.add_argument(
        "--storage_options",
        type=_json_object,
        default=None,
        help='JSON options of the URL\'s filesystem, e.g. \'{"endpoint_url": "http://..."}\' '
        "(default: the usual environment variables, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)",
    )
    parser.add_argument(
        "--truncate",
        action="store_true",
        help="drop each damaged rank's rows from its first damaged chunk on (the store "
        "stays valid; a capture resumed from an earlier checkpoint appends them again)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = verify_store(
            args.store, progress=not args.no_progress, storage_options=args.storage_options
        )
    except (FileNotFoundError, ValueError, StoreIntegrityError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.summary())
    if report.ok:
        return
    if args.truncate:
        try:
            keep = truncate_damaged(report)
        except GradientStoreWriteError as err:  # e.g. a read-only copy: nothing was changed
            print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
            raise SystemExit(2) from None
        for rank, rows in keep.items():
            print(f"rank {rank}: truncated to its first {rows} rows")
        if verify_store(args.store, progress=False, storage_options=args.storage_options).ok:
            print("the store now verifies")
            return
    raise SystemExit(1)


def _json_object(text: str) -> dict:
    """``--storage_options``: a JSON object, or an error that shows one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not JSON ({err}); pass an object such as '{{\"anon\": true}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{}}'")
    return value
