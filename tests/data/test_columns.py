"""TextDataModule columns, truncation, token-budget batches and reward advantages.

Every check compares against an oracle built apart from the code under test: spans worked
out by hand from the template's pieces, a brute-force greedy packing, pandas group means.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning.pytorch as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from tokenizers import processors
from transformers import AutoTokenizer

from lightning_bergson.batch import IGNORE_INDEX
from lightning_bergson.data import (
    TextDataModule,
    group_advantages,
    tokenize_conversations,
    tokenize_prompt_completions,
    tokenize_texts,
    train_tokenizer,
)
from lightning_bergson.loader import TokenBudgetBatchSampler, make_resumable

EOS = "<|endoftext|>"
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
PROMPTS = ["Who wrote the first program?", "Who built a compiler?", "", "What is 7 + 7?"]
ANSWERS = [" Ada Lovelace.", " Grace Hopper.", "Ken Thompson wrote Unix.", " fourteen."]
CORPUS = [
    "Ada Lovelace wrote the first program. Grace Hopper built a compiler.",
    "Ken Thompson wrote Unix. What is 7 + 7? It is fourteen, fourteen, fourteen.",
    "Is it true? Yes. Sure? Yes. Who wrote the first program?",
] * 4


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A local BPE tokenizer that adds a bos ("<|endoftext|>", offsets (0, 0)); with and
    without a chat template, each saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tok.convert_tokens_to_ids(EOS))]
    )
    tok.save_pretrained(str(root / "plain"))
    tok.chat_template = CHAT
    tok.save_pretrained(str(root / "chat"))
    return {"plain": str(root / "plain"), "chat": str(root / "chat")}


def _saved(tmp_path: Path, columns: dict) -> str:
    path = tmp_path / "ds"
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled positions, as token ids."""
    runs: list[list[int]] = []
    for k, (t, y) in enumerate(zip(ids, labels, strict=True)):
        if y == IGNORE_INDEX:
            continue
        assert y == t, "a labelled position must carry its own token"
        if k and labels[k - 1] != IGNORE_INDEX:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _overlap_oracle(tok, text: str, spans, special: bool) -> tuple[list[int], list[int]]:
    """Ids of ``text`` and labels: a token is labelled iff its characters meet a span."""
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    labels = []
    for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = any(max(s, a) < min(e, b) for a, b in spans)  # a shared character
        labels.append(t if inside else IGNORE_INDEX)
    return enc["input_ids"], labels


# ---------------------------------------------------------------- prompt + completion


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_prompt_completion_labels_only_the_completion(tmp_path, tok_dirs, kind) -> None:
    data = _saved(tmp_path, {"q": PROMPTS, "a": ANSWERS, "other": list(range(4))})
    dm = TextDataModule(
        data, prompt_column="q", completion_column="a", tokenizer=tok_dirs[kind],
        max_length=None, append_eos=False,
    )  # fmt: skip
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tok_dirs[kind])
    rows = dm.train_dataset
    for k, (q, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        head = f"<|user|>{q}\n<|assistant|>" if kind == "chat" else q  # hand-rendered
        text = head + a + ("\n" if kind == "chat" else "")
        assert dm.texts[k] == rows[k]["text"] == text
        ids, labels = _overlap_oracle(tok, text, [(len(head), len(head) + len(a))], kind != "chat")
        assert rows[k]["input_ids"] == ids and rows[k]["labels"] == labels
        assert (ids[0] == tok.bos_token_id) == (kind == "plain")  # special tokens: plain only
        runs = _labelled_runs(rows[k]["input_ids"], rows[k]["labels"])
        assert [tok.decode(r) for r in runs] == [a]  # exactly the completion, nothing else
    assert dm.batched_ids == [0, 1, 2, 3]


def test_a_token_straddling_the_prompt_end_is_labelled(tok_dirs) -> None:
    """ "...is four" + "teen." is tokenized as " fourteen" + ".": the straddling token holds
    completion characters, so it is labelled; the prompt's other tokens are not."""
    tok = AutoTokenizer.from_pretrained(tok_dirs["plain"])
    prompt, completion = "It is four", "teen."
    ids = tok(prompt + completion)["input_ids"]
    pieces = [tok.decode([t]) for t in ids]
    assert pieces[-2:] == [" fourteen", "."]  # the oracle's premise: one token across the cut
    enc = tokenize_prompt_completions([prompt], [completion], tok)
    assert enc.input_ids[0] == ids
    assert enc.labels[0] == [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
    exact = tokenize_prompt_completions(["It is"], [" fourteen."], tok)  # cut at a boundary
    assert _labelled_runs(exact.input_ids[0], exact.labels[0]) == [ids[-2:]]
    assert exact.labels[0][: len(ids) - 2] == [IGNORE_INDEX] * (len(ids) - 2)


def test_completion_missing_from_the_rendered_row_is_an_error(tmp_path, tok_dirs) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs["chat"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] | trim }}\n{% endfor %}"
    with pytest.raises(ValueError, match=r"example_id=1: assistant message 1 \(' Grace"):
        tokenize_prompt_completions(["a", "b"], ["x", " Grace Hopper."], tok)


