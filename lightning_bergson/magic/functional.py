"""Training as a pure, differentiable function of per-example (or per-token) data weights.

Everything here is plain torch (no Lightning): the weighted loss, gradient clipping, the
optimizer settings (the update itself is :mod:`.optim`; torchopt builds its initial state)
and the checkpoint schedules of the MAGIC reverse pass; :mod:`.step` composes them into one
training step.

**Weighted loss.** For a batch with token losses ``l[i, t]`` (the loss of predicting
``labels[i, t]`` from the tokens before it) and ``n`` supervised tokens (counted with unit
weights, so the normalizer does not depend on the weights)::

    L(theta; w) = sum_i w_i * sum_t l[i, t] / n          # weight_granularity="example"
    L(theta; w) = sum_i sum_t w[i, t] * l[i, t] / n      # weight_granularity="token"

With ``w = 1`` this is Hugging Face's batch loss (mean over every supervised token). The
token weight ``w[i, t]`` is aligned with input position ``t``: it scales the loss of
predicting token ``t``; position 0 is never predicted, so its weight has no effect.

**One step, several batches.** An optimizer step may see its examples as several
micro-batches (gradient accumulation) on several ranks (data parallel). The sums above
then run over every example of the step and ``n`` counts the supervised tokens of all of
them (:func:`step_tokens`, summed over ranks), so a step's loss
does not depend on how its examples are split: two micro-batches of ``B`` on one device,
or one of ``B`` on each of two ranks, train exactly as one batch of ``2B``. (Lightning's
own accumulation averages the micro-batches' means instead, which differs when they hold
different numbers of supervised tokens; Hugging Face's Trainer normalizes by the step's
tokens, as here.)

References:
    - Ilyas & Engstrom, "MAGIC: Near-Optimal Data Attribution for Deep Learning",
      arXiv:2504.16430.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torchopt
from torch import Tensor
from torchopt.typing import GradientTransformation

from ..batch import causal_lm_labels, supervised_tokens
from ..losses import token_losses

__all__ = [
    "DEFAULT_EPS_ROOT",
    "SCHEDULES",
    "OptimizerConfig",
    "batch_weights",
    "checkpoint_steps",
    "clip_by_global_norm",
    "example_losses",
    "make_optimizer",
    "metasmoothness_score",
    "replay_keep_next",
    "step_tokens",
    "token_losses",
    "weighted_lm_loss",
]

Schedule = Literal["all", "sqrt", "log"]
SCHEDULES: tuple[str, ...] = ("all", "sqrt", "log")
Granularity = Literal["example", "token"]


def weighted_lm_loss(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    num_tokens: int | None = None,
) -> Tensor:
    """Weighted causal-LM cross entropy; unit weights give Hugging Face's batch mean.

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]``, ``-100`` ignored.
        weights: ``None`` (all ones), ``[B]`` per example or ``[B, S]`` per token
            (``weights[i, t]`` scales the loss of predicting ``labels[i, t]``).
        num_tokens: ``n``, the supervised tokens of the whole step when this batch is one
            part of it (micro-batches, ranks); default: this batch's.

    Returns:
        Scalar ``sum(w * l) / n`` with ``n`` the number of supervised tokens.

    Example:
        >>> logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
        >>> ce = torch.nn.functional.cross_entropy
        >>> hf = ce(logits[:, :-1].reshape(-1, 5), labels[:, 1:].ravel())
        >>> torch.allclose(weighted_lm_loss(logits, labels, torch.ones(2)), hf)
        True
    """
    loss, mask = token_losses(logits, labels)  # (B, S), (B, S)
    if weights is not None:
        if weights.shape not in (loss.shape[:1], loss.shape):
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} fit neither [B]={tuple(loss.shape[:1])}"
                f" nor [B, S]={tuple(loss.shape)}; pass one weight per example or per token"
            )
        loss = loss * (weights[:, None] if weights.ndim == 1 else weights)
    if num_tokens is not None:
        return loss.sum() / max(1, num_tokens)
    return loss.sum() / mask.sum().clamp(min=1)


def step_tokens(micro_batches: Sequence[Mapping[str, Tensor]]) -> int:
    """Supervised tokens of one step's batches: the ``n`` of :func:`weighted_lm_loss`.

    Example:
        >>> step_tokens([{"labels": torch.tensor([[5, 6, -100]])}, {"input_ids": torch.ones(1, 3)}])
        3
    """
    return sum(int(supervised_tokens(causal_lm_labels(b)).sum()) for b in micro_batches)


def example_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Each example's mean token loss ``[B]`` (the per-query loss of MAGIC).

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]``, ``-100`` ignored.
    """
    loss, mask = token_losses(logits, labels)  # (B, S), (B, S)
    return loss.sum(1) / mask.sum(1).clamp(min=1)  # (B,)


