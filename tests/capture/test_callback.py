"""GradientCaptureCallback end to end: stored rows against torch.func oracles."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from oracles import (
    assert_rows_match,
    example_losses,
    lm_batch,
    module_grad,
    oracle_lm_grads,
    rows_by_id,
    tiny_gpt_neox,
)
from recipes import HFCausalModule, fit_with_capture

from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore

fit = functools.partial(fit_with_capture, batch_size=4)

MODULES = [
    "gpt_neox.layers.0.attention.query_key_value",
    "gpt_neox.layers.1.mlp.dense_4h_to_h",
]


class SumLossModule(HFCausalModule):
    """Sum of every token loss, optionally with NaN injected into one example."""

    def __init__(self, model, nan_row: int | None = None) -> None:
        super().__init__(model, lr=0.0)
        self.nan_row = nan_row

    def training_step(self, batch, batch_idx):
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        if self.nan_row is not None:
            poison = torch.ones(len(logits), 1, 1)
            poison[self.nan_row] = float("nan")
            logits = logits * poison
        return example_losses(logits, batch["labels"]).sum()


def expected_rows(model, data, reduction, modules=MODULES):
    grads = oracle_lm_grads(model, data, reduction)
    full = torch.cat([module_grad(grads, m).flatten(1) for m in modules], dim=1)
    return {int(i): full[k] for k, i in enumerate(data["example_id"])}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("kind", ["causal_lm", "hf_loss"])
def test_rows_equal_per_example_gradients(tmp_path, reduction, accumulate, kind):
    """lr=0 keeps the parameters fixed, so every row has the same oracle. Prompts are masked
    (labels -100 where the attention mask is 1): "mean" divides by supervised tokens."""
    net = tiny_gpt_neox()
    data = lm_batch(num=10, seq=9, prompt=True)
    want = expected_rows(copy.deepcopy(net), data, reduction)
    module = (
        CausalLMModule(net, lr=0.0, weight_decay=0.0)
        if kind == "causal_lm"
        else HFCausalModule(net, lr=0.0)
    )
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr",
        projection_dim=0,
        include=MODULES,
        loss_reduction=reduction,
        dtype="float32",
    )
    fit(module, data, cb, batch_size=3, accumulate=accumulate)
    store, got = GradientStore.open(tmp_path / "g.zarr"), rows_by_id(tmp_path / "g.zarr")
    assert_rows_match(got, want)
    assert store.complete and store.attrs["loss_reduction"] == reduction
    assert [m.name for m in store.modules] == MODULES


def test_sum_batch_reduction_and_float16(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=8, seq=8)
    want = expected_rows(copy.deepcopy(net), data, "sum")
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr", projection_dim=0, include=MODULES, batch_reduction="sum"
    )
    fit(SumLossModule(net), data, cb)
    store, got = GradientStore.open(tmp_path / "g.zarr"), rows_by_id(tmp_path / "g.zarr")
    assert store.dtype == "float16"
    assert_rows_match(got, want, tol=1e-3)  # float16 storage


def test_step_epoch_and_loss_columns(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=8, seq=8)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2)
    fit(
        CausalLMModule(net, lr=0.0),
        data,
        cb,
        batch_size=2,
        accumulate=2,
        max_epochs=2,
        shuffle=True,
    )
    store = GradientStore.open(tmp_path / "g.zarr")
    assert len(store) == 16
    # 4 micro-batches of 2 per epoch, 2 micro-batches per optimizer step -> steps 0..3
    assert store.steps.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert store.epochs.tolist() == [0] * 8 + [1] * 8
    for epoch in (0, 1):
        assert sorted(store.example_ids[store.epochs == epoch].tolist()) == list(range(100, 108))
    logits = net(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    sum_loss = example_losses(logits, data["labels"], "sum").detach()  # what the rows are of
    for k, i in enumerate(store.example_ids):
        assert abs(store.losses[k] - sum_loss[i - 100]) < 1e-4


def test_same_example_in_different_batches(tmp_path):
    """Batch invariance: example 3 shares a batch with others in epoch 0 and 1."""
    net = tiny_gpt_neox()
    data = lm_batch(num=9, seq=8)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=4, dtype="float32")
    fit(CausalLMModule(net, lr=0.0), data, cb, batch_size=4, max_epochs=2, shuffle=True)
    store = GradientStore.open(tmp_path / "g.zarr")
    rows = store.read(slice(None))
    for example in range(100, 109):
        a, b = rows[torch.as_tensor(store.example_ids == example).nonzero().flatten()]
        # float32 rounding differs with the batch's shapes; a wrong row differs by O(1)
        assert float((a - b).norm() / a.norm()) < 1e-5, example


def _manual_normalized_rows(net, data, batch_size, make_opt, kind):
    """Replay the training by hand; normalize step t's oracle rows with the state after step t."""
    net = copy.deepcopy(net)
    opt = make_opt(net.parameters())
    want = {}
    for start in range(0, len(data["input_ids"]), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        grads = oracle_lm_grads(net, batch, "sum")
        out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        opt.zero_grad()
        sums = example_losses(out.logits, batch["labels"])
        (sums.sum() / (batch["labels"][:, 1:] != -100).sum()).backward()
        opt.step()
        parts = []
        for name in MODULES:
            weight = net.get_submodule(name).weight
            state, group = opt.state[weight], opt.param_groups[0]
            if "exp_avg_sq" in state:
                v = state["exp_avg_sq"] / (1 - group["betas"][1] ** state["step"])
                if kind == "adam":
                    denom = v.sqrt() + group["eps"]
                else:
                    denom = (v.mean(1, keepdim=True) * v.mean(0, keepdim=True) / v.mean()).sqrt()
            else:  # torch.optim.Adafactor
                r, c = state["row_var"], state["col_var"]
                denom = (r @ c / r.mean()).sqrt()
            parts.append((module_grad(grads, name) / denom).flatten(1))
        rows = torch.cat(parts, dim=1)
        want.update({int(i): rows[k] for k, i in enumerate(batch["example_id"])})
    return want


@pytest.mark.parametrize(
    ("optimizer", "kind"), [("adamw", "adam"), ("adamw", "adafactor"), ("adafactor", "adafactor")]
)
def test_optimizer_normalizers_use_state_after_each_step(tmp_path, optimizer, kind):
    # float64: Adam's 1/sqrt(v) amplifies float32 rounding of the replayed trajectory
    net = tiny_gpt_neox().double()
    data = lm_batch(num=9, seq=8)
    if optimizer == "adamw":

        def make_opt(p):
            return torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0)
    else:

        def make_opt(p):
            return torch.optim.Adafactor(p, lr=1e-2)

    want = _manual_normalized_rows(net, data, 3, make_opt, kind)
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr", projection_dim=0, include=MODULES, normalizer=kind, dtype="float32"
    )
    fit(CausalLMModule(net, optimizer=optimizer, lr=1e-2, weight_decay=0.0), data, cb, batch_size=3)
    got = rows_by_id(tmp_path / "g.zarr")
    assert_rows_match(got, want, tol=1e-4)