# ---------------------------------------------------------------- conversations


def test_conversation_labels_each_assistant_turn_even_when_repeated(tmp_path, tok_dirs) -> None:
    turns = [
        ("user", "Is it true? Yes."),
        ("assistant", "Yes."),
        ("user", "Sure? Yes."),
        ("assistant", "Yes."),
    ]
    convo = [{"role": r, "content": c} for r, c in turns]
    single = [{"role": "user", "content": "Who wrote Unix?"}, {"role": "assistant", "content": ""}]
    data = _saved(tmp_path, {"messages": [convo, single]})
    dm = TextDataModule(data, conversation_column="messages", tokenizer=tok_dirs["chat"])
    with pytest.warns(UserWarning, match=r"1 of 2 documents have no token to predict.*id 1\b"):
        dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(tok_dirs["chat"])
    text, spans = "", []
    for role, content in turns:  # the template's pieces, by hand
        text += f"<|{role}|>"
        if role == "assistant":
            spans.append((len(text), len(text) + len(content)))
        text += content + "\n"
    row = dm.train_dataset[0]
    assert dm.texts[0] == row["text"] == text
    ids, labels = _overlap_oracle(tok, text, spans, special=False)
    assert row["input_ids"] == [*ids, tok.eos_token_id]  # append_eos=True by default ...
    assert row["labels"] == [*labels, IGNORE_INDEX]  # ... and the eos is not labelled
    assert [tok.decode(r) for r in _labelled_runs(row["input_ids"], row["labels"])] == ["Yes."] * 2
    assert dm.batched_ids == [0]  # the empty assistant turn labels nothing: no batch
    batches = list(dm.train_dataloader())
    assert [b["example_id"].tolist() for b in batches] == [[0]]
    assert torch.equal(batches[0]["labels"][0], torch.tensor(row["labels"]))


def test_conversations_need_a_chat_template(tmp_path, tok_dirs) -> None:
    plain = AutoTokenizer.from_pretrained(tok_dirs["plain"])
    with pytest.raises(ValueError, match="chat template; pass tokenizer="):
        tokenize_conversations([[{"role": "user", "content": "x"}]], plain)
    with pytest.raises(ValueError, match="needs a chat template"):
        TextDataModule(_saved(tmp_path, {"m": [[]]}), conversation_column="m")
    chat = AutoTokenizer.from_pretrained(tok_dirs["chat"])
    with pytest.raises(ValueError, match="example_id=0: a conversation must be a list"):
        tokenize_conversations([["not a message"]], chat)


# ---------------------------------------------------------------- truncation


def test_truncation_off_names_the_document_and_both_options(tmp_path, tok_dirs) -> None:
    texts = ["Ken Thompson wrote Unix.", "Ada wrote.", " ".join(CORPUS[:3]), "Yes."]
    tok = AutoTokenizer.from_pretrained(tok_dirs["plain"])
    full = [tok(t)["input_ids"] for t in texts]  # bos + text, no eos (append_eos=False)
    data = _saved(tmp_path, {"text": texts})
    kwargs = {"tokenizer": tok_dirs["plain"], "append_eos": False, "max_length": 12}
    dm = TextDataModule(data, truncation=False, **kwargs)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"example_id=2 has {len(full[2])} tokens" in message
    for option in ("truncation=True", "--truncation", "max_length", "--max_length"):
        assert option in message
    cut = TextDataModule(data, truncation=True, **kwargs)
    cut.setup("fit")
    assert cut.train_dataset["input_ids"] == [ids[:12] for ids in full]
    unlimited = TextDataModule(data, truncation=False, **(kwargs | {"max_length": None}))
    unlimited.setup("fit")
    assert unlimited.train_dataset["input_ids"] == full
    assert tokenize_texts(texts, tok, None, True, truncation=False)[2] == [
        *full[2],
        tok.eos_token_id,
    ]


