"""MAGIC's optimizer update and its closed-form VJP against torchopt and autograd (float64).

Oracles: torchopt's own update (``inplace=False``, the pure-Python path) for the new
parameters and state, autograd through that update (after ``clip_by_global_norm``) for the
VJP, and the scores of the step function that trained a run for a fresh one.
"""

from __future__ import annotations

import pytest
import torch
from magic_oracles import tiny_batches, tiny_model, tiny_query, train
from torchopt.pytree import tree_flatten, tree_unflatten

from lightning_bergson.magic import OptimizerConfig, metagradients
from lightning_bergson.magic.functional import clip_by_global_norm, make_optimizer
from lightning_bergson.magic.optim import FunctionalOptimizer
from lightning_bergson.magic.step import FunctionalTrainer, step_dtype

CONFIGS = {
    "adamw": OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, eps_root=1e-4),
    "adamw-warmup": OptimizerConfig("adamw", lr=1e-2, warmup_steps=3, eps_root=1e-8),
    "adamw-clip": OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "adamw-loose-clip": OptimizerConfig("adamw", lr=1e-2, max_grad_norm=1e3),
    "sgd": OptimizerConfig("sgd", lr=0.5),
    "sgd-momentum": OptimizerConfig("sgd", lr=0.5, momentum=0.9, weight_decay=0.01),
    "sgd-clip-warmup": OptimizerConfig(
        "sgd", lr=0.5, momentum=0.9, max_grad_norm=0.5, warmup_steps=2
    ),
}
SHAPES = {"b.weight": (3, 4), "a.bias": (5,), "c": (2, 2, 2)}  # not in sorted order


def _params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


def _oracle_update(cfg, transform, params, state, grads):
    """torchopt's update after the same clip (its bias correction in float64)."""
    if cfg.max_grad_norm is not None:
        grads = clip_by_global_norm(grads, cfg.max_grad_norm)
    with step_dtype(params.values()):
        updates, new_state = transform.update(
            dict(zip(params, grads, strict=True)), state, params=params, inplace=False
        )
    return {k: params[k] + updates[k] for k in params}, new_state


def _run_both(cfg, steps: int):
    """``steps`` updates by torchopt and by FunctionalOptimizer from the same start."""
    opt, transform = FunctionalOptimizer(cfg), make_optimizer(cfg)
    params = _params(0)
    ours, theirs = (params, opt.init(params)), (params, transform.init(params))
    for t in range(steps):
        grads = list(_params(10 + t).values())
        ours = opt.update(*ours, grads)
        theirs = _oracle_update(cfg, transform, *theirs, grads)
    return opt, transform, ours, theirs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_updates_equal_torchopts(name):
    _, _, (params, state), (want_params, want_state) = _run_both(CONFIGS[name], steps=4)
    assert list(params) == list(SHAPES)  # the caller's order
    for k in SHAPES:
        torch.testing.assert_close(params[k], want_params[k], rtol=1e-13, atol=1e-15)
    leaves, spec = tree_flatten(state)
    want, want_spec = tree_flatten(want_state)
    assert spec == want_spec  # torchopt's structure: stored trajectories stay readable
    for a, b in zip(leaves, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vjp_is_autograd_through_torchopts_update(name):
    cfg = CONFIGS[name]
    opt, transform, (params, state), (_, oracle_state) = _run_both(cfg, steps=2)
    grads = [3 * g for g in _params(20).values()]  # large enough for every clip to act
    gen = torch.Generator().manual_seed(5)
    floats = [t for t in tree_flatten(state)[0] if t.is_floating_point()]
    cotangents = [
        (
            [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params.values()],
            [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in floats],
        )
        for _ in range(2)  # two queries
    ]
    got = opt.vjp(params, state, grads, cotangents)

    # the oracle: leaves requiring grad through torchopt's update (past its first call)
    x = {k: v.clone().requires_grad_() for k, v in params.items()}
    leaves, spec = tree_flatten(oracle_state)
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in leaves]
    g = [t.clone().requires_grad_() for t in grads]
    new, new_state = _oracle_update(cfg, transform, x, tree_unflatten(spec, leaves), g)
    outs = list(new.values()) + [t for t in tree_flatten(new_state)[0] if t.is_floating_point()]
    ins = [*x.values(), *[t for t in leaves if t.is_floating_point()], *g]
    for (param_cot, leaf_cot), (bar_theta, bar_leaves, bar_g) in zip(cotangents, got, strict=True):
        want = torch.autograd.grad(
            outs, ins, [*param_cot, *leaf_cot], retain_graph=True, allow_unused=True
        )
        want = [torch.zeros_like(i) if w is None else w for i, w in zip(ins, want, strict=True)]
        for a, b in zip([*bar_theta, *bar_leaves, *bar_g], want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_a_fresh_step_function_attributes_a_run_exactly():
    """torchopt's SGD momentum skipped the momentum on an optimizer object's first call, so a
    new process attributing a saved run replayed its first step wrongly (225% off)."""
    cfg, query = CONFIGS["sgd-momentum"], tiny_query()
    for schedule in ("sqrt", "all"):
        trainer, traj = train(cfg, tiny_batches(num=10), schedule=schedule)
        expected = metagradients(trainer, traj, query, num_examples=10)
        fresh = FunctionalTrainer(tiny_model(), cfg)
        assert torch.equal(metagradients(fresh, traj, query, num_examples=10), expected)


def test_an_unknown_torchopt_state_is_refused(monkeypatch):
    opt = FunctionalOptimizer(CONFIGS["sgd-momentum"])
    monkeypatch.setattr(opt, "_init", lambda params: ({"buffer": list(params.values())},))
    with pytest.raises(RuntimeError, match=r"unexpected structure.*torchopt>=0\.7\.3,<0\.8"):
        opt.init(_params(0))
