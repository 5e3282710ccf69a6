"""Score arrays: one header format, one writer (streamed in whole chunks), old paths kept."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from lightning_bergson.scores import (
    ScoreArray,
    ScoreArrayWriter,
    ScoreHeader,
    ScoreSettings,
    write_scores,
)

HEADER = ScoreHeader(
    "gradient_cosine",
    "influence",
    ScoreSettings(store="g.zarr", preconditioner="none", columns="rows"),
    {"queries": ["a", "b"]},
)


def test_header_round_trips_and_reads_arrays_written_before_settings():
    assert ScoreHeader.from_json(json.loads(json.dumps(HEADER.to_json())), where="x") == HEADER
    old = {  # the attributes `score` wrote before settings had their own entry
        "format": "lightning_bergson.scores",
        "schema_version": 2,
        "method": "gradient_cosine",
        "convention": "influence",
        "metadata": {
            "store": "g.zarr",
            "preconditioned": True,
            "example_reduce": "mean",
            "query_reduce": "max",
        },
        "complete": True,
    }
    settings = ScoreHeader.from_json(old, where="x").settings
    assert settings == ScoreSettings("g.zarr", "fit", "examples", "mean", "max")


def test_bad_headers_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"schema 3, newer than the 2 .* upgrade"):
        ScoreHeader.from_json({**HEADER.to_json(), "schema_version": 3}, where="x")
    with pytest.raises(ValueError, match="x is not a lightning_bergson score array"):
        ScoreHeader.from_json({"format": "other"}, where="x")
    with pytest.raises(TypeError, match=r"plain JSON .*\.tolist\(\)"):
        ScoreHeader("m", "influence", metadata={"ids": np.arange(2)})
    with pytest.raises(ValueError, match="convention='sign' is not one of"):
        ScoreHeader("m", "sign")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass columns='examples'"):
        ScoreSettings(columns="rows", example_reduce="mean")


def test_streamed_blocks_are_written_in_whole_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 23)).astype(np.float32)  # (Q, N)
    ids, epochs = np.arange(23) % 10, np.arange(23) // 10
    writes = []
    real = zarr.Array.__setitem__

    def spy(self, key, value):
        if self.basename == "scores":
            writes.append((key[1].start, key[1].stop))
        real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    path = tmp_path / "s.zarr"
    with ScoreArrayWriter(path, HEADER, num_queries=2, example_ids=ids, epochs=epochs,
                          steps=epochs * 4, chunk_cols=5) as writer:  # fmt: skip
        for lo, hi in [(0, 3), (3, 4), (4, 13), (13, 16), (16, 23)]:
            writer.add(scores[:, lo:hi])
    assert all(lo % 5 == 0 and (hi % 5 == 0 or hi == 23) for lo, hi in writes), writes
    assert sum(hi - lo for lo, hi in writes) == 23  # every column written once
    arr = ScoreArray.open(path)
    np.testing.assert_array_equal(arr.scores, scores)
    assert arr.example_ids.tolist() == ids.tolist() and arr.epochs.tolist() == epochs.tolist()
    assert arr.steps.tolist() == (epochs * 4).tolist() and arr.header.settings == HEADER.settings
    assert arr.metadata == {"queries": ["a", "b"]} and arr.method == "gradient_cosine"


def test_write_scores_goes_through_the_writer_with_the_same_attributes(tmp_path):
    per_token = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # (Q, N, S)
    path = write_scores(tmp_path / "t.zarr", per_token, [5, 6, 7], method="magic",
                        convention="metagradient", query_ids=[8, 9],
                        metadata={"preconditioner": "ekfac"})  # fmt: skip
    arr = ScoreArray.open(path)
    np.testing.assert_array_equal(arr.scores, per_token)
    assert arr.query_ids.tolist() == [8, 9] and arr.epochs is None
    assert arr.settings == ScoreSettings(preconditioner="ekfac")  # read from the metadata
    keys = set(zarr.open_group(str(path), mode="r").attrs)
    streamed = ScoreArrayWriter(tmp_path / "u.zarr", HEADER, num_queries=1, example_ids=[1])
    assert keys == set(streamed.group.attrs)  # one attribute layout for every writer


def test_short_or_failed_arrays_stay_incomplete_and_are_refused(tmp_path):
    writer = ScoreArrayWriter(tmp_path / "a.zarr", HEADER, num_queries=2, example_ids=[1, 2, 3])
    writer.add(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2 of 3 score columns were written"):
        writer.close()
    with pytest.raises(ValueError, match="is incomplete"):
        ScoreArray.open(tmp_path / "a.zarr")
    path = tmp_path / "b.zarr"
    with (
        pytest.raises(RuntimeError, match="scan failed"),
        ScoreArrayWriter(path, HEADER, num_queries=2, example_ids=[1]),
    ):
        raise RuntimeError("scan failed")
    with pytest.raises(ValueError, match="is incomplete"):
        ScoreArray.open(path)


def test_writer_refuses_bad_blocks_and_ids(tmp_path):
    writer = ScoreArrayWriter(tmp_path / "a.zarr", HEADER, num_queries=2, example_ids=[1, 2])
    with pytest.raises(ValueError, match=r"\[Q, n\] with Q, S = \(2,\); got \(3, 1\)"):
        writer.add(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="3 score columns given for 2 example ids"):
        writer.add(np.zeros((2, 3)))
    examples = ScoreHeader("m", "influence", ScoreSettings(columns="examples"))
    with pytest.raises(ValueError, match="epochs/steps describe stored rows"):
        ScoreArrayWriter(tmp_path / "b.zarr", examples, num_queries=1, example_ids=[1], epochs=[0])
    with pytest.raises(ValueError, match="epochs has 1 entries; expected 2"):
        ScoreArrayWriter(tmp_path / "c.zarr", HEADER, num_queries=1, example_ids=[1, 2], epochs=[0])
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        ScoreArrayWriter(tmp_path / "a.zarr", HEADER, num_queries=2, example_ids=[1, 2])


def test_old_import_paths_name_the_new_objects():
    from lightning_bergson.attribution import report as old_report
    from lightning_bergson.magic import lds as old_lds
    from lightning_bergson.scores import lds, report

    assert old_report.query_reports is report.query_reports
    assert old_report.write_report is report.write_report and old_report.Match is report.Match
    assert old_lds.spearman is lds.spearman and old_lds.retrain_losses is lds.retrain_losses


def test_scores_package_loads_neither_lightning_nor_transformers():
    code = (
        "import sys\n"
        "import lightning_bergson.scores, lightning_bergson.scores.report\n"
        "import lightning_bergson.scores.lds, lightning_bergson.scores.histogram\n"
        "print([m for m in ('lightning', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"
