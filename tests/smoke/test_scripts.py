"""Every example and benchmark script runs at a tiny size and prints what it promises.

These are not measurements (no figure is checked against a target; the machine is shared):
they keep the scripts behind the README's figures from rotting. ``-m "not smoke"`` skips them.
``examples/lds.py`` (smoke-tested in ``tests/examples/``) and ``benchmarks/magic_cost.py`` are
left to their owners.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.smoke

TINY_LM = ["--hidden", "16", "--layers", "1", "--vocab", "64", "--seq-len", "8"]


def run_script(script: str, *args: str, cwd: Path, timeout: int = 600) -> str:
    """Run ``script`` with this interpreter and the checkout on the path; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_capture_overhead(tmp_path):
    out = run_script(
        "benchmarks/capture_overhead.py", *TINY_LM, "--heads", "2", "--batch-size", "2",
        "--steps", "2", "--repeats", "1", "--threads", "1", cwd=tmp_path,
    )  # fmt: skip
    lines = ("plain fit", "fit + capture", "overhead ratio", "CPU time ratio", "projection floor")
    for line in (*lines, "written"):
        assert line in out, line
    assert "written         4 rows x" in out  # 2 steps of 2 examples


def test_ddp_overhead(tmp_path):
    out = run_script(
        "benchmarks/ddp_overhead.py", *TINY_LM, "--batch-size", "4", "--steps", "2",
        "--repeats", "1", cwd=tmp_path,
    )  # fmt: skip
    assert "1 process" in out and "2 DDP (gloo)" in out
    assert out.count("overhead ratio") == 2


def test_scan_throughput(tmp_path):
    out = run_script(
        "benchmarks/scan_throughput.py", "--gigabytes", "0.001", "--dim", "256", "--repeats", "1",
        "--threads", "1", cwd=tmp_path,
    )  # fmt: skip
    for line in ("Attributor.search (on disk):", "in-memory matmul + topk:", "ratio:",
                 "search without checksums:", "checksum ratio:"):  # fmt: skip
        assert line in out, line


@pytest.mark.compare
def test_ekfac_vs_kronfluence(tmp_path):
    pytest.importorskip("kronfluence")
    out = run_script(
        "benchmarks/ekfac_vs_kronfluence.py", "--num_train", "8", "--num_query", "2",
        "--seq_len", "8", "--batch_size", "4", "--hidden", "16", "--layers", "1", "--heads", "2",
        "--vocab", "32", "--threads", "1", cwd=tmp_path,
    )  # fmt: skip
    assert "ratio ours/kronfluence" in out and "per-query Spearman ours vs kronfluence" in out
    spearman = float(out.split("per-query Spearman ours vs kronfluence: min ")[1].split(",")[0])
    assert spearman > 0.99  # the two implementations agree at any size
    assert "EK-FAC approximation error to the exact empirical Fisher block" in out


def test_index_vs_bergson(tmp_path):
    out = run_script("benchmarks/index_vs_bergson.py", "--smoke", "--threads", "1", cwd=tmp_path)
    assert "== smoke:" in out and "loop / floor" in out
    assert ("wall, ours / Bergson" in out) or ("Bergson not installed" in out)


def test_fact_tracing(tmp_path):
    report = tmp_path / "fact_tracing.md"
    out = run_script(
        "examples/fact_tracing.py", "--people", "3", "--epochs", "1", "--hidden", "16",
        "--layers", "1", "--batch_size", "8", "--projection_dim", "4", "--threads", "1",
        "--workdir", str(tmp_path / "work"), "--out", str(report), cwd=tmp_path,
    )  # fmt: skip
    text = report.read_text()
    assert text in out  # printed and written
    assert "| method | recall@1 | recall@5 | recall@10 | MRR |" in text
    for method in ("captured rows, preconditioner", "post-hoc final model", "BM25",
                   "mean hidden state cosine"):  # fmt: skip
        assert method in text, method
    assert "12 facts" in text  # 3 people x 4 facts


def test_magic_hvp(tmp_path):
    out = run_script(
        "benchmarks/magic_hvp.py", "--hidden", "16", "--layers", "1", "--vocab", "32",
        "--batch_size", "2", "--seq_len", "6", "--repeats", "1", cwd=tmp_path,
    )  # fmt: skip
    for line in ("plain step", "reverse-over-reverse", "forward-over-reverse", "H c agrees"):
        assert line in out, line
