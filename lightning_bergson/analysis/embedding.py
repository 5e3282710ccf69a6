"""A non-gradient baseline: cosine of the trained model's mean last hidden states.

A document and a query are near when the model represents them alike. This needs no
gradients and no store, so it separates "the model sees these texts as similar" from "this
document's gradient moves the query's loss" (the attribution methods)::

    scores = hidden_state_cosine(model, query_batch, doc_batches)     # [Q, N]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["hidden_state_cosine", "mean_hidden_states"]


@torch.no_grad()
def mean_hidden_states(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """``[B, H]`` mean of the last hidden state over each row's attended tokens.

    Args:
        model: A Hugging Face model that accepts ``output_hidden_states=True``.
        batch: ``input_ids`` ``[B, S]`` and optionally ``attention_mask`` (1 = token).
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
        )
    finally:
        model.train(was_training)
    h = out.hidden_states[-1].float()  # (B, S, H)
    m = mask.to(h.device)[..., None].float()  # (B, S, 1)
    if (m.sum(1) == 0).any():
        raise ValueError("a row of the batch has no attended token (attention_mask all 0)")
    return ((h * m).sum(1) / m.sum(1)).cpu()  # (B, H)


def hidden_state_cosine(
    model: nn.Module,
    queries: Mapping[str, Tensor],
    docs: Iterable[Mapping[str, Tensor]],
) -> Tensor:
    """``[Q, N]`` cosine of mean last hidden states of queries and documents.

    Args:
        model: The trained model.
        queries: One batch of queries.
        docs: Batches of documents, in document order.
    """
    q = nn.functional.normalize(mean_hidden_states(model, queries), dim=1)  # (Q, H)
    d = torch.cat([mean_hidden_states(model, b) for b in docs])  # (N, H)
    return q @ nn.functional.normalize(d, dim=1).T  # (Q, N)
