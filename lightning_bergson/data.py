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
import math
import os
import shutil
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from typing_extensions import override

from lightning_bergson.batch import IGNORE_INDEX, collate_batch
from lightning_bergson.corpus import BiographyCorpus, make_biographies
from lightning_bergson.loader import EpochShuffleSampler, TokenBudgetBatchSampler
from lightning_bergson.strategy import BergsonStrategyMixin as _registers_strategy_names  # noqa: F401

__all__ = [
    "Encoded",
    "TextDataModule",
    "collate_batch",
    "group_advantages",
    "load_text_data",
    "tokenize_conversations",
    "tokenize_prompt_completions",
    "tokenize_texts",
    "train_tokenizer",
]

EOS = "<|endoftext|>"
FILE_FORMATS = ("json", "csv", "text", "parquet")
_TOKENIZER_RECIPE = "byte-level-bpe/v1"  # part of the cache key: bump when training changes


class Encoded(NamedTuple):
    """Tokenized rows: ``documents[k]`` (the string tokenized), its ids and its labels."""

    documents: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]


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
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    append_eos: bool,
    *,
    truncation: bool = True,
) -> list[list[int]]:
    """Token ids per text with the tokenizer's special tokens, eos appended, then length-checked.

    Args:
        texts: Documents.
        tokenizer: Any Hugging Face tokenizer; its own special tokens (e.g. bos) are added.
        max_length: Maximum number of tokens per document (``None``: no limit).
        append_eos: Append ``tokenizer.eos_token_id`` to every document before truncating.
        truncation: Cut longer documents to ``max_length``; ``False`` makes a longer document
            a ``ValueError`` naming its position in ``texts``.

    Example:
        >>> tok = train_tokenizer(["ab ab ab"], vocab_size=260)
        >>> tokenize_texts(["ab ab"], tok, 3, append_eos=True)
        [[257, 258, 0]]
    """
    eos = _eos_id(tokenizer, append_eos)
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    rows = [[*row, eos] if append_eos else list(row) for row in ids]
    return [_fit(row, None, k, max_length, truncation)[0] for k, row in enumerate(rows)]


