"""One differentiable training step: ``state_{t+1} = step(state_t, batches_t, w)``.

The forward training, the replays of the reverse pass and every retrain (finite differences,
LDS) run this same step, built from the pure pieces of :mod:`.functional`. A step takes the
micro-batches of one optimizer step on this rank (one batch without gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchopt.pytree import tree_flatten, tree_unflatten

from ..batch import causal_lm_labels
from .distributed import DataParallel
from .functional import (
    Granularity,
    OptimizerConfig,
    example_losses,
    step_tokens,
    weighted_lm_loss,
)
from .optim import FunctionalOptimizer

__all__ = ["FunctionalTrainer", "TrainState", "as_micro_batches", "step_dtype", "training_mode"]


@dataclass
class TrainState:
    """The state of training before optimizer step ``step``.

    Args:
        params: Trainable parameters by name.
        opt_state: torchopt optimizer state (a pytree of tensors).
        rng: CPU RNG state (``torch.get_rng_state()``) the step starts from, so dropout
            is replayed exactly.
        step: Number of optimizer steps taken so far.
    """

    params: dict[str, Tensor]
    opt_state: Any
    rng: Tensor = field(default_factory=torch.get_rng_state)
    step: int = 0

    def opt_leaves(self) -> list[Tensor]:
        """The optimizer state's tensors in pytree order."""
        return list(tree_flatten(self.opt_state)[0])

    def with_opt_leaves(self, leaves: list[Tensor]) -> Any:
        """An optimizer state of the same structure holding ``leaves``."""
        return tree_unflatten(tree_flatten(self.opt_state)[1], leaves)

    def detached(self) -> TrainState:
        """A copy whose tensors carry no autograd history."""
        params = {k: v.detach() for k, v in self.params.items()}
        opt = self.with_opt_leaves([t.detach() for t in self.opt_leaves()])
        return TrainState(params, opt, self.rng, self.step)


