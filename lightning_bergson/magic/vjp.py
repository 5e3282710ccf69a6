"""One reverse step of MAGIC: a vector-Jacobian product through one training step.

:func:`trace_step` computes step ``t``'s gradient with its graph (``create_graph``), and
:func:`pull_step` pulls the adjoints of the state after the step back to the state before it
and to the step's data weights: the update's VJP in closed form
(:class:`~lightning_bergson.magic.optim.FunctionalOptimizer`), then a double backward
through the gradient. :func:`vjp_step` is the two in a row.
:func:`query_gradients` gives the adjoints the reverse pass starts from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .step import FunctionalTrainer, TrainState

__all__ = ["TracedStep", "pull_step", "query_gradients", "trace_step", "vjp_step"]


def query_gradients(
    trainer: FunctionalTrainer,
    params: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    *,
    per_query: bool,
) -> list[list[Tensor]]:
    """Gradients of the query losses at ``params``, one list (parameter order) per query.

    ``per_query=True``: query ``q``'s loss is its mean token loss; otherwise one aggregate
    loss, the mean over every supervised token of the batch.
    """
    names = list(params)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        losses = trainer.query_losses(leaves, batch, per_query=per_query)  # (Q,) or (1,)
        grads = []
        for q in range(len(losses)):
            g = torch.autograd.grad(
                losses[q],
                [leaves[k] for k in names],
                retain_graph=q < len(losses) - 1,
                allow_unused=True,
            )
            grads.append(
                [
                    torch.zeros_like(leaves[k]) if x is None else x
                    for k, x in zip(names, g, strict=True)
                ]
            )
    return grads


@dataclass
class TracedStep:
    """Step ``t`` traced for its VJP (:func:`trace_step`).

    Args:
        state: State ``t`` (before the step).
        params: Its parameters as the leaves of the traced graph.
        batches: This rank's micro-batches of the step.
        weights: Their weights, leaves of the graph.
        num_tokens: Supervised tokens of the whole step.
        traced: This rank's gradient, with its graph when the step has one micro-batch
            (with several, :func:`pull_step` re-traces one at a time).
        rngs: The RNG state each micro-batch started from.
        grads: The step gradient summed over ranks (detached).
    """

    state: TrainState
    params: dict[str, Tensor]
    batches: Sequence[Mapping[str, Tensor]]
    weights: list[Tensor]
    num_tokens: int
    traced: list[Tensor]
    rngs: list[Tensor]
    grads: list[Tensor]


def trace_step(
    trainer: FunctionalTrainer,
    state: TrainState,
    batches: Sequence[Mapping[str, Tensor]],
    weights: Sequence[Tensor],
    num_tokens: int,
) -> TracedStep:
    """Step ``t``'s gradient with its graph to the parameters and the data weights."""
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    ws = [w.detach().requires_grad_() for w in weights]
    traced, rngs = _step_gradient(trainer, state, params, batches, ws, num_tokens)
    grads = trainer.reduce([g.detach() for g in traced])
    return TracedStep(state, params, batches, ws, num_tokens, traced, rngs, grads)


