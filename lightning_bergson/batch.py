"""The batch contract: example ids in any batch type, the labels rule, token counts, collation.

Gradient capture needs, for every training batch, each example's dataset row (its
``example_id``). Where the ids live depends on the batch type:

* a **mapping** (``dict``, Hugging Face ``BatchEncoding``) carries them under a key
  (``"example_id"``); :class:`~lightning_bergson.TextDataModule` adds it, or
  ``dataset.map(lambda ex, i: {"example_id": i}, with_indices=True)``;
* **any other batch** (tuples, lists, tensors, dataclasses) cannot hold an extra key, so the
  Bergson strategies (``strategy="bergson"``, ``"bergson_ddp"``, ``"bergson_fsdp2"``) wrap it
  as :class:`IdStamped` ``(batch, example_id)`` with the sampler's dataset rows and unwrap it
  before ``training_step``: the LightningModule sees its batch unchanged.

The causal-LM labels rule (:func:`causal_lm_labels`) and the supervised-token count
(:func:`supervised_tokens`) are defined here once and used by capture, queries, EK-FAC and
MAGIC.

Example:
    >>> stamped = IdStamped((torch.zeros(2, 3), torch.ones(2)), torch.tensor([7, 9]))
    >>> example_ids(stamped).tolist(), type(unstamp(stamped)).__name__
    ([7, 9], 'tuple')
    >>> example_ids({"input_ids": torch.zeros(2, 3, dtype=torch.long), "example_id": [4, 5]})
    tensor([4, 5])
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "EXAMPLE_ID",
    "IGNORE_INDEX",
    "IdStamped",
    "MissingExampleIdError",
    "batch_size",
    "causal_lm_labels",
    "collate_batch",
    "example_ids",
    "lm_fields",
    "stamp",
    "supervised_tokens",
    "unstamp",
]

EXAMPLE_ID = "example_id"
"""Default batch key of each example's dataset row."""

IGNORE_INDEX = -100
"""Label of positions that enter no loss (Hugging Face's convention)."""


class MissingExampleIdError(KeyError):
    """A training batch carries no ``example_id``: capture cannot tell whose row is whose."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


class IdStamped(NamedTuple):
    """A batch of any type together with its examples' dataset rows.

    Lightning moves both fields to the device (it maps over named tuples), and the Bergson
    strategies hand ``batch`` alone to ``training_step``.

    Attributes:
        batch: The batch exactly as the DataLoader's collate function built it.
        example_id: ``[B]`` int64 dataset rows.
    """

    batch: Any
    example_id: Tensor


def stamp(batch: Any, ids: Tensor, *, key: str = EXAMPLE_ID) -> tuple[Any, bool]:
    """Attach dataset rows to ``batch``; returns ``(batch, added)``.

    A mapping that already has ``key`` is left alone (``added=False``); a mutable mapping
    gets the key; anything else is wrapped in :class:`IdStamped`.
    """
    if isinstance(batch, Mapping) and key in batch:
        return batch, False
    if isinstance(batch, MutableMapping):
        batch[key] = ids
        return batch, True
    return IdStamped(batch, ids), True


def unstamp(batch: Any) -> Any:
    """The batch a LightningModule should see: :class:`IdStamped` unwrapped, else ``batch``."""
    return batch.batch if isinstance(batch, IdStamped) else batch


def example_ids(batch: Any, key: str = EXAMPLE_ID) -> Tensor:
    """Each example's dataset row ``[B]`` (int64, CPU).

    Raises:
        MissingExampleIdError: the batch carries none; the message says how to add them.
    """
    if isinstance(batch, IdStamped):
        ids = batch.example_id
    elif isinstance(batch, Mapping) and key in batch:
        ids = batch[key]
    else:
        raise MissingExampleIdError(_missing_message(batch, key))
    return torch.as_tensor(ids).detach().to("cpu", torch.int64).reshape(-1)


def _missing_message(batch: Any, key: str) -> str:
    if isinstance(batch, Mapping):
        has = f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
        fix = (
            f"add {key!r} in the dataset (`dataset.map(lambda ex, i: {{{key!r}: i}}, "
            "with_indices=True)`) and keep it through your collate function, use "
            "lightning_bergson.TextDataModule, or train with strategy='bergson' (or "
            "'bergson_ddp'/'bergson_fsdp2'), which stamps the sampler's dataset rows into "
            "every batch"
        )
    else:
        has = f"a {type(batch).__name__} batch"
        fix = (
            "train with strategy='bergson' (or 'bergson_ddp'/'bergson_fsdp2'): it stamps the "
            "sampler's dataset rows into batches of any type and hands training_step the batch "
            "unchanged; or yield dict batches with an " + repr(key) + " key"
        )
    return (
        f"gradient capture needs each training batch to carry the dataset row of every example "
        f"({key!r}), but got {has}. To fix it, {fix}."
    )


def batch_size(batch: Any) -> int | None:
    """Examples in ``batch``: the first dimension of its first tensor (``None`` if none)."""
    batch = unstamp(batch)
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        fields = getattr(batch, "__dataclass_fields__", None)
        if fields is None:
            return None
        values = [getattr(batch, f) for f in fields]
    for value in values:
        if isinstance(value, Tensor) and value.ndim:
            return int(value.shape[0])
    return None


def causal_lm_labels(batch: Mapping[str, Any], labels_key: str = "labels") -> Tensor:
    """The labels of a causal-LM batch: ``labels``, else ``input_ids`` ignored where padded.

    Padding is ``attention_mask == 0``; ignored positions are :data:`IGNORE_INDEX`.

    Example:
        >>> ids, mask = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 0]])
        >>> causal_lm_labels({"input_ids": ids, "attention_mask": mask}).tolist()
        [[5, 6, -100]]
    """
    labels = batch.get(labels_key)
    if labels is not None:
        return torch.as_tensor(labels)
    if "input_ids" not in batch:
        raise KeyError(
            f"a causal-LM batch needs 'input_ids' (and optionally {labels_key!r}, -100 = "
            f"ignored); got keys {sorted(map(str, batch))}"
        )
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    return labels if mask is None else labels.masked_fill(mask == 0, IGNORE_INDEX)


def supervised_tokens(labels: Tensor) -> Tensor:
    """Tokens entering each example's shifted causal-LM loss ``[B]``: ``labels[:, 1:] != -100``.

    Position 0 is never predicted (token ``t`` is predicted from the tokens before it).

    Example:
        >>> supervised_tokens(torch.tensor([[1, 2, 3], [4, -100, -100]])).tolist()
        [2, 0]
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def lm_fields(batch: Any, labels_key: str = "labels") -> tuple[Tensor, Tensor] | None:
    """``(input_ids [B, S], labels [B, S])`` when ``batch`` is a causal-LM batch, else ``None``.

    A causal-LM batch is a mapping with 2-D ``input_ids`` and either no labels (the rule of
    :func:`causal_lm_labels`) or 2-D labels of the same shape. 1-D labels (classification),
    tuples and tensors are not.
    """
    batch = unstamp(batch)
    if not isinstance(batch, Mapping):
        return None
    ids = batch.get("input_ids")
    if not isinstance(ids, Tensor) or ids.ndim != 2:
        return None
    labels = batch.get(labels_key)
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != ids.shape):
        return None
    return ids, causal_lm_labels(batch, labels_key)


