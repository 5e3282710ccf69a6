"""MAGIC's optimizer update (AdamW, SGD) and its closed-form vector-Jacobian product.

A step is ``z' = update(z, g)`` with ``z`` the parameters and optimizer state and ``g`` the
step's gradient; the forward fit, every replay and retrain run it, and the reverse pass
needs its VJP at every step. The update is elementwise, so both directions are written as
``torch._foreach_*`` calls over the whole parameter list: a few dozen kernel calls a step,
where autograd through a per-tensor update traced and replayed a few hundred small nodes.

The optimizer state keeps torchopt's structure (what ``torchopt.adamw(...).init`` and
``torchopt.sgd(...).init`` build, per-parameter lists in the sorted order of the parameter
names), so stored trajectories and tools that read torchopt states keep working. torchopt's
own update is the tests' oracle (``tests/magic/test_optim.py``) but is not run here: its SGD
momentum keeps a "first call" flag in a closure, so a replay that began mid-run with a new
optimizer object (a trajectory reopened in a new process) silently dropped the momentum of
its first step.

With ``k`` the number of updates before this one, ``lr_k`` the learning rate after warmup and
``g`` the gradient after clipping (:func:`~.functional.clip_by_global_norm`'s rule)::

    AdamW:  m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,
            s = sqrt(v' / c2 + eps_root),   c1 = 1 - b1^(k+1),   c2 = 1 - b2^(k+1),
            theta' = theta - lr_k (m' / (c1 (s + eps)) + wd theta)
    SGD:    b' = mu b + g + wd theta   (no momentum buffer when mu = 0),
            theta' = theta - lr_k b'

The VJP pulls cotangents ``(T, M, V)`` of ``(theta', m', v')`` (or ``(T, B)``) back to
``(theta, m, v)`` and to ``g`` before clipping, by the chain rule through these lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torchopt.pytree import tree_flatten

from .functional import OptimizerConfig, make_optimizer

__all__ = ["Cotangent", "FunctionalOptimizer"]

_KINDS = {("mu", "nu", "count"): "adam", ("trace",): "trace", ("count",): "count", (): "empty"}

Cotangent = tuple[list[Tensor], list[Tensor]]
"""Cotangents of (parameters in their dict order, floating optimizer leaves in tree order)."""


@dataclass
class _Clip:
    """A clip's input and output, and what its VJP needs."""

    raw: list[Tensor]  # g before clipping
    grads: list[Tensor]  # coef * g
    norm: Tensor  # |g|
    coef: Tensor  # min(1, max_norm / (|g| + 1e-6))


@dataclass
class _Adam:
    """AdamW's intermediate values of one update (shared by the update and its VJP)."""

    mu: list[Tensor]  # m'
    nu: list[Tensor]  # v'
    root: list[Tensor]  # s = sqrt(v' / c2 + eps_root)
    denom: list[Tensor]  # s + eps
    c1: float
    c2: float


