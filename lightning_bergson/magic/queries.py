"""Query batches for attribution: free texts, or corpus facts scored on their answer only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..corpus import Fact

__all__ = ["query_batch"]


def query_batch(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] = (),
    facts: Sequence[Fact] = (),
) -> dict[str, Tensor]:
    """Right-padded query batch: texts (every token scored), then facts (answer scored).

    A fact's row is ``query + answer`` (e.g. ``"Alice Moreau was born in" + " Lyon"``) with
    labels ``-100`` on the prompt, so its loss is the answer's mean token loss.

    Args:
        tokenizer: The training tokenizer (its pad token, or eos, pads).
        texts: Free-text queries.
        facts: Corpus facts.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``[Q, S]``.

    Example:
        >>> import tempfile
        >>> from lightning_bergson.data import train_tokenizer
        >>> from lightning_bergson.corpus import make_biographies
        >>> corpus = make_biographies(2)
        >>> tok = train_tokenizer(corpus.texts, vocab_size=300)
        >>> batch = query_batch(tok, ["hello"], corpus.facts[:1])
        >>> batch["input_ids"].shape[0], bool((batch["labels"][1] == -100).any())
        (2, True)
    """
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, labels)
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append((ids, ids))
    for fact in facts:
        prompt = list(tokenizer(fact.query, add_special_tokens=False)["input_ids"])
        answer = list(tokenizer(fact.answer, add_special_tokens=False)["input_ids"])
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    if not rows:
        raise ValueError("no queries: pass texts=[...] or facts=[...] (e.g. corpus.facts[:4])")
    short = [i for i, (ids, _) in enumerate(rows) if len(ids) < 2]
    if short:
        raise ValueError(f"queries {short} have fewer than 2 tokens, so no token is predicted")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), int(pad or 0), dtype=torch.long)  # (Q, S)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)  # (Q, S)
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # (Q, S)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