def collate_batch(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad rows of ``input_ids`` to the longest one and build the batch contract.

    Args:
        rows: Mappings with ``input_ids`` (list of ints), ``example_id`` (int), optionally
            ``labels`` (list of ints, ``-100`` = not supervised, same length) and optionally
            ``advantage`` (float, the weight of a reward-weighted loss; all rows or none).
        pad_token_id: Id written at padded positions of ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ([B, S] int64; labels -100 at padding),
        ``example_id`` ([B] int64) and, when the rows have one, ``advantage`` ([B] float32).

    Example:
        >>> b = collate_batch([{"input_ids": [3, 4], "example_id": 0},
        ...                    {"input_ids": [5], "example_id": 1}], pad_token_id=0)
        >>> b["labels"].tolist(), b["example_id"].tolist()
        ([[3, 4], [5, -100]], [0, 1])
        >>> b = collate_batch([{"input_ids": [3, 4], "labels": [-100, 4], "example_id": 2,
        ...                     "advantage": 0.5}], pad_token_id=0)
        >>> b["labels"].tolist(), b["advantage"]
        ([[-100, 4]], tensor([0.5000]))
    """
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, S)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, S)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        given = row.get("labels")
        if given is not None and len(given) != n:
            raise ValueError(
                f"row example_id={row['example_id']} has {len(given)} labels for {n} input_ids;"
                " labels must have one entry (-100 = not supervised) per token."
            )
        labels[i, :n] = input_ids[i, :n] if given is None else torch.as_tensor(given)
    example_id = torch.tensor([int(row["example_id"]) for row in rows], dtype=torch.long)  # (B,)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_id": example_id,
    }
    with_advantage = ["advantage" in row for row in rows]
    if any(with_advantage):
        if not all(with_advantage):
            raise ValueError(
                f"{with_advantage.count(False)} of {len(rows)} rows have no 'advantage'; give"
                " every row of a batch an advantage or none."
            )
        values = [float(row["advantage"]) for row in rows]
        batch["advantage"] = torch.tensor(values, dtype=torch.float32)  # (B,)
    return batch
