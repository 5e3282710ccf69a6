"""The MAGIC reverse pass: dL_query/dw carried backward through every training step.

With ``z_t = (theta_t, opt_state_t)`` and one step ``z_{t+1} = step(z_t, w; batch_t)``, the
adjoint ``a_t = dL/dz_t`` follows ``a_t = a_{t+1} . d step / d z_t`` and the data weights
collect ``dL/dw += a_{t+1} . d step / d w``, for ``t = T-1 .. 0``, starting from
``a_T = (dL_query/dtheta_T, 0)``. Each vector-Jacobian product is a double backward
(``torch.autograd.grad`` through a step traced with ``create_graph=True``); state ``t`` is
recomputed by replaying from the nearest kept state (see
:func:`~lightning_bergson.magic.functional.checkpoint_steps`). One replay serves every
query: the step is traced once and differentiated once per query adjoint.

The pass is resumable: with ``state_path`` the adjoints, the scores so far and the next step
are written every ``save_every`` steps to one safetensors file whose header holds the JSON
metadata; a later call with the same arguments continues from it.

References:
    - Ilyas & Engstrom, "MAGIC: Near-Optimal Data Attribution for Deep Learning",
      arXiv:2504.16430.
    - Maclaurin et al., "Gradient-based Hyperparameter Optimization through Reversible
      Learning", ICML 2015 (metagradients through training).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .functional import batch_weights, replay_keep_next
from .step import FunctionalTrainer, TrainState
from .trajectory import Trajectory

__all__ = ["ReverseState", "metagradients", "query_gradients", "vjp_step"]

_FORMAT = "lightning_bergson.magic.reverse_state"


@dataclass
class ReverseState:
    """Where a reverse pass stands: the VJP of ``next_step`` comes next.

    Args:
        next_step: Step whose vector-Jacobian product is next (``-1`` when finished).
        adjoints: Per query, ``dL_q/d(theta, float optimizer leaves)`` after ``next_step``,
            parameters first (in the trajectory's name order).
        scores: ``[Q, N]`` or ``[Q, N, S]`` metagradients accumulated so far.
        fingerprint: Hash of everything the scores depend on; a saved state is only
            resumed by a pass with the same fingerprint.
    """

    next_step: int
    adjoints: list[list[Tensor]]
    scores: Tensor
    fingerprint: str

    def save(self, path: str | Path) -> None:
        """Write the state atomically (a temporary file, then a rename)."""
        path = Path(path)
        tensors = {"scores": self.scores.detach().cpu().contiguous()}
        for q, adj in enumerate(self.adjoints):
            tensors.update(
                {f"adj.{q}.{i}": a.detach().cpu().contiguous() for i, a in enumerate(adj)}
            )
        meta = {
            "next_step": self.next_step,
            "num_queries": len(self.adjoints),
            "num_leaves": len(self.adjoints[0]) if self.adjoints else 0,
            "fingerprint": self.fingerprint,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "json": json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device) -> ReverseState:
        """Read a state written by :meth:`save` onto ``device``."""
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a MAGIC reverse state; delete it or pick a new path"
                )
            meta = json.loads(header["json"])
            adjoints = [
                [f.get_tensor(f"adj.{q}.{i}").to(device) for i in range(meta["num_leaves"])]
                for q in range(meta["num_queries"])
            ]
            scores = f.get_tensor("scores").to(device)
        return cls(meta["next_step"], adjoints, scores, meta["fingerprint"])


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


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
    batch: Mapping[str, Tensor],
    weights: Tensor,
    adjoints: list[list[Tensor]],
) -> tuple[list[list[Tensor]], Tensor]:
    """Pull every query's adjoint back through one training step (double backward).

    Args:
        trainer: The step function.
        state: State ``t`` (before the step).
        batch: Batch ``t`` on the parameters' device.
        weights: ``[B]`` or ``[B, S]`` weights of the batch.
        adjoints: Per query, the adjoint of state ``t + 1`` (parameters, float optimizer leaves).

    Returns:
        ``(adjoints of state t, dL/dw of the batch [Q, B] or [Q, B, S])``.
    """
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    leaves = [
        t.detach().requires_grad_() if t.is_floating_point() else t for t in state.opt_leaves()
    ]
    floats = [t for t in leaves if t.is_floating_point()]
    w = weights.detach().requires_grad_()
    traced = TrainState(params, state.with_opt_leaves(leaves), state.rng, state.step)
    new, _ = trainer.step(traced, batch, w, trace=True)
    outs = list(new.params.values()) + [t for t in new.opt_leaves() if t.is_floating_point()]
    ins = [*params.values(), *floats, w]
    pulled, w_grads = [], []
    for q, adj in enumerate(adjoints):
        pairs = [(o, a) for o, a in zip(outs, adj, strict=True) if o.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            ins,
            grad_outputs=[a for _, a in pairs],
            retain_graph=q < len(adjoints) - 1,
            allow_unused=True,
        )
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(ins, grads, strict=True)]
        pulled.append([g.detach() for g in grads[:-1]])
        w_grads.append(grads[-1].detach())
    return pulled, torch.stack(w_grads)  # (Q, B) or (Q, B, S)


def _fingerprint(
    trainer: FunctionalTrainer,
    traj: Trajectory,
    query: Mapping[str, Tensor],
    per_query: bool,
    data_weights: Tensor | None,
    shape: tuple[int, ...],
) -> str:
    digest = hashlib.sha256(repr((trainer.config, trainer.granularity, per_query, shape)).encode())
    digest.update(str(traj.num_steps).encode())
    tensors = [query[k] for k in sorted(query)] + (
        [data_weights] if data_weights is not None else []
    )
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def metagradients(
    trainer: FunctionalTrainer,
    traj: Trajectory,
    query: Mapping[str, Tensor],
    *,
    num_examples: int,
    data_weights: Tensor | None = None,
    per_query: bool = True,
    seq_len: int | None = None,
    state_path: str | Path | None = None,
    save_every: int = 0,
) -> Tensor:
    """``dL_query/dw`` of every training example (or token) through the recorded training.

    Args:
        trainer: The step function the forward training used.
        traj: The finished forward trajectory.
        query: Query batch (``input_ids``, ``labels`` with ``-100`` on unscored tokens).
        num_examples: ``N``; scores are indexed by ``example_id``.
        data_weights: The weights the forward training used (``None``: all ones).
        per_query: One score row per query, or one row for the aggregate query loss.
        seq_len: ``S`` of per-token scores (default: the longest training batch).
        state_path: Save the reverse state there every ``save_every`` steps and resume from
            it if it exists (removed when the pass finishes).
        save_every: Steps between saves (0: never).

    Returns:
        ``[Q, N]`` (``[Q, N, S]`` per token) with ``Q = 1`` for the aggregate query.
    """
    if traj.final is None:
        raise RuntimeError("the trajectory is not finished; train (fit) before attributing")
    final = traj.final
    device = next(iter(final.params.values())).device
    query = _to(query, device)
    num_q = len(query["input_ids"]) if per_query else 1
    shape: tuple[int, ...] = (num_q, num_examples)
    if trainer.granularity == "token":
        longest = max(b["input_ids"].shape[1] for b in traj.batches)
        shape = (
            *shape,
            seq_len or (data_weights.shape[1] if data_weights is not None else longest),
        )
    fingerprint = _fingerprint(trainer, traj, query, per_query, data_weights, shape)
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file():
        rs = ReverseState.load(path, device)
        if rs.fingerprint != fingerprint:
            raise ValueError(
                f"the reverse state at {path} belongs to another run (fingerprint "
                f"{rs.fingerprint} != {fingerprint}); delete it or pass another state_path"
            )
    else:
        leaves = [t for t in final.opt_leaves() if t.is_floating_point()]
        adjoints = [
            [*g, *(torch.zeros_like(t) for t in leaves)]
            for g in query_gradients(trainer, final.params, query, per_query=per_query)
        ]
        dtype = next(iter(final.params.values())).dtype
        scores = torch.zeros(shape, dtype=dtype, device=device)
        rs = ReverseState(traj.num_steps - 1, adjoints, scores, fingerprint)
    _run(trainer, traj, rs, data_weights, device, path, save_every)
    if path is not None and path.is_file():
        path.unlink()
    return rs.scores


def _run(
    trainer: FunctionalTrainer,
    traj: Trajectory,
    rs: ReverseState,
    data_weights: Tensor | None,
    device: torch.device,
    path: Path | None,
    save_every: int,
) -> None:
    """Walk ``rs`` from ``rs.next_step`` down to step 0, replaying states from kept ones."""
    like = next(iter(traj.final.params.values()))  # type: ignore[union-attr]

    def inputs(t: int) -> tuple[dict[str, Tensor], Tensor]:
        batch = _to(traj.batches[t], device)
        w = batch_weights(
            data_weights,
            batch["example_id"],
            batch["input_ids"].shape[1],
            trainer.granularity,
            like,
        )
        return batch, w

    stack: list[tuple[int, TrainState | None]] = [
        (t, None) for t in traj.kept_steps if t <= rs.next_step
    ]
    done = 0
    while rs.next_step >= 0:
        target = rs.next_step
        idx, state = stack[-1]
        state = traj.state(idx) if state is None else state
        assert state is not None and state.step == idx, "kept states must match their step"
        if idx == target:
            stack.pop()
        keep = replay_keep_next(idx, target, traj.schedule)
        while idx < target:  # recompute state `target`, keeping what later targets need
            state, _ = trainer.step(state, *inputs(idx))
            idx += 1
            if idx == keep and idx < target:
                stack.append((idx, state))
                keep = replay_keep_next(idx, target, traj.schedule)
        batch, w = inputs(target)
        rs.adjoints, w_grad = vjp_step(trainer, state, batch, w, rs.adjoints)
        ids = batch["example_id"]
        view = rs.scores if w_grad.ndim == 2 else rs.scores[:, :, : w_grad.shape[2]]
        view.index_add_(1, ids, w_grad.to(rs.scores.dtype))  # (Q, N[, S]) += (Q, B[, S])
        rs.next_step = target - 1
        done += 1
        if path is not None and save_every > 0 and done % save_every == 0:
            rs.save(path)
