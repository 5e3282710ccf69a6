"""A resumable DataLoader that also stamps each example with its dataset row.

:class:`~lightning_bergson.strategy.BergsonStrategyMixin` wraps every training
DataLoader in :class:`ResumableLoader` after Lightning has inserted its distributed
sampler. The wrapper

* gives every batch its examples' dataset rows (the sampler's indices): dict batches that
  do not carry ``example_id`` get the key, batches of any other type (tuples, lists,
  tensors, dataclasses) are wrapped as :class:`~lightning_bergson.batch.IdStamped`, which
  the strategy unwraps before the LightningModule sees the batch (see
  :func:`lightning_bergson.batch.stamp`);
* implements Lightning's ``state_dict``/``load_state_dict`` loader protocol with
  the number of batches *trained on* this epoch, so a run resumed from a mid-epoch
  checkpoint skips exactly those batches (their indices, not their data) and sees
  the same examples in the same order as an uninterrupted run.

An epoch's order must be a function of the epoch number for that to hold:
``DistributedSampler``, :class:`EpochShuffleSampler` and :class:`TokenBudgetBatchSampler`
(used by :class:`~lightning_bergson.TextDataModule`) are; a ``RandomSampler`` with a shared
generator is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch import stamp

__all__ = ["EpochShuffleSampler", "ResumableLoader", "TokenBudgetBatchSampler", "make_resumable"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` (or of ``indices``) that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at every epoch start, also after a resume.

    Args:
        size: Number of examples.
        seed: Base seed.
        shuffle: ``False`` yields ``0..n-1`` every epoch.
        indices: If given (``size`` of them), the dataset rows to yield instead of
            ``0..n-1``; the permutation is applied to this list.

    Example:
        >>> s = EpochShuffleSampler(5, seed=1)
        >>> first = list(s); s.set_epoch(1); second = list(s); s.set_epoch(0)
        >>> sorted(first) == sorted(second) == list(range(5)), first == list(s)
        (True, True)
        >>> list(EpochShuffleSampler(2, shuffle=False, indices=[4, 7]))
        [4, 7]
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        indices: Sequence[int] | None = None,
    ) -> None:
        if indices is not None and len(indices) != size:
            raise ValueError(f"got {len(indices)} indices for size={size}; pass size=len(indices).")
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.indices = None if indices is None else [int(i) for i in indices]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            order = list(range(self.size))
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        return iter(order if self.indices is None else [self.indices[j] for j in order])

    def __len__(self) -> int:
        return self.size


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of documents whose padded size ``max_len * num_docs`` stays within a budget.

    Documents are sorted by length, longest first (ties by index), and packed greedily:
    a document joins the current batch while ``longest * (docs + 1) <= token_batch_size``
    (Bergson's cost, padding included). The batch count is then made a multiple of
    ``world_size`` by halving the batches with the most documents, and the batches are dealt
    round-robin to the ranks (rank ``r`` gets positions ``r, r + W, ...`` of the epoch's
    order), so every document is in exactly one batch of one rank and every rank runs
    ``len(self)`` batches. With ``shuffle`` the order of the batches (not their contents) is a
    permutation seeded by ``(seed, epoch)``; without it the order is longest first.

    Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` (here the
    :class:`EpochShuffleSampler` of batch positions); :meth:`set_epoch` does the same.

    Args:
        lengths: Token count of every dataset row (``lengths[i]`` is row ``i``).
        token_batch_size: Largest ``max_len_in_batch * num_docs`` of a batch.
        indices: The rows to batch (default all); the others are left out.
        shuffle: Permute the batch order every epoch.
        seed: Seed of that permutation.
        rank: This process's rank.
        world_size: Number of processes sharing the batches.

    Raises:
        ValueError: A document is longer than ``token_batch_size`` (the message names its
            row and length), or there are fewer documents than ``world_size`` batches need.

    Example:
        >>> s = TokenBudgetBatchSampler([3, 5, 2, 4], 8)
        >>> s.batches, list(s), len(s)  # costs 5 * 1, 4 * 2, 2 * 1
        ([[1], [3, 0], [2]], [[1], [3, 0], [2]], 3)
        >>> [list(TokenBudgetBatchSampler([3, 5, 2, 4], 8, rank=r, world_size=2)) for r in (0, 1)]
        [[[1], [0]], [[3], [2]]]
    """

    def __init__(
        self,
        lengths: Sequence[int],
        token_batch_size: int,
        *,
        indices: Sequence[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if token_batch_size < 1:
            raise ValueError(f"token_batch_size={token_batch_size} must be at least 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
        rows = range(len(lengths)) if indices is None else [int(i) for i in indices]
        packed = _pack_by_tokens(lengths, rows, token_batch_size)
        self.batches = _split_to_multiple(packed, lengths, world_size)
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochShuffleSampler(len(self.batches), seed=seed, shuffle=shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s batch order (only matters with ``shuffle``)."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)[self.rank :: self.world_size]
        return iter([list(self.batches[j]) for j in order])

    def __len__(self) -> int:
        return len(self.batches) // self.world_size


def _pack_by_tokens(
    lengths: Sequence[int], rows: Iterable[int], token_batch_size: int
) -> list[list[int]]:
    """Greedy longest-first packing of ``rows`` under ``max_len * num_docs <= token_batch_size``.

    Example:
        >>> _pack_by_tokens([3, 5, 2, 4], range(4), 8)
        [[1], [3, 0], [2]]
    """
    order = sorted(rows, key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if int(lengths[i]) > token_batch_size:
            raise ValueError(
                f"document example_id={i} has {int(lengths[i])} tokens, more than "
                f"token_batch_size={token_batch_size}: pass token_batch_size >= "
                f"{int(lengths[i])}, or truncation=True with max_length <= {token_batch_size}."
            )
        # Sorted longest first, so a batch's first document is its longest.
        if batches and int(lengths[batches[-1][0]]) * (len(batches[-1]) + 1) <= token_batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _split_to_multiple(
    batches: list[list[int]], lengths: Sequence[int], world_size: int
) -> list[list[int]]:
    """Halve the fullest batches until ``len(batches)`` is a multiple of ``world_size``.

    Halving never raises a batch's cost; the result stays longest first.

    Example:
        >>> _split_to_multiple([[1, 3], [0, 2]], [3, 5, 2, 4], 3)
        [[1], [3], [0, 2]]
    """
    docs = sum(len(b) for b in batches)
    target = -(-len(batches) // world_size) * world_size
    if docs < target:
        raise ValueError(
            f"{docs} documents cannot fill {target} batches ({target // world_size} per rank for "
            f"world_size={world_size}, at most one document each); use fewer processes or a "
            "dataset with more documents."
        )
    batches = [list(b) for b in batches]
    while len(batches) < target:
        k = max(range(len(batches)), key=lambda j: len(batches[j]))  # first of the fullest
        half = (len(batches[k]) + 1) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return sorted(batches, key=lambda b: (-int(lengths[b[0]]), b[0]))


class _IndexedDataset(Dataset):
    """``dataset[i] -> (i, dataset[i])``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _IndexedCollate:
    """Collate with the wrapped function, then stamp the indices in (:func:`stamp`)."""

    def __init__(self, collate: Callable[[list], Any], key: str) -> None:
        self.collate, self.key = collate, key

    def __call__(self, items: list[tuple[int, Any]]) -> Any:
        batch = self.collate([item for _, item in items])
        ids = torch.tensor([i for i, _ in items], dtype=torch.int64)  # (B,)
        return stamp(batch, ids, key=self.key)[0]


class _SkippingBatchSampler:
    """Yields the wrapped batch sampler's index lists, dropping the first ``skip`` once."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.sampler = getattr(batch_sampler, "sampler", None)  # Lightning calls set_epoch on it
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        if skip >= len(self):  # saved after the epoch's last batch: Lightning starts a new epoch
            skip = 0
        for k, indices in enumerate(self.batch_sampler):
            if k >= skip:
                yield indices

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableLoader(DataLoader):
    """DataLoader whose position in the epoch survives a checkpoint (see module docs).

    The owner calls :meth:`mark_trained` once per batch that reached ``training_step``.
    """

    def __iter__(self) -> Any:
        skip = self.batch_sampler.skip  # type: ignore[union-attr]
        self.trained = skip if skip < len(self.batch_sampler) else 0  # type: ignore[arg-type]
        return super().__iter__()

    def mark_trained(self) -> None:
        """Count one more batch of this epoch as trained on."""
        self.trained = getattr(self, "trained", 0) + 1

    def state_dict(self) -> dict[str, int]:
        return {"batches_trained": int(getattr(self, "trained", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.skip = int(state["batches_trained"])  # type: ignore[union-attr]


def make_resumable(dataloader: object, *, key: str = "example_id") -> object:
    """Wrap a map-style ``DataLoader`` in :class:`ResumableLoader`; other iterables pass through."""
    if isinstance(dataloader, ResumableLoader) or not isinstance(dataloader, DataLoader):
        return dataloader
    if not isinstance(dataloader.dataset, Sized) or dataloader.batch_sampler is None:
        return dataloader  # iterable-style datasets have no row indices
    kwargs: dict[str, Any] = {
        "num_workers": dataloader.num_workers,
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context,
        "generator": dataloader.generator,
        "persistent_workers": dataloader.persistent_workers,
    }
    if dataloader.num_workers > 0:
        kwargs["prefetch_factor"] = dataloader.prefetch_factor
    return ResumableLoader(
        _IndexedDataset(dataloader.dataset),
        batch_sampler=_SkippingBatchSampler(dataloader.batch_sampler),
        collate_fn=_IndexedCollate(dataloader.collate_fn, key),
        **kwargs,
    )
