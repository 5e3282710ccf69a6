"""``score --devices 2 --strategy ddp``: the command as a Lightning loop on 2 processes,
writing its score array to the local S3 server, equals the one-process command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_bergson.cli import main
from lightning_bergson.scores import ScoreArray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A shrunk quickstart fit (as tests/cli does): a checkpoint and its gradient store."""
    tmp = tmp_path_factory.mktemp("quick")
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, default_root_dir=str(tmp), enable_progress_bar=False)
    cfg["trainer"]["callbacks"][0]["init_args"]["path"] = str(tmp / "grads.zarr")
    cfg["data"]["init_args"].update(num_people=6, cache_dir=str(tmp / "cache"))
    (tmp / "quick.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp / "quick.yaml")])
    return tmp


def test_score_on_two_processes_equals_one(run, bucket):
    args = ["score", "--store", str(run / "grads.zarr"), "--model", str(run), "--fact", "all"]
    args += ["--example_reduce", "none"]
    main([*args, "--out", str(run / "one.zarr")])  # one process, no Lightning loop
    url = f"{bucket}/two.zarr"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_bergson", *args, "--out", url, "--devices", "2",
         "--strategy", "ddp"],
        capture_output=True, text=True, timeout=400, cwd=run,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("written to") == 1  # rank 0 reports, once
    one, two = ScoreArray.open(run / "one.zarr"), ScoreArray.open(url)
    assert two.scores.shape == one.scores.shape and one.scores.shape[1] > 1
    np.testing.assert_allclose(two.scores, one.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(two.example_ids, one.example_ids)
    assert two.header.metadata["queries"] == one.header.metadata["queries"]


def test_score_loop_refuses_a_row_reduction(run, bucket, capsys):
    args = ["score", "--store", str(run / "grads.zarr"), "--model", str(run), "--fact", "0"]
    with pytest.raises(SystemExit):
        main([*args, "--out", f"{bucket}/r.zarr", "--strategy", "ddp"])
    assert "example_reduce='none'" in capsys.readouterr().err