def tokenize_prompt_completions(
    prompts: Sequence[str],
    completions: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    truncation: bool = True,
    append_eos: bool = False,
) -> Encoded:
    """Prompt-completion rows in which only the completion's tokens are labelled.

    With a chat template the row is ``[{"role": "user", "content": prompt}, {"role":
    "assistant", "content": completion}]`` rendered by ``apply_chat_template(tokenize=False)``
    and tokenized without special tokens (the template has them), as Bergson does; the
    completion is its last occurrence in the rendered string. Without a template the row is
    ``prompt + completion`` tokenized with the tokenizer's special tokens. A token is
    labelled iff it holds at least one character of the completion (one straddling the
    boundary is labelled); every other position, an appended eos included, is -100.

    Args:
        prompts: User turns.
        completions: Assistant turns (the supervised text).
        tokenizer: A fast Hugging Face tokenizer (character offsets are needed).
        max_length: Maximum tokens per row (``None``: no limit).
        truncation: Cut longer rows (``False``: a longer row is a ``ValueError``).
        append_eos: Append the eos token (unlabelled) before the length check.

    Raises:
        ValueError: The completion is not found in the rendered row (the template changed
            it), or a row is too long with ``truncation=False``.

    Example:
        >>> tok = train_tokenizer(["Q: one A: two"], vocab_size=300)
        >>> enc = tokenize_prompt_completions(["Q: one"], [" A: two"], tok)
        >>> tok.decode([t for t in enc.labels[0] if t != -100])
        ' A: two'
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions.")
    chat = _has_chat_template(tokenizer)
    documents, spans = [], []
    for k, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not chat:
            documents.append(prompt + completion)
            spans.append([(len(prompt), len(prompt) + len(completion))])
            continue
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        document = _render(tokenizer, messages)
        documents.append(document)
        spans.append(_assistant_spans(document, messages, k))
    return _label_spans(
        documents, spans, tokenizer, not chat, max_length=max_length,
        truncation=truncation, append_eos=append_eos,
    )  # fmt: skip


def tokenize_conversations(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    truncation: bool = True,
    append_eos: bool = False,
) -> Encoded:
    """Chat rows rendered with the tokenizer's chat template; only assistant tokens labelled.

    Messages are located in the rendered string from the end: the last one is searched
    first, and every earlier one (of any role) only before the match of the one after it, so
    an assistant message repeated in an earlier turn, or in a user turn after it, is not
    taken for it. Tokens holding at least one character of an assistant message are
    labelled; an appended eos is not.

    Args:
        conversations: Lists of ``{"role": ..., "content": ...}`` messages.
        tokenizer: A fast tokenizer with a ``chat_template``.
        max_length: Maximum tokens per row (``None``: no limit).
        truncation: Cut longer rows (``False``: a longer row is a ``ValueError``).
        append_eos: Append the eos token (unlabelled) before the length check.

    Raises:
        ValueError: The tokenizer has no chat template, a message is malformed or an
            assistant message is not found in the rendered row.
    """
    if not _has_chat_template(tokenizer):
        raise ValueError(
            "conversation rows need a tokenizer with a chat template; pass tokenizer=<a "
            "tokenizer that has one>, or set tokenizer.chat_template and save_pretrained it."
        )
    documents, spans = [], []
    for k, messages in enumerate(conversations):
        _check_messages(messages, k)
        document = _render(tokenizer, messages)
        documents.append(document)
        spans.append(_assistant_spans(document, messages, k))
    return _label_spans(
        documents, spans, tokenizer, False, max_length=max_length,
        truncation=truncation, append_eos=append_eos,
    )  # fmt: skip


def group_advantages(
    rewards: Sequence[float], groups: Sequence[Hashable], *, skip_nan: bool = False
) -> np.ndarray:
    """Dr. GRPO advantages ``A_i = r_i - mean{r_j : group_j == group_i}`` (no std scaling).

    Args:
        rewards: One reward per row; ``None`` counts as NaN.
        groups: One group key per row (rows of the same prompt share a key).
        skip_nan: NaN rewards get a NaN advantage and stay out of the group means;
            ``False`` makes any NaN a ``ValueError``.

    Returns:
        ``[N]`` float64 advantages, NaN where the reward is NaN.

    References:
        Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
        arXiv:2503.20783 (2025).

    Example:
        >>> group_advantages([1.0, 3.0, 5.0], ["a", "a", "b"]).tolist()
        [-1.0, 1.0, 0.0]
    """
    values = np.asarray(rewards, dtype=np.float64)  # (N,)
    nan = np.flatnonzero(np.isnan(values))
    if len(nan) and not skip_nan:
        raise ValueError(
            f"{len(nan)} rewards are NaN (example_id {_first(nan)}); clean the reward column or "
            "pass skip_nan_rewards=True (--skip_nan_rewards) to leave those rows out."
        )
    sums: dict[Hashable, list[float]] = {}
    for value, group in zip(values.tolist(), groups, strict=True):
        if not math.isnan(value):
            total = sums.setdefault(group, [0.0, 0.0])
            total[0], total[1] = total[0] + value, total[1] + 1
    means = [sums[g][0] / sums[g][1] if g in sums else math.nan for g in groups]
    return values - np.asarray(means, dtype=np.float64)


def _label_spans(
    documents: list[str],
    spans: list[list[tuple[int, int]]],
    tokenizer: PreTrainedTokenizerBase,
    add_special_tokens: bool,
    *,
    max_length: int | None,
    truncation: bool,
    append_eos: bool,
) -> Encoded:
    """Tokenize ``documents``; label tokens sharing a character with a span, -100 elsewhere."""
    if not tokenizer.is_fast:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: labelling completions needs "
            "character offsets; load the fast one (AutoTokenizer.from_pretrained(name, "
            "use_fast=True))."
        )
    eos = _eos_id(tokenizer, append_eos)
    enc = tokenizer(documents, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    all_ids, all_labels = [], []
    for k, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        labels = [
            t if any(s < b and e > a for a, b in spans[k]) else IGNORE_INDEX
            for t, (s, e) in zip(ids, offsets, strict=True)
        ]  # zero-width tokens (s == e, e.g. an added bos) never overlap a span
        ids = [*ids, eos] if append_eos else list(ids)
        labels = [*labels, IGNORE_INDEX] if append_eos else labels
        ids, labels = _fit(ids, labels, k, max_length, truncation)
        all_ids.append(ids)
        all_labels.append(labels)
    return Encoded(documents, all_ids, all_labels)


def _assistant_spans(
    document: str, messages: Sequence[Mapping[str, str]], k: int
) -> list[tuple[int, int]]:
    """Character spans of the assistant messages in ``document``, found from the end.

    Every message (any role) is looked up, last first, only before the match of the one
    after it; that anchoring is what keeps an assistant turn from matching the same words
    in a later user turn. A non-assistant message the template rewrote is passed over.
    """
    spans, end = [], len(document)
    for turn in range(len(messages) - 1, -1, -1):
        content = messages[turn]["content"]
        start = document.rfind(content, 0, end)
        if messages[turn]["role"] == "assistant":
            if start < 0:
                raise ValueError(
                    f"example_id={k}: assistant message {turn} ({content[:40]!r}) is not in "
                    f"the chat-formatted row ({document[:80]!r}...); the chat template changes "
                    "it (e.g. strips whitespace). Clean the content or use a template that "
                    "keeps it verbatim."
                )
            spans.append((start, start + len(content)))
        if start >= 0:
            end = start
    return spans[::-1]


def _fit(
    ids: list[int], labels: list[int] | None, k: int, max_length: int | None, truncation: bool
) -> tuple[list[int], list[int] | None]:
    """``(ids, labels)`` cut to ``max_length``, or a ``ValueError`` without truncation."""
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    if not truncation:
        raise ValueError(
            f"document example_id={k} has {len(ids)} tokens, more than max_length={max_length}; "
            f"pass truncation=True (--truncation) to cut it to max_length, or a larger "
            f"max_length (--max_length {len(ids)} or more)."
        )
    return ids[:max_length], None if labels is None else labels[:max_length]


def _eos_id(tokenizer: PreTrainedTokenizerBase, append_eos: bool) -> int:
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError(
            "append_eos=True but the tokenizer has no eos token; pass append_eos=False."
        )
    return -1 if eos is None else int(eos)


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False)
    assert isinstance(rendered, str), type(rendered)
    return rendered


def _check_messages(messages: object, k: int) -> None:
    """A conversation is a list of ``{"role": str, "content": str}`` mappings."""
    ok = isinstance(messages, Sequence) and not isinstance(messages, str)
    ok = ok and all(
        isinstance(m, Mapping)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
        for m in messages  # type: ignore[union-attr]
    )
    if not ok:
        raise ValueError(
            f"example_id={k}: a conversation must be a list of {{'role': str, 'content': str}} "
            f"messages, got {str(messages)[:80]}; point conversation_column at such a column."
        )


def _first(ids: Iterable[int], count: int = 5) -> str:
    """``"3, 8, 11, ..."``: the first ``count`` ids of a list, for messages."""
    ids = [int(i) for i in ids]
    return ", ".join(map(str, ids[:count])) + (", ..." if len(ids) > count else "")


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

    A row is one of three kinds: plain text (``text_column``, every token labelled), a prompt
    and its completion (``prompt_column`` + ``completion_column``, only the completion
    labelled) or a conversation (``conversation_column``, only assistant turns labelled); see
    :func:`tokenize_prompt_completions` and :func:`tokenize_conversations`. ``example_id`` is
    always the row of the dataset split. Rows with no token to predict (fewer than 2 tokens,
    or no labelled token after the first) and, with ``skip_nan_rewards``, rows with a NaN
    reward are in no batch (one warning names them).

    Args:
        dataset: ``"bios"`` (the embedded corpus, ``make_biographies(num_people, seed=seed)``),
            a ``Dataset.save_to_disk`` directory, a file format (``"json"``, ``"csv"``,
            ``"text"``, ``"parquet"``) with ``data_files``, or a Hugging Face Hub dataset name.
        data_files: Local file(s) for a file format (or passed on to ``load_dataset``).
        split: Split to train on.
        text_column: Column holding the document text (plain-text rows).
        prompt_column: Column of prompts: with ``completion_column`` the user turn, and with
            ``reward_column`` the group key of the advantages.
        completion_column: Column of completions, the only labelled tokens of a row.
        conversation_column: Column of ``[{"role", "content"}, ...]`` messages, rendered with
            the tokenizer's chat template; only assistant messages are labelled.
        reward_column: Column of rewards; each row gets the Dr. GRPO advantage
            ``A_i = r_i - mean(r of the rows with the same prompt)`` (grouped by
            ``prompt_column``, else by ``text_column``) as the batch key ``advantage``.
        skip_nan_rewards: Leave rows with a NaN reward out (default: a NaN is an error).
        tokenizer: Name or local path for ``AutoTokenizer.from_pretrained``; ``None`` trains a
            byte-level BPE tokenizer on the training texts (cached, see ``cache_dir``).
        tokenizer_vocab_size: Largest vocabulary of the trained tokenizer (ignored with
            ``tokenizer``); the property ``vocab_size`` reports the real size, which can be
            smaller when the corpus runs out of merges.
        max_length: Maximum tokens per document (``None``: no limit).
        truncation: Cut longer documents to ``max_length``; ``False`` makes a longer document
            an error naming it.
        batch_size: Documents per batch (ignored with ``token_batch_size``).
        token_batch_size: If set, batches of at most this many tokens, padding included
            (``longest * documents``), in length order (:class:`TokenBudgetBatchSampler`).
            Under DDP it deals the batches to the ranks itself: pass
            ``Trainer(use_distributed_sampler=False)``.
        shuffle: Shuffle the training order (of batches, with ``token_batch_size``) with a
            generator seeded by ``(seed, epoch)``.
        num_workers: DataLoader worker processes.
        num_people: People in the biography corpus (``dataset="bios"`` only).
        seed: Seed of the biography corpus and of the shuffling.
        cache_dir: Root of the tokenizer cache (default ``~/.cache/lightning_bergson``);
            tokenizers are stored in ``<cache_dir>/tokenizers/<hash of texts and vocab_size>``.
        append_eos: Append the eos token to every document (before the length check); it is
            labelled in plain-text rows only.
        text_field: Deprecated name of ``text_column``.

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
        text_column: str = "text",
        prompt_column: str | None = None,
        completion_column: str | None = None,
        conversation_column: str | None = None,
        reward_column: str | None = None,
        skip_nan_rewards: bool = False,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 2048,
        max_length: int | None = 64,
        truncation: bool = True,
        batch_size: int = 16,
        token_batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
        num_people: int = 250,
        seed: int = 0,
        cache_dir: str | None = None,
        append_eos: bool = True,
        text_field: str | None = None,
    ) -> None:
        super().__init__()
        text_column = _text_column(text_column, text_field)
        _check_args(dataset, data_files, tokenizer, tokenizer_vocab_size, num_workers)
        _check_sizes(
            max_length=max_length, batch_size=batch_size, token_batch_size=token_batch_size
        )
        _check_columns(
            dataset, tokenizer, prompt_column, completion_column, conversation_column,
            reward_column, skip_nan_rewards,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["text_field"])
        self.hparams["text_column"] = text_column
        self.dataset = dataset
        self.data_files = data_files
        self.split = split
        self.text_column = text_column
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.conversation_column = conversation_column
        self.reward_column = reward_column
        self.skip_nan_rewards = skip_nan_rewards
        self.tokenizer_name = tokenizer
        self.requested_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.truncation = truncation
        self.batch_size = batch_size
        self.token_batch_size = token_batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.num_people = num_people
        self.seed = seed
        self.cache_dir = cache_dir
        self.append_eos = append_eos
        self._corpus: BiographyCorpus | None = None
        self._columns: dict[str, list] | None = None
        self._texts: list[str] | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train_dataset: datasets.Dataset | None = None
        self._batched_ids: list[int] | None = None
        self._advantages: np.ndarray | None = None
        self._encoded: Encoded | None = None
        self._lengths: list[int] = []

    @property
    def text_field(self) -> str:
        """Deprecated name of :attr:`text_column`."""
        return self.text_column

    @property
    def corpus(self) -> BiographyCorpus | None:
        """The biography corpus when ``dataset == "bios"``, else ``None``."""
        if self.dataset == "bios" and self._corpus is None:
            self._corpus = make_biographies(self.num_people, seed=self.seed)
        return self._corpus

    @property
    def texts(self) -> list[str]:
        """The training documents; ``texts[k]`` is the document of ``example_id`` k.

        Plain text, ``prompt + completion`` without a chat template, or the string the chat
        template rendered.
        """
        if self._texts is None:
            plain = self._plain_documents()
            self._texts = plain if plain is not None else self._encode().documents
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
        """One row per dataset row: ``{"text", "input_ids", "example_id"}`` (+ ``labels`` for
        prompt-completion and conversation rows, + ``advantage`` with ``reward_column``).

        ``train_dataset[k]`` is example ``k``; rows outside :attr:`batched_ids` are in it too.
        """
        if self._train_dataset is None:
            self._train_dataset = self._build_train_dataset()
        return self._train_dataset

    @property
    def batched_ids(self) -> list[int]:
        """The example ids that go into batches (ascending): rows with a token to predict and,
        with ``skip_nan_rewards``, a reward."""
        if self._batched_ids is None:
            _ = self.train_dataset
        assert self._batched_ids is not None
        return self._batched_ids

    @property
    def advantages(self) -> np.ndarray | None:
        """``[N]`` float64 advantage of every example id (NaN where the reward is NaN);
        ``None`` without ``reward_column``."""
        if self.reward_column is not None and self._advantages is None:
            columns = self._load_columns()
            key = self.prompt_column or self.text_column
            self._advantages = group_advantages(
                columns[self.reward_column], columns[key], skip_nan=self.skip_nan_rewards
            )
        return self._advantages

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
        """Batches in the contract; epoch ``e``'s order is a function of ``(seed, e)``.

        The order depends only on the epoch (Lightning calls ``set_epoch``), so a run resumed
        from a checkpoint sees the same examples in the same order as an uninterrupted one.
        With ``token_batch_size`` the DataLoader has a ``batch_sampler``
        (:class:`TokenBudgetBatchSampler`) that gives this rank its share of the batches.
        """
        collate = partial(collate_batch, pad_token_id=self.pad_token_id)
        common: dict[str, Any] = {
            "collate_fn": collate,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        ids = self.batched_ids
        if self.token_batch_size is None:
            sampler = EpochShuffleSampler(
                len(ids), seed=self.seed, shuffle=self.shuffle, indices=ids
            )
            return DataLoader(
                self.train_dataset, batch_size=self.batch_size, sampler=sampler, **common
            )  # type: ignore[arg-type]
        rank, world_size = self._rank_and_world_size()
        batch_sampler = TokenBudgetBatchSampler(
            self._lengths, self.token_batch_size, indices=ids, shuffle=self.shuffle,
            seed=self.seed, rank=rank, world_size=world_size,
        )  # fmt: skip
        return DataLoader(self.train_dataset, batch_sampler=batch_sampler, **common)  # type: ignore[arg-type]

    def _rank_and_world_size(self) -> tuple[int, int]:
        """From the attached trainer, else ``torch.distributed``, else ``(0, 1)``."""
        trainer = self.trainer
        if trainer is not None:
            connector = getattr(trainer, "_accelerator_connector", None)
            if getattr(connector, "use_distributed_sampler", False) and getattr(
                connector, "is_distributed", False
            ):
                raise ValueError(
                    f"token_batch_size={self.token_batch_size} deals its batches to the ranks "
                    f"itself (rank r of {trainer.world_size} gets every {trainer.world_size}th "
                    "batch), but Lightning would replace its batch sampler with a "
                    "DistributedSampler; pass Trainer(use_distributed_sampler=False) "
                    "(--trainer.use_distributed_sampler false)."
                )
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _build_train_dataset(self) -> datasets.Dataset:
        """Tokenize every row, find the rows to batch, warn once about the others."""
        advantages = self.advantages  # a NaN reward without skip_nan_rewards fails here, early
        encoded = self._encode()
        rows: dict[str, list] = {
            "text": encoded.documents,
            "input_ids": encoded.input_ids,
            "example_id": list(range(len(encoded.input_ids))),
        }
        masked = self.completion_column is not None or self.conversation_column is not None
        if masked:
            rows["labels"] = encoded.labels
        if advantages is not None:
            rows["advantage"] = advantages.astype(np.float32).tolist()
        self._lengths = [len(ids) for ids in encoded.input_ids]
        labels = encoded.labels if masked else encoded.input_ids
        idle = [k for k, row in enumerate(labels) if all(t == IGNORE_INDEX for t in row[1:])]
        if idle:
            rank_zero_warn(
                f"TextDataModule: {len(idle)} of {len(labels)} documents have no token to "
                f"predict (fewer than 2 tokens, or no labelled token after the first): "
                f"example_id {_first(idle)}. They are in no batch and get no gradient row."
            )
        skipped = set(idle)
        if advantages is not None and np.isnan(advantages).any():
            nan = np.flatnonzero(np.isnan(advantages)).tolist()
            rank_zero_warn(
                f"TextDataModule: skip_nan_rewards=True leaves out {len(nan)} rows with a NaN "
                f"reward: example_id {_first(nan)}."
            )
            skipped.update(nan)
        self._batched_ids = [k for k in range(len(labels)) if k not in skipped]
        return datasets.Dataset.from_dict(rows)

    def _encode(self) -> Encoded:
        """Token ids and labels of every row (cached)."""
        if self._encoded is None:
            self._encoded = self._tokenize_rows()
        return self._encoded

    def _tokenize_rows(self) -> Encoded:
        tok, columns = self.tokenizer, self._load_columns()
        fit = {"max_length": self.max_length, "truncation": self.truncation}
        if self.conversation_column is not None:
            rows = columns[self.conversation_column]
            return tokenize_conversations(rows, tok, append_eos=self.append_eos, **fit)
        if self.completion_column is not None:
            assert self.prompt_column is not None
            prompts, completions = columns[self.prompt_column], columns[self.completion_column]
            return tokenize_prompt_completions(
                prompts, completions, tok, append_eos=self.append_eos, **fit
            )
        ids = tokenize_texts(
            self.texts, tok, self.max_length, self.append_eos, truncation=self.truncation
        )
        return Encoded(list(self.texts), ids, ids)

    def _plain_documents(self) -> list[str] | None:
        """The documents as strings when no chat template renders them, else ``None``."""
        corpus = self.corpus
        if corpus is not None:
            return list(corpus.texts)
        columns = self._load_columns()
        if self.conversation_column is not None:
            return None
        if self.completion_column is None:
            return list(columns[self.text_column])
        if self.tokenizer_name is not None and _has_chat_template(self.tokenizer):
            return None
        prompts, completions = columns[self.prompt_column], columns[self.completion_column]  # type: ignore[index]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def _load_columns(self) -> dict[str, list]:
        """The columns of the configured split that the row kind needs (loaded once)."""
        if self._columns is None:
            if self.corpus is not None:
                self._columns = {self.text_column: list(self.corpus.texts)}
                return self._columns
            ds = _load_split(self.dataset, data_files=self.data_files, split=self.split)
            wanted = {
                "prompt_column": self.prompt_column,
                "completion_column": self.completion_column,
                "conversation_column": self.conversation_column,
                "reward_column": self.reward_column,
            }
            if self.conversation_column is None and self.completion_column is None:
                wanted["text_column"] = self.text_column  # plain rows (and their reward groups)
            self._columns = {}
            for arg, name in wanted.items():
                if name is None:
                    continue
                if name not in ds.column_names:
                    raise ValueError(
                        f"{arg}={name!r} is not a column of dataset={self.dataset!r}; available "
                        f"columns: {ds.column_names}. Pass {arg}=<one of them>."
                    )
                self._columns[name] = list(ds[name])
        return self._columns

    def _build_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load ``tokenizer`` or train one on the texts; make sure a pad token exists."""
        if self.tokenizer_name is None:
            texts = self._plain_documents()
            assert texts is not None  # conversation rows need tokenizer=... (checked at init)
            tok = _cached_tokenizer(texts, self.requested_vocab_size, self.cache_dir)
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


