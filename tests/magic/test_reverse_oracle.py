"""The reverse pass against plain autograd through the whole unrolled training (float64).

Oracle: the training run traced end to end with the data weights as a leaf (each step's
gradient with ``create_graph``, torchopt's own differentiable update after the same clip),
and one ``torch.autograd.grad`` of the final query losses with respect to the weights. No
checkpoints, replays or adjoints: an independent route to the same derivative, exact to
rounding, and fast (a second a case), so it also serves as the mutation-testing selection of
``magic/reverse.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
from magic_oracles import tiny_batches, tiny_model, tiny_query

from lightning_bergson.magic import OptimizerConfig
from lightning_bergson.magic.functional import (
    batch_weights,
    clip_by_global_norm,
    make_optimizer,
    step_tokens,
)
from lightning_bergson.magic.reverse import ReverseState, metagradients, replay
from lightning_bergson.magic.step import FunctionalTrainer, TrainState, step_dtype
from lightning_bergson.magic.trajectory import Trajectory

CONFIGS = {
    "sgd": OptimizerConfig("sgd", lr=0.5, momentum=0.9, weight_decay=0.01),
    "adamw-clip": OptimizerConfig(
        "adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.1, warmup_steps=2
    ),
}
NUM, SEQ = 6, 6


def _steps(micro: int, epochs: int = 1, batch: int = 2) -> list[list[dict]]:
    """Steps of ``batch`` examples (three a pass for 2), as one batch each or (``micro=2``)
    as two micro-batches of one; ``epochs`` passes over the examples."""
    batches = tiny_batches(num=NUM, batch=batch, seq=SEQ) * epochs
    if micro == 1:
        return [[b] for b in batches]
    return [[{k: v[i : i + 1] for k, v in b.items()} for i in range(2)] for b in batches]


def _record(cfg, granularity, steps, schedule, weights=None, directory=None):
    """The package's forward training (what MagicModule runs), recorded for the reverse pass."""
    trainer = FunctionalTrainer(tiny_model(), cfg, granularity)
    state = trainer.init_state(torch.manual_seed(7).get_state())
    traj = Trajectory(len(steps), schedule, directory)
    like = next(iter(state.params.values()))
    for micro in steps:
        traj.record(state, micro)
        ws = [batch_weights(weights, b["example_id"], SEQ, granularity, like) for b in micro]
        state, _ = trainer.step(state, micro, ws, num_tokens=step_tokens(micro))
    traj.finish(state)
    return trainer, traj


def _oracle(cfg, granularity, steps, query, per_query=True, at=None):
    """``d query_loss / d w`` at ``w = at`` (default 1) by autograd through every step."""
    trainer = FunctionalTrainer(tiny_model(), cfg, granularity)
    state = trainer.init_state(torch.manual_seed(7).get_state())
    shape = (NUM,) if granularity == "example" else (NUM, SEQ)
    w = torch.ones(shape, dtype=torch.float64) if at is None else at.clone()
    w.requires_grad_()
    transform = make_optimizer(cfg)
    params = dict(state.params)
    opt_state = transform.init(params)
    for micro in steps:
        leaves = {k: v if v.requires_grad else v.requires_grad_() for k, v in params.items()}
        with trainer.context(TrainState(leaves, None, state.rng, 0)):
            total = None
            for b in micro:
                wb = batch_weights(w, b["example_id"], SEQ, granularity, w)
                g, _ = trainer.gradient(leaves, [b], [wb], step_tokens(micro), create_graph=True)
                total = g if total is None else [x + y for x, y in zip(total, g, strict=True)]
        if cfg.max_grad_norm is not None:
            total = clip_by_global_norm(total, cfg.max_grad_norm)
        with step_dtype(leaves.values()):
            updates, opt_state = transform.update(
                dict(zip(leaves, total, strict=True)), opt_state, params=leaves, inplace=False
            )
        params = {k: leaves[k] + updates[k] for k in leaves}
    losses = trainer.query_losses(params, query, per_query=per_query)
    rows = [torch.autograd.grad(loss, w, retain_graph=True)[0] for loss in losses]
    return torch.stack(rows)


def _close(got, want):
    assert got.shape == want.shape and got.dtype == torch.float64
    assert want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().amax()))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("granularity", ["example", "token"])
@pytest.mark.parametrize("schedule", ["all", "sqrt", "log"])
def test_scores_are_autograd_through_the_unrolled_training(name, granularity, schedule):
    # 12 steps: sqrt and log keep few states, so the pass replays and keeps states on the way
    cfg, steps, query = CONFIGS[name], _steps(1, epochs=2, batch=1), tiny_query()
    trainer, traj = _record(cfg, granularity, steps, schedule)
    got = metagradients(trainer, traj, query, num_examples=NUM)
    _close(got, _oracle(cfg, granularity, steps, query))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_micro_batches_and_the_aggregate_query(name):
    cfg, steps, query = CONFIGS[name], _steps(2), tiny_query(3)
    trainer, traj = _record(cfg, "example", steps, "sqrt")
    _close(
        metagradients(trainer, traj, query, num_examples=NUM), _oracle(cfg, "example", steps, query)
    )
    aggregate = metagradients(trainer, traj, query, num_examples=NUM, per_query=False)
    _close(aggregate, _oracle(cfg, "example", steps, query, per_query=False))