def clip_by_global_norm(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """Scale gradients so their global L2 norm is at most ``max_norm`` (differentiable).

    Same rule as ``torch.nn.utils.clip_grad_norm_``: ``g * min(1, max_norm / (|g| + 1e-6))``.

    Args:
        grads: Gradients, one per parameter.
        max_norm: Largest global norm.
    """
    norm = torch.sqrt(sum((g * g).sum() for g in grads))  # type: ignore[arg-type]
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return [g * coef for g in grads]


def batch_weights(
    data_weights: Tensor | None,
    example_id: Tensor,
    seq_len: int,
    granularity: Granularity,
    like: Tensor,
) -> Tensor:
    """The weights of one batch: ``[B]`` per example or ``[B, S]`` per token.

    Args:
        data_weights: ``[N]`` or ``[N, S_max]`` weights of the whole training set, or ``None``
            for unit weights.
        example_id: ``[B]`` dataset rows of the batch.
        seq_len: ``S`` of the batch.
        granularity: ``"example"`` or ``"token"``.
        like: A tensor whose dtype and device the weights take (a parameter).
    """
    shape = (len(example_id),) if granularity == "example" else (len(example_id), seq_len)
    if data_weights is None:
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    w = data_weights.to(device=like.device, dtype=like.dtype)[example_id.to(like.device)]
    if granularity == "token":
        if w.ndim != 2 or w.shape[1] < seq_len:
            raise ValueError(
                f"per-token data_weights need shape [num_examples, >= {seq_len}] for a batch of "
                f"sequence length {seq_len}; got {tuple(data_weights.shape)}"
            )
        w = w[:, :seq_len]  # (B, S)
    return w


def metasmoothness_score(theta0: Tensor, theta_h: Tensor, theta_2h: Tensor) -> float:
    """Empirical metasmoothness of three trainings (arXiv 2503.13751, Definition 2).

    ``theta0``, ``theta_h``, ``theta_2h`` are the flat final parameters of trainings with data
    weights ``w``, ``w + h v`` and ``w + 2h v``. The score is the movement-weighted sign
    agreement of the two consecutive finite differences,
    ``sum_j (d_j / |d|_1) sign(theta_h - theta0)_j sign(theta_2h - theta_h)_j`` with
    ``d = |theta_2h - theta0|``: 1 when the parameters respond linearly to the weights,
    near 0 or negative when the response is rough (metagradients then predict retrains
    poorly).

    Example:
        >>> t0 = torch.tensor([0.0, 0.0, 0.0])
        >>> metasmoothness_score(t0, torch.tensor([1.0, -1.0, 1.0]), torch.tensor([2.0, -2.0, 0.0]))
        1.0
    """
    d = (theta_2h - theta0).abs()
    total = d.sum()
    if total == 0:
        return 1.0
    agree = torch.sign(theta_h - theta0) * torch.sign(theta_2h - theta_h)
    return float((d / total * agree).sum())


DEFAULT_EPS_ROOT = 1e-4
"""Adam's default ``eps_root`` for MAGIC (see :class:`OptimizerConfig`)."""


@dataclass(frozen=True)
class OptimizerConfig:
    """The functional optimizer and the update rule around it.

    Args:
        name: ``"adamw"`` (decoupled weight decay) or ``"sgd"`` (L2 weight decay).
        lr: Learning rate (constant).
        weight_decay: Weight decay.
        betas: Adam betas.
        eps: Adam epsilon, added after the square root.
        eps_root: Adam epsilon inside the square root, ``sqrt(v + eps_root)``; must be
            positive so the update is differentiable where ``v = 0``. The default
            (:data:`DEFAULT_EPS_ROOT`, 1e-4) is for smooth metagradients: Adam's update
            ``m / sqrt(v + eps_root)`` is sign-like (it jumps from ``-lr`` to ``+lr`` as a
            gradient crosses zero) except within about ``sqrt(eps_root)`` of zero, so a
            larger value makes training smoother in the data weights (LDS 0.98 against 0.90
            at 1e-8, ``examples/results/lds.md``). The price: parameters whose gradient RMS
            is below ``sqrt(eps_root)`` (1e-2) take smaller, SGD-like steps than
            ``torch.optim.AdamW`` would; pass ``eps_root=1e-8`` for nearly plain Adam.
        momentum: SGD momentum.
        max_grad_norm: Clip the gradient to this global norm before the update (``None``: off).
        warmup_steps: Linear learning-rate warmup over this many steps (0: constant), which
            also makes early Adam steps less sensitive to the data weights.

    Example:
        >>> OptimizerConfig("adamw", lr=1e-3).name
        'adamw'
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = DEFAULT_EPS_ROOT
    momentum: float = 0.0
    max_grad_norm: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={self.name!r} is not one of 'adamw', 'sgd'")
        if self.name == "adamw" and not self.eps_root > 0:
            raise ValueError(
                f"eps_root={self.eps_root} must be > 0 for Adam: sqrt(v) is not differentiable at"
                f" v = 0; use e.g. eps_root={DEFAULT_EPS_ROOT} (the default)"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 or None (no clip)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (0 = no warmup)")

    def learning_rate(self, count: Tensor) -> Tensor:
        """``lr * min(1, (count + 1) / warmup_steps)`` for the update after ``count`` updates."""
        ramp = (count + 1).to(torch.float64) / max(1, self.warmup_steps)
        return self.lr * ramp.clamp(max=1.0)


def make_optimizer(cfg: OptimizerConfig) -> GradientTransformation:
    """The torchopt transformation of ``cfg`` (pure-Python path, never the C++ ops)."""
    lr = cfg.learning_rate if cfg.warmup_steps else cfg.lr
    if cfg.name == "sgd":
        return torchopt.sgd(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torchopt.adamw(
        lr,
        betas=tuple(cfg.betas),  # type: ignore[arg-type]
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        eps_root=cfg.eps_root,
        use_accelerated_op=False,
    )


def checkpoint_steps(num_steps: int, schedule: Schedule) -> list[int]:
    """States (before step ``t``) the forward pass keeps for the reverse pass.

    ``"all"`` keeps every state (no replay); ``"sqrt"`` every ``ceil(sqrt(T))``-th (replay
    one segment, keeping its states: memory and extra compute ``O(sqrt T)``); ``"log"`` keeps
    ``0, T/2, 3T/4, ...`` and bisects during replay (memory ``O(log T)``, compute
    ``O(T log T)``).

    Args:
        num_steps: ``T``, the number of optimizer steps.
        schedule: ``"all"``, ``"sqrt"`` or ``"log"``.

    Example:
        >>> checkpoint_steps(10, "sqrt"), checkpoint_steps(10, "log")
        ([0, 4, 8], [0, 4, 6, 7, 8, 9])
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"checkpoint_schedule={schedule!r} is not one of {SCHEDULES}")
    if num_steps < 1:
        return []
    if schedule == "all":
        return list(range(num_steps))
    if schedule == "sqrt":
        return list(range(0, num_steps, math.ceil(math.sqrt(num_steps))))
    steps, current = [0], 0
    while current < num_steps - 1:
        current = replay_keep_next(current, num_steps - 1, "log")
        steps.append(current)
    return steps


def replay_keep_next(current: int, target: int, schedule: Schedule) -> int:
    """The next state to keep when replaying from state ``current`` towards ``target``.

    ``"log"`` bisects the remaining range; the other schedules keep every state of a segment.
    """
    if schedule == "log":
        return current + max(1, (target - current) // 2)
    return current + 1