def _text_column(text_column: str, text_field: str | None) -> str:
    """``text_column``, or the deprecated ``text_field`` (with a warning)."""
    if text_field is None:
        return text_column
    if text_column not in ("text", text_field):
        raise ValueError(
            f"got text_column={text_column!r} and text_field={text_field!r}; text_field is "
            "the deprecated name of text_column, pass only text_column."
        )
    warnings.warn(
        f"TextDataModule(text_field={text_field!r}) is deprecated; use text_column={text_field!r}.",
        FutureWarning,
        stacklevel=3,
    )
    return text_field


def _check_args(
    dataset: str,
    data_files: str | list[str] | None,
    tokenizer: str | None,
    vocab_size: int,
    num_workers: int,
) -> None:
    """Validate ``TextDataModule`` arguments before any data is touched."""
    if dataset in FILE_FORMATS and data_files is None:
        raise ValueError(f"dataset={dataset!r} is a file format; pass data_files=<path(s)>.")
    if tokenizer is None and vocab_size < 257:
        raise ValueError(
            f"tokenizer_vocab_size={vocab_size} must be at least 257 (256 bytes + {EOS})."
        )
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0.")


def _check_sizes(**sizes: int | None) -> None:
    """Every size given is at least 1 (``None`` means no limit / not used)."""
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be at least 1 (or None where allowed).")