class FunctionalTrainer:
    """One differentiable training step of a model: ``state_{t+1} = step(state_t, batch_t, w)``.

    The same object runs the forward training, the replays of the reverse pass and the
    retrains of finite differences and LDS, so all of them follow one code path. A step is
    three parts, which the reverse pass differentiates one at a time
    (:func:`~lightning_bergson.magic.reverse.vjp_step`):

    1. :meth:`gradient`: the gradient of the step's weighted loss on this rank's batches
       (several micro-batches under gradient accumulation, each normalized by the step's
       token count, see :mod:`.functional`);
    2. :meth:`reduce`: its sum over ranks (data parallel; nothing on one process);
    3. :meth:`update`: clipping and the optimizer update.

    Args:
        model: The network, called with ``torch.func.functional_call`` on the state's
            parameters (its own parameters are not read during steps).
        optimizer: The optimizer configuration.
        granularity: ``"example"`` or ``"token"`` weights.
        group: The data-parallel group (``None``: one process).

    Example:
        >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        >>> net = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=7, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> trainer = FunctionalTrainer(net, OptimizerConfig("sgd", lr=0.1))
        >>> state = trainer.init_state()
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> batch = {"input_ids": ids, "labels": ids, "example_id": torch.tensor([0])}
        >>> trainer.step(state, batch, torch.ones(1))[0].step
        1
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerConfig,
        granularity: Granularity = "example",
        *,
        group: DataParallel | None = None,
    ) -> None:
        if granularity not in ("example", "token"):
            raise ValueError(f"weight_granularity={granularity!r} is not one of 'example', 'token'")
        self.model = model
        self.config = optimizer
        self.optimizer = FunctionalOptimizer(optimizer)
        self.granularity: Granularity = granularity
        self.group = group

    def init_state(self, rng: Tensor | None = None) -> TrainState:
        """State 0 from the model's current trainable parameters (detached copies)."""
        params = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }
        rng = torch.get_rng_state() if rng is None else rng
        return TrainState(params, self.optimizer.init(params), rng, 0)

    def logits(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """Logits ``[B, S, V]`` of ``batch`` under ``params``."""
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        if _accepts_use_cache(self.model):
            kwargs["use_cache"] = False
        out = functional_call(self.model, dict(params), (), kwargs)
        return out.logits if hasattr(out, "logits") else out

    def query_losses(
        self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor], *, per_query: bool = True
    ) -> Tensor:
        """Query losses in eval mode: ``[Q]`` mean token losses, or ``[1]`` aggregate.

        The aggregate loss is the mean over every supervised token of the batch.
        """
        with training_mode(self.model, False), step_dtype(params.values()):
            logits = self.logits(params, batch)  # (Q, S, V)
        labels = _labels(batch)
        return (
            example_losses(logits, labels) if per_query else weighted_lm_loss(logits, labels)[None]
        )

    @contextmanager
    def context(self, state: TrainState) -> Iterator[None]:
        """What a step runs in: train mode, its dtype, and the CPU RNG at ``state.rng``.

        The caller's RNG is restored afterwards, so steps consume no caller randomness.
        """
        with (
            torch.enable_grad(),
            torch.random.fork_rng(devices=[]),
            training_mode(self.model, True),
            step_dtype(state.params.values()),
        ):
            torch.set_rng_state(state.rng)
            yield

    def gradient(
        self,
        params: Mapping[str, Tensor],
        batches: Sequence[Mapping[str, Tensor]],
        weights: Sequence[Tensor],
        num_tokens: int,
        *,
        create_graph: bool = False,
    ) -> tuple[list[Tensor], Tensor]:
        """This rank's gradient of the step loss (parameter order) and its loss, summed over
        ``batches`` (the micro-batches), each normalized by the step's ``num_tokens``.

        Runs inside :meth:`context`; ``params`` must require grad.
        """
        names = list(params)
        total: list[Tensor] | None = None
        like = next(iter(params.values()))
        loss_sum = torch.zeros((), dtype=like.dtype, device=like.device)
        for batch, w in zip(batches, weights, strict=True):
            loss = weighted_lm_loss(
                self.logits(params, batch), _labels(batch), w, num_tokens=num_tokens
            )
            grads = torch.autograd.grad(
                loss, [params[k] for k in names], create_graph=create_graph, allow_unused=True
            )
            grads = [
                torch.zeros_like(params[k]) if g is None else g
                for k, g in zip(names, grads, strict=True)
            ]
            total = grads if total is None else [a + g for a, g in zip(total, grads, strict=True)]
            loss_sum = loss_sum + loss.detach()
        assert total is not None, "a step has at least one batch"
        return total, loss_sum

    def reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum over the data-parallel ranks (identity on one process)."""
        return tensors if self.group is None else self.group.sum(tensors)

    def update(
        self, params: Mapping[str, Tensor], opt_state: Any, grads: list[Tensor]
    ) -> tuple[dict[str, Tensor], Any]:
        """Clip ``grads`` (parameter order) and apply the optimizer: new params, opt state
        (:class:`~lightning_bergson.magic.optim.FunctionalOptimizer`)."""
        return self.optimizer.update(params, opt_state, grads)

    def step(
        self,
        state: TrainState,
        batches: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
        weights: Tensor | Sequence[Tensor],
        *,
        num_tokens: int | None = None,
    ) -> tuple[TrainState, Tensor]:
        """One optimizer step on a batch (or the micro-batches of one step) with data weights.

        Args:
            state: The state before the step.
            batches: ``input_ids``, ``labels`` (and ``attention_mask``): one batch, or this
                rank's micro-batches of the step.
            weights: ``[B]`` or ``[B, S]`` (see :func:`batch_weights`), one per batch.
            num_tokens: Supervised tokens of the whole step (all micro-batches and ranks);
                default: those of ``batches`` (one process).

        Returns:
            ``(state after the step, detached training loss of the step)``.
        """
        batches, weights = as_micro_batches(batches, weights)
        if num_tokens is None:
            num_tokens = step_tokens(batches)
        params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        with self.context(state):
            grads, loss = self.gradient(params, batches, weights, num_tokens)
            rng = torch.get_rng_state()
        *grads, loss = self.reduce([*grads, loss])
        with torch.no_grad(), step_dtype(params.values()):
            new_params, opt_state = self.update(_detached(params), state.opt_state, grads)
        return TrainState(new_params, opt_state, rng, state.step + 1), loss


def as_micro_batches(
    batches: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    weights: Tensor | Sequence[Tensor],
) -> tuple[list[Mapping[str, Tensor]], list[Tensor]]:
    """``(micro-batches, weights)`` as lists, from one batch or a step's micro-batches."""
    if isinstance(batches, Mapping):
        batches, weights = [batches], [weights]  # type: ignore[list-item]
    batches, weights = list(batches), list(weights)  # type: ignore[arg-type]
    if not batches or len(batches) != len(weights):
        raise ValueError(
            f"a step needs at least one batch and one weight tensor per batch; got "
            f"{len(batches)} batches and {len(weights)} weight tensors"
        )
    return batches, weights


def _detached(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in params.items()}


@contextmanager
def step_dtype(params: Iterable[Tensor]) -> Iterator[None]:
    """Fix the default dtype for a step: float64 if any parameter is float64, else float32.

    Tensors a step creates without a dtype follow the default dtype; torchopt's Adam bias
    correction ``1 - beta ** count`` was one (the update is now :mod:`.optim`, whose bias
    correction is a Python float, but the model's own forward creates such tensors too). Lightning
    changes the default inside ``training_step`` (``precision="64-true"`` makes it float64,
    ``"bf16-true"`` bfloat16), but the reverse pass and retrains run outside it, so without
    this the replayed steps would differ from the recorded ones (in float32,
    ``1 - 0.999`` is off by 1.3e-5) and metagradients would silently depend on the
    checkpoint schedule. bfloat16/float16 parameters still get float32 (``0.999`` rounds
    to 1 in bfloat16).
    """
    wide = any(p.dtype == torch.float64 for p in params)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if wide else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in train (dropout on) or eval mode for the block, then restore it."""
    before = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in before:
            m.training = mode


def _labels(batch: Mapping[str, Tensor]) -> Tensor:
    return causal_lm_labels(batch)


def _accepts_use_cache(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "use_cache")
