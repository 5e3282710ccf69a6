"""Capture in recipes nobody here wrote: rows equal a per-example oracle, or the fit refuses.

Each recipe runs with ``projection_dim=0`` (exact rows) on one batch holding every example,
and the rows are compared with a plain backward loop over examples on a copy of the
initial model. Without the per-example loss contract the causal-LM rule applies where it
provably holds; elsewhere the fit stops at the first batch and no row is stored.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import Rows, example_losses, lm_batch
from recipes import (
    AdvantageModule,
    ClassifierModule,
    CNNModule,
    ContractBoringModel,
    DemoTransformerModule,
    HFCausalModule,
    ImageLabels,
    TokenPairs,
    assert_store_matches,
    classification_batch,
    loop_oracle,
    stored_modules,
    summed_lm_loss,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    trainer,
)
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore
from lightning_bergson.capture.scaling import CaptureContractError


def capture(tmp_path, **kw):
    return GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=0, dtype="float32", **kw)


def no_rows(path) -> bool:
    with pytest.warns(Warning, match="incomplete"):
        return len(GradientStore.open(path)) == 0


def refuses(tmp_path, module, loader, *, match, strategy="auto", **cb):
    cb = capture(tmp_path, **cb)
    with pytest.raises(CaptureContractError, match=match):
        trainer(cb, strategy=strategy, max_steps=1).fit(module, loader)
    assert no_rows(tmp_path / "g.zarr")


# ---------------------------------------------------------------- the contract


def test_demo_transformer_tuple_batches_under_bergson_strategy(tmp_path):
    data = TokenPairs(n=6)
    module = DemoTransformerModule(contract=True)
    ref = copy.deepcopy(module)
    cb = capture(tmp_path)
    trainer(cb, strategy="bergson", max_steps=1).fit(module, DataLoader(data, batch_size=6))
    names = stored_modules(tmp_path / "g.zarr")
    assert not any("self_attn.out_proj" in n or "multihead_attn" in n for n in names), names

    def loss_of(i):
        return ref.example_losses(data.x[i : i + 1], data.y[i : i + 1])[0]

    want = loop_oracle(ref.model, names, loss_of, range(6))
    store = assert_store_matches(tmp_path / "g.zarr", want)
    expect = torch.stack([loss_of(i) for i in store.example_ids.tolist()]).detach()
    torch.testing.assert_close(torch.from_numpy(store.losses), expect, rtol=1e-5, atol=1e-6)


def test_demo_transformer_as_shipped_is_refused(tmp_path):
    loader = DataLoader(TokenPairs(n=4), batch_size=4)
    refuses(
        tmp_path,
        DemoTransformerModule(contract=False),
        loader,
        strategy="bergson",
        match=r"(?s)(list|tuple) batch has no labels rule.*\"example_loss\": example_loss",
    )


def test_tuple_batches_without_the_strategy_name_the_fix(tmp_path):
    cb = capture(tmp_path)
    loader = DataLoader(TokenPairs(n=4), batch_size=4)
    with pytest.raises(KeyError, match=r"a list batch.*strategy='bergson'"):
        trainer(cb, max_steps=1).fit(DemoTransformerModule(contract=True), loader)


@pytest.mark.parametrize("contract", [True, False])
def test_boring_model_tensor_batches(tmp_path, contract):
    from lightning.pytorch.demos.boring_classes import RandomDataset

    data = RandomDataset(32, 8)
    module = ContractBoringModel.make(contract)
    loader = DataLoader(data, batch_size=8)
    if not contract:
        refuses(tmp_path, module, loader, strategy="bergson", match="Tensor batch has no labels")
        return
    ref = copy.deepcopy(module)
    trainer(capture(tmp_path), strategy="bergson", max_steps=1).fit(module, loader)

    def loss_of(i):
        return (ref(data[i][None]) - 1).square().mean()

    assert stored_modules(tmp_path / "g.zarr") == ["layer"]
    assert_store_matches(tmp_path / "g.zarr", loop_oracle(ref, ["layer"], loss_of, range(8)))


def test_bert_classifier_with_one_dimensional_labels(tmp_path):
    batch = classification_batch(n=6)
    net = tiny_bert()
    ref = copy.deepcopy(net)
    cb = capture(tmp_path)
    trainer(cb, max_steps=1).fit(ClassifierModule(net, True), DataLoader(Rows(batch), 6))
    names = stored_modules(tmp_path / "g.zarr")
    assert "classifier" in names and "bert.pooler.dense" in names

    def loss_of(i):
        out = ref(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
        )
        return F.cross_entropy(out.logits, batch["labels"][i : i + 1])

    ref.train()
    assert_store_matches(tmp_path / "g.zarr", loop_oracle(ref, names, loss_of, range(6)))


def test_bert_classifier_without_the_contract_is_refused(tmp_path):
    loader = DataLoader(Rows(classification_batch(n=4)), batch_size=4)
    refuses(
        tmp_path,
        ClassifierModule(tiny_bert(), contract=False),
        loader,
        match=r"is not a causal-LM batch \(2-D input_ids",
    )


def test_advantage_weighted_rows_are_gradients_of_weighted_losses(tmp_path):
    """Rows are grad (A_i * CE_i), including a negative advantage, whatever `loss` averages."""
    batch = lm_batch(num=5, seq=8, vocab_size=41)
    batch["example_id"] = torch.arange(5)
    advantages = torch.tensor([1.5, -0.5, 2.0, 0.25, -1.0])
    net = tiny_llama()
    ref = copy.deepcopy(net)
    cb = capture(tmp_path)
    module = AdvantageModule(net, advantages)
    trainer(cb, max_epochs=1).fit(module, DataLoader(Rows(batch), batch_size=2))
    names = stored_modules(tmp_path / "g.zarr")

    def loss_of(i):
        logits = ref(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
        ).logits
        return advantages[i] * example_losses(logits, batch["labels"][i : i + 1])[0]

    store = assert_store_matches(tmp_path / "g.zarr", loop_oracle(ref, names, loss_of, range(5)))
    want = torch.stack([loss_of(i) for i in store.example_ids.tolist()]).detach()
    torch.testing.assert_close(torch.from_numpy(store.losses), want, rtol=1e-5, atol=1e-6)


def test_cnn_tuple_batches(tmp_path):
    data = ImageLabels(n=6)
    module = CNNModule()
    ref = copy.deepcopy(module.model)
    trainer(capture(tmp_path), strategy="bergson", max_steps=1).fit(module, DataLoader(data, 6))
    names = stored_modules(tmp_path / "g.zarr")
    assert names == ["conv2", "conv1", "head"]

    def loss_of(i):
        x, y = data[i]
        return F.cross_entropy(ref(x[None]), y[None])

    assert_store_matches(tmp_path / "g.zarr", loop_oracle(ref, names, loss_of, range(6)))


def test_cnn_without_the_contract_is_refused(tmp_path):
    loader = DataLoader(ImageLabels(n=4), batch_size=4)
    refuses(tmp_path, CNNModule(contract=False), loader, strategy="bergson", match="no labels rule")


# ---------------------------------------------------------------- the causal-LM rule


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_hugging_face_loss_without_contract_is_exact(tmp_path, make, accumulate):
    """Rule 2: HF's token-mean `.loss`, ragged lengths, accumulation; GPT-2's Conv1D too."""
    batch = lm_batch(num=6, seq=9, vocab_size=41)
    net = make()
    ref = copy.deepcopy(net)
    cb = capture(tmp_path)
    trainer(cb, accumulate=accumulate, max_steps=1).fit(
        HFCausalModule(net), DataLoader(Rows(batch), batch_size=6 // accumulate)
    )
    names = stored_modules(tmp_path / "g.zarr")
    if make is tiny_gpt2:
        assert "transformer.h.0.attn.c_attn" in names

    loss_of = summed_lm_loss(ref, batch)

    rows = loop_oracle(ref, names, loss_of, range(6))
    store = assert_store_matches(tmp_path / "g.zarr", {k + 100: v for k, v in rows.items()})
    sums = torch.stack([loss_of(i - 100) for i in store.example_ids.tolist()]).detach()
    torch.testing.assert_close(torch.from_numpy(store.losses), sums, rtol=1e-5, atol=1e-5)


class ExampleMeanModule(HFCausalModule):
    """Mean over examples of each example's mean token loss (not HF's token mean)."""

    def training_step(self, batch, batch_idx):
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return example_losses(logits, batch["labels"], "mean").mean()


@pytest.mark.parametrize("declared", ["auto", "example_mean", "token_mean"])
def test_example_mean_loss_is_measured_and_declarations_checked(tmp_path, declared):
    batch = lm_batch(num=6, seq=9, vocab_size=41)
    net = tiny_llama()
    ref = copy.deepcopy(net)
    cb = capture(tmp_path, batch_reduction=declared)
    run = trainer(cb, max_steps=1)
    loader = DataLoader(Rows(batch), batch_size=6)
    if declared == "token_mean":  # ragged lengths: the token mean weights examples otherwise
        with pytest.raises(CaptureContractError, match="batch_reduction='token_mean' does not"):
            run.fit(ExampleMeanModule(net), loader)
        assert no_rows(tmp_path / "g.zarr")
        return
    run.fit(ExampleMeanModule(net), loader)
    names = stored_modules(tmp_path / "g.zarr")

    loss_of = summed_lm_loss(ref, batch)

    rows = loop_oracle(ref, names, loss_of, range(6))
    assert_store_matches(tmp_path / "g.zarr", {k + 100: v for k, v in rows.items()})


class UnshiftedModule(HFCausalModule):
    """A token loss without the causal shift (each position predicts its own label)."""

    def training_step(self, batch, batch_idx):
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


class SmoothedModule(HFCausalModule):
    def training_step(self, batch, batch_idx):
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), label_smoothing=0.1
        )


@pytest.mark.parametrize("module", [UnshiftedModule, SmoothedModule])
def test_losses_the_rule_cannot_see_are_refused(tmp_path, module):
    loader = DataLoader(Rows(lm_batch(num=4, seq=8, vocab_size=41)), batch_size=4)
    refuses(
        tmp_path, module(tiny_llama()), loader, match=r"(?s)departs from that form.*example_loss"
    )


def test_dict_batch_with_labels_for_the_demo_transformer_is_refused(tmp_path):
    """The demo's loss is unshifted over [B*S, V] log-probs: once 15/16 silently, now refused."""

    class DictDemo(DemoTransformerModule):
        def training_step(self, batch, batch_idx):
            out = self.model(batch["input_ids"], batch["labels"])
            return F.nll_loss(out, batch["labels"].reshape(-1))

    data = TokenPairs(n=4)
    rows = {"input_ids": data.x, "labels": data.y, "example_id": torch.arange(4)}
    refuses(
        tmp_path,
        DictDemo(contract=False),
        DataLoader(Rows(rows), batch_size=4),
        match=r"no logits of shape \[B, S, V\]",
    )


