"""Capture beyond Linear: conv layers, optimizer state of conv weights, bypassed and frozen
modules (nn.MultiheadAttention, PEFT LoRA), GPT-2's fused c_attn heads, the capture table.

Oracles: torch.func per-example gradients, explicit normalize-then-project with the
matrices of ``projection_matrix``, and the update an optimizer actually applied.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracles import (
    ToyCNN,
    block_grad,
    example_losses,
    lm_batch,
    module_grad,
    oracle_lm_grads,
    per_example_grads,
    tiny_gpt2,
    tiny_gpt_neox,
)
from torch import nn

from lightning_bergson.capture import (
    AdafactorNormalizer,
    AdamNormalizer,
    GradientCollector,
    HeadConfig,
    describe_capture,
    normalizers_from_optimizer,
    projection_matrix,
    select_modules,
    trackable_modules,
)

CONVS = ["c3d", "c2d", "grouped", "c1d"]


def rel_err(x, y):
    return ((x - y).norm() / y.norm()).item()


def project(full, p, seed, key):
    """``L G R^T`` flattened, with the explicit matrices of block ``key``."""
    left = projection_matrix(p, full.shape[1], seed=seed, key=key, side="left", dtype=full.dtype)
    right = projection_matrix(p, full.shape[2], seed=seed, key=key, side="right", dtype=full.dtype)
    return (left @ full @ right.T).flatten(1)


def cnn_loss(out):
    return (out.square() + out).sum()


@pytest.fixture(scope="module")
def cnn():
    return ToyCNN()


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def cnn_oracle(cnn, images):
    return per_example_grads(cnn, images, cnn_loss)


def collect_cnn(cnn, images, **kwargs):
    with GradientCollector(cnn, **kwargs) as collector:
        cnn_loss(cnn(images)).backward()
    return collector.gradients


# ---------------------------------------------------------------- conv layers


@pytest.mark.parametrize("bias", [False, True])
def test_conv_exact_rows_equal_torch_func(cnn, images, cnn_oracle, bias):
    rows = collect_cnn(cnn, images, projection_dim=0, include_bias=bias)
    assert sorted(rows) == sorted([*CONVS, "fc"])
    for name, got in rows.items():
        want = block_grad(cnn_oracle, name, bias=bias).flatten(1)
        assert rel_err(got, want) <= 1e-5, name


def test_conv_projected_rows_equal_explicit_projection(cnn, images, cnn_oracle):
    rows = collect_cnn(cnn, images, projection_dim=3, seed=4, include_bias=True)
    for name in CONVS:
        want = project(block_grad(cnn_oracle, name, bias=True), 3, 4, name)
        assert rel_err(rows[name], want) <= 1e-5, name


def _conv_moments(cnn, kind, bias=True):
    gen = torch.Generator().manual_seed(5)
    norms = {}
    for name in CONVS:
        weight = cnn.get_submodule(name).weight
        v = torch.rand(weight.shape[0], weight[0].numel() + int(bias), generator=gen) + 0.1
        norms[name] = (
            AdamNormalizer(v, eps=1e-3)
            if kind == "adam"
            else AdafactorNormalizer(v.mean(1), v.mean(0))
        )
    return norms


@pytest.mark.parametrize("kind", ["adafactor", "adam"])
@pytest.mark.parametrize("p", [0, 3])
def test_conv_normalized_rows_equal_normalize_then_project(cnn, images, cnn_oracle, kind, p):
    norms = _conv_moments(cnn, kind)
    rows = collect_cnn(
        cnn, images, projection_dim=p, seed=2, include=CONVS, include_bias=True, normalizers=norms
    )
    for name in CONVS:
        full, norm = block_grad(cnn_oracle, name, bias=True), norms[name]
        if kind == "adafactor":
            full = full / (norm.row[:, None] * norm.col[None, :] / norm.row.mean()).sqrt()
        else:
            full = full / (norm.avg_sq.sqrt() + norm.eps)
        want = project(full, p, 2, name) if p else full.flatten(1)
        assert rel_err(rows[name], want) <= 1e-5, name


@pytest.mark.parametrize("p", [0, 3])
def test_conv_heads_split_output_channels(cnn, images, cnn_oracle, p):
    rows = collect_cnn(
        cnn, images, projection_dim=p, seed=1, include=["c2d"], head_cfgs={"c2d": HeadConfig(2, 3)}
    )
    for h in range(2):
        want = block_grad(cnn_oracle, "c2d")[:, 3 * h : 3 * (h + 1)]
        want = project(want, p, 1, f"c2d.head_{h}") if p else want.flatten(1)
        assert rel_err(rows[f"c2d.head_{h}"], want) <= 1e-5


def test_grouped_conv_heads_are_refused(cnn):
    with pytest.raises(ValueError, match=r"'grouped' is a grouped convolution.*head_cfgs"):
        GradientCollector(cnn, head_cfgs={"grouped": HeadConfig(2, 3)})


def test_unbatched_conv_input_is_one_example():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 2, 3, padding=1)
    x = torch.randn(3, 7)
    with GradientCollector(nn.Sequential(conv), projection_dim=0) as c:
        conv(x).square().sum().backward()
    torch.testing.assert_close(c.gradients["0"], conv.weight.grad.reshape(1, -1))


def test_conv_block_shapes_and_normalizer_shape_check(cnn):
    c = GradientCollector(cnn, projection_dim=0, include_bias=True)
    shapes = {b.name: b.shape for b in c.blocks}
    assert shapes["c3d"] == (4, 2 * 2 * 3 * 3 + 1)
    assert shapes["grouped"] == (6, 2 * 3 * 3 + 1)  # C / groups * prod(k), + bias
    with pytest.raises(ValueError, match=r"'c1d' has shape \(5, 18\).*\(5, 19\)"):
        c.set_normalizers({"c1d": AdamNormalizer(torch.ones(5, 18))})


# ---------------------------------------------------------------- optimizer state of conv


def _conv_steps(module, opt, steps=3):
    """(grad [O, C*prod(k)+1], delta [O, C*prod(k)+1]) after each step, random gradients."""
    gen = torch.Generator().manual_seed(0)
    params = (module.weight, module.bias)
    for _ in range(steps):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * torch.rand(
                p.shape, generator=gen, dtype=p.dtype
            )
        grads = [p.grad.clone() for p in params]
        opt.step()
        deltas = [p.detach() - b for p, b in zip(params, before, strict=True)]
        yield tuple(torch.cat([x.flatten(1), y[:, None]], dim=1) for x, y in (grads, deltas))


CONV_LAYERS = {
    "conv1d": lambda: nn.Conv1d(3, 4, 3),
    "conv2d": lambda: nn.Conv2d(3, 4, (2, 3)),
    "conv3d": lambda: nn.Conv3d(2, 3, (2, 2, 3)),
}


@pytest.mark.parametrize("layer", sorted(CONV_LAYERS))
def test_adamw_conv_normalizer_is_the_applied_denominator(layer):
    module = CONV_LAYERS[layer]().double()
    opt = torch.optim.AdamW(module.parameters(), lr=0.1, betas=(0.0, 0.99), weight_decay=0.0)
    for grad, delta in _conv_steps(module, opt):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adam", include_bias=True)["m"]
        torch.testing.assert_close(norm.normalize(grad[None])[0], -delta / 0.1)


@pytest.mark.parametrize("layer", sorted(CONV_LAYERS))
@pytest.mark.parametrize("impl", ["torch", "transformers"])
def test_adafactor_conv_normalizer_is_the_applied_direction(layer, impl):
    """torch and HF Adafactor factor a conv weight over its last two dims, not over the block."""
    from transformers.optimization import Adafactor

    module = CONV_LAYERS[layer]().double()
    params = [module.weight]  # the bias (a vector) is not factored
    if impl == "torch":
        opt = torch.optim.Adafactor(params, lr=0.01, weight_decay=0.0)
    else:
        opt = Adafactor(params, lr=0.01, relative_step=False, scale_parameter=False)
    width = module.weight[0].numel()
    for grad, delta in _conv_steps(module, opt):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adam")["m"]
        got = norm.normalize(grad[None, :, :width])[0]
        ratio = -delta[:, :width] / got  # one scalar step size (relative step, RMS clipping)
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-9, atol=0)
        fact = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
        torch.testing.assert_close(fact.row, norm.avg_sq.mean(1))
        torch.testing.assert_close(fact.col, norm.avg_sq.mean(0))


def test_frozen_module_has_no_optimizer_normalizer():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(
        ValueError, match=r"module '0'.*frozen.*normalizer='none' or normalizer_source='file'"
    ):
        normalizers_from_optimizer(opt, {"0": net[0]}, "adam")


# ---------------------------------------------------------------- nn.MultiheadAttention


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_linears_are_not_trackable():
    net = AttnNet()
    fired = []
    net.attn.out_proj.register_forward_hook(lambda *args: fired.append(1))
    net(torch.randn(2, 5, 4)).sum().backward()
    assert not fired  # the premise: MHA's forward never calls out_proj
    assert list(trackable_modules(net)) == ["inp", "out"]
    assert list(GradientCollector(net).modules) == ["inp", "out"]
    with pytest.raises(ValueError, match=r"'attn\.out_proj' matches no"):
        GradientCollector(net, include=["attn.out_proj"])


# ---------------------------------------------------------------- frozen weights / PEFT LoRA


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["query_key_value", "dense_h_to_4h"],
        init_lora_weights=False,  # lora_B != 0, so lora_A gets a gradient too
    )
    return get_peft_model(tiny_gpt_neox(), cfg)


def test_default_selection_is_trainable_modules(lora_model):
    selected = select_modules(lora_model, None, ())
    assert len(selected) == 8 and all(".lora_A." in n or ".lora_B." in n for n in selected)
    frozen = select_modules(lora_model, ["*.layers.0.*base_layer"], ())
    assert all(n.endswith("base_layer") for n in frozen) and len(frozen) == 2
    assert select_modules(lora_model, ["*"], ()) == trackable_modules(lora_model)  # frozen too
    net = nn.Sequential(nn.Linear(3, 2)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"leave no module.*include=\['\*'\] to capture frozen"):
        select_modules(net, None, ())


def test_lora_adapter_rows_equal_torch_func(lora_model):
    batch = lm_batch(num=4)
    oracle = oracle_lm_grads(lora_model, batch)
    with GradientCollector(lora_model, projection_dim=0) as c:
        out = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        example_losses(out.logits, batch["labels"]).sum().backward()
    assert len(c.gradients) == 8
    for name, got in c.gradients.items():
        assert rel_err(got, module_grad(oracle, name).flatten(1)) <= 1e-5, name
    lora_model.zero_grad()


def test_lora_optimizer_normalizers(lora_model):
    batch = lm_batch(num=2)
    saved = {k: v.clone() for k, v in lora_model.state_dict().items()}
    trainable = [p for p in lora_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    out = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    example_losses(out.logits, batch["labels"]).sum().backward()
    opt.step()
    lora_model.zero_grad()
    collector = GradientCollector(lora_model, projection_dim=2)
    norms = normalizers_from_optimizer(opt, collector.modules, "adafactor")
    collector.set_normalizers(norms)
    assert sorted(norms) == sorted(collector.modules)
    everything = GradientCollector(lora_model, projection_dim=2, include=["*"])
    with pytest.raises(ValueError, match=r"base_layer'.*Frozen modules need normalizer='none'"):
        normalizers_from_optimizer(opt, everything.modules, "adam")
    lora_model.load_state_dict(saved)  # undo the step for the other tests of this module


# ---------------------------------------------------------------- GPT-2 fused c_attn heads

C_ATTN = "transformer.h.0.attn.c_attn"
C_PROJ = "transformer.h.0.attn.c_proj"


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_batch():
    return lm_batch(num=4)


@pytest.fixture(scope="module")
def gpt2_oracle(gpt2, gpt2_batch):
    return oracle_lm_grads(gpt2, gpt2_batch)


def head_block(oracle, h, norm=None):
    """Rows of real head ``h`` (q_h, k_h, v_h) of the transposed Conv1D gradient."""
    full = module_grad(oracle, C_ATTN, conv1d=True)  # (B, 96, 32): [q | k | v], heads of 8
    if norm is not None:
        full = norm.normalize(full)
    return torch.cat([full[:, s * 32 + 8 * h : s * 32 + 8 * (h + 1)] for s in range(3)], dim=1)


def collect_lm(model, batch, **kwargs):
    with GradientCollector(model, **kwargs) as collector:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        example_losses(out.logits, batch["labels"]).sum().backward()
    return collector.gradients


@pytest.mark.parametrize("p", [0, 3])
def test_gpt2_c_attn_heads_are_real_heads(gpt2, gpt2_batch, gpt2_oracle, p):
    heads = {C_ATTN: HeadConfig(4, 24, sections=3), C_PROJ: HeadConfig(4, 8, axis="input")}
    rows = collect_lm(
        gpt2, gpt2_batch, projection_dim=p, seed=3, include=[C_ATTN, C_PROJ], head_cfgs=heads
    )
    for h in range(4):
        blocks = {
            C_ATTN: head_block(gpt2_oracle, h),
            C_PROJ: module_grad(gpt2_oracle, C_PROJ, conv1d=True)[:, :, 8 * h : 8 * (h + 1)],
        }
        for name, want in blocks.items():
            key = f"{name}.head_{h}"
            want = project(want, p, 3, key) if p else want.flatten(1)
            assert rel_err(rows[key], want) <= 1e-5, key


@pytest.mark.parametrize("kind", ["adafactor", "adam"])
def test_gpt2_c_attn_heads_normalize_before_gathering(gpt2, gpt2_batch, gpt2_oracle, kind):
    gen = torch.Generator().manual_seed(2)
    v = torch.rand(96, 32, generator=gen) + 0.1
    norm = (
        AdamNormalizer(v, eps=1e-3) if kind == "adam" else AdafactorNormalizer(v.mean(1), v.mean(0))
    )
    rows = collect_lm(
        gpt2,
        gpt2_batch,
        projection_dim=3,
        seed=3,
        include=[C_ATTN],
        head_cfgs={C_ATTN: HeadConfig(4, 24, sections=3)},
        normalizers={C_ATTN: norm},
    )
    for h in range(4):
        key = f"{C_ATTN}.head_{h}"
        assert rel_err(rows[key], project(head_block(gpt2_oracle, h, norm), 3, 3, key)) <= 1e-5


def test_gpt2_contiguous_heads_are_refused(gpt2):
    with pytest.raises(
        ValueError, match=r"c_attn.*fused.*HeadConfig\(num_heads=4, head_size=24, sections=3\)"
    ):
        GradientCollector(gpt2, head_cfgs={"*.c_attn": HeadConfig(4, 24)})


def test_head_config_sections_validation_and_old_stores():
    with pytest.raises(ValueError, match=r"sections=3.*Pick head_size = sections \* d_head"):
        HeadConfig(4, 25, sections=3)
    old = {"num_heads": 4, "head_size": 24, "head_dim": 2, "axis": "output"}  # before sections
    assert HeadConfig(**old).sections == 1
    cfg = HeadConfig(4, 24, sections=3)
    assert HeadConfig(**dataclasses.asdict(cfg)) == cfg


# ---------------------------------------------------------------- capture table


def reasons(report):
    return {s.name: s.reason for s in report.skipped}


def test_capture_table_of_gpt_neox():
    model = tiny_gpt_neox()
    collector = GradientCollector(model, projection_dim=4)
    report = describe_capture(model, collector)
    assert len(report.captured) == 8 and report.width == 8 * 16 == sum(
        b.shape[0] * b.shape[1] for b in collector.blocks
    )
    got = reasons(report)
    assert got["gpt_neox.embed_in.weight"] == "embedding (nn.Embedding is not captured)"
    assert got["lm_head.weight"] == "excluded by pattern 'lm_head'"
    assert (
        got["gpt_neox.layers.0.input_layernorm.weight"] == "module type LayerNorm is not supported"
    )
    assert got["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"] == "bias (include_bias=False)"
    table = report.format()
    assert table.splitlines()[0].startswith("capture of GPTNeoXForCausalLM: projection_dim=4")
    assert "gpt_neox.layers.0.attention.query_key_value  Linear" in table
    assert f"row width D = 128; {len(report.skipped)} trainable parameters" in table
    assert f"({report.skipped_numel} numbers)" in table

    heads = GradientCollector(
        model,
        projection_dim=2,
        include=["*.query_key_value"],
        include_bias=True,
        head_cfgs={"*.query_key_value": HeadConfig(4, 24)},
    )
    report = describe_capture(model, heads)
    assert [m.heads for m in report.captured] == [4, 4] and report.width == 2 * 4 * 4
    assert reasons(report)["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == "not matched by include"
    assert "gpt_neox.layers.0.attention.query_key_value.bias" not in reasons(report)


def test_capture_table_of_attention_and_bare_parameters():
    net = AttnNet()
    net.scale = nn.Parameter(torch.ones(3))
    wrapper = nn.ModuleDict({"net": net, "probe": nn.Linear(3, 1)})
    got = reasons(describe_capture(wrapper, GradientCollector(net, include_bias=True)))
    inside = "inside nn.MultiheadAttention (forward bypasses submodules)"
    assert got == {
        "net.attn.in_proj_weight": inside,
        "net.attn.in_proj_bias": inside,
        "net.attn.out_proj.weight": inside,
        "net.attn.out_proj.bias": inside,
        "net.scale": "bare nn.Parameter of AttnNet",
        "probe.weight": "outside the collector's model",
        "probe.bias": "outside the collector's model",
    }


def test_capture_table_of_cnn(cnn):
    report = describe_capture(cnn, GradientCollector(cnn, projection_dim=0, include_bias=True))
    assert report.skipped == []
    assert report.captured[0].weight_shape == (4, 2, 2, 3, 3)
    assert report.captured[0].block_shape == (4, 37)
    assert report.width == sum(m.block_shape[0] * m.block_shape[1] for m in report.captured)
    norm = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ConvTranspose2d(2, 1, 3))
    got = reasons(describe_capture(norm, GradientCollector(norm, include_bias=True)))
    assert got["1.weight"] == "module type BatchNorm2d is not supported"
    assert got["2.weight"] == "module type ConvTranspose2d is not supported"


def test_capture_table_of_lora(lora_model):
    report = describe_capture(lora_model, GradientCollector(lora_model))
    assert report.skipped == []  # base_layer weights are frozen: not skipped-trainable
    assert all("lora_" in m.name for m in report.captured)
    header = report.format().splitlines()[:2]
    assert "frozen modules are not captured by default" in "\n".join(header)
