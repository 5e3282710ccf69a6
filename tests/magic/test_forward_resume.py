"""Resume a MAGIC forward fit from a Lightning checkpoint: the same trajectory and scores.

Oracle: the uninterrupted fit (bitwise, float64). The fit is interrupted by an exception
after step 5 of 6; ModelCheckpoint saved at steps 2 and 4, and the resumed fit starts from
step 4, in the middle of the second epoch (``strategy="bergson"``'s loader resumes there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from magic_oracles import lightning_fit, tiny_model, tiny_query, tiny_rows
from torch.utils.data import DataLoader

from lightning_bergson import MagicModule
from lightning_bergson.strategy import BergsonSingleDeviceStrategy

OPTIONS = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.1}


class Interrupt(Callback):
    """Raise after the ``at``-th training batch (counting from 1)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("interrupted")


def _module(**kw) -> MagicModule:
    return MagicModule(tiny_model(), num_examples=6, **OPTIONS, **kw)


def _fit(mm: MagicModule, tmp: Path | None = None, *, stop: int = 0, ckpt: str | None = None,
         accumulate: int = 1, batch: int = 2):  # fmt: skip
    callbacks: list[Callback] = [Interrupt(stop)] if stop else []
    if tmp is not None:
        every = ModelCheckpoint(tmp, every_n_train_steps=2, save_top_k=-1, save_last=False)
        callbacks.append(every)
    return lightning_fit(
        mm,
        DataLoader(tiny_rows(), batch_size=batch),
        strategy=BergsonSingleDeviceStrategy(),  # resumable loader: resumes mid-epoch
        callbacks=callbacks,
        enable_checkpointing=tmp is not None,
        ckpt_path=ckpt,
        accumulate_grad_batches=accumulate,
    )


def _interrupted(mm: MagicModule, tmp: Path) -> str:
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(mm, tmp, stop=5)
    return str(tmp / "epoch=1-step=4.ckpt")


def _assert_same_trajectory(got, want) -> None:
    assert got.num_steps == want.num_steps and got.tokens == want.tokens
    for t in range(want.num_steps):
        for b_got, b_want in zip(got.batches[t], want.batches[t], strict=True):
            assert b_got.keys() == b_want.keys()
            assert all(torch.equal(b_got[k], b_want[k]) for k in b_want), t
    assert got.kept_steps == want.kept_steps
    for t in want.kept_steps:
        _assert_same_state(got.state(t), want.state(t))
    _assert_same_state(got.final, want.final)


def _assert_same_state(a, b) -> None:
    """Parameters, optimizer state, RNG state and step, bitwise."""
    assert a.step == b.step and torch.equal(a.rng, b.rng), a.step
    assert a.params.keys() == b.params.keys()
    mine, theirs = [*a.params.values(), *a.opt_leaves()], [*b.params.values(), *b.opt_leaves()]
    tensors = zip(mine, theirs, strict=True)
    assert all(torch.equal(x, y) for x, y in tensors), a.step


@pytest.fixture(scope="module")
def uninterrupted():
    mm = _module()  # default schedule "sqrt": kept steps 0, 3
    _fit(mm)
    return mm, mm.attribute(tiny_query())


def test_resume_from_disk_in_a_new_module_equals_the_uninterrupted_fit(tmp_path, uninterrupted):
    reference, expected = uninterrupted
    traj_dir = tmp_path / "trajectory"
    ckpt = _interrupted(_module(checkpoint_dir=str(traj_dir)), tmp_path / "ckpt")
    resumed = _module(checkpoint_dir=str(traj_dir))  # a new module, as in a new process
    torch.manual_seed(1234)  # a new process's RNG: the run's RNG state must come from disk
    trainer = _fit(resumed, ckpt=ckpt)
    assert trainer.global_step == 6
    _assert_same_trajectory(resumed.trajectory, reference.trajectory)
    assert torch.equal(resumed.attribute(tiny_query()), expected)
    # and what is on disk reopens as the same finished trajectory
    reopened = _module()
    reopened.load_trajectory(traj_dir)
    _assert_same_trajectory(reopened.trajectory, reference.trajectory)


@pytest.mark.parametrize("schedule", ["all", "log"])
def test_resume_in_memory_keeps_every_schedule_bitwise(tmp_path, uninterrupted, schedule):
    """The same module (same process) resumes from its in-memory trajectory."""
    reference, expected = uninterrupted
    mm = _module(checkpoint_schedule=schedule)
    ckpt = _interrupted(mm, tmp_path)
    assert mm.trajectory is not None and mm.trajectory.num_steps == 5  # past the checkpoint
    _fit(mm, ckpt=ckpt)
    assert mm.trajectory.num_steps == 6
    _assert_same_state(mm.trajectory.final, reference.trajectory.final)
    assert torch.equal(mm.attribute(tiny_query()), expected)


def test_an_in_memory_trajectory_cannot_resume_in_a_new_module(tmp_path):
    ckpt = _interrupted(_module(), tmp_path)
    with pytest.raises(RuntimeError, match=r"kept in memory.*MagicModule\(checkpoint_dir=\.\.\.\)"):
        _fit(_module(), ckpt=ckpt)


def test_another_runs_trajectory_is_refused(tmp_path):
    ckpt = _interrupted(_module(checkpoint_dir=str(tmp_path / "a")), tmp_path / "ckpt_a")
    other = MagicModule(tiny_model(), num_examples=6, **{**OPTIONS, "lr": 2e-2},
                        checkpoint_dir=str(tmp_path / "b"))  # fmt: skip
    _fit(other, tmp_path / "ckpt_b")  # flushed at the same steps, different weights
    with pytest.raises(RuntimeError, match="does not give this checkpoint's weights"):
        _fit(_module(checkpoint_dir=str(tmp_path / "b")), ckpt=ckpt)


def test_a_checkpoint_inside_an_accumulated_step_is_refused(tmp_path):
    class SaveAfterFirstMicroBatch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0 and trainer.current_epoch == 0:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    mm = _module(checkpoint_dir=str(tmp_path / "traj"))
    lightning_fit(
        mm,
        DataLoader(tiny_rows(), batch_size=1),
        accumulate_grad_batches=2,
        callbacks=[SaveAfterFirstMicroBatch()],
        max_steps=2,
    )
    with pytest.raises(ValueError, match="micro-batches of an accumulated step"):
        _fit(_module(checkpoint_dir=str(tmp_path / "traj")), ckpt=str(tmp_path / "mid.ckpt"))


def test_a_checkpoint_without_a_magic_record_is_refused(tmp_path):
    ckpt = _interrupted(_module(checkpoint_dir=str(tmp_path / "traj")), tmp_path)
    state = torch.load(ckpt, weights_only=True)
    del state["magic"]
    torch.save(state, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no MAGIC record"):
        _fit(_module(checkpoint_dir=str(tmp_path / "traj")), ckpt=str(tmp_path / "plain.ckpt"))