def test_missing_example_id(tmp_path):
    data = lm_batch(num=4, seq=6)
    del data["example_id"]
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2)
    with pytest.raises(
        KeyError, match=r"needs each training batch to carry the dataset row.*with_indices"
    ):
        fit(CausalLMModule(tiny_gpt_neox(), lr=0.0), data, cb)


def test_unknown_module_pattern(tmp_path):
    cb = GradientCaptureCallback(tmp_path / "g.zarr", include=["*.attn.*"])
    with pytest.raises(ValueError, match=r"'\*\.attn\.\*' matches no"):
        fit(CausalLMModule(tiny_gpt_neox(), lr=0.0), lm_batch(num=4, seq=6), cb)


def test_existing_store_needs_overwrite(tmp_path):
    data = lm_batch(num=4, seq=6)
    fit(CausalLMModule(tiny_gpt_neox(), lr=0.0), data, GradientCaptureCallback(tmp_path / "g.zarr"))
    before = GradientStore.open(tmp_path / "g.zarr").read(slice(None))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fit(
            CausalLMModule(tiny_gpt_neox(seed=3), lr=0.0),
            data,
            GradientCaptureCallback(tmp_path / "g.zarr"),
        )
    torch.testing.assert_close(GradientStore.open(tmp_path / "g.zarr").read(slice(None)), before)
    fit(
        CausalLMModule(tiny_gpt_neox(seed=3), lr=0.0),
        data,
        GradientCaptureCallback(tmp_path / "g.zarr", overwrite=True),
    )
    assert not torch.equal(GradientStore.open(tmp_path / "g.zarr").read(slice(None)), before)


