"""MagicModule under a Lightning Trainer: same scores as the pure path, retrains, errors."""

from __future__ import annotations

import pytest
import torch
from magic_oracles import tiny_batches, tiny_model, tiny_query, train
from recipes import trainer
from torch.utils.data import DataLoader

from lightning_bergson import MagicModule
from lightning_bergson.magic import OptimizerConfig, metagradients

OPTIONS = {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.1}


def _fit(
    module: MagicModule,
    batches: list[dict],
    epochs: int = 2,
    precision: str = "32-true",
    accumulate: int = 1,
) -> MagicModule:
    trainer(max_epochs=epochs, precision=precision, accumulate=accumulate).fit(
        module, DataLoader(batches, batch_size=None)
    )
    return module


def test_lightning_fit_attribute_and_retrains_follow_the_pure_path():
    batches, query = tiny_batches(), tiny_query()
    mm = _fit(
        MagicModule(tiny_model(), num_examples=6, checkpoint_schedule="log", **OPTIONS), batches
    )
    scores = mm.attribute(query)  # (Q, N)

    cfg = OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.1)
    step_fn, traj = train(cfg, batches + batches)  # two epochs of the same batches
    assert mm.trajectory is not None and mm.trajectory.num_steps == 6
    for name, param in mm.model.named_parameters():  # the network holds the final weights
        torch.testing.assert_close(param, traj.final.params[name], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        scores, metagradients(step_fn, traj, query, num_examples=6), rtol=1e-9, atol=0
    )
    # aggregate query loss = token-weighted mean of the per-query losses (linearity)
    tokens = (query["labels"][:, 1:] != -100).sum(1).double()
    aggregate = mm.attribute(query, per_query=False)  # (N,)
    torch.testing.assert_close(aggregate, (tokens / tokens.sum()) @ scores, rtol=1e-9, atol=0)

    # the same module retrains with data weights: central difference on example 4
    h, losses = 1e-5, []
    for sign in (1, -1):
        w = torch.ones(6, dtype=torch.float64)
        w[4] += sign * h
        retrained = MagicModule(tiny_model(), num_examples=6, data_weights=w, **OPTIONS)
        losses.append(_fit(retrained, batches).query_loss(query))
    fd = (losses[0] - losses[1]) / (2 * h)
    assert float(((scores[:, 4] - fd).abs() / fd.abs()).max()) <= 1e-4


# Through L.Trainer with precision="64-true" (Lightning makes float64 the default dtype
# inside training_step, not in the reverse pass): default eps_root, a clip that is active.
LIGHTNING = {
    "sgd": {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9},
    "sgd-clip": {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "max_grad_norm": 0.1},
    "adamw": {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1},
    "adamw-clip": {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.1},
}