class FunctionalOptimizer:
    """AdamW or SGD as pure functions of (parameters, torchopt state, gradient), with a VJP.

    Args:
        config: The optimizer settings (learning rate, warmup, betas, clipping, ...).

    Example:
        >>> opt = FunctionalOptimizer(OptimizerConfig("sgd", lr=0.5, momentum=0.9))
        >>> params = {"w": torch.ones(2, dtype=torch.float64)}
        >>> state = opt.init(params)
        >>> new, state = opt.update(params, state, [torch.ones(2, dtype=torch.float64)])
        >>> new, _ = opt.update(new, state, [torch.ones(2, dtype=torch.float64)])
        >>> new["w"]  # 1 - 0.5 * 1, then 0.5 - 0.5 * (0.9 * 1 + 1)
        tensor([-0.4500, -0.4500], dtype=torch.float64)
    """

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config
        self._init = make_optimizer(config).init

    def init(self, params: Mapping[str, Tensor]) -> Any:
        """The state before the first update (torchopt's zeros and counts)."""
        state = self._init(dict(params))
        _check_structure(state, self.config)
        return state

    def update(
        self, params: Mapping[str, Tensor], state: Any, grads: Sequence[Tensor]
    ) -> tuple[dict[str, Tensor], Any]:
        """New parameters (same names and order) and state after one update with ``grads``
        (one per parameter, in the parameters' order). Never modifies its inputs."""
        names, order = list(params), _tree_order(tuple(params))
        theta = [params[names[i]] for i in order]
        clip = self._clip([grads[i] for i in order])
        lr, moments = self._lr(state), _moments(state)
        if self.config.name == "adamw":
            new_theta, new_moments = self._adamw(theta, moments, clip.grads, _count(state), lr)
        else:
            new_theta, new_moments = self._sgd(theta, moments, clip.grads, lr)
        by_name = {names[i]: t for i, t in zip(order, new_theta, strict=True)}
        return {n: by_name[n] for n in names}, _rebuild(state, new_moments)

    def vjp(
        self,
        params: Mapping[str, Tensor],
        state: Any,
        grads: Sequence[Tensor],
        cotangents: Sequence[Cotangent],
    ) -> list[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """Pull each cotangent of ``update(params, state, grads)``'s outputs back to its inputs.

        Args:
            params, state, grads: The update's inputs (``grads`` before clipping).
            cotangents: Per query, the cotangents of the new parameters (dict order) and of
                the new state's floating leaves (tree order, as :meth:`TrainState.opt_leaves`).

        Returns:
            Per query, the cotangents of the parameters (dict order), of the state's
            floating leaves (tree order) and of ``grads`` (parameter order).
        """
        order = _tree_order(tuple(params))
        clip = self._clip([grads[i].detach() for i in order])
        lr, moments = self._lr(state), _moments(state)
        adam = None
        if self.config.name == "adamw":
            adam = self._adam_terms(moments, clip.grads, _count(state))
        out = []
        for param_cot, leaf_cot in cotangents:
            cot_theta = [param_cot[i] for i in order]
            if adam is not None:
                bar_theta, bar_leaves, bar_g = self._adamw_vjp(
                    adam, clip.grads, cot_theta, leaf_cot, lr
                )
            else:
                bar_theta, bar_leaves, bar_g = self._sgd_vjp(cot_theta, leaf_cot, lr)
            bar_g = self._clip_vjp(clip, bar_g)
            out.append((_in_order(bar_theta, order), bar_leaves, _in_order(bar_g, order)))
        return out

    # ------------------------------------------------------------------ pieces

    def _lr(self, state: Any) -> float:
        cfg = self.config
        if not cfg.warmup_steps:
            return cfg.lr
        return cfg.lr * min(1.0, (_count(state) + 1) / cfg.warmup_steps)

    def _clip(self, grads: list[Tensor]) -> _Clip:
        max_norm = self.config.max_grad_norm
        one = torch.ones((), dtype=grads[0].dtype, device=grads[0].device)
        if max_norm is None:
            return _Clip(grads, grads, one, one)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return _Clip(grads, list(torch._foreach_mul(grads, coef)), norm, coef)

    def _clip_vjp(self, clip: _Clip, bar: list[Tensor]) -> list[Tensor]:
        """``coef bar + <bar, g> dcoef/dg``, ``dcoef/dg = -max_norm g / (|g| (|g| + 1e-6)^2)``
        where the clamp lets ``coef`` depend on ``g`` (as torch's clamp: at equality too)."""
        max_norm = self.config.max_grad_norm
        if max_norm is None:
            return bar
        out = list(torch._foreach_mul(bar, clip.coef))
        if float(max_norm / (clip.norm + 1e-6)) <= 1.0:
            dot = torch.stack(
                [
                    torch.dot(b.reshape(-1), g.reshape(-1))
                    for b, g in zip(bar, clip.raw, strict=True)
                ]
            )
            scale = -max_norm * dot.sum() / (clip.norm * (clip.norm + 1e-6) ** 2)
            torch._foreach_add_(out, torch._foreach_mul(clip.raw, scale))
        return out

    def _adam_terms(self, moments: tuple[list[Tensor], ...], g: list[Tensor], k: int) -> _Adam:
        b1, b2 = self.config.betas
        mu = list(torch._foreach_mul(moments[0], b1))
        torch._foreach_add_(mu, g, alpha=1 - b1)
        nu = list(torch._foreach_mul(moments[1], b2))
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
        root = list(torch._foreach_div(nu, c2))
        torch._foreach_add_(root, self.config.eps_root)
        torch._foreach_sqrt_(root)
        return _Adam(mu, nu, root, list(torch._foreach_add(root, self.config.eps)), c1, c2)

    def _adamw(
        self, theta: list[Tensor], moments: tuple[list[Tensor], ...], g: list[Tensor], k: int,
        lr: float,
    ) -> tuple[list[Tensor], tuple[list[Tensor], ...]]:  # fmt: skip
        adam = self._adam_terms(moments, g, k)
        step = list(torch._foreach_div(adam.mu, adam.denom))  # m' / (s + eps)
        torch._foreach_div_(step, adam.c1)
        if self.config.weight_decay:
            torch._foreach_add_(step, theta, alpha=self.config.weight_decay)
        return list(torch._foreach_add(theta, step, alpha=-lr)), (adam.mu, adam.nu)

    def _adamw_vjp(
        self,
        adam: _Adam,
        g: list[Tensor],
        cot_theta: list[Tensor],
        cot_leaves: list[Tensor],
        lr: float,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cfg, n = self.config, len(cot_theta)
        b1, b2 = cfg.betas
        bar_step = list(torch._foreach_mul(cot_theta, -lr))  # d theta' / d step = -lr
        bar_mu = list(torch._foreach_div(bar_step, adam.denom))  # + M: d step / d m'
        torch._foreach_div_(bar_mu, adam.c1)
        torch._foreach_add_(bar_mu, cot_leaves[:n])
        # d step / d v' = -m' / (c1 (s + eps)^2 2 s c2)
        slope = list(torch._foreach_mul(adam.denom, adam.denom))
        torch._foreach_mul_(slope, adam.root)
        slope = list(torch._foreach_div(adam.mu, slope))
        torch._foreach_mul_(slope, bar_step)
        bar_nu = list(torch._foreach_div(slope, -2 * adam.c1 * adam.c2))
        torch._foreach_add_(bar_nu, cot_leaves[n : 2 * n])
        bar_g = list(torch._foreach_mul(bar_mu, 1 - b1))
        torch._foreach_addcmul_(bar_g, g, bar_nu, value=2 * (1 - b2))
        bar_theta = list(torch._foreach_mul(cot_theta, 1 - lr * cfg.weight_decay))
        leaves = [*torch._foreach_mul(bar_mu, b1), *torch._foreach_mul(bar_nu, b2)]
        return bar_theta, leaves, bar_g

    def _sgd(
        self, theta: list[Tensor], moments: tuple[list[Tensor], ...], g: list[Tensor], lr: float
    ) -> tuple[list[Tensor], tuple[list[Tensor], ...]]:
        cfg = self.config
        step = list(torch._foreach_add(g, theta, alpha=cfg.weight_decay)) if cfg.weight_decay else g
        if cfg.momentum:
            buf = list(torch._foreach_mul(moments[0], cfg.momentum))
            torch._foreach_add_(buf, step)
            step, moments = buf, (buf,)
        return list(torch._foreach_add(theta, step, alpha=-lr)), moments

    def _sgd_vjp(
        self, cot_theta: list[Tensor], cot_leaves: list[Tensor], lr: float
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cfg = self.config
        bar_step = list(torch._foreach_mul(cot_theta, -lr))  # d theta' / d step = -lr
        leaves: list[Tensor] = []
        if cfg.momentum:
            torch._foreach_add_(bar_step, cot_leaves)  # + B: the new buffer is the step
            leaves = list(torch._foreach_mul(bar_step, cfg.momentum))
        bar_theta = list(torch._foreach_add(cot_theta, bar_step, alpha=cfg.weight_decay))
        return bar_theta, leaves, bar_step


# ---------------------------------------------------------------------- torchopt's state


@lru_cache(maxsize=64)
def _tree_order(names: tuple[str, ...]) -> list[int]:
    """Positions of the parameters in torchopt's lists (the pytree order of a dict)."""
    return list(tree_flatten({n: i for i, n in enumerate(names)})[0])


def _in_order(tree_ordered: list[Tensor], order: list[int]) -> list[Tensor]:
    """A list in pytree order back in the parameters' own order."""
    out: list[Tensor | None] = [None] * len(order)
    for pos, value in zip(order, tree_ordered, strict=True):
        out[pos] = value
    return out  # type: ignore[return-value]


def _kind(s: Any) -> str:
    return _KINDS.get(tuple(getattr(s, "_fields", ("?",))), "?")


def _moments(state: Any) -> tuple[list[Tensor], ...]:
    for s in state:
        if _kind(s) == "adam":
            return (list(s.mu), list(s.nu))
        if _kind(s) == "trace":
            return (list(s.trace),)
    return ()


def _count(state: Any) -> int:
    """Updates taken so far (0 for a state that counts none: no warmup, no Adam)."""
    for s in state:
        if _kind(s) in ("adam", "count") and len(s.count):
            return int(s.count[0])
    return 0


def _rebuild(state: Any, moments: tuple[list[Tensor], ...]) -> Any:
    """``state`` with new moments and every count one higher (new tensors throughout)."""
    out = []
    for s in state:
        kind = _kind(s)
        if kind == "adam":
            s = s._replace(mu=moments[0], nu=moments[1], count=[c + 1 for c in s.count])
        elif kind == "trace":
            s = s._replace(trace=moments[0])
        elif kind == "count":
            s = s._replace(count=[c + 1 for c in s.count])
        out.append(s)
    return tuple(out)


def _check_structure(state: Any, config: OptimizerConfig) -> None:
    """Raise unless ``state`` is the torchopt structure this module updates."""
    kinds = [_kind(s) for s in state] if isinstance(state, tuple) else ["?"]
    expected = {"adamw": ["adam"], "sgd": ["trace"] if config.momentum else []}[config.name]
    if "?" in kinds or [k for k in kinds if k in ("adam", "trace")] != expected:
        found = [type(s).__name__ for s in state] if isinstance(state, tuple) else type(state)
        raise RuntimeError(
            f"torchopt's {config.name} state has an unexpected structure ({found}); MAGIC's "
            "update knows torchopt 0.7's. Install torchopt>=0.7.3,<0.8 or report the version"
        )
