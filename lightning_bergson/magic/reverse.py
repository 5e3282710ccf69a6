"""The MAGIC reverse pass: dL_query/dw carried backward through every training step.

With ``z_t = (theta_t, opt_state_t)`` and one step ``z_{t+1} = step(z_t, w; batch_t)``, the
adjoint ``a_t = dL/dz_t`` follows ``a_t = a_{t+1} . d step / d z_t`` and the data weights
collect ``dL/dw += a_{t+1} . d step / d w``, for ``t = T-1 .. 0``, starting from
``a_T = (dL_query/dtheta_T, 0)``. Each vector-Jacobian product is a double backward
(``torch.autograd.grad`` through a step traced with ``create_graph=True``); state ``t`` is
recomputed by replaying from the nearest kept state (see
:func:`~lightning_bergson.magic.functional.checkpoint_steps`; the VJP itself is
:func:`~lightning_bergson.magic.vjp.vjp_step`). One replay serves every query: the step is
traced once and differentiated once per query adjoint. Under data parallelism every rank
walks its own shard of the same steps in lockstep, and the scores are summed at the end.

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

from .distributed import DataParallel
from .functional import batch_weights, replay_keep_next
from .step import FunctionalTrainer, TrainState
from .trajectory import Trajectory
from .vjp import query_gradients, vjp_step

__all__ = ["ReverseState", "metagradients", "query_gradients", "replay", "step_inputs", "vjp_step"]

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

    Under data parallelism (``trainer.group``) every rank calls this with its own trajectory
    (its shards of every step) and gets the full scores, summed over ranks.

    Args:
        trainer: The step function the forward training used.
        traj: The finished forward trajectory.
        query: Query batch (``input_ids``, ``labels`` with ``-100`` on unscored tokens).
        num_examples: ``N``; scores are indexed by ``example_id``.
        data_weights: The weights the forward training used (``None``: all ones).
        per_query: One score row per query, or one row for the aggregate query loss.
        seq_len: ``S`` of per-token scores (default: the longest training batch).
        state_path: Save the reverse state there every ``save_every`` steps and resume from
            it if it exists (removed when the pass finishes); under data parallelism each
            rank uses its own file, ``<stem>.rank<r><suffix>``.
        save_every: Steps between saves (0: never).

    Returns:
        ``[Q, N]`` (``[Q, N, S]`` per token) with ``Q = 1`` for the aggregate query.
    """
    if traj.final is None:
        raise RuntimeError("the trajectory is not finished; train (fit) before attributing")
    group = trainer.group
    if group is not None:
        group.same_int(traj.num_steps, "the number of recorded steps")
    final = traj.final
    device = next(iter(final.params.values())).device
    query = _to(query, device)
    num_q = len(query["input_ids"]) if per_query else 1
    shape: tuple[int, ...] = (num_q, num_examples)
    if trainer.granularity == "token":
        longest = max(b["input_ids"].shape[1] for step in traj.batches for b in step)
        longest = longest if group is None else group.max_int(longest)
        shape = (
            *shape,
            seq_len or (data_weights.shape[1] if data_weights is not None else longest),
        )
    fingerprint = _fingerprint(trainer, traj, query, per_query, data_weights, shape)
    path = _rank_path(state_path, group)
    rs = _start(trainer, final, query, per_query, shape, fingerprint, path, device)
    _run(trainer, traj, rs, data_weights, device, path, save_every)
    if path is not None and path.is_file():
        path.unlink()
    return rs.scores if group is None else group.sum([rs.scores])[0]


def _rank_path(state_path: str | Path | None, group: DataParallel | None) -> Path | None:
    if state_path is None:
        return None
    path = Path(state_path)
    return path if group is None else path.with_name(f"{path.stem}.rank{group.rank}{path.suffix}")


def _start(
    trainer: FunctionalTrainer,
    final: TrainState,
    query: Mapping[str, Tensor],
    per_query: bool,
    shape: tuple[int, ...],
    fingerprint: str,
    path: Path | None,
    device: torch.device,
) -> ReverseState:
    """The saved reverse state at ``path`` if there is one, else the state at step ``T``."""
    if path is not None and path.is_file():
        rs = ReverseState.load(path, device)
        if rs.fingerprint != fingerprint:
            raise ValueError(
                f"the reverse state at {path} belongs to another run (fingerprint "
                f"{rs.fingerprint} != {fingerprint}); delete it or pass another state_path"
            )
        return rs
    leaves = [t for t in final.opt_leaves() if t.is_floating_point()]
    adjoints = [
        [*g, *(torch.zeros_like(t) for t in leaves)]
        for g in query_gradients(trainer, final.params, query, per_query=per_query)
    ]
    dtype = next(iter(final.params.values())).dtype
    scores = torch.zeros(shape, dtype=dtype, device=device)
    return ReverseState(final.step - 1, adjoints, scores, fingerprint)


def step_inputs(
    trainer: FunctionalTrainer,
    traj: Trajectory,
    t: int,
    data_weights: Tensor | None,
    like: Tensor,
) -> tuple[list[dict[str, Tensor]], list[Tensor], int]:
    """Step ``t``'s micro-batches (on ``like``'s device), their weights and token count."""
    batches = [_to(b, like.device) for b in traj.batches[t]]
    weights = [
        batch_weights(
            data_weights, b["example_id"], b["input_ids"].shape[1], trainer.granularity, like
        )
        for b in batches
    ]
    return batches, weights, traj.tokens[t]


def replay(
    trainer: FunctionalTrainer,
    traj: Trajectory,
    state: TrainState,
    end: int,
    data_weights: Tensor | None = None,
) -> TrainState:
    """Train from ``state`` over the recorded steps ``state.step .. end - 1``."""
    like = next(iter(state.params.values()))
    for t in range(state.step, end):
        batches, weights, tokens = step_inputs(trainer, traj, t, data_weights, like)
        state, _ = trainer.step(state, batches, weights, num_tokens=tokens)
    return state


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

    def inputs(t: int) -> tuple[list[dict[str, Tensor]], list[Tensor], int]:
        return step_inputs(trainer, traj, t, data_weights, like)

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
            batches, ws, tokens = inputs(idx)
            state, _ = trainer.step(state, batches, ws, num_tokens=tokens)
            idx += 1
            if idx == keep and idx < target:
                stack.append((idx, state))
                keep = replay_keep_next(idx, target, traj.schedule)
        batches, ws, tokens = inputs(target)
        rs.adjoints, w_grads = vjp_step(trainer, state, batches, ws, tokens, rs.adjoints)
        for batch, w_grad in zip(batches, w_grads, strict=True):
            view = rs.scores if w_grad.ndim == 2 else rs.scores[:, :, : w_grad.shape[2]]
            view.index_add_(1, batch["example_id"], w_grad.to(rs.scores.dtype))  # (Q, N[, S])
        rs.next_step = target - 1
        done += 1
        if path is not None and save_every > 0 and done % save_every == 0:
            rs.save(path)