def _lightning_scores(options: dict, accumulate: int = 1, **kw) -> tuple[MagicModule, torch.Tensor]:
    """6 steps: batches of 2, or (accumulate=2) two micro-batches of 1 per step."""
    mm = MagicModule(tiny_model(), num_examples=6, **options, **kw)
    batches = tiny_batches(batch=2 // accumulate)
    _fit(mm, batches, precision="64-true", accumulate=accumulate)
    return mm, mm.attribute(tiny_query())


@pytest.mark.parametrize(("name", "accumulate"), [("sgd", 1), ("adamw-clip", 1), ("adamw-clip", 2)])
def test_lightning_scores_do_not_depend_on_the_checkpoint_schedule(name, accumulate, tmp_path):
    mm, base = _lightning_scores(LIGHTNING[name], accumulate, checkpoint_schedule="all")
    assert mm.trajectory is not None and mm.trajectory.kept_steps == list(range(6))
    for schedule in ("sqrt", "log"):
        for where in (None, tmp_path / schedule):
            run, scores = _lightning_scores(
                LIGHTNING[name], accumulate, checkpoint_schedule=schedule, checkpoint_dir=where
            )
            assert run.trajectory is not None and len(run.trajectory.kept_steps) < 6
            assert torch.equal(scores, base), (schedule, where)  # bitwise


@pytest.mark.parametrize("name", list(LIGHTNING))
def test_lightning_scores_are_float64_central_differences(name):
    _, scores = _lightning_scores(LIGHTNING[name])  # default schedule "sqrt"
    # h = 1e-5: O(h^2) error ~1e-9 with the default eps_root (at eps_root=1e-8 Adam is
    # curved enough to leave 3e-6; h = 1e-6 brings that to 3e-8)
    h, query = 1e-5, tiny_query()
    for i in (0, 1, 4):  # both examples of the first batch, one of the last
        losses = []
        for sign in (1, -1):
            w = torch.ones(6, dtype=torch.float64)
            w[i] += sign * h
            retrained = MagicModule(tiny_model(), num_examples=6, data_weights=w, **LIGHTNING[name])
            losses.append(_fit(retrained, tiny_batches(), precision="64-true").query_loss(query))
        fd = (losses[0] - losses[1]) / (2 * h)
        # relative to the score, or to 1% of the query's largest score for a near-zero one
        # (a difference of losses cannot resolve 1e-6 of a score 3000x below the others)
        scale = torch.maximum(fd.abs(), 1e-2 * scores.abs().max(1).values)
        assert float(((scores[:, i] - fd).abs() / scale).max()) <= 1e-6, (name, i)


def test_steps_do_not_depend_on_the_callers_default_dtype():
    """Lightning sets the default dtype per precision; the step fixes its own."""
    from lightning_bergson.magic.step import FunctionalTrainer

    step_fn = FunctionalTrainer(tiny_model(), OptimizerConfig("adamw", lr=1e-2))
    batch = tiny_batches()[0]
    states = []
    for default in (torch.float32, torch.float64):
        before = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            state = step_fn.init_state(torch.manual_seed(0).get_state())
            states.append(step_fn.step(state, batch, torch.ones(2, dtype=torch.float64))[0])
        finally:
            torch.set_default_dtype(before)
        assert torch.get_default_dtype() == before
    for name, value in states[0].params.items():
        assert torch.equal(value, states[1].params[name]), name


def test_fused_attention_is_switched_to_eager():
    with pytest.warns(UserWarning, match="not twice differentiable"):
        mm = MagicModule(tiny_model(attn="sdpa"), num_examples=6)
    assert mm.model.config._attn_implementation == "eager"


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match=r"eps_root=0\.0 must be > 0"):
        MagicModule(tiny_model(), eps_root=0.0)
    with pytest.raises(ValueError, match="checkpoint_schedule='every'"):
        MagicModule(tiny_model(), checkpoint_schedule="every")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"weight_granularity='token' needs \[N, S\]"):
        MagicModule(tiny_model(), weight_granularity="token", data_weights=torch.ones(6))
    no_ids = [{k: v for k, v in b.items() if k != "example_id"} for b in tiny_batches()]
    with pytest.raises(KeyError, match="example_id"):
        _fit(MagicModule(tiny_model(), num_examples=6), no_ids, epochs=1)
    with pytest.raises(ValueError, match="example_id 5 >= num_examples=4"):
        _fit(MagicModule(tiny_model(), num_examples=4), tiny_batches(), epochs=1)
    with pytest.raises(RuntimeError, match="needs a finished fit"):
        MagicModule(tiny_model()).attribute(tiny_query())