def test_data_weights_move_the_point_the_scores_are_taken_at():
    # Scores at w != 1 differ from those at w = 1: the reverse pass replays with the forward
    # run's weights. Oracle: autograd through the unrolled training at that w.
    cfg, steps, query = CONFIGS["sgd"], _steps(1), tiny_query()
    w = torch.linspace(0.5, 1.5, NUM, dtype=torch.float64)
    trainer, traj = _record(cfg, "example", steps, "sqrt", weights=w)
    at_w = metagradients(trainer, traj, query, num_examples=NUM, data_weights=w)
    trainer1, traj1 = _record(cfg, "example", steps, "sqrt")
    at_1 = metagradients(trainer1, traj1, query, num_examples=NUM)
    assert not torch.allclose(at_w, at_1)
    _close(at_w, _oracle(cfg, "example", steps, query, at=w))


def test_replay_reaches_the_recorded_final_state():
    cfg, steps = CONFIGS["adamw-clip"], _steps(2)
    weights = torch.linspace(0.5, 1.5, NUM, dtype=torch.float64)
    trainer, traj = _record(cfg, "example", steps, "all", weights=weights)
    for start in (0, 1):  # from the first state and from a later kept one
        state = replay(trainer, traj, traj.state(start), traj.num_steps, data_weights=weights)
        assert state.step == traj.num_steps
        for k, v in traj.final.params.items():
            assert torch.equal(state.params[k], v), (start, k)
    unweighted = replay(trainer, traj, traj.state(0), traj.num_steps)
    assert not torch.equal(unweighted.params[k], traj.final.params[k])


@pytest.mark.parametrize(
    ("schedule", "kept", "replayed"),
    [
        ("all", list(range(12)), 0),
        # sqrt: segments 0-3, 4-7, 8-11; the walk down keeps every state of a segment on
        # the way, so each state that was not kept is recomputed exactly once: 12 - 3.
        ("sqrt", [0, 4, 8], 9),
        # log bisects: target 7 from 5 keeps 6 (2 steps); target 4 from 0 keeps 2, then 3
        # (4 steps); targets 6, 3, 2 are kept; target 1 from 0 (1 step): 2 + 4 + 1.
        ("log", [0, 5, 8, 9, 10, 11], 7),
    ],
)
def test_the_walk_down_replays_each_step_as_few_times_as_its_schedule_allows(
    schedule, kept, replayed
):
    # The scores are the same however states are recomputed; the cost is not. Recomputing
    # every state from its checkpoint (no state kept on the way) is quadratic per segment.
    cfg, steps, query = CONFIGS["sgd"], _steps(1, epochs=2, batch=1), tiny_query()
    trainer, traj = _record(cfg, "example", steps, schedule)
    assert traj.kept_steps == kept
    real, calls = trainer.step, []

    def counting(*args, **kwargs):
        calls.append(args[0].step)
        return real(*args, **kwargs)

    trainer.step = counting
    metagradients(trainer, traj, query, num_examples=NUM)
    assert len(calls) == replayed, calls


def _interrupted(trainer, traj, query, path, after, **kwargs):
    """Run a pass that stops (KeyboardInterrupt) before VJP number ``after + 1``."""
    import lightning_bergson.magic.reverse as reverse_mod

    real, calls = reverse_mod.vjp_step, []

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kw)

    reverse_mod.vjp_step = stopping
    try:
        with pytest.raises(KeyboardInterrupt):
            metagradients(trainer, traj, query, num_examples=NUM, state_path=path, **kwargs)
    finally:
        reverse_mod.vjp_step = real


def test_a_saved_reverse_state_round_trips_and_resumes_to_the_same_scores(tmp_path):
    cfg, steps, query = CONFIGS["adamw-clip"], _steps(1), tiny_query()
    trainer, traj = _record(cfg, "example", steps, "log")
    want = metagradients(trainer, traj, query, num_examples=NUM)
    path = tmp_path / "new" / "dirs" / "reverse.safetensors"  # made when first saved
    _interrupted(trainer, traj, query, path, after=1, save_every=1)  # one VJP done and saved
    on_meta = ReverseState.load(path, torch.device("meta"))
    assert on_meta.scores.device.type == "meta"
    assert all(a.device.type == "meta" for adj in on_meta.adjoints for a in adj)
    saved = ReverseState.load(path, torch.device("cpu"))
    assert saved.next_step == traj.num_steps - 2  # the last step's VJP is done
    assert saved.scores.abs().sum() > 0 and len(saved.adjoints) == len(query["input_ids"])
    got = metagradients(trainer, traj, query, num_examples=NUM, state_path=path, save_every=1)
    assert torch.equal(got, want)
    assert not path.exists()  # removed when the pass finishes
    # a state of another run is refused by name
    saved.fingerprint = "0" * 16
    saved.save(path)
    with pytest.raises(ValueError, match=r"reverse\.safetensors belongs to another run"):
        metagradients(trainer, traj, query, num_examples=NUM, state_path=path, save_every=1)


