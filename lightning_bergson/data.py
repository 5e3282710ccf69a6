"""Text datasets -> tokenized causal-LM batches that carry each row's ``example_id``.

A batch is the contract of DESIGN.md: ``input_ids`` [B, S] int64, ``attention_mask`` [B, S],
``labels`` [B, S] (``input_ids`` with -100 at padding) and ``example_id`` [B] int64, the row of
the training dataset. The default dataset is the embedded biography corpus with a byte-level
BPE tokenizer trained locally, so nothing is downloaded:

    python -c "from lightning_bergson.data import TextDataModule as D; d = D(num_people=20);
    d.setup('fit'); print(next(iter(d.train_dataloader())))"
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import datasets
import lightning.pytorch as pl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from typing_extensions import override

from lightning_bergson.batch import collate_batch
from lightning_bergson.corpus import BiographyCorpus, make_biographies
from lightning_bergson.loader import EpochShuffleSampler

__all__ = ["TextDataModule", "collate_batch", "tokenize_texts", "train_tokenizer"]

EOS = "<|endoftext|>"
FILE_FORMATS = ("json", "csv", "text", "parquet")
_TOKENIZER_RECIPE = "byte-level-bpe/v1"  # part of the cache key: bump when training changes


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 2048, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (deterministic for the same texts).

    ``"<|endoftext|>"`` (id 0) is the eos, bos and pad token. Byte-level BPE covers every
    string, so ``decode(encode(x)) == x``.

    Args:
        texts: Training texts.
        vocab_size: Largest vocabulary size, counting the 256 byte tokens and the special token.
            A small corpus can run out of merges first (250 biographies stop near 1650).
        save_dir: If given, the tokenizer is written there with ``save_pretrained``.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} must be at least 257 (256 bytes + {EOS}).")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tokenize_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, append_eos: bool
) -> list[list[int]]:
    """Token ids per text, eos appended (if asked) and then truncated to ``max_length``.

    Args:
        texts: Documents.
        tokenizer: Any Hugging Face tokenizer; its own special tokens (e.g. bos) are added.
        max_length: Maximum number of tokens kept per document.
        append_eos: Append ``tokenizer.eos_token_id`` to every document before truncating.
    """
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError(
            "append_eos=True but the tokenizer has no eos token; pass append_eos=False."
        )
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [([*row, eos] if append_eos else row)[:max_length] for row in ids]


def _cache_root() -> Path:
    """``$XDG_CACHE_HOME/lightning_bergson`` (default ``~/.cache/lightning_bergson``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lightning_bergson"


def _tokenizer_key(texts: Sequence[str], vocab_size: int) -> str:
    """A stable hash of the training texts, the vocabulary size and the recipe."""
    digest = hashlib.sha256(f"{_TOKENIZER_RECIPE}/{vocab_size}/{len(texts)}".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _cached_tokenizer(
    texts: Sequence[str], vocab_size: int, cache_dir: str | Path | None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer trained on ``texts`` from the cache, training and saving it if absent.

    Args:
        texts: Training texts (part of the cache key).
        vocab_size: Vocabulary size (part of the cache key).
        cache_dir: Cache root; tokenizers live in ``<cache_dir>/tokenizers/<key>``.
    """
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    path = root / "tokenizers" / f"bpe{vocab_size}-{_tokenizer_key(texts, vocab_size)}"
    if not (path / "tokenizer.json").is_file():
        # Write under a private name, then rename: ranks racing here never see half a tokenizer.
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        train_tokenizer(texts, vocab_size=vocab_size, save_dir=tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; its tokenizer is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(path))


def _load_split(
    dataset: str, *, data_files: str | list[str] | None, split: str
) -> datasets.Dataset:
    """One split of a Hugging Face dataset: a ``save_to_disk`` directory, local files or the Hub.

    Args:
        dataset: A ``save_to_disk`` directory, a file format in ``FILE_FORMATS`` (with
            ``data_files``), or a dataset name for ``datasets.load_dataset``.
        data_files: Local files for a file format.
        split: Split to load.
    """
    saved = Path(dataset) / "dataset_info.json", Path(dataset) / "dataset_dict.json"
    if any(path.is_file() for path in saved):
        loaded = datasets.load_from_disk(dataset)
    else:
        loaded = datasets.load_dataset(dataset, data_files=data_files, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split={split!r} not in {dataset!r}; available: {list(loaded)}.")
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise TypeError(f"dataset={dataset!r} loaded as {type(loaded).__name__}, not a Dataset.")
    return loaded


class TextDataModule(pl.LightningDataModule):
    """Causal-LM batches with ``example_id`` from the biography corpus or any text dataset.

    Args:
        dataset: ``"bios"`` (the embedded corpus, ``make_biographies(num_people, seed=seed)``),
            a ``Dataset.save_to_disk`` directory, a file format (``"json"``, ``"csv"``,
            ``"text"``, ``"parquet"``) with ``data_files``, or a Hugging Face Hub dataset name.
        data_files: Local file(s) for a file format (or passed on to ``load_dataset``).
        split: Split to train on.
        text_field: Column holding the document text.
        tokenizer: Name or local path for ``AutoTokenizer.from_pretrained``; ``None`` trains a
            byte-level BPE tokenizer on the training texts (cached, see ``cache_dir``).
        tokenizer_vocab_size: Largest vocabulary of the trained tokenizer (ignored with
            ``tokenizer``); the property ``vocab_size`` reports the real size, which can be
            smaller when the corpus runs out of merges.
        max_length: Maximum tokens per document; longer documents are truncated.
        batch_size: Documents per batch.
        shuffle: Shuffle the training order with a generator seeded by ``seed``.
        num_workers: DataLoader worker processes.
        num_people: People in the biography corpus (``dataset="bios"`` only).
        seed: Seed of the biography corpus and of the shuffling.
        cache_dir: Root of the tokenizer cache (default ``~/.cache/lightning_bergson``);
            tokenizers are stored in ``<cache_dir>/tokenizers/<hash of texts and vocab_size>``.
        append_eos: Append the eos token to every document (before truncation).

    Example:
        >>> import tempfile
        >>> dm = TextDataModule(num_people=10, batch_size=4, cache_dir=tempfile.mkdtemp())
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["example_id"].shape
        (['attention_mask', 'example_id', 'input_ids', 'labels'], torch.Size([4]))
    """

    def __init__(
        self,
        dataset: str = "bios",
        *,
        data_files: str | list[str] | None = None,
        split: str = "train",
        text_field: str = "text",
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 2048,
        max_length: int = 64,
        batch_size: int = 16,
        shuffle: bool = True,
        num_workers: int = 0,
        num_people: int = 250,
        seed: int = 0,
        cache_dir: str | None = None,
        append_eos: bool = True,
    ) -> None:
        super().__init__()
        _check_args(
            dataset,
            data_files,
            tokenizer,
            tokenizer_vocab_size,
            max_length,
            batch_size,
            num_workers,
        )
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_files = data_files
        self.split = split
        self.text_field = text_field
        self.tokenizer_name = tokenizer
        self.requested_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.num_people = num_people
        self.seed = seed
        self.cache_dir = cache_dir
        self.append_eos = append_eos
        self._corpus: BiographyCorpus | None = None
        self._texts: list[str] | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train_dataset: datasets.Dataset | None = None

    @property
    def corpus(self) -> BiographyCorpus | None:
        """The biography corpus when ``dataset == "bios"``, else ``None``."""
        if self.dataset == "bios" and self._corpus is None:
            self._corpus = make_biographies(self.num_people, seed=self.seed)
        return self._corpus

    @property
    def texts(self) -> list[str]:
        """The training documents; ``texts[k]`` is the document of ``example_id`` k."""
        if self._texts is None:
            corpus = self.corpus
            self._texts = list(corpus.texts) if corpus is not None else self._load_texts()
        return self._texts

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (loaded, or trained and cached, on first access); it has a pad token."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``; builds the tokenizer (so LightningCLI can link it to the model)."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """Id used for right padding (the eos id when the tokenizer has no pad token)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def train_dataset(self) -> datasets.Dataset:
        """Rows ``{"text", "input_ids", "example_id"}``; ``example_id`` is the row index."""
        if self._train_dataset is None:
            ids = tokenize_texts(self.texts, self.tokenizer, self.max_length, self.append_eos)
            columns = {"text": self.texts, "input_ids": ids, "example_id": range(len(ids))}
            self._train_dataset = datasets.Dataset.from_dict(
                {key: list(value) for key, value in columns.items()}
            )
        return self._train_dataset

    @override
    def prepare_data(self) -> None:
        """Download the dataset and train/cache the tokenizer once (rank 0 of each node)."""
        _ = self.tokenizer

    @override
    def setup(self, stage: str) -> None:
        """Tokenize the training texts and attach ``example_id``.

        Args:
            stage: Lightning stage (``"fit"``, ...); every stage uses the training split.
        """
        _ = self.train_dataset

    @override
    def train_dataloader(self) -> DataLoader:
        """Batches in the contract; epoch ``e`` is a permutation seeded by ``(seed, e)``.

        The order depends only on the epoch (Lightning calls ``set_epoch``), so a run resumed
        from a checkpoint sees the same examples in the same order as an uninterrupted one.
        """
        sampler = EpochShuffleSampler(len(self.train_dataset), seed=self.seed, shuffle=self.shuffle)
        return DataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=partial(collate_batch, pad_token_id=self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _load_texts(self) -> list[str]:
        """Texts of the ``text_field`` column of the configured dataset split."""
        ds = _load_split(self.dataset, data_files=self.data_files, split=self.split)
        if self.text_field not in ds.column_names:
            raise ValueError(
                f"text_field={self.text_field!r} is not a column of dataset={self.dataset!r};"
                f" available columns: {ds.column_names}. Pass text_field=<one of them>."
            )
        return list(ds[self.text_field])

    def _build_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load ``tokenizer`` or train one on the texts; make sure a pad token exists."""
        if self.tokenizer_name is None:
            tok = _cached_tokenizer(self.texts, self.requested_vocab_size, self.cache_dir)
        else:
            tok = AutoTokenizer.from_pretrained(self.tokenizer_name)
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ValueError(
                    f"tokenizer={self.tokenizer_name!r} has neither a pad nor an eos token;"
                    " give it a pad_token or use tokenizer=None to train one."
                )
            tok.pad_token = tok.eos_token
        return tok


def _check_args(
    dataset: str,
    data_files: str | list[str] | None,
    tokenizer: str | None,
    vocab_size: int,
    max_length: int,
    batch_size: int,
    num_workers: int,
) -> None:
    """Validate ``TextDataModule`` arguments before any data is touched."""
    if dataset in FILE_FORMATS and data_files is None:
        raise ValueError(f"dataset={dataset!r} is a file format; pass data_files=<path(s)>.")
    if tokenizer is None and vocab_size < 257:
        raise ValueError(
            f"tokenizer_vocab_size={vocab_size} must be at least 257 (256 bytes + {EOS})."
        )
    for name, value, low in [("max_length", max_length, 1), ("batch_size", batch_size, 1)]:
        if value < low:
            raise ValueError(f"{name}={value} must be at least {low}.")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0.")