def vjp_step(
    trainer: FunctionalTrainer,
    state: TrainState,
    batches: Sequence[Mapping[str, Tensor]],
    weights: Sequence[Tensor],
    num_tokens: int,
    adjoints: list[list[Tensor]],
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Pull every query's adjoint back through one training step (:func:`trace_step`, then
    :func:`pull_step`).

    Args:
        trainer: The step function.
        state: State ``t`` (before the step).
        batches: This rank's micro-batches of step ``t`` on the parameters' device.
        weights: Their weights, ``[B_j]`` or ``[B_j, S_j]`` each.
        num_tokens: Supervised tokens of the whole step (all micro-batches and ranks).
        adjoints: Per query, the adjoint of state ``t + 1`` (parameters, float optimizer leaves).

    Returns:
        ``(adjoints of state t, dL/dw per micro-batch: [Q, B_j] or [Q, B_j, S_j])``.
    """
    return pull_step(trainer, trace_step(trainer, state, batches, weights, num_tokens), adjoints)


def pull_step(
    trainer: FunctionalTrainer, step: TracedStep, adjoints: list[list[Tensor]]
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """The adjoints of state ``t`` and ``dL/dw`` of the step's micro-batches (see
    :func:`vjp_step`); frees the step's graph.

    The step is ``z' = update(z, g)`` with ``g = reduce(sum_j g_j(theta, w_j))`` over this
    rank's micro-batches ``j``. Stage A is the update's VJP (closed form), giving its direct
    part of ``dL/dz`` and ``c = dL/dg``; stage B pulls ``c`` back through each micro-batch's
    gradient (the double backward), giving ``dL/dw_j`` and this rank's part of
    ``dL/dtheta``, which is summed over ranks. With several micro-batches stage B re-traces
    one at a time (from its recorded RNG state), so the graph of only one is alive.
    """
    num_params = len(step.params)
    with torch.no_grad():  # stage A
        direct = trainer.optimizer.vjp(
            step.params,
            step.state.opt_state,
            step.grads,
            [(a[:num_params], a[num_params:]) for a in adjoints],
        )
    cotangents = [bar_g for _, _, bar_g in direct]  # dL/dg per query
    through_g: list[list[Tensor]] = []  # per query, this rank's dL/dtheta through g
    w_grads = []
    params = list(step.params.values())
    for j, (batch, w) in enumerate(zip(step.batches, step.weights, strict=True)):  # stage B
        g_j = step.traced
        if len(step.batches) > 1:
            g_j = _step_gradient(
                trainer, step.state, step.params, [batch], [w], step.num_tokens, step.rngs[j]
            )[0]
        pulled = _pull(g_j, cotangents, [*params, w])
        if not through_g:
            through_g = [p[:num_params] for p in pulled]
        else:
            through_g = [_add(t, p[:num_params]) for t, p in zip(through_g, pulled, strict=True)]
        w_grads.append(torch.stack([p[-1] for p in pulled]))  # (Q, B_j[, S_j])
    step.traced = []  # the graph is spent (freed by the last pull)
    summed = trainer.reduce([t for q in through_g for t in q])
    new_adjoints = [
        _add(bar_theta, summed[q * num_params : (q + 1) * num_params]) + bar_leaves
        for q, (bar_theta, bar_leaves, _) in enumerate(direct)
    ]
    return new_adjoints, w_grads


def _add(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    return [x + y for x, y in zip(a, b, strict=True)]


def _step_gradient(
    trainer: FunctionalTrainer,
    state: TrainState,
    params: Mapping[str, Tensor],
    batches: Sequence[Mapping[str, Tensor]],
    weights: Sequence[Tensor],
    num_tokens: int,
    rng: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """This rank's step gradient (traced when there is one micro-batch) and the RNG state each
    micro-batch started from; ``rng`` starts elsewhere than ``state.rng``."""
    one = len(batches) == 1
    rngs, total = [], None
    with trainer.context(state):
        if rng is not None:
            torch.set_rng_state(rng)
        for batch, w in zip(batches, weights, strict=True):
            rngs.append(torch.get_rng_state())
            g, _ = trainer.gradient(params, [batch], [w], num_tokens, create_graph=one)
            total = g if total is None else [a + b for a, b in zip(total, g, strict=True)]
    assert total is not None, "a step has at least one batch"
    return total, rngs


def _pull(
    outs: list[Tensor], cotangents: list[list[Tensor]], ins: list[Tensor]
) -> list[list[Tensor]]:
    """``cotangent . d outs / d ins`` for every cotangent (zeros where unused)."""
    result = []
    for q, cot in enumerate(cotangents):
        pairs = [(o, c) for o, c in zip(outs, cot, strict=True) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            ins,
            grad_outputs=[c for _, c in pairs],
            retain_graph=q < len(cotangents) - 1,
            allow_unused=True,
        )
        result.append(
            [
                torch.zeros_like(x) if g is None else g.detach()
                for x, g in zip(ins, grads, strict=True)
            ]
        )
    return result
