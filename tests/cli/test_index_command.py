"""The ``index`` command with Bergson's flags, on ``save_pretrained`` models and local datasets.

Rows are checked against a per-document autograd oracle of the summed token loss over the
tokens ``index`` labels (and, when Bergson is installed, against ``bergson build``).
"""

from __future__ import annotations

import math
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import yaml
from oracles import tiny_gpt_neox
from recipes import assert_store_matches
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_bergson import GradientStore
from lightning_bergson.capture import DEFAULT_EXCLUDE, select_modules
from lightning_bergson.cli import main
from lightning_bergson.cli.index import build_parser, index_config, resolve_config
from lightning_bergson.data import train_tokenizer

TEXTS = [
    "Ada Lovelace wrote the first program.",
    "Grace Hopper built a compiler.",
    "Alan Turing asked whether machines can think, and answered with a test.",
    "Edsger Dijkstra found shortest paths.",
    "Barbara Liskov defined substitution.",
    "Donald Knuth typeset his own books with a program he wrote himself.",
    "Ken Thompson wrote Unix.",
]
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-init GPT-NeoX and its own tokenizer (with a chat template), save_pretrained."""
    root = tmp_path_factory.mktemp("model")
    tok = train_tokenizer(TEXTS * 3, vocab_size=300)
    tok.chat_template = CHAT
    net = tiny_gpt_neox(0, len(tok), hidden_size=16, num_attention_heads=2, intermediate_size=32)
    net.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _saved(tmp_path, columns: dict) -> str:
    path = tmp_path / "data"
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def _run(tmp_path, model_dir, dataset, *flags):
    store = tmp_path / "idx.zarr"
    main(
        [
            "index",
            "--model",
            str(model_dir),
            "--dataset",
            dataset,
            "--store",
            str(store),
            "--projection_dim",
            "0",
            "--grad_dtype",
            "float32",
            "--token_batch_size",
            "64",
            *flags,
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return store


def _oracle(model_dir, docs: list[tuple[list[int], list[int]]], weights=None):
    """Per-document rows: grad of the summed loss over labelled tokens (labels[t] != -100)."""
    from recipes import loop_oracle

    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = list(select_modules(net, None, DEFAULT_EXCLUDE))

    def loss_of(i):
        ids, labels = docs[i]
        logits = net(input_ids=torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(labels[1:])
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        return loss * (1.0 if weights is None else float(weights[i]))

    return loop_oracle(net, names, loss_of, range(len(docs)))


def test_flags_rows_equal_a_per_document_oracle(tmp_path, model_dir, capsys):
    """Plain text: the model's own tokenizer, its special tokens, no EOS, no truncation."""
    store = _run(tmp_path, model_dir, _saved(tmp_path, {"text": TEXTS}))
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [(ids, ids) for ids in tok(TEXTS)["input_ids"]]
    assert_store_matches(store, _oracle(model_dir, docs))
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for what in (str(model_dir), "idx.zarr", "token_batch_size 64", "truncation False"):
        assert what in text, what
    assert "gradient store written to" in text


def test_prompt_completion_labels_only_the_completion(tmp_path, model_dir):
    prompts = ["Who wrote the first program?", "Who built a compiler?", "Who wrote Unix?"]
    answers = [" Ada Lovelace.", " Grace Hopper.", " Ken Thompson."]
    data = _saved(tmp_path, {"q": prompts, "a": answers})
    store = _run(tmp_path, model_dir, data, "--prompt_column", "q", "--completion_column", "a")
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = []
    for q, a in zip(prompts, answers, strict=True):  # chat template: user, then assistant
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.rindex(a)
        labels = [
            t if s >= start and e <= start + len(a) else -100
            for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]
        assert any(x != -100 for x in labels)
        docs.append((enc["input_ids"], labels))
    assert_store_matches(store, _oracle(model_dir, docs))


