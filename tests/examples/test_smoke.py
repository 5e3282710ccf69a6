"""Tiny runs of the study examples: they finish and write every table and figure they promise."""

from __future__ import annotations

import behaviours
import lds
import memorization

TINY = [
    "--people", "2", "--copies", "1", "3", "--canaries_per_level", "1", "--epochs", "2",
    "--hidden", "32", "--layers", "1", "--batch_size", "16", "--projection_dim", "4",
    "--k", "3", "--m", "4", "--threads", "1",
]  # fmt: skip
METHODS = (
    "cosine, preconditioner", "cosine, no preconditioner", "inner product, preconditioner",
    "inner product, no preconditioner", "EK-FAC", "BM25", "mean hidden state cosine",
)  # fmt: skip


def test_memorization_then_behaviours_on_the_same_run(tmp_path):
    work, out = tmp_path / "run", tmp_path / "results"
    memorization.main([*TINY, "--workdir", str(work), "--out", str(out / "memorization.md")])
    text = (out / "memorization.md").read_text()
    for heading in ("## Recall by class", "## Early- vs late-memorized canaries", "## Findings"):
        assert heading in text
    for method in METHODS:
        assert f"| {method} |" in text
    assert (out / "memorization_curves.png").stat().st_size > 1000
    assert (out / "memorization_recall.png").stat().st_size > 1000
    trained = (work / "run.json").stat().st_mtime_ns

    behaviours.main([*TINY, "--facts", "3", "--workdir", str(work), "--out", str(out / "b.md")])
    assert (work / "run.json").stat().st_mtime_ns == trained  # the run was reused
    text = (out / "b.md").read_text()
    for behaviour in ("facts", "memorized sequences", "style"):
        for method in METHODS:
            assert f"| {behaviour} |" in text and f"| {method} |" in text
    assert (out / "behaviours.png").stat().st_size > 1000


def test_lds_every_method(tmp_path):
    report = tmp_path / "lds.md"
    lds.main([
        "--num_people", "2", "--epochs", "1", "--batch_size", "8", "--num_queries", "2",
        "--num_subsets", "4", "--projection_dim", "4", "--tail_k", "2", "--threads", "1",
        "--out", str(tmp_path / "lds"), "--report", str(report),
    ])  # fmt: skip
    text = report.read_text()
    for method in (
        "MAGIC", "TrackStar rows, cosine, preconditioner", "TrackStar rows, cosine, no "
        "preconditioner", "TrackStar rows, inner product, preconditioner", "TrackStar rows, "
        "inner product, no preconditioner", "gradient inner product (exact, final model)",
        "gradient cosine (exact, final model)", "EK-FAC", "mean hidden state cosine",
        "random documents (reference)",
    ):  # fmt: skip
        assert f"| {method} |" in text
    assert "Bergson" in text  # run, or skipped with the reason
    assert (tmp_path / "lds" / "magic.zarr").is_dir()
