"""Query batches for attribution: free texts, or corpus facts scored on their answer only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..batch import collate_batch
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
    batch = collate_batch(
        [{"input_ids": ids, "labels": lab, "example_id": i} for i, (ids, lab) in enumerate(rows)],
        pad_token_id=int(pad or 0),
    )
    del batch["example_id"]
    return batch  # input_ids, attention_mask, labels (Q, S)