def _check_columns(
    dataset: str,
    tokenizer: str | None,
    prompt: str | None,
    completion: str | None,
    conversation: str | None,
    reward: str | None,
    skip_nan_rewards: bool,
) -> None:
    """The column arguments describe one row kind."""
    if dataset == "bios" and any(c is not None for c in (prompt, completion, conversation, reward)):
        raise ValueError(
            'dataset="bios" has a text column only; prompt/completion/conversation/reward '
            "columns need dataset=<a dataset that has them>."
        )
    if completion is not None and prompt is None:
        raise ValueError(f"completion_column={completion!r} needs prompt_column=<the prompts>.")
    if conversation is not None and completion is not None:
        raise ValueError(
            f"conversation_column={conversation!r} and completion_column={completion!r} are two "
            "row kinds; pass one of them."
        )
    if prompt is not None and completion is None and reward is None:
        raise ValueError(
            f"prompt_column={prompt!r} is used with completion_column (prompt + completion rows) "
            "or reward_column (the advantage groups); pass one of them, or text_column="
            f"{prompt!r} for plain text."
        )
    if conversation is not None and reward is not None and prompt is None:
        raise ValueError(
            f"reward_column={reward!r} with conversation rows needs prompt_column=<the column "
            "naming each row's prompt>, the group of its advantage."
        )
    if conversation is not None and tokenizer is None:
        raise ValueError(
            f"conversation_column={conversation!r} needs a chat template; pass tokenizer=<a "
            "tokenizer that has one> (the trained tokenizer has none)."
        )
    if skip_nan_rewards and reward is None:
        raise ValueError("skip_nan_rewards=True needs reward_column=<the rewards>.")


def load_text_data(hparams: dict[str, Any] | None) -> TextDataModule | None:
    """The :class:`TextDataModule` described by saved hyperparameters (None if another class).

    ``hparams`` are a checkpoint's ``datamodule_hyper_parameters`` (as
    :func:`lightning_bergson.networks.load_model` returns them): the run's tokenizer and texts.
    """
    if not hparams:
        return None
    class_path = hparams.get("_class_path", "lightning_bergson.TextDataModule")
    if class_path.rsplit(".", 1)[-1] != "TextDataModule":
        return None
    return TextDataModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
