"""Post-hoc index (IndexModule, ``index`` command): rows equal the callback's training rows."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml
from oracles import assert_rows_match, lm_batch, rows_by_id, tiny_gpt_neox
from recipes import fit_with_capture

from lightning_bergson import CausalLMModule, GradientCaptureCallback, HeadConfig, TextDataModule
from lightning_bergson.attribution import Attributor, query_batch
from lightning_bergson.attribution.index import IndexModule
from lightning_bergson.cli import main

ROOT = Path(__file__).resolve().parents[2]
QKV = "gpt_neox.layers.0.attention.query_key_value"


def capture(tmp_path, name, **kwargs):
    return GradientCaptureCallback(
        tmp_path / name,
        projection_dim=4,
        head_cfgs={QKV: HeadConfig(num_heads=4, head_size=24)},
        dtype="float32",
        **kwargs,
    )


def test_index_rows_equal_callback_rows(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=7, seq=9)
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0), data, capture(tmp_path, "a.zarr"))
    before = copy.deepcopy(net.state_dict())
    fit_with_capture(IndexModule(net), data, capture(tmp_path, "b.zarr"), batch_size=4)
    assert_rows_match(rows_by_id(tmp_path / "b.zarr"), rows_by_id(tmp_path / "a.zarr"))
    for key, value in net.state_dict().items():  # no parameter changed
        assert torch.equal(value, before[key]), key


def test_index_refuses_optimizer_normalizers(tmp_path):
    cb = capture(tmp_path, "c.zarr", normalizer="adafactor")
    with pytest.raises(ValueError, match="normalizer_source='file'"):
        fit_with_capture(IndexModule(tiny_gpt_neox()), lm_batch(num=3, seq=5), cb)


def test_index_command_over_a_checkpoint(tmp_path):
    """``index --config`` over a CausalLMModule checkpoint: rows equal the query rows."""
    data = TextDataModule(num_people=3, batch_size=4, shuffle=False, cache_dir=str(tmp_path))
    config = {
        "model_type": "gpt_neox",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    trainer = L.Trainer(
        max_steps=2, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False
    )
    trainer.fit(CausalLMModule(config=config, lr=1e-2), data)
    cfg = yaml.safe_load((ROOT / "configs" / "index_quickstart.yaml").read_text())
    init = cfg["trainer"]["callbacks"][0]["init_args"]
    init.update(path=str(tmp_path / "idx.zarr"), normalizer="none", head_cfgs=None, dtype="float32")
    cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(tmp_path))
    cfg["model"]["init_args"]["model"] = str(tmp_path / "run")
    cfg["data"]["init_args"].update(num_people=3, cache_dir=str(tmp_path))
    (tmp_path / "index.yaml").write_text(yaml.safe_dump(cfg))
    main(["index", "--config", str(tmp_path / "index.yaml")])

    stored = rows_by_id(tmp_path / "idx.zarr")
    assert sorted(stored) == list(range(len(data.texts)))
    model = IndexModule(str(tmp_path / "run")).model
    attr = Attributor(tmp_path / "idx.zarr", dtype=torch.float64)
    batch = query_batch(data.tokenizer, data.texts[:5], max_length=64, append_eos=True)
    got = attr.query_gradients(model, batch)
    assert_rows_match(dict(enumerate(got)), {i: stored[i] for i in range(5)})


# ------------------------------------------------------------------ exact, frozen, weighted


def _doc_oracle(net, data, weights=None, reduction="sum"):
    """Per-document rows by a plain backward loop over a trainable copy of the network."""
    from recipes import loop_oracle

    from lightning_bergson.capture import DEFAULT_EXCLUDE, select_modules

    oracle_net = copy.deepcopy(net).requires_grad_(True)
    names = list(select_modules(oracle_net, None, DEFAULT_EXCLUDE))

    def loss_of(i):
        n = int(data["attention_mask"][i].sum())
        ids = data["input_ids"][i : i + 1, :n]
        logits = oracle_net(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        if reduction == "mean":
            loss = loss / (n - 1)
        return loss * (1.0 if weights is None else float(weights[i]))

    rows = loop_oracle(oracle_net, names, loss_of, range(len(data["input_ids"])))
    return {int(data["example_id"][i]): row for i, row in rows.items()}


class _FrozenProbe(L.Callback):
    """Records, during every step, which parameters require grad or hold a gradient."""

    def __init__(self):
        self.trainable, self.with_grad = set(), set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, p in pl_module.model.named_parameters():
            if p.requires_grad:
                self.trainable.add(name)
            if p.grad is not None:
                self.with_grad.add(name)


def _index(tmp_path, net, data, name="i.zarr", batch_size=3, **kwargs):
    from recipes import trainer

    cb = GradientCaptureCallback(tmp_path / name, projection_dim=0, dtype="float32", **kwargs)
    probe = _FrozenProbe()
    t = trainer(cb)
    t.callbacks.append(probe)
    from oracles import Rows
    from torch.utils.data import DataLoader

    t.fit(IndexModule(net), DataLoader(Rows(data), batch_size=batch_size))
    return probe


def test_index_rows_equal_a_per_document_oracle_with_every_weight_frozen(tmp_path):
    """Rows are each document's summed-loss gradient; no parameter requires or gets a grad."""
    from recipes import assert_store_matches

    net = tiny_gpt_neox()
    data = lm_batch(num=7, seq=9)
    probe = _index(tmp_path, net, data)
    store = assert_store_matches(tmp_path / "i.zarr", _doc_oracle(net, data))
    assert probe.trainable == set() and probe.with_grad == set()
    assert all(not p.requires_grad for p in net.parameters())
    # The store's loss is the summed loss that was differentiated.
    logits = net(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    from oracles import example_losses

    want = example_losses(logits, data["labels"]).detach()
    order = {int(i): k for k, i in enumerate(data["example_id"])}
    want = want[[order[int(i)] for i in store.example_ids]]
    assert torch.allclose(torch.as_tensor(store.losses), want, rtol=1e-5)
    assert bool(torch.isnan(torch.as_tensor(store.advantages)).all())  # no advantage column


def test_index_mean_reduction_divides_rows_and_losses_by_tokens(tmp_path):
    from recipes import assert_store_matches

    net = tiny_gpt_neox()
    data = lm_batch(num=5, seq=9)
    _index(tmp_path, net, data, loss_reduction="mean")
    store = assert_store_matches(tmp_path / "i.zarr", _doc_oracle(net, data, reduction="mean"))
    logits = net(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    from oracles import example_losses

    want = example_losses(logits, data["labels"], "mean").detach()
    order = {int(i): k for k, i in enumerate(data["example_id"])}
    want = want[[order[int(i)] for i in store.example_ids]]
    assert torch.allclose(torch.as_tensor(store.losses), want, rtol=1e-5)


def test_index_advantage_weights_rows_and_is_stored(tmp_path):
    """Rows are ``A_i * grad L_i`` (negative and zero advantages too), A_i stored per row."""
    from recipes import assert_store_matches

    net = tiny_gpt_neox()
    data = lm_batch(num=6, seq=8)
    data["advantage"] = torch.tensor([0.5, -1.25, 2.0, 0.75, -0.5, 1.5])
    _index(tmp_path, net, data)
    store = assert_store_matches(
        tmp_path / "i.zarr", _doc_oracle(net, data, weights=data["advantage"])
    )
    order = {int(i): k for k, i in enumerate(data["example_id"])}
    want = data["advantage"][[order[int(i)] for i in store.example_ids]]
    assert torch.equal(torch.as_tensor(store.advantages), want)


@pytest.mark.parametrize("reduction", ["token_mean", "example_mean"])
def test_index_refuses_a_batch_reduction_that_is_not_its_loss(tmp_path, reduction):
    with pytest.raises(ValueError, match="IndexModule, which backpropagates the sum"):
        _index(tmp_path, tiny_gpt_neox(), lm_batch(num=3, seq=5), batch_reduction=reduction)
    assert not (tmp_path / "i.zarr").exists()


def test_index_declared_sum_is_accepted_and_checked(tmp_path):
    from recipes import assert_store_matches

    net = tiny_gpt_neox()
    data = lm_batch(num=4, seq=6)
    _index(tmp_path, net, data, batch_reduction="sum")
    assert_store_matches(tmp_path / "i.zarr", _doc_oracle(net, data))


def test_index_refuses_a_tokenizer_larger_than_the_embedding(tmp_path):
    """Texts tokenized for another model stop the run before any row is written."""
    data = TextDataModule(num_people=3, batch_size=4, shuffle=False, cache_dir=str(tmp_path))
    net = tiny_gpt_neox(vocab_size=64)  # the trained BPE tokenizer has far more tokens
    cb = GradientCaptureCallback(tmp_path / "v.zarr", projection_dim=4)
    from recipes import trainer

    with pytest.raises(ValueError, match="tokenized for another model"):
        trainer(cb).fit(IndexModule(net), data)
