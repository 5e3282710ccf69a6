"""Damaged stores are refused, never read as data: missing, overwritten and cut chunks.

Each damage is made to a copy of a real store as a user's disk or copy would make it; every
reader (``GradientStore.read``, the raw scan behind ``Attributor``, ``verify``) must name
the array, the chunk and its rows.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_bergson.attribution import Attributor
from lightning_bergson.attribution.reading import iter_rows
from lightning_bergson.attribution.score_writer import write_score_array
from lightning_bergson.cli.verify import verify_main
from lightning_bergson.scores import ScoreArray
from lightning_bergson.store import (
    GradientStore,
    GradientStoreWriter,
    StoreIntegrityError,
    layout_blocks,
    verify_store,
)

BLOCKS = layout_blocks([("a", (2, 3), "a", None), ("b", (1, 4), "b", None)])
DIM = 10
ROWS, CHUNK = 27, 8  # chunks 0..3, the last one partial


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("stores") / "run.zarr"
    grads = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    meta = {"projection": {"dim": 0, "seed": 0}, "capture": {}}  # what Attributor checks
    with GradientStoreWriter(
        path, modules=BLOCKS, dtype="float32", chunk_rows=CHUNK, metadata=meta
    ) as w:
        for start in range(0, ROWS, 5):
            stop = min(start + 5, ROWS)
            w.append(grads[start:stop], example_id=range(start, stop), step=start, epoch=0)
    return path, grads.numpy()


def _copy(pristine, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(pristine[0], path)
    return path


def _damage(path: Path, array: str, chunk: int, how: str) -> None:
    key = path / "rank_0" / array / "c" / str(chunk)
    key = key / "0" if array == "gradients" else key
    data = key.read_bytes()
    if how == "deleted":
        key.unlink()
    elif how == "overwritten":  # same size, a few bytes in the middle changed
        mid = len(data) // 2
        key.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 3]) + data[mid + 3 :])
    else:  # truncated
        key.write_bytes(data[: len(data) // 2])


HOWS = ["deleted", "overwritten", "truncated"]


def _named(chunk: int, array: str = "gradients") -> str:
    lo, hi = chunk * CHUNK, min((chunk + 1) * CHUNK, ROWS)
    return rf"rank_0/{array} chunk {chunk} \(rows {lo}-{hi - 1} of rank 0"


def test_undamaged_store_verifies(pristine, capsys):
    report = verify_store(pristine[0], progress=False)
    assert report.ok and report.checked and report.damaged_ranges() == {}
    assert report.chunks == 4 * 7  # every chunk of the 7 arrays read once
    verify_main([str(pristine[0]), "--no-progress"])  # returns: exit status 0
    assert "no damage found" in capsys.readouterr().out


@pytest.mark.parametrize("how", HOWS)
def test_damaged_gradient_chunk_is_refused_by_every_reader(pristine, tmp_path, how):
    path = _copy(pristine, tmp_path)
    _damage(path, "gradients", 1, how)
    store = GradientStore.open(path)  # the columns are intact: the store opens
    np.testing.assert_array_equal(store.read(slice(0, CHUNK)).numpy(), pristine[1][:CHUNK])
    np.testing.assert_array_equal(store.read([20, 3]).numpy(), pristine[1][[20, 3]])
    with pytest.raises(StoreIntegrityError, match=_named(1)):
        store.read(slice(None))
    with pytest.raises(StoreIntegrityError, match=_named(1)):
        store.read([9])
    with pytest.raises(StoreIntegrityError, match=_named(1)):
        list(store.iter_chunks())
    with pytest.raises(StoreIntegrityError, match=_named(1)):  # the raw scan path
        list(iter_rows(store, CHUNK))
    with pytest.raises(StoreIntegrityError, match=_named(1)):  # scan chunks across chunks
        list(iter_rows(store, 5))
    with pytest.raises(StoreIntegrityError, match=_named(1)):
        Attributor(path).scores(torch.ones(2, DIM))
    with pytest.raises(StoreIntegrityError, match=_named(1)):
        Attributor(path).search(torch.ones(1, DIM), k=3)
    for reduce in ("none", "mean"):  # what the ``score`` command runs: streamed and reduced
        out = tmp_path / f"scores-{reduce}.zarr"
        with pytest.raises(StoreIntegrityError, match=_named(1)):
            write_score_array(Attributor(path, example_reduce=reduce), torch.ones(2, DIM), out)
        if out.exists():  # a partly written score array must not read as scores
            with pytest.raises(ValueError, match="incomplete"):
                ScoreArray.open(out)
    report = verify_store(path, progress=False)
    assert not report.ok
    assert [(d.array, d.chunk, d.rows) for d in report.damage] == [("gradients", 1, (8, 16))]
    assert report.damage[0].kind == ("missing" if how == "deleted" else "checksum")
    assert report.damaged_ranges() == {0: [(8, 16)]}


@pytest.mark.parametrize("array", ["example_id", "step", "finite"])
@pytest.mark.parametrize("how", HOWS)
def test_damaged_column_chunk_is_refused(pristine, tmp_path, array, how):
    path = _copy(pristine, tmp_path)
    _damage(path, array, 3, how)  # the last, partial chunk
    with pytest.raises(StoreIntegrityError, match=_named(3, array)):
        GradientStore.open(path)
    with pytest.raises(StoreIntegrityError, match=_named(3, array)):
        Attributor(path)
    report = verify_store(path, progress=False)
    assert [(d.array, d.chunk, d.rows) for d in report.damage] == [(array, 3, (24, 27))]


def test_verify_command_reports_and_truncates(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    _damage(path, "gradients", 2, "overwritten")
    _damage(path, "step", 3, "deleted")
    run = [sys.executable, "-m", "lightning_bergson", "verify", str(path), "--no-progress"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "rank_0/gradients chunk 2 (rows 16-23" in out.stdout
    assert "rank_0/step chunk 3 (rows 24-26" in out.stdout
    assert "rank 0: damaged rows 16-26" in out.stdout
    out = subprocess.run([*run, "--truncate"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "truncated to its first 16 rows" in out.stdout
    store = GradientStore.open(path)
    assert store.complete and len(store) == 16
    np.testing.assert_array_equal(store.read(slice(None)).numpy(), pristine[1][:16])
    np.testing.assert_array_equal(store.example_ids, np.arange(16))
    assert verify_store(path, progress=False).ok


def test_damage_in_a_later_rank_names_store_rows(tmp_path):
    path = tmp_path / "two.zarr"
    for rank in (0, 1):
        with GradientStoreWriter(
            path, modules=BLOCKS, dtype="float16", chunk_rows=4, rank=rank, world_size=2
        ) as w:
            w.append(np.ones((6, DIM)), example_id=np.arange(6) + 10 * rank, step=0, epoch=0)
    (path / "rank_1" / "gradients" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreIntegrityError, match=r"rank_1/gradients chunk 1 \(rows 4-5 of "
                       r"rank 1, store rows 10-11\) is missing"):  # fmt: skip
        GradientStore.open(path).read(slice(None))
    assert verify_store(path, progress=False).damaged_ranges() == {1: [(4, 6)]}


def test_all_fill_chunks_are_stored(tmp_path):
    """Chunks holding only fill values (epoch 0, finite False, zero rows) are written."""
    path = tmp_path / "zeros.zarr"
    with GradientStoreWriter(path, modules=BLOCKS, chunk_rows=4, background=False) as w:
        w.append(np.zeros((4, DIM)), example_id=range(4), step=0, epoch=0)
        w.append(np.full((4, DIM), np.nan), example_id=range(4, 8), step=0, epoch=0)
    for name in ("gradients", "epoch", "finite", "loss", "advantage"):
        assert sorted(p.name for p in (path / "rank_0" / name / "c").iterdir()) == ["0", "1"]
    assert verify_store(path, progress=False).ok


def test_nonfinite_query_raises(pristine):
    queries = torch.ones(3, DIM)
    queries[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"query rows \[1\] have non-finite gradients"):
        Attributor(pristine[0]).search(queries, k=2)


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_reading_leaves_the_store_byte_for_byte_unchanged(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    before = _snapshot(path)
    store = GradientStore.open(path)
    store.read(slice(None)), store.read([3, 1]), list(store.iter_chunks(5))
    list(iter_rows(store, 7))
    assert store.verify(progress=False).ok
    Attributor(path).search(torch.ones(2, DIM), k=3)
    verify_main([str(path), "--no-progress"])
    assert _snapshot(path) == before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_enospc_at_a_random_write_keeps_committed_rows(tmp_path, monkeypatch, seed):
    """A full disk at a seeded random chunk write: an error, and the rows before it intact."""
    import errno

    import lightning_bergson.store.writer as writer_mod
    from lightning_bergson.store import GradientStoreWriteError, IncompleteStoreWarning

    fail_at = int(np.random.default_rng(seed).integers(0, 6))
    print(f"ENOSPC at chunk write {fail_at} (seed {seed})")
    real, calls = writer_mod._write_block, []

    def full_disk(arrays, start, rows):
        calls.append(start)
        if len(calls) - 1 == fail_at:
            real({"gradients": arrays["gradients"]}, start, rows)  # half a write, then full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(arrays, start, rows)

    monkeypatch.setattr(writer_mod, "_write_block", full_disk)
    grads = torch.randn(24, DIM, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / "full.zarr"
    with pytest.raises(GradientStoreWriteError, match=r"No space left.*Free disk space"):  # noqa: SIM117
        with GradientStoreWriter(path, modules=BLOCKS, dtype="float32", chunk_rows=4) as w:
            for start in range(0, 24, 3):
                w.append(grads[start : start + 3], example_id=range(start, start + 3), step=0,
                         epoch=0)  # fmt: skip
            w.flush()
    with pytest.warns(IncompleteStoreWarning):
        store = GradientStore.open(path)
    assert len(store) == 4 * fail_at
    np.testing.assert_array_equal(store.read(slice(None)).numpy(), grads[: 4 * fail_at].numpy())
    assert verify_store(path, progress=False).ok


def test_a_reader_during_writing_sees_only_committed_rows(tmp_path):
    """Open and read the store again and again while a writer thread appends chunks."""
    import threading
    import warnings

    from lightning_bergson.store import IncompleteStoreWarning

    path = tmp_path / "live.zarr"
    grads = torch.randn(400, DIM, generator=torch.Generator().manual_seed(3))
    writer = GradientStoreWriter(path, modules=BLOCKS, dtype="float32", chunk_rows=8)
    done = threading.Event()

    def produce() -> None:
        for start in range(0, 400, 5):
            writer.append(grads[start : start + 5], example_id=range(start, start + 5), step=0,
                          epoch=0)  # fmt: skip
        writer.close()
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    seen = set()
    while not done.is_set() or not seen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IncompleteStoreWarning)
            store = GradientStore.open(path)
            n = len(store)
            rows = store.read(slice(None)).numpy() if n else np.zeros((0, DIM), np.float32)
        np.testing.assert_array_equal(store.example_ids, np.arange(n))
        np.testing.assert_array_equal(rows, grads[:n].numpy())
        seen.add(n)
    thread.join()
    assert len(seen) > 1 and GradientStore.open(path).complete


def test_a_chunk_deleted_after_opening_is_refused(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    store = GradientStore.open(path)
    _damage(path, "gradients", 2, "deleted")
    with pytest.raises(StoreIntegrityError, match=_named(2)):
        store.read(slice(None))
    with pytest.raises(StoreIntegrityError, match=_named(2)):
        store.read([17])
    with pytest.raises(StoreIntegrityError, match=_named(2)):
        list(iter_rows(store, CHUNK))


# A read-only location: root bypasses file permissions, so as root the script runs with
# the capabilities that do so dropped from its bounding set (util-linux ``setpriv``).
_READ_ONLY_SCRIPT = r"""
import json, subprocess, sys
import numpy as np
from lightning_bergson.scores import write_scores
from lightning_bergson.store import GradientStoreWriter, GradientStoreWriteError, layout_blocks

