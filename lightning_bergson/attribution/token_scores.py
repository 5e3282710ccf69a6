"""Per-token attribution: which positions of a document (or of a query) carry its score.

A document's loss is a sum over its positions, ``L_i = sum_t l_it`` (with
``loss_reduction="mean"`` each ``l_it`` is divided by the document's supervised tokens), and
a stored row is a linear map ``P`` of the loss's parameter gradient (:mod:`.directions`), so
the row splits exactly into per-token rows ``c_it = P(grad l_it)`` and every score that is
linear in the row splits with it.

**Documents** (:func:`document_token_scores`). Against a processed query ``u`` (``H^-1 q``
for inner products) the score of token ``t`` is ``u . c_it = <P^T u, grad l_it>``: the
derivative of ``l_it`` along the parameter direction ``v = P^T u``. One forward-mode pass
(``torch.func.jvp`` of the token losses ``[B, S]`` along ``v``) gives it for every token of
every document, exactly, without forming a per-token gradient. Position ``t``'s loss depends
on every earlier position's activations, which a per-layer ``g_t a_t^T`` decomposition would
miss; the JVP differentiates through all of them. Cost: one forward-mode pass (about two to
three forwards) per query, plus one backward of the batch for the document rows.

**Queries** (:func:`token_rows`): the query's own token rows ``c_t``, one backward per
supervised position through the store's hooks (a fact query supervises only its answer's
few tokens); they are then scored against stored rows like queries (``H^-1`` applied to each,
linear), so the scores of a query's tokens sum to the query's score.

**Cosine.** A cosine divides a document's inner product by its norm (and the query's);
the per-token score applies the document's normalization to each token's contribution:
``s_it = u . c_it / |H^-1/2 row_i|`` with ``u = H^-1/2 q / |H^-1/2 q|``, so the token scores of
a document add up to its cosine score. A token's score is its share of the document's
cosine, not the cosine of the token's own gradient.

Every result is checked: the token scores of each document must add up to the score of the
document's row made by the store's hooks (an independent backward pass), and a query's token
rows to its row, else :class:`TokenScoreMismatchError` says why and what to fix. What no
check can see is a ``token_loss_fn`` whose sum is not the loss the store's rows are the
gradients of: the default (causal-LM token losses, with the store's ``loss_reduction``) is,
by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..losses import TokenLossFn, causal_lm_token_loss_fn
from ..store import ModuleBlock
from .directions import parameter_directions
from .preconditioners import SecondMomentPreconditioner
from .queries import to_device
from .query_encoder import QueryEncoder, query_mode
from .scoring import ExampleReducer
from .streaming import StreamingScorer

__all__ = [
    "TokenScoreMismatchError",
    "document_token_scores",
    "jvp_token_scores",
    "score_token_queries",
    "token_queries",
    "token_rows",
]


class TokenScoreMismatchError(ValueError):
    """Token scores do not add up to their document's (or query's) score."""


def _columns(blocks: Sequence[ModuleBlock]) -> Tensor:
    return torch.cat([torch.arange(b.offset, b.offset + b.size) for b in blocks])


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a sum check: ``sqrt(eps)`` of the network's dtype."""
    return float(torch.finfo(dtype).eps) ** 0.5


class _LossCall(nn.Module):
    """``token_loss_fn(network, batch)`` as a module call, so ``functional_call`` can swap
    the network's parameters for the forward-mode pass."""

    def __init__(self, network: nn.Module, token_loss_fn: TokenLossFn, batch: Any) -> None:
        super().__init__()
        self.network, self.fn, self.batch = network, token_loss_fn, batch

    def forward(self) -> Tensor:
        return self.fn(self.network, self.batch)


def jvp_token_scores(
    network: nn.Module, batch: Any, directions: Mapping[str, Tensor], token_loss_fn: TokenLossFn
) -> Tensor:
    """``[Q, B, S]``: the derivative of each token loss along each parameter direction.

    Args:
        network: The network; its parameters are not changed.
        batch: Documents, on the network's device.
        directions: Parameter name -> ``[Q, *param.shape]`` (others: zero).
        token_loss_fn: ``(network, batch) -> [B, S]``.

    Raises:
        NotImplementedError: an operation of the network has no forward-mode derivative
            (the message names it); fused attention kernels are avoided here already.
    """
    params = dict(network.named_parameters())
    primals = {f"network.{n}": params[n].detach() for n in directions}
    call = _LossCall(network, token_loss_fn, batch)
    num = len(next(iter(directions.values())))
    out = []
    # The fused SDPA kernels have no forward-mode derivative; the math kernel is exact.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        for q in range(num):
            tangents = {f"network.{n}": d[q].to(params[n]) for n, d in directions.items()}
            _, dots = jvp(lambda p: functional_call(call, p, ()), (primals,), (tangents,))
            out.append(dots.to(torch.float64))  # (B, S)
    return torch.stack(out)  # (Q, B, S)