def test_causal_lm_module_contract_with_mean_reduction(tmp_path):
    batch = lm_batch(num=4, seq=8, vocab_size=41)
    net = tiny_llama()
    ref = copy.deepcopy(net)
    cb = capture(tmp_path, loss_reduction="mean")
    trainer(cb, max_steps=1).fit(CausalLMModule(net, lr=0.0), DataLoader(Rows(batch), 4))
    names = stored_modules(tmp_path / "g.zarr")

    def loss_of(k):
        logits = ref(
            input_ids=batch["input_ids"][k : k + 1],
            attention_mask=batch["attention_mask"][k : k + 1],
        ).logits
        return example_losses(logits, batch["labels"][k : k + 1], "mean")[0]

    rows = loop_oracle(ref, names, loss_of, range(4))
    store = assert_store_matches(tmp_path / "g.zarr", {k + 100: v for k, v in rows.items()})
    means = torch.stack([loss_of(i - 100) for i in store.example_ids.tolist()]).detach()
    torch.testing.assert_close(torch.from_numpy(store.losses), means, rtol=1e-5, atol=1e-5)


def test_mean_reduction_with_a_users_own_example_loss_is_refused(tmp_path):
    loader = DataLoader(Rows(classification_batch(n=4)), batch_size=4)
    refuses(
        tmp_path,
        ClassifierModule(tiny_bert(), contract=True),
        loader,
        loss_reduction="mean",
        match="loss_reduction='mean' divides",
    )