def test_states_are_saved_every_save_every_steps(tmp_path):
    cfg, steps, query = CONFIGS["sgd"], _steps(1), tiny_query()
    trainer, traj = _record(cfg, "example", steps, "all")
    path = tmp_path / "reverse.safetensors"
    _interrupted(trainer, traj, query, path, after=1, save_every=2)
    assert not path.exists()  # one VJP: nothing saved yet
    _interrupted(trainer, traj, query, path, after=2, save_every=2)
    assert ReverseState.load(path, torch.device("cpu")).next_step == traj.num_steps - 3
    want = metagradients(trainer, traj, query, num_examples=NUM)
    got = metagradients(trainer, traj, query, num_examples=NUM, state_path=path, save_every=2)
    assert torch.equal(got, want)


def test_a_state_of_another_query_weights_or_reduction_is_refused(tmp_path):
    cfg, steps, query = CONFIGS["sgd"], _steps(1), tiny_query()
    trainer, traj = _record(cfg, "example", steps, "all")
    path = tmp_path / "reverse.safetensors"
    _interrupted(trainer, traj, query, path, after=1, save_every=1)
    other = {k: v.flip(0) for k, v in query.items()}
    weights = torch.ones(NUM, dtype=torch.float64)
    weights[0] = 2.0
    for kwargs in (
        {"query": other},
        {"query": query, "per_query": False},
        {"query": query, "data_weights": weights},
        {"query": query, "num_examples": NUM + 1},  # scores of another shape
    ):
        kw = {"num_examples": NUM, "state_path": path, "save_every": 1, **kwargs}
        with pytest.raises(ValueError, match=r"belongs to another run \(fingerprint"):
            metagradients(trainer, traj, **kw)
    # the same arguments resume it
    want = metagradients(trainer, traj, query, num_examples=NUM)
    got = metagradients(trainer, traj, query, num_examples=NUM, state_path=path, save_every=1)
    assert torch.equal(got, want)


def test_ranks_that_recorded_different_step_counts_are_refused():
    # One rank of two, in process: the group's only collective here (an all-reduce max of
    # [n, -n]) answers as if the other rank had recorded one step more.
    from lightning_bergson.magic.distributed import DataParallel

    class OtherRankHasOneMore(DataParallel):
        def __init__(self) -> None:
            self.rank, self.world_size = 0, 2

        def _max(self, values):
            other = [values[0] + 1, -(values[0] + 1)]
            return [max(a, b) for a, b in zip(values, other, strict=True)]

    trainer, traj = _record(CONFIGS["sgd"], "example", _steps(1), "all")
    trainer.group = OtherRankHasOneMore()
    n = traj.num_steps
    msg = f"ranks disagree on the number of recorded steps (from {n} to {n + 1})"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        metagradients(trainer, traj, tiny_query(), num_examples=NUM)


class _MirroredRanks:
    """One rank of two whose other rank holds the very same shards, simulated in process:
    every cross-rank sum doubles (exact in binary), every max is this rank's own value
    except ``max_int``, where the other rank's batches are ``longer`` tokens longer."""

    rank, world_size = 0, 2

    def __init__(self, longer: int = 0) -> None:
        self.longer = longer

    def sum(self, tensors):
        return [2 * t for t in tensors]

    def sum_int(self, value):
        return 2 * value

    def max_int(self, value):
        return value + self.longer

    def same_int(self, value, what):
        pass


def _record_mirrored(cfg, granularity, steps, schedule, group):
    trainer = FunctionalTrainer(tiny_model(), cfg, granularity, group=group)
    state = trainer.init_state(torch.manual_seed(7).get_state())
    traj = Trajectory(len(steps), schedule)
    like = next(iter(state.params.values()))
    for micro in steps:
        tokens = 2 * step_tokens(micro)  # the step's supervised tokens over both ranks
        traj.record(state, micro, num_tokens=tokens)
        ws = [batch_weights(None, b["example_id"], SEQ, granularity, like) for b in micro]
        state, _ = trainer.step(state, micro, ws, num_tokens=tokens)
    traj.finish(state)
    return trainer, traj


