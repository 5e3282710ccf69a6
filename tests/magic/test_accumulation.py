"""MAGIC with Trainer(accumulate_grad_batches=k): one step takes all k micro-batches.

Oracles: the same examples as one batch per step (accumulation 1), and float64 central
differences of retrains with accumulation.
"""

from __future__ import annotations

import pytest
import torch
from magic_oracles import lightning_fit, tiny_batches, tiny_model, tiny_query

from lightning_bergson import MagicModule

OPTIONS = {
    "sgd": {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9},
    "adamw-clip": {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.1},
}


def _fit(options: dict, batch: int, accumulate: int, **kw) -> MagicModule:
    mm = MagicModule(tiny_model(), num_examples=6, **options, **kw)
    lightning_fit(mm, tiny_batches(batch=batch), accumulate_grad_batches=accumulate)
    return mm


# (micro-batch size, k): 6 examples per epoch, so (2, 2) ends each epoch with a short
# step of one micro-batch, which is one batch of 2 without accumulation.
@pytest.mark.parametrize(
    ("name", "granularity", "micro", "k"),
    [("sgd", "example", 1, 2), ("adamw-clip", "example", 2, 2), ("adamw-clip", "token", 1, 3)],
)
def test_k_micro_batches_train_and_score_as_one_batch(name, granularity, micro, k):
    """Uneven sequence lengths: each micro-batch is normalized by the step's tokens."""
    one = _fit(OPTIONS[name], micro * k, 1, weight_granularity=granularity)
    acc = _fit(OPTIONS[name], micro, k, weight_granularity=granularity)
    ref, got = one.trajectory, acc.trajectory
    assert ref is not None and got is not None and got.num_steps == ref.num_steps
    assert acc.trainer.global_step == got.num_steps  # Lightning counts MAGIC steps
    assert acc.trainer.accumulate_grad_batches == k  # given back after Lightning's check
    for t in range(got.num_steps):  # the micro-batches of each step are recorded
        joined = torch.cat([b["example_id"] for b in got.batches[t]])
        assert torch.equal(joined, ref.batches[t][0]["example_id"]), t
        assert len(got.batches[t]) == -(-len(joined) // micro)
    assert got.tokens == ref.tokens
    for key, value in ref.final.params.items():
        torch.testing.assert_close(got.final.params[key], value, rtol=1e-12, atol=1e-15)
    query = tiny_query()
    expected = one.attribute(query)
    torch.testing.assert_close(acc.attribute(query), expected, rtol=1e-12, atol=1e-16)
    assert expected.reshape(*expected.shape[:2], -1).abs().sum(2).min() > 0  # every example


@pytest.mark.parametrize("name", list(OPTIONS))
def test_accumulated_scores_are_central_differences(name):
    """Micro-batches of 2, k = 2: steps of 4 then 2 examples; retrains accumulate too."""
    scores = _fit(OPTIONS[name], 2, 2).attribute(tiny_query())
    h, query = 1e-5, tiny_query()
    for i in (0, 3, 5):  # first and second micro-batch of a step, and the short step
        losses = []
        for sign in (1, -1):
            w = torch.ones(6, dtype=torch.float64)
            w[i] += sign * h
            losses.append(_fit(OPTIONS[name], 2, 2, data_weights=w).query_loss(query))
        fd = (losses[0] - losses[1]) / (2 * h)
        scale = torch.maximum(
            fd.abs(), 1e-2 * scores.abs().max(1).values
        )  # as in test_magic_module
        assert float(((scores[:, i] - fd).abs() / scale).max()) <= 1e-6, (name, i)


def test_steps_count_for_max_steps_and_the_checkpoint_plan():
    mm = MagicModule(tiny_model(), num_examples=6, **OPTIONS["sgd"])
    trainer = lightning_fit(mm, tiny_batches(batch=1), accumulate_grad_batches=2, max_steps=4)
    assert mm.trajectory is not None and mm.trajectory.num_steps == 4 == trainer.global_step
    assert mm.trajectory.planned == 4  # min(max_steps, 2 epochs x ceil(6 / 2))
    assert [len(step) for step in mm.trajectory.batches] == [2, 2, 2, 2]


def test_scores_match_the_pure_path_with_micro_batches():
    """The Lightning fit and a hand-driven FunctionalTrainer over the same micro-batches."""
    from lightning_bergson.magic import OptimizerConfig
    from lightning_bergson.magic.reverse import metagradients
    from lightning_bergson.magic.step import FunctionalTrainer
    from lightning_bergson.magic.trajectory import Trajectory

    mm = _fit(OPTIONS["adamw-clip"], 2, 2, checkpoint_schedule="all")
    cfg = OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.1)
    step_fn = FunctionalTrainer(tiny_model(), cfg)
    state = step_fn.init_state(mm.trajectory.state(0).rng)
    batches = tiny_batches()
    steps = [batches[:2], batches[2:]] * 2  # two epochs of (4 examples, 2 examples)
    traj = Trajectory(len(steps), "sqrt")
    for micro in steps:
        traj.record(state, micro)
        ones = [torch.ones(2, dtype=torch.float64)] * len(micro)
        state, _ = step_fn.step(state, micro, ones)
    traj.finish(state)
    expected = metagradients(step_fn, traj, tiny_query(), num_examples=6)
    assert torch.equal(mm.attribute(tiny_query()), expected)