# ---------------------------------------------------------------- LoRA, the table, queries


def test_peft_lora_captures_the_adapters_only(tmp_path):
    pytest.importorskip("peft")
    from recipes import tiny_lora_llama

    batch = lm_batch(num=4, seq=8, vocab_size=41)
    net = tiny_lora_llama()
    ref = copy.deepcopy(net)
    trainer(capture(tmp_path), max_steps=1).fit(
        HFCausalModule(net, lr=0.0), DataLoader(Rows(batch), batch_size=4)
    )
    names = stored_modules(tmp_path / "g.zarr")
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    assert len(names) == 4  # q_proj and v_proj, A and B

    loss_of = summed_lm_loss(ref, batch)

    rows = loop_oracle(ref, names, loss_of, range(4))
    assert_store_matches(tmp_path / "g.zarr", {k + 100: v for k, v in rows.items()})
    # Optimizer normalizers map the adapters (the frozen base weights are not captured).
    cb = GradientCaptureCallback(tmp_path / "n.zarr", projection_dim=4, normalizer="adafactor")
    trainer(cb, max_steps=2).fit(HFCausalModule(tiny_lora_llama()), DataLoader(Rows(batch), 2))
    assert len(GradientStore.open(tmp_path / "n.zarr")) == 4


TABLE_CASES = {
    "demo_transformer": (
        lambda: DemoTransformerModule(contract=True),
        lambda: DataLoader(TokenPairs(n=4), batch_size=4),
        ["inside nn.MultiheadAttention", "embedding"],
    ),
    "bert": (
        lambda: ClassifierModule(tiny_bert(), contract=True),
        lambda: DataLoader(Rows(classification_batch(n=4)), batch_size=4),
        ["bert.embeddings.word_embeddings.weight", "LayerNorm"],
    ),
    "cnn": (CNNModule, lambda: DataLoader(ImageLabels(n=4), batch_size=4), ["conv2.bias"]),
    "gpt2": (
        lambda: HFCausalModule(tiny_gpt2()),
        lambda: DataLoader(Rows(lm_batch(num=4, seq=8, vocab_size=41)), batch_size=4),
        ["transformer.wte.weight", "transformer.wpe.weight"],
    ),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_the_capture_table_is_printed_once_with_what_is_skipped(tmp_path, case, caplog):
    import logging

    make, loader, skipped = TABLE_CASES[case]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer(capture(tmp_path), strategy="bergson", max_steps=1).fit(make(), loader())
    tables = [r.getMessage() for r in caplog.records if "row width D =" in r.getMessage()]
    assert len(tables) == 1
    for name in stored_modules(tmp_path / "g.zarr"):
        assert name in tables[0]
    for needle in skipped:
        assert needle in tables[0], needle


def test_query_gradients_with_a_loss_fn_equal_the_stored_rows(tmp_path):
    from lightning_bergson import Attributor
    from lightning_bergson.losses import LossFnContractError

    batch = classification_batch(n=5)
    net = tiny_bert()
    module = ClassifierModule(net, contract=True, lr=0.0)
    trainer(capture(tmp_path), max_steps=1).fit(module, DataLoader(Rows(batch), batch_size=5))

    def loss_fn(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return F.cross_entropy(out.logits, b["labels"], reduction="none")

    attributor = Attributor(tmp_path / "g.zarr")
    queries = attributor.query_gradients(net, batch, loss_fn=loss_fn)  # (5, D)
    store = GradientStore.open(tmp_path / "g.zarr")
    rows = store.read(slice(None))
    for k, i in enumerate(store.example_ids.tolist()):
        err = (rows[k] - queries[i]).norm() / rows[k].norm()
        assert err < 1e-5, (i, float(err))
    with pytest.raises(LossFnContractError, match=r"(?s)2-D 'input_ids'.*loss_fn"):
        attributor.query_gradients(net, batch)


def test_weighted_hf_loss_without_contract_gives_token_loss_rows_and_warns_on_zero_weight(
    tmp_path,
):
    """Rule 2 measures c_i = A_i / B, so rows are grad CE_i; a zero weight leaves a zero row."""

    class Weighted(AdvantageModule):
        def training_step(self, batch, batch_idx):
            return self.example_losses(batch).mean()  # no example_loss: the causal-LM rule

    batch = lm_batch(num=4, seq=8, vocab_size=41)
    batch["example_id"] = torch.arange(4)
    advantages = torch.tensor([2.0, 0.0, -0.5, 1.0])
    net = tiny_llama()
    ref = copy.deepcopy(net)
    with pytest.warns(UserWarning, match=r"examples \[1\] at step 0 did not enter"):
        trainer(capture(tmp_path), max_steps=1).fit(
            Weighted(net, advantages), DataLoader(Rows(batch), batch_size=4)
        )
    names = stored_modules(tmp_path / "g.zarr")

    loss_of = summed_lm_loss(ref, batch)

    want = loop_oracle(ref, names, loss_of, range(4))
    want[1] = torch.zeros_like(want[1])
    store = GradientStore.open(tmp_path / "g.zarr")
    rows = store.read(slice(None))
    for k, i in enumerate(store.example_ids.tolist()):
        assert torch.allclose(rows[k], want[i], rtol=1e-4, atol=1e-6), i
