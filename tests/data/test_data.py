"""TextDataModule: the batch contract, example ids, seeded shuffling, local data and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

import lightning_bergson.data as data_module
from lightning_bergson.corpus import make_biographies
from lightning_bergson.data import TextDataModule, collate_batch, tokenize_texts, train_tokenizer

EOS = "<|endoftext|>"
TEXTS = [
    "Alice Moreau was born in Lyon.",
    "  two  spaces, a tab\tand a newline\n",
    "Unicode: café, naïve, 東京, emoji 🙂.",
    "",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _bios(cache_dir: str, **kwargs) -> TextDataModule:
    kwargs = {"num_people": 12, "batch_size": 8, "tokenizer_vocab_size": 400, "seed": 5} | kwargs
    dm = TextDataModule("bios", cache_dir=cache_dir, **kwargs)
    dm.setup("fit")
    return dm


def _epoch(dm: TextDataModule) -> list[dict[str, torch.Tensor]]:
    return list(dm.train_dataloader())


def _decoded(dm: TextDataModule, batch: dict[str, torch.Tensor], row: int) -> str:
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    return dm.tokenizer.decode(ids.tolist())


def test_batches_follow_the_contract(cache_dir: str) -> None:
    dm = _bios(cache_dir)
    for batch in _epoch(dm):
        assert sorted(batch) == ["attention_mask", "example_id", "input_ids", "labels"]
        assert all(t.dtype == torch.int64 for t in batch.values())
        b, s = batch["input_ids"].shape
        assert batch["attention_mask"].shape == batch["labels"].shape == (b, s)
        assert batch["example_id"].shape == (b,)
        mask = batch["attention_mask"]
        lengths = mask.sum(1)
        assert s == lengths.max()  # padded to the longest row, not to max_length
        assert torch.equal(mask, (torch.arange(s) < lengths[:, None]).long())  # right padding
        assert torch.equal(batch["labels"] == -100, mask == 0)
        assert torch.equal(batch["labels"][mask == 1], batch["input_ids"][mask == 1])
        assert (batch["input_ids"][mask == 0] == dm.pad_token_id).all()


def test_example_id_is_the_row_of_the_corpus(cache_dir: str) -> None:
    dm = _bios(cache_dir)
    texts = make_biographies(12, seed=5).texts
    assert dm.corpus is not None and dm.corpus.texts == texts
    for batch in _epoch(dm):
        for row, k in enumerate(batch["example_id"].tolist()):
            assert _decoded(dm, batch, row) == texts[k] + EOS


def test_every_example_once_per_epoch_and_seeded_shuffle(cache_dir: str) -> None:
    n = len(make_biographies(12, seed=5).texts)
    order = torch.cat([b["example_id"] for b in _epoch(_bios(cache_dir))]).tolist()
    assert sorted(order) == list(range(n))
    assert order != list(range(n))
    again = torch.cat([b["example_id"] for b in _epoch(_bios(cache_dir))]).tolist()
    assert again == order
    other = _bios(cache_dir, seed=6)
    assert torch.cat([b["example_id"] for b in _epoch(other)]).tolist() != order
    plain = torch.cat([b["example_id"] for b in _epoch(_bios(cache_dir, shuffle=False))])
    assert plain.tolist() == list(range(n))


def test_epoch_order_depends_only_on_the_epoch(cache_dir: str) -> None:
    """What exact resume needs: Lightning's set_epoch(e) reproduces epoch e's order."""
    loader = _bios(cache_dir).train_dataloader()
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        orders.append(torch.cat([b["example_id"] for b in loader]).tolist())
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[1]) == sorted(orders[0])


def test_truncation_and_no_eos(cache_dir: str) -> None:
    dm = _bios(cache_dir, max_length=5, append_eos=False)
    lengths = [len(ids) for ids in dm.train_dataset["input_ids"]]
    assert max(lengths) == 5
    eos = dm.tokenizer.eos_token_id
    full = tokenize_texts(dm.texts, dm.tokenizer, max_length=1000, append_eos=False)
    assert all(eos not in ids for ids in full)
    assert dm.train_dataset["input_ids"] == [ids[:5] for ids in full]


def test_trained_tokenizer_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    corpus = make_biographies(12, seed=0).texts + TEXTS
    tok = train_tokenizer(corpus, vocab_size=300, save_dir=tmp_path / "tok")
    for text in TEXTS + corpus[:5]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(EOS)
    assert len(tok) == 300
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert train_tokenizer(corpus, vocab_size=300).get_vocab() == tok.get_vocab()


def test_tokenizer_is_reused_from_cache_dir(tmp_path: Path, monkeypatch) -> None:
    first = TextDataModule(num_people=6, tokenizer_vocab_size=300, cache_dir=str(tmp_path))
    assert first.vocab_size == len(first.tokenizer) == 300  # before setup
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(data_module, "train_tokenizer", fail)
    second = TextDataModule(num_people=6, tokenizer_vocab_size=300, cache_dir=str(tmp_path))
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    with pytest.raises(AssertionError, match="reused"):  # another corpus is another key
        _ = TextDataModule(
            num_people=7, tokenizer_vocab_size=300, cache_dir=str(tmp_path)
        ).vocab_size


def _check_rows(dm: TextDataModule, texts: list[str]) -> None:
    dm.setup("fit")
    seen = []
    for batch in _epoch(dm):
        for row, k in enumerate(batch["example_id"].tolist()):
            assert _decoded(dm, batch, row) == texts[k] + EOS
            seen.append(k)
    assert sorted(seen) == list(range(len(texts)))


def test_save_to_disk_directory(tmp_path: Path) -> None:
    texts = make_biographies(8, seed=1).texts
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": texts, "n": list(range(len(texts)))}).save_to_disk(path)
    dm = TextDataModule(
        str(path),
        text_column="body",
        tokenizer_vocab_size=300,
        max_length=128,
        cache_dir=str(tmp_path),
    )
    assert dm.corpus is None
    _check_rows(dm, texts)


def test_json_lines_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    texts = make_biographies(8, seed=2).texts
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    dm = TextDataModule(
        "json",
        data_files=str(path),
        tokenizer_vocab_size=300,
        max_length=128,
        cache_dir=str(tmp_path),
    )
    _check_rows(dm, texts)


def test_local_pretrained_tokenizer_without_pad(tmp_path: Path) -> None:
    tok = train_tokenizer(make_biographies(8, seed=0).texts, vocab_size=350)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "tok"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok")).pad_token is None
    dm = TextDataModule(num_people=8, tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path))
    assert dm.vocab_size == 350
    assert dm.pad_token_id == tok.eos_token_id
    assert not (tmp_path / "tokenizers").exists()  # nothing trained
    _check_rows(dm, make_biographies(8, seed=0).texts)


def test_collate_batch_pads_on_the_right() -> None:
    rows = [{"input_ids": [5, 6, 7], "example_id": 9}, {"input_ids": [8], "example_id": 2}]
    batch = collate_batch(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["example_id"].tolist() == [9, 2]


def test_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": ["a", "b"], "title": ["x", "y"]}).save_to_disk(path)
    dm = TextDataModule(str(path), tokenizer_vocab_size=300, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"text_column='text'.*\['body', 'title'\]"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="data_files"):
        TextDataModule("json")
    with pytest.raises(ValueError, match="tokenizer_vocab_size=100"):
        TextDataModule(tokenizer_vocab_size=100)
    with pytest.raises(ValueError, match="batch_size=0"):
        TextDataModule(batch_size=0)
