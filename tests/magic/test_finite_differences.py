"""MAGIC scores against central finite differences of retrained query losses (float64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from magic_oracles import central_difference, magic, tiny_batches, tiny_query, train

from lightning_bergson.magic import OptimizerConfig, reverse
from lightning_bergson.magic.reverse import metagradients

CONFIGS = {
    "sgd": OptimizerConfig("sgd", lr=0.5, momentum=0.9, weight_decay=0.01),
    "sgd-clip": OptimizerConfig("sgd", lr=0.5, momentum=0.9, max_grad_norm=0.1),
    "adamw": OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, warmup_steps=2),
    "adamw-clip": OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.1),
}


def _relative_error(scores: torch.Tensor, fd: torch.Tensor) -> float:
    return float(((scores - fd).abs() / fd.abs()).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_example_score_is_the_central_difference(name):
    cfg, batches, query = CONFIGS[name], tiny_batches(), tiny_query()
    scores = magic(cfg, batches, query, num_examples=6)  # (Q, N)
    fd = torch.stack([central_difference(cfg, batches, query, i, (6,)) for i in range(6)], 1)
    assert scores.shape == (2, 6) and scores.dtype == torch.float64
    assert _relative_error(scores, fd) <= 1e-4
    if cfg.max_grad_norm is not None:  # the clip is active, so it was differentiated through
        unclipped = dataclasses.replace(cfg, max_grad_norm=None)
        assert not torch.allclose(scores, magic(unclipped, batches, query, num_examples=6))


def test_token_scores_sum_to_example_scores_and_match_differences():
    cfg, batches, query = CONFIGS["adamw-clip"], tiny_batches(), tiny_query()
    per_example = magic(cfg, batches, query, num_examples=6)
    per_token = magic(cfg, batches, query, num_examples=6, granularity="token")  # (Q, N, S)
    assert per_token.shape == (2, 6, 6)
    torch.testing.assert_close(per_token.sum(-1), per_example, rtol=1e-10, atol=1e-14)
    assert per_token[:, :, 0].abs().max() == 0  # position 0 is never predicted
    for i, t in [(1, 3), (4, 2)]:
        fd = central_difference(cfg, batches, query, (i, t), (6, 6), granularity="token")
        assert _relative_error(per_token[:, i, t], fd) <= 1e-4


def test_checkpoint_schedules_give_the_same_scores(tmp_path):
    cfg, batches, query = CONFIGS["adamw-clip"], tiny_batches(num=18), tiny_query()  # 9 steps
    base = magic(cfg, batches, query, num_examples=18, schedule="all")
    for schedule in ("sqrt", "log"):
        scores = magic(cfg, batches, query, num_examples=18, schedule=schedule)
        assert torch.equal(scores, base), schedule  # replays recompute the same steps bitwise
    on_disk = magic(cfg, batches, query, num_examples=18, schedule="sqrt", directory=tmp_path)
    assert torch.equal(on_disk, base)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        f"step_{t:06d}.safetensors" for t in (0, 3, 6)
    ]


def test_dropout_is_replayed_from_the_checkpointed_rng_state():
    cfg, batches, query = CONFIGS["sgd"], tiny_batches(num=8), tiny_query()  # 4 steps
    scores = magic(cfg, batches, query, num_examples=8, schedule="log", dropout=0.2)
    plain = magic(cfg, batches, query, num_examples=8, schedule="log")
    assert not torch.allclose(scores, plain)  # dropout is active in training
    fd = torch.stack(
        [central_difference(cfg, batches, query, i, (8,), dropout=0.2) for i in (0, 5)], 1
    )
    assert _relative_error(scores[:, [0, 5]], fd) <= 1e-4


def test_interrupted_reverse_pass_resumes_to_the_same_scores(tmp_path, monkeypatch):
    cfg, batches, query = CONFIGS["adamw"], tiny_batches(num=10), tiny_query()  # 5 steps
    trainer, traj = train(cfg, batches, directory=tmp_path / "run")
    expected = metagradients(trainer, traj, query, num_examples=10)
    state_path = tmp_path / "reverse.safetensors"
    real_vjp, calls = reverse.vjp_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_vjp(*args, **kwargs)

    monkeypatch.setattr(reverse, "vjp_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        metagradients(trainer, traj, query, num_examples=10, state_path=state_path, save_every=2)
    assert reverse.ReverseState.load(state_path, torch.device("cpu")).next_step == 2
    monkeypatch.setattr(reverse, "vjp_step", real_vjp)
    # resume in a "new process": the trajectory is reopened from disk
    reopened = type(traj).load(tmp_path / "run", like=trainer.init_state())
    resumed = metagradients(trainer, reopened, query, num_examples=10, state_path=state_path)
    torch.testing.assert_close(resumed, expected, rtol=1e-12, atol=0)
    assert not state_path.exists()  # removed once the pass is complete
    with pytest.raises(ValueError, match="belongs to another run"):
        reverse.ReverseState(0, [], torch.zeros(1, 10), "other").save(state_path)
        metagradients(trainer, traj, query, num_examples=10, state_path=state_path)


def test_queries_in_one_pass_equal_each_query_alone():
    """Several queries share the replays and the traced step of one reverse pass."""
    cfg, batches, query = CONFIGS["adamw-clip"], tiny_batches(num=8), tiny_query(num=3)
    trainer, traj = train(cfg, batches)
    together = metagradients(trainer, traj, query, num_examples=8)  # (3, 8)
    alone = torch.cat(
        [
            metagradients(
                trainer, traj, {k: v[q : q + 1] for k, v in query.items()}, num_examples=8
            )
            for q in range(3)
        ]
    )
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-16)
