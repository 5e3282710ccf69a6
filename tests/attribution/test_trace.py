"""Query rows (trace, query_gradients) equal the rows the callback stores for the same text."""

from __future__ import annotations

import copy

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
from recipes import fit_with_capture

from lightning_bergson import CausalLMModule, GradientCaptureCallback, HeadConfig
from lightning_bergson.attribution import Attributor, StoreMismatchError
from lightning_bergson.capture import AdafactorNormalizer
from lightning_bergson.capture.normalizers import save_normalizers

QKV = "gpt_neox.layers.0.attention.query_key_value"
MODULES = [QKV, "gpt_neox.layers.1.mlp.dense_4h_to_h"]


def file_normalizers(net, path):
    gen = torch.Generator().manual_seed(3)
    norms = {
        name: AdafactorNormalizer(
            torch.rand(mod.out_features, generator=gen) + 0.5,
            torch.rand(mod.in_features, generator=gen) + 0.5,
        )
        for name, mod in ((m, net.get_submodule(m)) for m in MODULES)
    }
    save_normalizers(path, norms)
    return str(path)


CASES = {
    "heads": {"projection_dim": 4, "head_cfgs": {QKV: HeadConfig(num_heads=4, head_size=24)}},
    "mean_bias": {"projection_dim": 3, "loss_reduction": "mean", "include_bias": True},
    "file_normalizer": {"projection_dim": 0, "include": MODULES, "normalizer": "adafactor"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_query_rows_equal_stored_rows(tmp_path, case):
    """lr=0 keeps the parameters fixed, so a training text's query row is its stored row."""
    net = tiny_gpt_neox()
    data = lm_batch(num=7, seq=9)
    kwargs = dict(CASES[case])
    if kwargs.get("normalizer"):
        norms = file_normalizers(net, tmp_path / "n")
        kwargs.update(normalizer_source="file", normalizer_path=norms)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", dtype="float32", **kwargs)
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0, weight_decay=0.0), data, cb)
    stored = rows_by_id(tmp_path / "g.zarr", dtype=torch.float64)

    attr = Attributor(tmp_path / "g.zarr", dtype=torch.float64)
    query = {k: v for k, v in data.items() if k != "example_id"}
    got = attr.query_gradients(net, query)  # (7, D)
    assert_rows_match(dict(zip(data["example_id"].tolist(), got, strict=True)), stored)
    # the LightningModule resolves to the same network (root="auto")
    torch.testing.assert_close(attr.query_gradients(CausalLMModule(net), query), got)


def test_trace_with_summed_loss_equals_query_gradients(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=6, seq=8)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=4, dtype="float32")
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0), data, cb)
    attr = Attributor(tmp_path / "g.zarr", unit_norm=True)
    query = lm_batch(num=2, seq=7, seed=11)
    with attr.trace(net, k=3) as result:
        logits = net(input_ids=query["input_ids"], attention_mask=query["attention_mask"]).logits
        example_losses(logits, query["labels"]).sum().backward()
    want = attr.query_gradients(net, query)
    torch.testing.assert_close(result.queries, want, rtol=1e-5, atol=1e-7)
    expected = attr.search(want, k=3)
    assert result.indices.tolist() == expected.indices.tolist()
    torch.testing.assert_close(result.scores, expected.scores)
    assert set(result.indices.flatten().tolist()) <= set(range(100, 106))


def test_queries_use_the_final_optimizer_normalizers(tmp_path):
    """Rows of a store normalized by the live optimizer: queries use the state after fit."""
    net = tiny_gpt_neox()
    data = lm_batch(num=6, seq=8)
    module = CausalLMModule(net, lr=1e-2, weight_decay=0.0)
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr", projection_dim=0, include=MODULES, normalizer="adafactor"
    )
    trainer = fit_with_capture(module, data, cb, batch_size=3)
    opt = trainer.optimizers[0]
    query = lm_batch(num=2, seq=7, seed=4)
    grads = oracle_lm_grads(net, query, "sum")
    parts = []
    for name in MODULES:  # AdamW state factored by row and column means, bias-corrected
        weight = net.get_submodule(name).weight
        state, beta2 = opt.state[weight], opt.param_groups[0]["betas"][1]
        v = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        denom = (v.mean(1, keepdim=True) * v.mean(0, keepdim=True) / v.mean()).sqrt()
        parts.append((module_grad(grads, name) / denom).flatten(1))
    want = torch.cat(parts, dim=1)
    got = Attributor(tmp_path / "g.zarr").query_gradients(net, query)
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5


def test_other_model_is_refused(tmp_path):
    data = lm_batch(num=4, seq=6)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2)
    fit_with_capture(CausalLMModule(tiny_gpt_neox(), lr=0.0), data, cb)
    attr = Attributor(tmp_path / "g.zarr")
    other = tiny_gpt_neox(vocab_size=101)
    with pytest.raises(StoreMismatchError, match=r"model.config.vocab_size is 101 .* but 97"):
        attr.query_gradients(other, data)
    linear = torch.nn.Linear(3, 3)
    with pytest.raises(StoreMismatchError, match=r"model.class is '.*Linear'"):
        attr.query_gradients(linear, data)
    with pytest.raises(ValueError, match="no query gradients were captured"):  # noqa: SIM117
        with attr.trace(tiny_gpt_neox(), k=1):
            pass


def test_fingerprint_modes(tmp_path):
    """Dropout and use_cache never count; other config entries count unless relaxed."""
    data = lm_batch(num=4, seq=6)
    net = tiny_gpt_neox()
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2, dtype="float32")
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0), data, cb)
    want = Attributor(tmp_path / "g.zarr").query_gradients(net, data)
    eval_only = copy.deepcopy(net)  # same weights; config differs only where eval mode ignores it
    eval_only.config.attention_dropout, eval_only.config.hidden_dropout = 0.3, 0.2
    eval_only.config.use_cache = not eval_only.config.use_cache
    torch.testing.assert_close(
        Attributor(tmp_path / "g.zarr").query_gradients(eval_only, data), want
    )
    other = copy.deepcopy(net)
    other.config.layer_norm_eps = 0.5  # changes the model, not its parameter shapes
    with pytest.raises(StoreMismatchError, match=r"layer_norm_eps is 0.5 .*check_model='shapes'"):
        Attributor(tmp_path / "g.zarr").query_gradients(other, data)
    Attributor(tmp_path / "g.zarr", check_model="shapes").query_gradients(other, data)
    small = tiny_gpt_neox(vocab_size=101)
    with pytest.raises(StoreMismatchError, match=r"parameter_shapes_sha256|num_parameters"):
        Attributor(tmp_path / "g.zarr", check_model="shapes").query_gradients(small, data)
    with pytest.raises(ValueError, match=r"check_model='loose' is not one of"):
        Attributor(tmp_path / "g.zarr", check_model="loose")


def test_missing_normalizer_file_is_explained(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=4, seq=6)
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr", projection_dim=2, normalizer="adafactor", dtype="float32"
    )
    fit_with_capture(CausalLMModule(net, lr=1e-3), data, cb)
    (tmp_path / "g.zarr" / "normalizers" / "normalizers.safetensors").unlink()
    with pytest.raises(StoreMismatchError, match=r"pass normalizers=<file\.safetensors>"):
        Attributor(tmp_path / "g.zarr").query_gradients(net, data)
