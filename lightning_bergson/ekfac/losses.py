"""Per-example causal-LM losses for EK-FAC: dataset labels (empirical Fisher) or sampled ones.

An example's loss is the *sum* of its supervised token losses (``labels != -100``), as in
Kronfluence's language-model tasks; the DESIGN contract's ``loss_reduction="sum"``.

Example:
    >>> logits = torch.zeros(2, 4, 5)
    >>> labels = torch.tensor([[1, 2, 3, -100], [0, 1, -100, -100]])
    >>> sample_labels(logits, labels, torch.tensor([0, 1]), seed=0, salt=0).ne(-100).sum().item()
    5
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..batch import causal_lm_labels
from ..losses import causal_lm_losses

__all__ = ["batch_labels", "lm_example_losses", "sample_labels"]


def batch_labels(batch: dict[str, Any]) -> Tensor:
    """``labels`` of the batch, else ``input_ids`` with -100 where ``attention_mask`` is 0."""
    if "labels" not in batch and "input_ids" not in batch:
        raise KeyError(
            f"EK-FAC needs batches with 'input_ids' (and 'labels', -100 = ignored); got keys "
            f"{sorted(batch)}. Use lightning_bergson.TextDataModule or override "
            "EkfacModule.example_losses for other models."
        )
    return causal_lm_labels(batch)


def _example_seed(seed: int, salt: int, example_id: int) -> int:
    return (seed * 1_000_003 + salt * 7_919 + example_id * 104_729 + 12_345) % (2**63)


def sample_labels(
    logits: Tensor, labels: Tensor, example_ids: Tensor, *, seed: int, salt: int
) -> Tensor:
    """Labels drawn from the model's predictive distribution at every supervised position.

    Each example's draw uses its own generator seeded by ``(seed, salt, example_id)``, so the
    labels do not depend on batch composition or world size.

    Args:
        logits: ``[B, S, V]``; position ``t`` predicts ``labels[:, t + 1]``.
        labels: ``[B, S]`` dataset labels; only where they are not -100 is a label drawn.
        example_ids: ``[B]`` dataset rows.
        seed: User seed.
        salt: Distinguishes independent draws (e.g. the fitting phase).
    """
    out = labels.clone()  # (B, S)
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)  # (B, S-1, V)
    for i in range(labels.shape[0]):
        keep = labels[i, 1:] != -100  # (S-1,)
        if not bool(keep.any()):
            continue
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(_example_seed(seed, salt, int(example_ids[i])))
        draw = torch.multinomial(probs[i][keep], 1, generator=gen).squeeze(1)  # (n,)
        row = out[i, 1:]
        row[keep] = draw.to(out.dtype)
    return out


def lm_example_losses(
    model: nn.Module, batch: dict[str, Any], *, sample: bool = False, seed: int = 0, salt: int = 0
) -> Tensor:
    """Per-example summed token losses ``[B]`` of a Hugging Face causal LM on ``batch``.

    Args:
        model: A causal LM whose output has ``.logits`` ``[B, S, V]``.
        batch: ``input_ids``, optional ``attention_mask``, ``labels`` and ``example_id``.
        sample: Replace the labels by draws from the model (true Fisher).
        seed: Seed of the draws.
        salt: Distinguishes independent draws.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch_labels(batch)
    if sample:
        ids = batch.get("example_id")
        if ids is None:
            ids = torch.arange(labels.shape[0])
        labels = sample_labels(logits, labels, torch.as_tensor(ids), seed=seed, salt=salt)
    return causal_lm_losses(logits, labels)[0]