def test_nan_gradients_are_flagged_not_hidden(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=4, seq=8)
    want = expected_rows(copy.deepcopy(net), data, "sum")
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr",
        projection_dim=0,
        include=MODULES,
        batch_reduction="sum",
        dtype="float32",
    )
    with pytest.warns(UserWarning, match=r"1 example had non-finite gradients in epoch 0 "
                      r"\(example ids \[101\]\): stored as they are"):  # fmt: skip
        fit(SumLossModule(net, nan_row=1), data, cb, max_steps=1)
    store, got = GradientStore.open(tmp_path / "g.zarr"), rows_by_id(tmp_path / "g.zarr")
    assert store.finite.tolist() == [True, False, True, True]
    assert torch.isnan(got[101]).any()
    assert_rows_match({i: got[i] for i in (100, 102, 103)}, {i: want[i] for i in (100, 102, 103)})


class FrozenNanModule(SumLossModule):
    """Drops the (NaN) gradients before each step: every epoch sees the same weights."""

    def on_before_optimizer_step(self, optimizer):
        for param in self.parameters():
            param.grad = None


def _nan_fit(tmp_path, mode, **kw):
    """Two epochs of 8 examples (ids 100..107), batch 4, the second of each batch NaN."""
    net = tiny_gpt_neox()
    data = lm_batch(num=8, seq=8)
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr", projection_dim=0, include=MODULES, batch_reduction="sum",
        dtype="float32", on_nonfinite=mode,
    )  # fmt: skip
    fit(FrozenNanModule(net, nan_row=1), data, cb, max_epochs=2, **kw)
    return tmp_path / "g.zarr"


def test_nonfinite_warn_once_per_epoch_with_count(tmp_path):
    with pytest.warns(UserWarning) as record:
        path = _nan_fit(tmp_path, "warn")
    got = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert got == [
        f"2 examples had non-finite gradients in epoch {e} (example ids [101, 105]): stored as "
        "they are and flagged finite=False (queries skip them). Set on_nonfinite='raise' to "
        "stop at the first one."
        for e in (0, 1)
    ]
    store = GradientStore.open(path)
    assert len(store) == 16 and store.skipped == []
    assert sorted(store.example_ids[~store.finite].tolist()) == [101, 101, 105, 105]


def test_nonfinite_raise_stops_at_the_first_row(tmp_path):
    from lightning_bergson.callbacks import NonFiniteGradientError

    with pytest.raises(NonFiniteGradientError, match=r"example ids \[101\] at step 0 \(epoch 0\)"):
        _nan_fit(tmp_path, "raise")
    assert GradientStore.open(tmp_path / "g.zarr").num_rows == 0  # nothing after the first


def test_nonfinite_skip_stores_no_row_and_records_it(tmp_path):
    with pytest.warns(UserWarning, match=r"2 examples .* epoch 0 .*\[101, 105\]\): not stored"):
        path = _nan_fit(tmp_path, "skip")
    store = GradientStore.open(path)
    assert len(store) == 12 and bool(store.finite.all())
    assert sorted(store.example_ids.tolist()) == sorted([100, 102, 103, 104, 106, 107] * 2)
    assert store.skipped == [
        {"rank": 0, "example_id": i, "step": step, "epoch": e}
        for e, steps in ((0, (0, 1)), (1, (2, 3)))
        for i, step in zip((101, 105), steps, strict=True)
    ]
    assert torch.isfinite(store.read(slice(None))).all()


def test_fixed_normalizers_from_a_file(tmp_path):
    from lightning_bergson.capture import AdafactorNormalizer
    from lightning_bergson.capture.normalizers import save_normalizers

    net = tiny_gpt_neox()
    data = lm_batch(num=6, seq=8)
    gen = torch.Generator().manual_seed(3)
    norms = {}
    for name in MODULES:
        mod = net.get_submodule(name)
        norms[name] = AdafactorNormalizer(  # independent moments, mean(c) ~ 3 mean(r)
            torch.rand(mod.out_features, generator=gen) + 0.5,
            3 * torch.rand(mod.in_features, generator=gen) + 0.5,
        )
    save_normalizers(tmp_path / "norms.safetensors", norms)
    grads = oracle_lm_grads(copy.deepcopy(net), data, "sum")
    parts = []
    for m in MODULES:  # G / sqrt(r c^T / mean(r)), written out
        r, c = norms[m].row, norms[m].col
        parts.append((module_grad(grads, m) / (r[:, None] * c[None] / r.mean()).sqrt()).flatten(1))
    full = torch.cat(parts, dim=1)
    want = {int(i): full[k] for k, i in enumerate(data["example_id"])}
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr",
        projection_dim=0,
        include=MODULES,
        normalizer="adafactor",
        normalizer_source="file",
        normalizer_path=str(tmp_path / "norms.safetensors"),
        dtype="float32",
    )
    fit(CausalLMModule(net, lr=0.0), data, cb, batch_size=3)
    got = rows_by_id(tmp_path / "g.zarr")
    assert_rows_match(got, want)
