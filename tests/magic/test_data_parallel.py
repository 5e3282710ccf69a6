"""Data-parallel MAGIC under DDP (2 gloo processes) equals one process with the global batch.

Oracle: the one-process fit (float64) on the same global batches; the ranks' schedules
agree bitwise with each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from magic_oracles import relative_error
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "magic_run.py"
sys.path.insert(0, str(SCRIPT.parent))
import magic_run  # noqa: E402


def _launch(out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out.parent,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one")
    magic_run.main(["--out", str(out), "--batch-size", "4", "--schedules", "all"])
    return load_file(out / "all.safetensors")


def _assert_close(got: dict, want: dict) -> None:
    for key, value in want.items():
        if key.startswith("param."):
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-13)
    assert relative_error(got["scores"], want["scores"]) <= 1e-10


def test_two_processes_equal_one_for_every_schedule(tmp_path, one_process):
    """Each rank trains on and replays its half of every global batch of 4."""
    _launch(tmp_path / "ddp", "--batch-size", "2", "--schedules", "all,sqrt,log")
    runs = {s: load_file(tmp_path / "ddp" / f"{s}.safetensors") for s in ("all", "sqrt", "log")}
    assert int(runs["all"]["world_size"]) == 2 and int(runs["all"]["global_step"]) == 4
    _assert_close(runs["all"], one_process)
    for schedule in ("sqrt", "log"):  # replays give the same steps bitwise, collectives too
        assert torch.equal(runs[schedule]["scores"], runs["all"]["scores"]), schedule


def test_two_processes_with_accumulation_equal_one(tmp_path, one_process):
    """Micro-batches of 1, k = 2, 2 ranks: global batches of 4 again."""
    _launch(tmp_path / "acc", "--batch-size", "1", "--accumulate", "2", "--schedules", "sqrt")
    _assert_close(load_file(tmp_path / "acc" / "sqrt.safetensors"), one_process)


def test_unsupported_strategies_and_fp16_loss_scaling_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lightning_bergson.magic.loop import check_strategy

    check_strategy(DDPStrategy(), 2)  # processes launched as scripts: supported
    with pytest.raises(RuntimeError, match=r"start_method='spawn'.*strategy='ddp'"):
        check_strategy(DDPStrategy(start_method="spawn"), 2)
    with pytest.raises(RuntimeError, match=r"ModelParallelStrategy.*sharded strategies"):
        check_strategy(ModelParallelStrategy(), 2)

    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_bergson.magic.loop import check_precision

    check_precision(MixedPrecision("bf16-mixed", "cpu"))  # no loss scaling: admitted
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(RuntimeError, match=r"precision='16-mixed'.*loss scaling"):
        check_precision(scaled)