blocks = layout_blocks([("a", (2, 3), "a", None), ("b", (1, 4), "b", None)])
store, locked, scores = sys.argv[1:4]
attempts = {
    "create in a read-only dir": lambda: GradientStoreWriter(f"{locked}/new.zarr", modules=blocks),
    "reopen": lambda: GradientStoreWriter.reopen(store, committed_rows=8),
    "overwrite": lambda: GradientStoreWriter(store, modules=blocks, overwrite=True),
    "score array overwrite": lambda: write_scores(
        scores, np.ones((1, 2)), [0, 1], method="m", convention="influence", overwrite=True
    ),
}
out = {}
for name, attempt in attempts.items():
    try:
        attempt()
        out[name] = "no error"
    except GradientStoreWriteError as err:
        out[name] = str(err)
    except Exception as err:  # any other error is a failure of the test too
        out[name] = f"{type(err).__name__}: {err}"
verify = [sys.executable, "-m", "lightning_bergson", "verify", store, "--truncate",
          "--no-progress"]
run = subprocess.run(verify, capture_output=True, text=True)
out["verify --truncate"] = [run.returncode, run.stderr]
print(json.dumps(out))
"""


def _without_permission_override() -> list[str]:
    import os

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and util-linux setpriv is missing: cannot drop the "
                    "capability that bypasses file permissions")  # fmt: skip
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_a_read_only_location_is_refused_before_anything_changes(pristine, tmp_path):
    import json

    from lightning_bergson.scores import write_scores

    path = _copy(pristine, tmp_path)
    scores = write_scores(tmp_path / "s.zarr", np.eye(2), [7, 9], method="m",
                          convention="influence")  # fmt: skip
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    # only rank_0/gradients of the store is read-only: a replacement that removed what it
    # could before failing would leave half a store
    targets = [path / "rank_0" / "gradients", scores, ro_dir]
    locked = [d for t in targets for d in [t, *t.rglob("*")] if d.is_dir()]
    before = {p: _snapshot(p) for p in (path, scores)}
    for d in locked:
        d.chmod(0o555)
    try:
        cmd = [*_without_permission_override(), sys.executable, "-c", _READ_ONLY_SCRIPT]
        run = subprocess.run([*cmd, str(path), str(ro_dir), str(scores)], capture_output=True,
                             text=True)  # fmt: skip
    finally:
        for d in locked:
            d.chmod(0o755)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("reopen", "overwrite"):
        assert "is read-only (nothing was changed)" in out[name], (name, out[name])
        assert str(path / "rank_0" / "gradients") in out[name] and "chmod -R u+w" in out[name]
    assert f"{ro_dir} is read-only" in out["create in a read-only dir"]
    assert f"Cannot write a score array at {scores}" in out["score array overwrite"]
    code, err = out["verify --truncate"]
    assert code == 0, err  # nothing to truncate: the store is undamaged, verify only reads
    assert {p: _snapshot(p) for p in (path, scores)} == before  # byte for byte, mtimes too
    assert list(ro_dir.iterdir()) == []
    assert verify_store(path, progress=False).ok


def test_verify_truncate_on_a_read_only_copy_is_an_error(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    _damage(path, "gradients", 2, "overwritten")
    before = _snapshot(path)
    locked = [d for d in [path, *path.rglob("*")] if d.is_dir()]
    for d in locked:
        d.chmod(0o555)
    try:
        cmd = [*_without_permission_override(), sys.executable, "-m", "lightning_bergson"]
        run = subprocess.run([*cmd, "verify", str(path), "--truncate", "--no-progress"],
                             capture_output=True, text=True)  # fmt: skip
    finally:
        for d in locked:
            d.chmod(0o755)
    assert run.returncode == 2
    assert "rank_0/gradients chunk 2 (rows 16-23" in run.stdout
    assert f"error: Cannot write a gradient store at {path / 'rank_0'}" in run.stderr
    assert "Traceback" not in run.stderr
    assert _snapshot(path) == before


@pytest.mark.parametrize("how", HOWS)
def test_a_damaged_score_array_is_refused(tmp_path, how):
    from lightning_bergson.scores import ScoreArray, write_scores

    path = write_scores(tmp_path / "s.zarr", np.arange(6.0).reshape(2, 3), [4, 5, 6],
                        method="m", convention="influence")  # fmt: skip
    np.testing.assert_array_equal(ScoreArray.open(path).scores, np.arange(6.0).reshape(2, 3))
    key = path / "scores" / "c" / "0" / "0"
    data = key.read_bytes()
    if how == "deleted":
        key.unlink()
    elif how == "overwritten":
        key.write_bytes(data[:4] + bytes(b ^ 0x5A for b in data[4:7]) + data[7:])
    else:
        key.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreIntegrityError, match=r"s.zarr/scores.*(missing|damaged)"):
        ScoreArray.open(path)
