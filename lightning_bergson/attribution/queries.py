"""Query batches and query losses: what a query gradient is the gradient of.

A query row is made exactly like a training row: the gradient of the query's own loss
``L_q`` (sum of its supervised token losses, or their mean when the store was captured with
``loss_reduction="mean"``), hooked by the same :class:`GradientCollector`. With
``answers``, only the answer tokens are supervised (TrackStar's fact queries: the prompt
conditions, the answer is scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..batch import collate_batch
from ..data import tokenize_texts
from ..losses import LossFn, causal_lm_loss_fn

__all__ = ["LossFn", "causal_lm_query_losses", "query_batch"]


def query_batch(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    answers: Sequence[str] | None = None,
    max_length: int = 1024,
    append_eos: bool = False,
) -> dict[str, Tensor]:
    """A right-padded causal-LM batch of queries, in the training batch contract.

    Args:
        tokenizer: The tokenizer the model was trained with.
        texts: Query texts, or prompts when ``answers`` is given.
        answers: Continuations scored as the query (e.g. ``" Lyon"``); the prompt's tokens
            get label -100. ``None`` supervises every token, as training does.
        max_length: Tokens kept per query.
        append_eos: Append the eos token (as ``TextDataModule(append_eos=True)`` does for
            training documents): use it to reproduce a training document's row.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``[Q, S]`` and ``example_id`` ``[Q]``
        (``0 .. Q-1``).

    Example:
        >>> from lightning_bergson.data import train_tokenizer
        >>> tok = train_tokenizer(["Alice was born in Lyon."], vocab_size=300)
        >>> b = query_batch(tok, ["Alice was born in"], answers=[" Lyon"])
        >>> b["labels"][0].tolist().count(-100) == len(tok("Alice was born in")["input_ids"])
        True
    """
    if answers is not None and len(answers) != len(texts):
        raise ValueError(f"got {len(texts)} query texts but {len(answers)} answers")
    full = [t + a for t, a in zip(texts, answers, strict=True)] if answers else list(texts)
    ids = tokenize_texts(full, tokenizer, max_length, append_eos)
    batch = collate_batch(
        [{"input_ids": row, "example_id": i} for i, row in enumerate(ids)],
        pad_token_id=int(tokenizer.pad_token_id or 0),
    )
    if answers is not None:
        prompts = tokenize_texts(list(texts), tokenizer, max_length, append_eos=False)
        for i, (row, prompt) in enumerate(zip(ids, prompts, strict=True)):
            if row[: len(prompt)] != prompt:
                raise ValueError(
                    f"query {i}: the tokens of the prompt {texts[i]!r} are not a prefix of the "
                    f"tokens of prompt + answer; start the answer with a space (e.g. ' Lyon')"
                )
            batch["labels"][i, : len(prompt)] = -100
    return batch


def causal_lm_query_losses(reduction: str) -> LossFn:
    """Per-query causal-LM loss ``[B]``: summed (``"sum"``) or mean supervised token loss.

    The default ``loss_fn`` of :meth:`Attributor.query_gradients` (see
    :func:`lightning_bergson.losses.causal_lm_loss_fn`, which refuses other batches).
    """
    return causal_lm_loss_fn(reduction)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` (mappings, sequences, dataclasses, tensors) moved to ``device``."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)