def test_reward_column_weights_rows_by_the_group_advantage(tmp_path, model_dir):
    prompts = ["p1", "p1", "p1", "p2", "p2", "p3"]
    texts = TEXTS[:6]
    rewards = [1.0, 0.0, 0.5, 2.0, -1.0, 3.0]
    data = _saved(tmp_path, {"text": texts, "prompt": prompts, "reward": rewards})
    store = _run(
        tmp_path, model_dir, data, "--reward_column", "reward", "--prompt_column", "prompt"
    )
    pairs = list(zip(prompts, rewards, strict=True))
    means = {p: np.mean([r for q, r in pairs if q == p]) for p in set(prompts)}
    advantage = [r - means[p] for p, r in zip(prompts, rewards, strict=True)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [(ids, ids) for ids in tok(texts)["input_ids"]]
    got = assert_store_matches(store, _oracle(model_dir, docs, weights=advantage))
    stored = dict(zip(got.example_ids.tolist(), got.advantages.tolist(), strict=True))
    assert all(math.isclose(stored[i], advantage[i], abs_tol=1e-6) for i in range(6))
    for p in set(prompts):  # advantages sum to zero within each prompt's group
        assert abs(sum(stored[i] for i in range(6) if prompts[i] == p)) < 1e-6


def test_too_long_document_is_an_error_naming_both_flags(tmp_path, model_dir, capsys):
    data = _saved(tmp_path, {"text": [" ".join(TEXTS * 3)]})
    with pytest.raises(SystemExit) as exit_:
        _run(tmp_path, model_dir, data, "--max_length", "16")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("python -m lightning_bergson index: error:")
    assert "truncation" in err and "max_length" in err
    store = _run(tmp_path, model_dir, data, "--max_length", "16", "--truncation", "--overwrite")
    assert GradientStore.open(store).num_rows == 1


def test_resolve_config_maps_every_flag():
    parser = build_parser()
    args = parser.parse_args(
        [
            "--model", "m", "--dataset", "d", "--store", "out/g.zarr", "--projection_dim", "0",
            "--normalizer", "adafactor", "--normalizer_path", "n.safetensors",
            "--token_batch_size", "512", "--precision", "bf16-mixed", "--devices", "2",
            "--dtype", "bfloat16", "--split", "test", "--append_eos", "--loss_reduction", "mean",
        ]
    )  # fmt: skip
    cfg = resolve_config(args)
    cb = cfg["trainer"]["callbacks"][0]["init_args"]
    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    assert cb["path"] == "out/g.zarr" and cb["projection_dim"] == 0
    assert (cb["normalizer"], cb["normalizer_source"]) == ("adafactor", "file")
    assert cb["normalizer_path"] == "n.safetensors" and cb["loss_reduction"] == "mean"
    assert model == {"model": "m", "dtype": "bfloat16"}
    assert data["tokenizer"] == "m" and data["dataset"] == "d" and data["split"] == "test"
    assert data["token_batch_size"] == 512 and data["append_eos"] is True
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["devices"] == 2
    assert cfg["trainer"]["strategy"] == "ddp"
    assert cfg["trainer"]["use_distributed_sampler"] is False  # token batches are dealt per rank


def test_normalizer_without_a_file_is_refused():
    args = build_parser().parse_args(["--model", "m", "--normalizer", "adam"])
    with pytest.raises(SystemExit, match="--normalizer_path"):
        resolve_config(args)


def test_dataset_files_get_their_format(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "a b"}\n')
    cfg = resolve_config(build_parser().parse_args(["--model", "m", "--dataset", str(path)]))
    assert cfg["data"]["init_args"]["dataset"] == "json"
    assert cfg["data"]["init_args"]["data_files"] == str(path)


def test_shipped_index_config_is_the_flags_default(request):
    root = request.config.rootpath
    assert yaml.safe_load((root / "configs" / "index.yaml").read_text()) == index_config()


@pytest.mark.compare
def test_rows_equal_bergson_build(tmp_path, model_dir):
    """``index --projection_dim 0`` and ``bergson build`` store the same rows."""
    pytest.importorskip("bergson")
    from bergson.data import load_module_gradients

    data = _saved(tmp_path, {"text": TEXTS})
    store = GradientStore.open(_run(tmp_path, model_dir, data))
    run = tmp_path / "bergson"
    cmd = [sys.executable, "-m", "bergson", "build", str(run), "--model", str(model_dir)]
    cmd += ["--dataset", data, "--projection_dim", "0", "--token_batch_size", "64"]
    done = subprocess.run([*cmd, "--precision", "fp32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_module_gradients(run)
    rows = store.read(slice(None), dtype=torch.float64)
    order = np.argsort(store.example_ids)
    for block in store.modules:
        name = block.name.removeprefix("gpt_neox.")  # Bergson names modules from base_model
        want = torch.as_tensor(np.asarray(theirs[name], dtype=np.float64))  # (N, O*I)
        got = rows[order][:, block.offset : block.offset + block.size]
        err = float((got - want).norm() / want.norm())
        assert err <= 1e-5, (block.name, err)
