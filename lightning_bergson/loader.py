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
``DistributedSampler`` and :class:`EpochShuffleSampler` (used by
:class:`~lightning_bergson.TextDataModule`) are; a ``RandomSampler`` with a shared
generator is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch import stamp

__all__ = ["EpochShuffleSampler", "ResumableLoader", "make_resumable"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at every epoch start, also after a resume.

    Args:
        size: Number of examples.
        seed: Base seed.
        shuffle: ``False`` yields ``0..n-1`` every epoch.

    Example:
        >>> s = EpochShuffleSampler(5, seed=1)
        >>> first = list(s); s.set_epoch(1); second = list(s); s.set_epoch(0)
        >>> sorted(first) == sorted(second) == list(range(5)), first == list(s)
        (True, True)
    """

    def __init__(self, size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


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