# ---------------------------------------------------------------- token-budget batches


def _greedy_oracle(lengths: list[int], budget: int) -> list[list[int]]:
    """Brute force: walk documents longest first; open a new batch when one more would cost
    more than the budget (cost = longest * count, recomputed from scratch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        trial = (batches[-1] + [i]) if batches else None
        if trial and max(lengths[j] for j in trial) * len(trial) <= budget:
            batches[-1] = trial
        else:
            batches.append([i])
    return batches


def _cost(batch: list[int], lengths: list[int]) -> int:
    return max(lengths[i] for i in batch) * len(batch)


@pytest.mark.parametrize("budget", [40, 64, 200])
def test_token_budget_packs_greedily_longest_first(budget) -> None:
    rng = random.Random(budget)
    lengths = [rng.randint(2, 40) for _ in range(57)]
    sampler = TokenBudgetBatchSampler(lengths, budget)
    batches = list(sampler)
    assert batches == _greedy_oracle(lengths, budget) == sampler.batches
    assert len(sampler) == len(batches)
    assert sorted(i for b in batches for i in b) == list(range(57))  # every id exactly once
    assert all(_cost(b, lengths) <= budget for b in batches)
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest == sorted(longest, reverse=True)  # longest first


@pytest.mark.parametrize("world_size", [2, 3])
def test_token_budget_ranks_get_equal_counts_and_a_disjoint_cover(world_size) -> None:
    rng = random.Random(world_size)
    lengths = [rng.randint(2, 30) for _ in range(40)]
    indices = [i for i in range(40) if i % 7]  # a subset of rows, as after skipping
    budget = next(  # a budget whose greedy packing needs splitting for world_size
        b
        for b in range(90, 200)
        if len(TokenBudgetBatchSampler(lengths, b, indices=indices)) % world_size
    )
    single = TokenBudgetBatchSampler(lengths, budget, indices=indices)
    per_rank = [
        list(
            TokenBudgetBatchSampler(lengths, budget, indices=indices, rank=r, world_size=world_size)
        )
        for r in range(world_size)
    ]
    counts = {len(b) for b in per_rank}
    assert counts == {-(-len(single) // world_size)}  # equal, and as few as possible
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == indices  # disjoint (no repeats) and covering
    assert all(_cost(b, lengths) <= budget for batches in per_rank for b in batches)


def test_token_budget_split_needs_enough_documents() -> None:
    with pytest.raises(ValueError, match="2 documents cannot fill 3 batches"):
        TokenBudgetBatchSampler([5, 5], 5, world_size=3)


def test_token_budget_shuffle_permutes_batches_per_epoch() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(2, 30) for _ in range(60)]
    plain = TokenBudgetBatchSampler(lengths, 60).batches
    sampler = TokenBudgetBatchSampler(lengths, 60, shuffle=True, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]
    for order in orders:  # same packing, another order
        assert sorted(order) == sorted(plain) and order != plain
    again = TokenBudgetBatchSampler(lengths, 60, shuffle=True, seed=3)
    again.set_epoch(1)
    assert list(again) == orders[1]
    other = TokenBudgetBatchSampler(lengths, 60, shuffle=True, seed=4)
    assert list(other) != orders[0]


def test_token_budget_loader_follows_lightning_set_epoch_and_resumes(tmp_path, tok_dirs) -> None:
    """Lightning calls set_epoch on ``batch_sampler.sampler``, also through make_resumable;
    a resumed loader skips the batches already trained on."""
    texts = [" ".join(CORPUS[:3])[: 8 + 9 * k] for k in range(20)]
    data = _saved(tmp_path, {"text": texts})
    dm = TextDataModule(data, tokenizer=tok_dirs["plain"], token_batch_size=100, seed=1)
    dm.setup("fit")
    loader = make_resumable(dm.train_dataloader())
    epochs = {}
    for epoch in (1, 0):
        _set_sampler_epoch(loader, epoch)
        epochs[epoch] = [b["example_id"].tolist() for b in loader]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    loader.load_state_dict({"batches_trained": 2})
    assert [b["example_id"].tolist() for b in loader] == epochs[0][2:]


def test_too_long_document_for_the_budget_names_it_and_both_fixes(tmp_path, tok_dirs) -> None:
    texts = ["short one", " ".join(CORPUS), "short two"]
    tok = AutoTokenizer.from_pretrained(tok_dirs["plain"])
    n = len(tok(texts[1])["input_ids"]) + 1  # + eos
    data = _saved(tmp_path, {"text": texts})
    dm = TextDataModule(data, tokenizer=tok_dirs["plain"], max_length=None, token_batch_size=64)
    dm.setup("fit")
    with pytest.raises(ValueError) as err:
        dm.train_dataloader()
    message = str(err.value)
    assert f"example_id=1 has {n} tokens" in message
    assert "token_batch_size >=" in message and "truncation=True with max_length" in message


def test_short_documents_are_skipped_once_loudly(tmp_path, tok_dirs) -> None:
    texts = ["Ada wrote.", "", "Ken wrote Unix.", "", "Yes."]
    data = _saved(tmp_path, {"text": texts})
    dm = TextDataModule(
        data, tokenizer=tok_dirs["plain"], append_eos=False, token_batch_size=64, shuffle=False
    )
    with pytest.warns(UserWarning, match=r"2 of 5 documents.*example_id 1, 3\."):
        dm.setup("fit")
    assert len(dm.train_dataset) == 5 and dm.train_dataset["example_id"] == list(range(5))
    assert dm.batched_ids == [0, 2, 4]
    ids = sorted(i for b in dm.train_dataloader() for i in b["example_id"].tolist())
    assert ids == [0, 2, 4]


# ---------------------------------------------------------------- Lightning and DDP


def test_ddp_sampler_injection_is_refused_with_the_fix(tmp_path, tok_dirs) -> None:
    data = _saved(tmp_path, {"text": CORPUS})
    dm = TextDataModule(data, tokenizer=tok_dirs["plain"], token_batch_size=256)
    dm.setup("fit")
    trainer = L.Trainer(strategy="ddp", devices=1, accelerator="cpu", logger=False)
    dm.trainer = trainer
    with pytest.raises(ValueError, match=r"Trainer\(use_distributed_sampler=False\)"):
        dm.train_dataloader()
    trainer = L.Trainer(
        strategy="ddp", devices=1, accelerator="cpu", logger=False, use_distributed_sampler=False
    )
    dm.trainer = trainer
    loader = dm.train_dataloader()
    from lightning.pytorch.trainer.states import RunningStage

    prepared = trainer._data_connector._prepare_dataloader(loader, True, RunningStage.TRAINING)
    assert prepared is loader  # Lightning leaves the batch sampler alone


def test_ranks_from_the_trainer_cover_the_batched_ids(tmp_path, tok_dirs) -> None:
    data = _saved(tmp_path, {"text": [" ".join(CORPUS)[: 5 + 7 * k] for k in range(25)]})
    dm = TextDataModule(data, tokenizer=tok_dirs["plain"], token_batch_size=200)
    dm.setup("fit")
    per_rank = []
    for rank in range(3):
        connector = SimpleNamespace(use_distributed_sampler=False, is_distributed=True)
        dm.trainer = SimpleNamespace(  # type: ignore[assignment]
            global_rank=rank, world_size=3, _accelerator_connector=connector
        )
        per_rank.append([b["example_id"].tolist() for b in dm.train_dataloader()])
    assert len({len(batches) for batches in per_rank}) == 1
    assert sorted(i for batches in per_rank for b in batches for i in b) == dm.batched_ids


class _Recorder(L.LightningModule):
    needs_example_id = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["example_id"].tolist())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fit_with_token_batches_sees_every_example_once_per_epoch(tmp_path, tok_dirs) -> None:
    texts = [" ".join(CORPUS)[: 4 + 11 * k] for k in range(18)]
    dm = TextDataModule(
        _saved(tmp_path, {"text": texts}), tokenizer=tok_dirs["plain"], token_batch_size=160
    )
    module = _Recorder()
    trainer = L.Trainer(
        strategy="bergson", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    per_epoch = len(module.seen) // 2
    first, second = module.seen[:per_epoch], module.seen[per_epoch:]
    for epoch in (first, second):
        assert sorted(i for b in epoch for i in b) == list(range(18))
        assert all(_cost(b, dm._lengths) <= 160 for b in epoch)
    assert first != second and sorted(first) == sorted(second)  # reshuffled, same packing


# ---------------------------------------------------------------- rewards


def test_advantages_are_rewards_minus_the_prompt_group_mean(tmp_path, tok_dirs) -> None:
    prompts = ["p1", "p2", "p1", "p3", "p2", "p1"]
    rewards = [1.0, 2.0, 0.0, 3.0, -1.0, 0.5]
    texts = [f"{p} answer {k}" for k, p in enumerate(prompts)]
    frame = pd.DataFrame({"p": prompts, "r": rewards})
    want = (frame["r"] - frame.groupby("p")["r"].transform("mean")).to_numpy()
    data = _saved(tmp_path, {"text": texts, "prompt": prompts, "reward": rewards})
    dm = TextDataModule(
        data, tokenizer=tok_dirs["plain"], prompt_column="prompt", reward_column="reward",
        token_batch_size=64,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.advantages is not None
    np.testing.assert_allclose(dm.advantages, want, atol=1e-12)
    for p in set(prompts):
        assert abs(sum(a for a, q in zip(dm.advantages, prompts, strict=True) if q == p)) < 1e-12
    seen = {}
    for batch in dm.train_dataloader():
        assert batch["advantage"].dtype == torch.float32 and batch["advantage"].shape == (
            len(batch["example_id"]),
        )
        seen.update(zip(batch["example_id"].tolist(), batch["advantage"].tolist(), strict=True))
    assert sorted(seen) == list(range(6))
    assert all(math.isclose(seen[k], want[k], abs_tol=1e-6) for k in range(6))
    by_text = group_advantages([1.0, 3.0, 2.0], ["a", "b", "a"])  # no prompt: the text groups
    assert by_text.tolist() == [-0.5, 0.0, 0.5]


def test_nan_rewards_error_or_are_skipped(tmp_path, tok_dirs) -> None:
    prompts = ["p1", "p1", "p1", "p2", "p2", "p2"]
    rewards = [1.0, float("nan"), 3.0, float("nan"), 4.0, 8.0]
    texts = [f"reply {k}" for k in range(6)]
    data = _saved(tmp_path, {"text": texts, "prompt": prompts, "reward": rewards})
    kwargs = {"tokenizer": tok_dirs["plain"], "prompt_column": "prompt", "reward_column": "reward"}
    with pytest.raises(ValueError, match=r"2 rewards are NaN \(example_id 1, 3\).*skip_nan_"):
        TextDataModule(data, **kwargs).setup("fit")
    dm = TextDataModule(data, skip_nan_rewards=True, token_batch_size=64, **kwargs)
    with pytest.warns(UserWarning, match=r"leaves out 2 rows with a NaN reward: example_id 1, 3"):
        dm.setup("fit")
    kept = pd.DataFrame({"p": prompts, "r": rewards}).dropna()
    want = kept["r"] - kept.groupby("p")["r"].transform("mean")
    assert dm.advantages is not None
    assert np.isnan(dm.advantages[[1, 3]]).all()
    np.testing.assert_allclose(dm.advantages[kept.index], want.to_numpy())
    assert dm.batched_ids == [0, 2, 4, 5]
    for batch in dm.train_dataloader():  # ids are still the rows of the dataset
        for row, k in enumerate(batch["example_id"].tolist()):
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            assert dm.tokenizer.decode(ids) == EOS + texts[k] + EOS


# ---------------------------------------------------------------- end to end, API


def test_end_to_end_batches_address_the_saved_dataset(tmp_path, tok_dirs) -> None:
    data = _saved(
        tmp_path, {"q": PROMPTS * 3, "a": ANSWERS * 3, "r": [float(k) for k in range(12)]}
    )
    dm = TextDataModule(
        data, prompt_column="q", completion_column="a", reward_column="r",
        tokenizer=tok_dirs["chat"], token_batch_size=96, max_length=None,
    )  # fmt: skip
    dm.setup("fit")
    rows = datasets.load_from_disk(data)
    tok = AutoTokenizer.from_pretrained(tok_dirs["chat"])
    seen = []
    for batch in dm.train_dataloader():
        assert sorted(batch) == ["advantage", "attention_mask", "example_id", "input_ids", "labels"]
        mask = batch["attention_mask"].bool()
        assert (batch["labels"][~mask] == IGNORE_INDEX).all()
        assert int(mask.sum(1).max()) * len(mask) <= 96
        for row, k in enumerate(batch["example_id"].tolist()):
            labels = batch["labels"][row][mask[row]].tolist()
            ids = batch["input_ids"][row][mask[row]].tolist()
            assert [tok.decode(r) for r in _labelled_runs(ids, labels)] == [rows[k]["a"]]
            assert tok.decode(ids[:-1]) == dm.texts[k] and ids[-1] == tok.eos_token_id
            seen.append(k)
    assert sorted(seen) == list(range(12))
    plain = TextDataModule(_saved(tmp_path / "p", {"text": CORPUS}), tokenizer=tok_dirs["plain"])
    plain.setup("fit")
    assert "advantage" not in next(iter(plain.train_dataloader()))


def test_text_field_is_a_deprecated_alias(tmp_path, tok_dirs) -> None:
    data = _saved(tmp_path, {"body": CORPUS})
    with pytest.warns(FutureWarning, match="text_column='body'"):
        dm = TextDataModule(data, text_field="body", tokenizer=tok_dirs["plain"])
    assert dm.text_column == dm.text_field == dm.hparams["text_column"] == "body"
    assert "text_field" not in dm.hparams
    assert dm.texts == CORPUS
    with pytest.raises(ValueError, match="pass only text_column"):
        TextDataModule(data, text_field="body", text_column="other")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"completion_column": "a"}, "needs prompt_column"),
        ({"prompt_column": "q"}, "completion_column .* or reward_column"),
        ({"conversation_column": "m", "completion_column": "a", "prompt_column": "q"}, "one of"),
        ({"skip_nan_rewards": True}, "needs reward_column"),
        ({"token_batch_size": 0}, "token_batch_size=0"),
        ({"max_length": 0}, "max_length=0"),
    ],
)
def test_bad_column_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule("some/dir", tokenizer="tok", **kwargs)


@pytest.mark.compare
def test_tokens_and_labels_equal_bergson_tokenize(tok_dirs) -> None:
    """Same flags, same tokens: Bergson's ``tokenize`` on the same rows (when installed)."""
    pytest.importorskip("bergson")
    from bergson.config import DataConfig
    from bergson.data import tokenize

    tok = AutoTokenizer.from_pretrained(tok_dirs["chat"])
    batch = {"q": PROMPTS[:2] + PROMPTS[3:], "a": ANSWERS[:2] + ANSWERS[3:]}
    cfg = DataConfig(prompt_column="q", completion_column="a")
    theirs = tokenize(batch, args=cfg, tokenizer=tok)
    ours = tokenize_prompt_completions(batch["q"], batch["a"], tok)
    assert ours.input_ids == theirs["input_ids"] and ours.labels == theirs["labels"]
    plain = tokenize({"text": CORPUS[:3]}, args=DataConfig(), tokenizer=tok)
    assert tokenize_texts(CORPUS[:3], tok, None, False) == plain["input_ids"]
    convo = [
        {"role": "user", "content": "Is it true?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    chats = tokenize({"m": [convo]}, args=DataConfig(conversation_column="m"), tokenizer=tok)
    ours = tokenize_conversations([convo], tok)
    assert ours.input_ids == chats["input_ids"] and ours.labels == chats["labels"]


@pytest.mark.compare
def test_token_batches_equal_bergson_allocation() -> None:
    """One rank: the same documents share a batch as in Bergson's ``allocate_batches``."""
    pytest.importorskip("bergson")
    from bergson.data import _allocate_batches_world

    rng = random.Random(5)
    lengths = [rng.randint(2, 50) for _ in range(80)]
    (theirs,) = _allocate_batches_world(lengths, 128, world_size=1)
    ours = TokenBudgetBatchSampler(lengths, 128).batches
    assert sorted(map(sorted, theirs)) == sorted(map(sorted, ours))