def test_metasmoothness_is_the_score_of_three_lightning_trainings():
    from lightning_bergson.magic.functional import metasmoothness_score

    opts = LIGHTNING["adamw-clip"]
    mm, _ = _lightning_scores(opts)
    h, v = 0.1, torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    finals = [dict(mm.model.named_parameters())]
    for k in (1, 2):  # independent retrains through L.Trainer with the perturbed weights
        run = MagicModule(tiny_model(), num_examples=6, data_weights=1 + k * h * v, **opts)
        finals.append(dict(_fit(run, tiny_batches(), precision="64-true").model.named_parameters()))
    flat = [torch.cat([p.detach().reshape(-1) for p in f.values()]) for f in finals]
    expected = metasmoothness_score(*flat)
    assert 0 < expected < 1
    assert mm.metasmoothness(h=h, seed=3) == pytest.approx(expected, rel=1e-12)
    with pytest.warns(UserWarning, match="eps_root"):
        mm.metasmoothness(h=h, seed=3, warn_below=1.01)


def test_one_sgd_step_is_perfectly_metasmooth_and_sign_flips_count_against():
    from lightning_bergson.magic.functional import metasmoothness_score

    mm = MagicModule(tiny_model(), num_examples=6, optimizer="sgd", lr=0.5)
    _fit(mm, tiny_batches()[:1], epochs=1, precision="64-true")  # parameters affine in w
    assert mm.metasmoothness(h=0.5) == pytest.approx(1.0, abs=1e-9)
    t0 = torch.zeros(4, dtype=torch.float64)
    th = torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    t2h = torch.tensor([3.0, 0.5, -2.0, 0.0], dtype=torch.float64)  # 2nd entry turns back
    # d = [3, 0.5, 2, 0] / 5.5; agreement [+1, -1, +1, 0]
    assert metasmoothness_score(t0, th, t2h) == pytest.approx((3 - 0.5 + 2) / 5.5)


TINY_CONFIG = {"model_type": "gpt_neox", "hidden_size": 8, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 16}  # fmt: skip


def test_vocabulary_arrives_in_configure_model_and_a_given_network_is_held_once():
    from types import SimpleNamespace

    def attach(module, vocab_size):
        module._trainer = SimpleNamespace(datamodule=SimpleNamespace(vocab_size=vocab_size))
        return module

    mm = MagicModule(config=TINY_CONFIG)
    assert mm.model is None
    with pytest.raises(ValueError, match=r"MagicModule was given no vocab_size.*vocab_size=\.\.\."):
        attach(mm, None).configure_model()
    mm = attach(MagicModule(config=TINY_CONFIG), 37)
    mm.configure_model()
    assert mm.model.get_input_embeddings().num_embeddings == 37
    assert mm.hparams.vocab_size == 37  # so a checkpoint rebuilds the same network
    assert mm.step_fn.model is mm.model
    net = tiny_model()  # the network's own keys, once, under `model.`
    assert list(MagicModule(net).state_dict()) == [f"model.{k}" for k in net.state_dict()]


def test_score_arrays_state_their_settings_for_the_report(tmp_path):
    from lightning_bergson.cli.report import report
    from lightning_bergson.scores import ScoreArray, ScoreSettings

    mm = _fit(MagicModule(tiny_model(), num_examples=6, **LIGHTNING["sgd"]), tiny_batches(), 1)
    query = tiny_query()
    for per_query, reduce in ((True, "none"), (False, "token-weighted mean")):
        scores = mm.attribute(query, per_query=per_query)
        scores = scores if per_query else scores[None]
        path = mm.write_scores(tmp_path / f"{per_query}.zarr", scores, per_query=per_query)
        array = ScoreArray.open(path)
        assert array.header.settings == ScoreSettings(
            preconditioner="none (exact metagradients)", columns="examples", query_reduce=reduce
        )
        assert array.header.method == "magic" and array.header.convention == "metagradient"
        np_scores = scores.float().numpy()
        assert (array.scores[:] == np_scores).all()
        report(str(path), str(tmp_path / f"rep{per_query}"), top_k=2)
        md = (tmp_path / f"rep{per_query}" / "report.md").read_text()
        assert "- **preconditioner**: none (exact metagradients)" in md
        assert ("token-weighted mean" in md) is (not per_query)
