"""k-extractability: does greedy decoding from a k-token prefix reproduce the next m tokens?

A training sequence ``x`` is *(k, m)-extractable* from a model when greedy decoding started
from ``x[start : start + k]`` emits exactly ``x[start + k : start + k + m]``. Evaluated at
several checkpoints, the first step from which a sequence stays extractable is when it was
memorized::

    ok = k_extractable(model, sequences, k=8, m=12)                  # [B] bool
    history = np.stack([k_extractable(m_t, sequences, 8, 12) for m_t in checkpoints])
    memorized_at = memorization_steps(history, steps)                # [B], -1 = never

Decoding runs in batches (all prefixes have ``k`` tokens, so no padding), in eval mode and
without gradients; the model's training mode is restored afterwards.

References:
    - Carlini et al., "Quantifying Memorization Across Neural Language Models",
      arXiv:2202.07646 (k-extractability, duplicates and memorization).
    - Biderman et al., "Emergent and Predictable Memorization in Large Language Models",
      arXiv:2304.11158 (memorization over training checkpoints).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "extraction_lengths",
    "greedy_continuation",
    "k_extractable",
    "memorization_steps",
    "windows",
]


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    """``[B, S, V]`` logits of a Hugging Face causal LM (``.logits``) or a plain module."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, prefixes: Tensor, num_tokens: int, *, batch_size: int = 64
) -> Tensor:
    """``[B, num_tokens]`` greedy (argmax) continuation of every ``[B, k]`` prefix.

    Args:
        model: A causal LM: ``model(input_ids=..., attention_mask=...)`` returns logits
            ``[B, S, V]`` or an object with ``.logits``.
        prefixes: ``[B, k]`` token ids (``k >= 1``).
        num_tokens: Tokens to generate (``m``).
        batch_size: Prefixes decoded together.
    """
    if prefixes.ndim != 2 or prefixes.shape[1] < 1:
        raise ValueError(f"prefixes must be [B, k] with k >= 1, got {tuple(prefixes.shape)}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, len(prefixes), batch_size):
            ids = prefixes[start : start + batch_size].to(device)  # (b, k)
            for _ in range(num_tokens):
                nxt = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)  # (b, 1)
                ids = torch.cat([ids, nxt], dim=1)
            parts.append(ids[:, prefixes.shape[1] :].cpu())  # (b, m)
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else prefixes.new_zeros(0, num_tokens)


def windows(sequences: Sequence[Sequence[int]] | Tensor, k: int, m: int, start: int = 0) -> Tensor:
    """``[B, k + m]`` token windows ``x[start : start + k + m]`` of every sequence.

    Raises:
        ValueError: A sequence is shorter than ``start + k + m`` (named by index and length).
    """
    if k < 1 or m < 1 or start < 0:
        raise ValueError(f"need k >= 1, m >= 1 and start >= 0; got k={k}, m={m}, start={start}")
    rows = sequences.tolist() if isinstance(sequences, Tensor) else [list(s) for s in sequences]
    short = [(i, len(r)) for i, r in enumerate(rows) if len(r) < start + k + m]
    if short:
        raise ValueError(
            f"sequences (index, length) {short[:5]} are shorter than start + k + m = "
            f"{start + k + m}; use a smaller k or m, or leave them out"
        )
    return torch.tensor([r[start : start + k + m] for r in rows], dtype=torch.long)


def extraction_lengths(
    model: nn.Module,
    sequences: Sequence[Sequence[int]] | Tensor,
    k: int,
    m: int,
    *,
    start: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """``[B]`` how many leading tokens of ``x[start+k : start+k+m]`` greedy decoding matches.

    ``m`` means (k, m)-extractable; 0 means the first generated token is already wrong.

    Args:
        model: A causal LM (see :func:`greedy_continuation`).
        sequences: Token ids per sequence (ragged lists, or a ``[B, L]`` tensor without
            padding inside the window).
        k: Prefix tokens.
        m: Continuation tokens that must match.
        start: Where the prefix starts in each sequence.
        batch_size: Prefixes decoded together.
    """
    win = windows(sequences, k, m, start)  # (B, k + m)
    generated = greedy_continuation(model, win[:, :k], m, batch_size=batch_size)  # (B, m)
    match = (generated == win[:, k:]).long()  # (B, m)
    return match.cumprod(dim=1).sum(dim=1)  # (B,) matches before the first miss


def k_extractable(
    model: nn.Module,
    sequences: Sequence[Sequence[int]] | Tensor,
    k: int,
    m: int,
    *,
    start: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """``[B]`` bool: greedy decoding from the k-token prefix reproduces the next m tokens."""
    return extraction_lengths(model, sequences, k, m, start=start, batch_size=batch_size) == m


def memorization_steps(history: np.ndarray | Tensor, steps: Sequence[int]) -> np.ndarray:
    """``[B]`` first evaluated step from which each sequence stays extractable to the end.

    Args:
        history: ``[T, B]`` bool, row ``t`` = extractability at ``steps[t]``.
        steps: ``T`` increasing training steps (or epochs) of the evaluations.

    Returns:
        The step, or ``-1`` for sequences not extractable at the last evaluation. A
        sequence extractable at step 3, forgotten at 4 and extractable again from 5 on
        gets 5: memorized means it stays.

    Example:
        >>> history = np.array([[0, 1, 0], [1, 0, 0], [1, 1, 0]], bool)  # 3 steps x 3 sequences
        >>> memorization_steps(history, [10, 20, 30])
        array([20, 30, -1])
    """
    h = np.asarray(history, dtype=bool)
    if h.ndim != 2 or h.shape[0] != len(steps):
        raise ValueError(
            f"history must be [T, B] with T = len(steps) = {len(steps)}, got {h.shape}"
        )
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"steps must increase, got {list(steps)}")
    out = np.full(h.shape[1], -1, dtype=np.int64)
    for b in range(h.shape[1]):
        t = len(steps)
        while t > 0 and h[t - 1, b]:
            t -= 1
        if t < len(steps):
            out[b] = steps[t]
    return out
