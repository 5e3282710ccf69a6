"""One reverse step of MAGIC: a vector-Jacobian product through one training step.

:func:`vjp_step` pulls the adjoints of the state after step ``t`` back to the state before
it and to the step's data weights, by double backward through the step of
:class:`~lightning_bergson.magic.step.FunctionalTrainer` (gradient, cross-rank sum, update);
:func:`query_gradients` gives the adjoints the reverse pass starts from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchopt.pytree import tree_flatten

from .step import FunctionalTrainer, TrainState, step_dtype

__all__ = ["query_gradients", "vjp_step"]


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


def vjp_step(
    trainer: FunctionalTrainer,
    state: TrainState,
    batches: Sequence[Mapping[str, Tensor]],
    weights: Sequence[Tensor],
    num_tokens: int,
    adjoints: list[list[Tensor]],
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Pull every query's adjoint back through one training step (double backward).

    The step is ``z' = update(z, g)`` with ``g = reduce(sum_j g_j(theta, w_j))`` over this
    rank's micro-batches ``j`` (see :class:`FunctionalTrainer`). Stage A differentiates the
    update alone, giving the direct part of ``dL/dz`` and ``c = dL/dg``; stage B pulls ``c``
    back through each micro-batch's gradient (the double backward), giving ``dL/dw_j`` and
    this rank's part of ``dL/dtheta``, which is summed over ranks. With one micro-batch its
    traced gradient serves both stages; with several, stage B re-traces one micro-batch at a
    time (from its recorded RNG state), so the double-backward graph of only one is alive.

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
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    leaves = [
        t.detach().requires_grad_() if t.is_floating_point() else t for t in state.opt_leaves()
    ]
    floats = [t for t in leaves if t.is_floating_point()]
    ws = [w.detach().requires_grad_() for w in weights]
    traced, rngs = _step_gradient(trainer, state, params, batches, ws, num_tokens)
    g_in = [g.detach().requires_grad_() for g in trainer.reduce([g.detach() for g in traced])]
    with torch.enable_grad(), step_dtype(params.values()):
        new_params, new_opt = trainer.update(params, state.with_opt_leaves(leaves), g_in)
    outs = list(new_params.values()) + [
        t for t in tree_flatten(new_opt)[0] if t.is_floating_point()
    ]
    direct = _pull(outs, adjoints, [*params.values(), *floats, *g_in])  # stage A
    num_params, num_direct = len(params), len(params) + len(floats)
    cotangents = [d[num_direct:] for d in direct]  # dL/dg per query
    through_g: list[list[Tensor]] = []  # per query, this rank's dL/dtheta through g
    w_grads = []
    for j, (batch, w) in enumerate(zip(batches, ws, strict=True)):  # stage B
        if len(batches) == 1:
            g_j = traced
        else:
            g_j = _step_gradient(trainer, state, params, [batch], [w], num_tokens, rngs[j])[0]
        pulled = _pull(g_j, cotangents, [*params.values(), w])
        if not through_g:
            through_g = [p[:num_params] for p in pulled]
        else:
            through_g = [_add(t, p[:num_params]) for t, p in zip(through_g, pulled, strict=True)]
        w_grads.append(torch.stack([p[-1] for p in pulled]))  # (Q, B_j[, S_j])
    summed = trainer.reduce([t for q in through_g for t in q])
    new_adjoints = [
        _add(direct[q][:num_params], summed[q * num_params : (q + 1) * num_params])
        + direct[q][num_params:num_direct]
        for q in range(len(adjoints))
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
    """This rank's step gradient (traced when there is one micro-batch) and the RNG state
    each micro-batch started from; ``rng`` starts from another state than ``state.rng``."""
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