@pytest.mark.parametrize("granularity", ["example", "token"])
def test_two_ranks_with_the_same_shards_score_as_one_process(granularity, tmp_path):
    # Each rank's VJP carries half of every example's derivative (its loss is half of the
    # global token mean); the pass must sum the ranks' scores, reduce the longest batch over
    # ranks for per-token scores, and keep a state file per rank. Oracle: one process.
    cfg, steps, query = CONFIGS["adamw-clip"], _steps(2), tiny_query()
    trainer, traj = _record(cfg, granularity, steps, "sqrt")
    want = metagradients(trainer, traj, query, num_examples=NUM)
    group = _MirroredRanks(longer=2 if granularity == "token" else 0)
    trainer2, traj2 = _record_mirrored(cfg, granularity, steps, "sqrt", group)
    replayed = replay(trainer2, traj2, traj2.state(0), traj2.num_steps)  # global token counts
    for k, v in traj.final.params.items():
        assert torch.equal(traj2.final.params[k], v), k
        assert torch.equal(replayed.params[k], v), k
    path = tmp_path / "reverse.safetensors"
    _interrupted(trainer2, traj2, query, path, after=1, save_every=1)
    assert (tmp_path / "reverse.rank0.safetensors").is_file() and not path.exists()
    got = metagradients(trainer2, traj2, query, num_examples=NUM, state_path=path, save_every=1)
    if granularity == "token":  # the other rank's longer batches widen the scores
        assert got.shape == (*want.shape[:2], SEQ + 2)
        assert not got[..., SEQ:].any()
        got = got[..., :SEQ]
    _close(got, want)


def test_a_file_that_is_not_a_reverse_state_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    msg = f"{path} is not a MAGIC reverse state; delete it or pick a new path"
    with pytest.raises(ValueError) as err:
        ReverseState.load(path, torch.device("cpu"))
    assert str(err.value) == msg
    trainer, traj = _record(CONFIGS["sgd"], "example", _steps(1), "all")
    with pytest.raises(ValueError, match="is not a MAGIC reverse state"):
        metagradients(trainer, traj, tiny_query(), num_examples=NUM, state_path=path)


def test_an_unfinished_trajectory_is_refused():
    cfg = CONFIGS["sgd"]
    trainer = FunctionalTrainer(tiny_model(), cfg, "example")
    traj = Trajectory(3, "all", None)
    with pytest.raises(RuntimeError, match=r"^the trajectory is not finished; train \(fit\)"):
        metagradients(trainer, traj, tiny_query(), num_examples=NUM)


def test_each_rank_keeps_its_own_state_file(tmp_path):
    from types import SimpleNamespace

    from lightning_bergson.magic.reverse import _rank_path

    path = tmp_path / "dir" / "state.safetensors"
    assert _rank_path(None, None) is None
    assert _rank_path(str(path), None) == path
    rank1 = SimpleNamespace(rank=1)
    assert _rank_path(path, rank1) == tmp_path / "dir" / "state.rank1.safetensors"


def test_token_scores_take_the_longest_batch_or_the_given_length():
    cfg, steps, query = CONFIGS["adamw-clip"], _steps(1), tiny_query()
    trainer, traj = _record(cfg, "token", steps, "sqrt")
    default = metagradients(trainer, traj, query, num_examples=NUM)
    assert default.shape == (2, NUM, SEQ)
    longer = metagradients(trainer, traj, query, num_examples=NUM, seq_len=SEQ + 3)
    assert longer.shape == (2, NUM, SEQ + 3)
    assert torch.equal(longer[..., :SEQ], default) and not longer[..., SEQ:].any()
    weights = torch.ones(NUM, SEQ + 2, dtype=torch.float64)
    trainer, traj = _record(cfg, "token", steps, "sqrt", weights=weights)
    from_weights = metagradients(trainer, traj, query, num_examples=NUM, data_weights=weights)
    assert from_weights.shape == (2, NUM, SEQ + 2)
    assert torch.equal(from_weights[..., :SEQ], default)


def test_a_state_without_queries_round_trips(tmp_path):
    state = ReverseState(3, [], torch.zeros(0, NUM, dtype=torch.float64), "f" * 16)
    state.save(tmp_path / "s.safetensors")
    back = ReverseState.load(tmp_path / "s.safetensors", torch.device("cpu"))
    assert (back.next_step, back.adjoints, back.fingerprint) == (3, [], "f" * 16)
    assert back.scores.shape == (0, NUM)


def test_a_state_path_alone_saves_nothing(tmp_path):
    # save_every defaults to 0: a state path without it is only read (to resume), never written.
    trainer, traj = _record(CONFIGS["sgd"], "example", _steps(1), "all")
    path = tmp_path / "reverse.safetensors"
    _interrupted(trainer, traj, tiny_query(), path, after=2)
    assert not path.exists()