def document_token_scores(
    encoder: QueryEncoder,
    model: nn.Module,
    batch: Any,
    q: Tensor,
    blocks: Sequence[ModuleBlock],
    pre: SecondMomentPreconditioner | None,
    *,
    unit_norm: bool,
    token_loss_fn: TokenLossFn | None = None,
) -> Tensor:
    """Scores ``[Q, B, S]`` (float64, CPU) of every token of ``batch`` against processed queries.

    Args:
        encoder: The store's query encoder.
        model: The network the store's modules refer to (or its LightningModule).
        batch: The documents.
        q: Processed queries ``[Q, D_sel]`` over ``blocks``
            (:meth:`~.streaming.StreamingScorer.process`: ``H^-1 q``, or ``unit(H^-1/2 q)``).
        blocks: The scored blocks.
        pre: The preconditioner ``q`` was processed with.
        unit_norm: Cosine scores (each document's normalization applied to its tokens).
        token_loss_fn: ``(network, batch) -> [B, S]`` (default: the causal-LM token losses
            with the store's ``loss_reduction``).

    Raises:
        TokenScoreMismatchError: a document's token scores do not add up to its score.
    """
    fn = token_loss_fn or causal_lm_token_loss_fn(encoder.settings.loss_reduction)
    u = q.to("cpu", torch.float64)
    if unit_norm and pre is not None:
        u = pre.apply(u, -0.5, blocks)  # (u . H^-1/2 row) == (H^-1/2 u) . row
    collector = encoder.collector(model)  # not entered: its settings give P^T
    network = collector.model
    directions = parameter_directions(collector, u, [b.name for b in blocks])
    device = next(network.parameters()).device
    with query_mode(network, []):
        scores = jvp_token_scores(network, to_device(batch, device), directions, fn)
    rows = encoder.query_gradients(model, batch, loss_fn=lambda m, b: fn(m, b).sum(1))
    rows = rows[:, _columns(blocks)].to(torch.float64)  # (B, D_sel)
    norms = torch.ones(len(rows), dtype=torch.float64)
    if unit_norm:
        x = pre.apply(rows, -0.5, blocks) if pre is not None else rows
        norms = torch.linalg.vector_norm(x, dim=1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # (B,)
    scores = scores.cpu() / norms[None, :, None]
    want = (u @ rows.T) / norms  # (Q, B): each document's score from its row
    _check_sums(scores.sum(-1), want, scores.abs().sum(-1), next(network.parameters()).dtype)
    return scores


def _check_sums(got: Tensor, want: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
    """Refuse token scores whose sums ``[Q, B]`` differ from the documents' scores."""
    tol = _tolerance(dtype)
    err = (got - want).abs()
    bad = err > tol * (scale + want.abs()) + torch.finfo(torch.float64).tiny
    if bool(bad.any()):
        q, i = (int(x) for x in bad.nonzero()[0])
        raise TokenScoreMismatchError(
            f"the token scores of document {i} add up to {float(got[q, i]):.6g} against query "
            f"{q}, but the document's row (made by the store's hooks) scores "
            f"{float(want[q, i]):.6g} (tolerance {tol:.2g}, relative): the forward-mode "
            "derivative of the token losses and the hooks disagree. Causes: a tracked module's "
            "weight also used outside that module (tied weights), a network that is not "
            "deterministic in eval mode, or low precision (run the network in float32)."
        )


def token_rows(
    encoder: QueryEncoder, model: nn.Module, batch: Any, token_loss_fn: TokenLossFn | None = None
) -> Tensor:
    """Per-token rows ``[B, S, D]`` (CPU): row ``[i, t]`` is the store's row of ``l_it`` alone.

    One backward per position whose token loss is non-zero for some example (a masked
    position's loss is zero); the rows of each example sum to its row (checked against one
    backward of the summed loss).

    Raises:
        TokenScoreMismatchError: the positions' rows do not add up to the example's row.
    """
    fn = token_loss_fn or causal_lm_token_loss_fn(encoder.settings.loss_reduction)
    sink = _PositionSink(encoder.store.modules)
    collector = encoder.collector(model, closure=sink.add)
    network = collector.model
    weights = [m.weight for m in collector.modules.values()]
    device = next(network.parameters()).device
    with query_mode(network, weights), collector, torch.enable_grad():
        losses = fn(network, to_device(batch, device))  # (B, S)
        sink.start(*losses.shape, torch.promote_types(losses.dtype, torch.float32))
        positions = (losses.detach() != 0).any(0).nonzero().flatten().tolist()
        for t in positions:
            sink.position = t
            torch.autograd.grad(losses[:, t].sum(), weights, retain_graph=True, allow_unused=True)
    rows = sink.rows  # (B, S, D)
    whole = encoder.query_gradients(model, batch, loss_fn=lambda m, b: fn(m, b).sum(1))
    got, want = rows.sum(1).double(), whole.double()
    err = torch.linalg.vector_norm(got - want, dim=1)
    scale = torch.linalg.vector_norm(rows.double(), dim=2).sum(1) + want.norm(dim=1)
    tol = _tolerance(next(network.parameters()).dtype)
    if bool((err > tol * scale).any()):
        raise TokenScoreMismatchError(
            f"the per-token rows do not add up to the query's row (relative error "
            f"{float((err / scale.clamp(min=1e-300)).max()):.3g}); a position whose token "
            "loss is exactly 0 for every query was skipped but has a gradient: make "
            "token_loss_fn return exact zeros only where a token enters no loss"
        )
    return rows


class _PositionSink:
    """The collector's closure for one backward per position: rows go to ``[B, S, D]``."""

    def __init__(self, blocks: Sequence[ModuleBlock]) -> None:
        self.blocks = {b.name: b for b in blocks}
        self.dim = sum(b.size for b in blocks)
        self.position = 0
        self.rows = torch.zeros(0, 0, self.dim)

    def start(self, batch: int, seq: int, dtype: torch.dtype) -> None:
        self.rows = torch.zeros(batch, seq, self.dim, dtype=dtype)

    def add(self, name: str, rows: Tensor) -> None:
        b = self.blocks[name]  # a module called twice per forward adds twice, as capture does
        self.rows[:, self.position, b.offset : b.offset + b.size] += rows.detach().cpu()


def token_queries(
    rows: Tensor,
    full: Tensor,
    blocks: Sequence[ModuleBlock],
    pre: SecondMomentPreconditioner | None,
    *,
    unit_norm: bool,
) -> Tensor:
    """Per-token query rows ``[Q, S, D]`` processed like their query ``[Q, D_sel]`` rows.

    Inner products: ``H^-1 c_t`` (linear, so they sum to the processed query). Cosine:
    ``H^-1/2 c_t / |H^-1/2 q|``, the query's normalization applied to each of its tokens,
    ready for :meth:`~.streaming.StreamingScorer.iter_scores` like a processed query.

    Returns:
        ``[Q * S, D_sel]`` float64.
    """
    cols = _columns(blocks)
    num, seq = rows.shape[:2]
    x = rows[..., cols].to(torch.float64).reshape(num * seq, -1)  # (Q * S, D_sel)
    if pre is not None:
        x = pre.apply(x, -0.5 if unit_norm else -1.0, blocks)
    if unit_norm:
        z = full[:, cols].to(torch.float64)
        z = pre.apply(z, -0.5, blocks) if pre is not None else z
        norm = torch.linalg.vector_norm(z, dim=1)  # (Q,)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        x = (x.reshape(num, seq, -1) / norm[:, None, None]).reshape(num * seq, -1)
    return x


def score_token_queries(
    scorer: StreamingScorer,
    x: Tensor,
    blocks: Sequence[ModuleBlock],
    pre: SecondMomentPreconditioner | None,
    *,
    example_ids: Sequence[int] | None = None,
    reduce: str = "none",
    cache_norms: bool = False,
) -> tuple[Tensor, np.ndarray]:
    """Scores ``[Q * S, n]`` of token queries (:func:`token_queries`) against the store.

    Args:
        scorer: The store's streaming scorer.
        x: Processed token queries ``[Q * S, D_sel]``.
        blocks: Their blocks.
        pre: The preconditioner they were processed with.
        example_ids: Keep only the rows of these examples (default: every row).
        reduce: ``"none"`` (a column per row), ``"sum"`` or ``"mean"`` of each example's rows
            (linear, so token scores still add up; ``"max"`` is refused).
        cache_norms: As :meth:`StreamingScorer.iter_scores`.

    Returns:
        ``(scores [Q * S, n], example ids [n])``: columns are stored rows in store order, or
        examples in ascending id order when reduced.
    """
    if reduce not in ("none", "sum", "mean"):
        raise ValueError(
            f"example_reduce={reduce!r}: per-token scores add up to an example's score only "
            "under a linear reduction; use an Attributor with example_reduce='mean', 'sum' "
            "or 'none'"
        )
    ids = scorer.store.example_ids
    keep = np.ones(len(ids), dtype=bool)
    if example_ids is not None:
        keep = np.isin(ids, np.asarray(example_ids, dtype=np.int64))
        if missing := sorted(set(map(int, example_ids)) - set(ids[keep].tolist())):
            raise KeyError(
                f"example ids {missing[:10]} have no row in the store {scorer.store.path}"
            )
    q = x.to(scorer.device, scorer.dtype)
    reducer = None
    if reduce != "none":
        reducer = ExampleReducer(ids[keep], len(q), reduce, q.dtype)  # type: ignore[arg-type]
    parts, done = [], 0
    for chunk in scorer.iter_scores(q, blocks, pre, cache_norms=cache_norms):
        mask = torch.from_numpy(keep[chunk.start : chunk.start + chunk.scores.shape[1]])
        kept = chunk.scores[:, mask.to(chunk.scores.device)].cpu()  # (Q * S, n')
        if reducer is not None:
            reducer.add(kept, done)
        else:
            parts.append(kept)
        done += kept.shape[1]
    if reducer is not None:
        reduced, uniq = reducer.result()
        return reduced, uniq.numpy()
    scores = torch.cat(parts, 1) if parts else torch.zeros(len(q), 0, dtype=q.dtype)
    return scores, ids[keep]
