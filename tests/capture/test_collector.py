"""GradientCollector against torch.func per-example gradients and explicit projections."""

from __future__ import annotations

import pytest
import torch
from oracles import (
    ToyConv1DNet,
    documented_projection,
    example_losses,
    module_grad,
    oracle_lm_grads,
)
from torch.func import functional_call, grad, vmap

from lightning_bergson.capture import (
    AdafactorNormalizer,
    AdamNormalizer,
    GradientCollector,
    HeadConfig,
    projection_matrix,
)

proj = documented_projection
QKV = "gpt_neox.layers.0.attention.query_key_value"
DENSE = "gpt_neox.layers.0.attention.dense"
MLP = "gpt_neox.layers.1.mlp.dense_h_to_4h"


def collect(tiny_lm, lm_data, reduction="sum", **kwargs):
    """Rows from the collector for the summed per-example loss."""
    with GradientCollector(tiny_lm, **kwargs) as collector:
        out = tiny_lm(input_ids=lm_data["input_ids"], attention_mask=lm_data["attention_mask"])
        example_losses(out.logits, lm_data["labels"], reduction).sum().backward()
    return collector.gradients


def rel_err(x, y):
    return ((x - y).norm() / y.norm()).item()


@pytest.fixture(scope="module")
def oracle(tiny_lm, lm_data):
    return oracle_lm_grads(tiny_lm, lm_data)


@pytest.mark.parametrize("bias", [False, True])
def test_exact_rows_equal_torch_func(tiny_lm, lm_data, oracle, bias):
    rows = collect(tiny_lm, lm_data, projection_dim=0, include_bias=bias)
    assert len(rows) == 8  # 2 layers x (qkv, dense, h_to_4h, 4h_to_h); lm_head excluded
    for name, got in rows.items():
        want = module_grad(oracle, name, bias=bias).flatten(1)
        assert rel_err(got, want) <= 1e-5, name


def test_conv1d_rows_equal_torch_func():
    torch.manual_seed(0)
    net = ToyConv1DNet()
    ids = torch.randint(0, 11, (5, 7))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_one(p, x):
        return functional_call(net, p, (x[None],)).square().sum()

    oracle = vmap(grad(loss_one), in_dims=(None, 0))(params, ids)
    with GradientCollector(net, projection_dim=0, include_bias=True) as c:
        net(ids).square().sum().backward()
    assert (
        rel_err(c.gradients["conv"], module_grad(oracle, "conv", bias=True, conv1d=True).flatten(1))
        < 1e-5
    )
    assert rel_err(c.gradients["out"], module_grad(oracle, "out", bias=True).flatten(1)) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_projected_rows_equal_explicit_projection(tiny_lm, lm_data, oracle, bias):
    p, seed = 4, 7
    rows = collect(tiny_lm, lm_data, projection_dim=p, seed=seed, include_bias=bias)
    for name in (QKV, MLP):
        full = module_grad(oracle, name, bias=bias)  # (B, O, I)
        left = proj(p, full.shape[1], seed=seed, key=name, side="left")
        right = proj(p, full.shape[2], seed=seed, key=name, side="right")
        want = (left @ full @ right.T).flatten(1)
        assert rel_err(rows[name], want) <= 1e-5


def test_projection_preserves_inner_products_on_average():
    """Over many seeds, <L G1 R^T, L G2 R^T> / <G1, G2> averages to 1 (JL scaling)."""
    torch.manual_seed(0)
    g1 = torch.randn(24, 40)
    g2 = g1 + 0.5 * torch.randn(24, 40)
    true = (g1 * g2).sum()
    ratios = []
    for seed in range(400):
        left = projection_matrix(8, 24, seed=seed, key="m", side="left")
        right = projection_matrix(8, 40, seed=seed, key="m", side="right")
        ratios.append(((left @ g1 @ right.T) * (left @ g2 @ right.T)).sum() / true)
    assert abs(torch.stack(ratios).mean().item() - 1) < 0.05


def test_projection_is_seeded_and_device_independent():
    a = projection_matrix(8, 30, seed=3, key="x.y", side="left")
    assert torch.equal(a, projection_matrix(8, 30, seed=3, key="x.y", side="left"))
    assert not torch.equal(a, projection_matrix(8, 30, seed=4, key="x.y", side="left"))
    assert not torch.equal(a, projection_matrix(8, 30, seed=3, key="x.y", side="right"))
    assert torch.allclose(a.abs(), torch.full_like(a, 8**-0.5))
    assert 0.3 < (a > 0).float().mean() < 0.7
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(a, projection_matrix(8, 30, seed=3, key="x.y", side="left"))
    with torch.device("meta"):  # a default device (Lightning's init_module sets one on GPUs)
        assert torch.equal(projection_matrix(8, 30, seed=3, key="x.y", side="left"), a)
    if torch.cuda.is_available():
        gpu = projection_matrix(8, 30, seed=3, key="x.y", side="left", device="cuda")
        assert torch.equal(gpu.cpu(), a)


def test_projection_cache_builds_each_matrix_once_per_device():
    from lightning_bergson.capture.projection import ProjectionCache

    cache = ProjectionCache(4, seed=3)
    first = cache.get(["a", "b"], "left", 6, torch.float32, "cpu")  # (2, 4, 6)
    assert cache.get(["a", "b"], "left", 6, torch.float32, "cpu") is first  # built once
    assert torch.equal(first[1], proj(4, 6, seed=3, key="b", side="left"))
    assert cache.get(["a", "b"], "left", 6, torch.float32, "meta").device.type == "meta"
    assert cache.dim == 4 and cache.seed == 3
    default = ProjectionCache(3).get(["a"], "right", 5, torch.float32, "cpu")  # seed 0
    assert torch.equal(default[0], proj(3, 5, seed=0, key="a", side="right"))


def test_projection_follows_the_documented_seeding_rule():
    """``sha256("<seed>/<key>/<side>")`` seeds a CPU generator whose bits are the signs."""
    for key in ("fc", "gpt_neox.layers.0.attention.query_key_value.head_3"):
        for side in ("left", "right"):
            want = proj(5, 7, seed=11, key=key, side=side)
            assert torch.equal(projection_matrix(5, 7, seed=11, key=key, side=side), want)


def test_the_seed_is_the_32_bits_the_generator_keeps():
    """The documented 63-bit value and its low 32 bits seed the same matrices (the CPU
    generator keeps 32 bits), so ``stable_seed`` returns those 32 bits and no more."""
    from lightning_bergson.capture.projection import stable_seed

    seeds = {stable_seed(11, f"m{i}", "left") for i in range(200)}
    assert max(seeds) < 2**32 and len(seeds) == 200
    assert max(seeds) >= 2**31  # all 32 bits are used


def test_projection_shape_must_be_positive():
    """A 1 x 1 projection is +-1; an empty or negative side is refused, naming both sizes."""
    assert projection_matrix(1, 1, seed=0, key="a", side="left").abs().item() == 1.0
    for dim, features in ((0, 3), (3, 0), (-1, 3), (3, -2)):
        want = f"projection shape must be positive, got dim={dim}, features={features}$"
        with pytest.raises(ValueError, match=want):
            projection_matrix(dim, features, seed=0, key="a", side="left")


def test_projection_cache_returns_the_requested_dtype():
    """float64 matrices from the cache are the float64 matrices of the documented rule."""
    from lightning_bergson.capture.projection import ProjectionCache

    got = ProjectionCache(3, seed=2).get(["a", "b"], "left", 5, torch.float64, "cpu")
    assert got.dtype == torch.float64
    for i, key in enumerate("ab"):
        want = projection_matrix(3, 5, seed=2, key=key, side="left", dtype=torch.float64)
        assert torch.equal(got[i], want)


@pytest.mark.parametrize("p", [2, 3])
def test_every_block_and_head_has_its_own_projection(tiny_lm, lm_data, oracle, p):
    """Rows of every block equal ``L_b G_b R_b^T`` with the block's own matrices: a head (or
    module) projected with another block's matrices, or with shared ones, fails."""
    heads = {QKV: HeadConfig(4, 24), DENSE: HeadConfig(4, 8, axis="input")}
    rows = collect(tiny_lm, lm_data, projection_dim=p, include=[QKV, DENSE, MLP], head_cfgs=heads)
    blocks = {MLP: module_grad(oracle, MLP)}
    for h in range(4):
        blocks[f"{QKV}.head_{h}"] = module_grad(oracle, QKV)[:, 24 * h : 24 * (h + 1)]
        blocks[f"{DENSE}.head_{h}"] = module_grad(oracle, DENSE)[:, :, 8 * h : 8 * (h + 1)]
    lefts = {}
    for key, g in blocks.items():
        left = proj(p, g.shape[1], seed=0, key=key, side="left")
        right = proj(p, g.shape[2], seed=0, key=key, side="right")
        assert rel_err(rows[key], (left @ g @ right.T).flatten(1)) <= 1e-5, key
        lefts[key] = left
    # the heads of a module have matrices of one shape, all different
    qkv = [lefts[f"{QKV}.head_{h}"] for h in range(4)]
    assert len({tuple(m.flatten().tolist()) for m in qkv}) == 4


def _random_moments(tiny_lm, names, bias, kind):
    """Random second moments; Adafactor's row and column statistics are drawn independently
    and on different scales (mean(c) ~ 3 mean(r)), so a normalizer that divides by mean(c),
    or by no mean, differs from ``r c^T / mean(r)``."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for name in names:
        mod = tiny_lm.get_submodule(name)
        shape = (mod.out_features, mod.in_features + int(bias))
        if kind == "adam":
            out[name] = AdamNormalizer(torch.rand(shape, generator=gen) + 0.1, eps=1e-3)
        else:
            row = torch.rand(shape[0], generator=gen) + 0.1
            col = 3 * torch.rand(shape[1], generator=gen) + 0.3
            out[name] = AdafactorNormalizer(row, col)
    return out


@pytest.mark.parametrize("kind", ["adafactor", "adam"])
@pytest.mark.parametrize("p", [0, 4])
def test_normalized_rows_equal_explicit_normalization(tiny_lm, lm_data, oracle, kind, p):
    """The Adafactor trick (and the Adam path) equal normalizing G explicitly, then projecting."""
    names = [QKV, MLP]
    norms = _random_moments(tiny_lm, names, bias=True, kind=kind)
    rows = collect(
        tiny_lm,
        lm_data,
        projection_dim=p,
        include=names,
        include_bias=True,
        normalizers=norms,
        seed=2,
    )
    for name in names:
        full = module_grad(oracle, name, bias=True)
        norm = norms[name]
        if kind == "adafactor":
            v = norm.row[:, None] * norm.col[None, :] / norm.row.mean()
            full = full / v.sqrt()
        else:
            full = full / (norm.avg_sq.sqrt() + norm.eps)
        if p:
            left = proj(p, full.shape[1], seed=2, key=name, side="left")
            right = proj(p, full.shape[2], seed=2, key=name, side="right")
            full = left @ full @ right.T
        assert rel_err(rows[name], full.flatten(1)) <= 1e-5


@pytest.mark.parametrize("p", [0, 3])
def test_heads_split_both_axes(tiny_lm, lm_data, oracle, p):
    heads = {QKV: HeadConfig(4, 24), DENSE: HeadConfig(4, 8, axis="input")}
    rows = collect(
        tiny_lm, lm_data, projection_dim=p, include=[QKV, DENSE], head_cfgs=heads, seed=1
    )
    assert sorted(rows) == sorted(
        [f"{QKV}.head_{h}" for h in range(4)] + [f"{DENSE}.head_{h}" for h in range(4)]
    )
    for h in range(4):
        blocks = {
            QKV: module_grad(oracle, QKV)[:, 24 * h : 24 * (h + 1), :],
            DENSE: module_grad(oracle, DENSE)[:, :, 8 * h : 8 * (h + 1)],
        }
        for name, want in blocks.items():
            key = f"{name}.head_{h}"
            if p:
                left = proj(p, want.shape[1], seed=1, key=key, side="left")
                right = proj(p, want.shape[2], seed=1, key=key, side="right")
                want = left @ want @ right.T
            assert rel_err(rows[key], want.flatten(1)) <= 1e-5, key


@pytest.mark.parametrize("perm", [False, True])
def test_heads_with_adafactor_normalizer_on_both_axes(tiny_lm, lm_data, oracle, perm):
    """Adafactor scales folded into per-head projections equal normalize-split-project."""
    names = [QKV, DENSE]
    norms = _random_moments(tiny_lm, names, bias=False, kind="adafactor")
    qkv = HeadConfig(4, 24, sections=3) if perm else HeadConfig(4, 24)
    order = torch.tensor(qkv.permutation(96)) if perm else None
    heads = {QKV: qkv, DENSE: HeadConfig(4, 8, axis="input")}
    rows = collect(
        tiny_lm,
        lm_data,
        projection_dim=3,
        include=names,
        head_cfgs=heads,
        normalizers=norms,
        seed=4,
    )
    for name in names:
        norm = norms[name]
        full = module_grad(oracle, name) / (norm.row[:, None] * norm.col / norm.row.mean()).sqrt()
        if name == QKV and perm:
            full = full[:, order]
        for h in range(4):
            want = full[:, 24 * h : 24 * (h + 1)] if name == QKV else full[:, :, 8 * h : 8 * h + 8]
            key = f"{name}.head_{h}"
            left = proj(3, want.shape[1], seed=4, key=key, side="left")
            right = proj(3, want.shape[2], seed=4, key=key, side="right")
            assert rel_err(rows[key], (left @ want @ right.T).flatten(1)) <= 1e-5, key


@pytest.mark.parametrize("p", [0, 3])
def test_gathered_heads_with_bias_and_adafactor(tiny_lm, lm_data, oracle, p):
    """Section-gathered heads on either axis, a bias column and Adafactor scales together
    (the input axis's column scales gathered with its heads).

    The projected path folds the bias and the scales into the projections and gathers
    the heads of the input axis before projecting; this is the explicit route.
    """
    norms = _random_moments(tiny_lm, [QKV], bias=True, kind="adafactor")
    qkv = HeadConfig(4, 24, sections=3)
    dense = HeadConfig(4, 8, axis="input", sections=2)
    rows = collect(tiny_lm, lm_data, projection_dim=p, include=[QKV], head_cfgs={QKV: qkv},
                   normalizers=norms, include_bias=True, seed=6)  # fmt: skip
    dense_norms = _random_moments(tiny_lm, [DENSE], bias=False, kind="adafactor")
    dense_rows = collect(tiny_lm, lm_data, projection_dim=p, include=[DENSE],
                         head_cfgs={DENSE: dense}, normalizers=dense_norms, seed=6)  # fmt: skip

    def scaled(name, full):
        norm = (norms | dense_norms)[name]
        return full / (norm.row[:, None] * norm.col / norm.row.mean()).sqrt()

    order = torch.tensor(qkv.permutation(96))
    qkv_full = scaled(QKV, module_grad(oracle, QKV, bias=True))[:, order]
    dense_order = torch.tensor(dense.permutation(32))
    dense_full = scaled(DENSE, module_grad(oracle, DENSE))[:, :, dense_order]
    for h in range(4):
        for key, want, got in (
            (f"{QKV}.head_{h}", qkv_full[:, 24 * h : 24 * (h + 1)], rows),
            (f"{DENSE}.head_{h}", dense_full[:, :, 8 * h : 8 * (h + 1)], dense_rows),
        ):
            if p:
                left = proj(p, want.shape[1], seed=6, key=key, side="left")
                right = proj(p, want.shape[2], seed=6, key=key, side="right")
                want = left @ want @ right.T
            assert rel_err(got[key], want.flatten(1)) <= 1e-5, key


def test_heads_with_adam_normalizer(tiny_lm, lm_data, oracle):
    norms = _random_moments(tiny_lm, [QKV], bias=False, kind="adam")
    rows = collect(
        tiny_lm,
        lm_data,
        projection_dim=3,
        include=[QKV],
        head_cfgs={QKV: HeadConfig(4, 24)},
        normalizers=norms,
        seed=1,
    )
    full = module_grad(oracle, QKV) / (norms[QKV].avg_sq.sqrt() + norms[QKV].eps)
    want = full[:, 24:48]
    left = proj(3, 24, seed=1, key=f"{QKV}.head_1", side="left")
    right = proj(3, 32, seed=1, key=f"{QKV}.head_1", side="right")
    assert rel_err(rows[f"{QKV}.head_1"], (left @ want @ right.T).flatten(1)) <= 1e-5


def test_head_config_that_does_not_divide_is_rejected(tiny_lm):
    with pytest.raises(ValueError, match=r"does not divide module .*query_key_value.*96"):
        GradientCollector(tiny_lm, head_cfgs={QKV: HeadConfig(5, 24)})
    with pytest.raises(ValueError, match="matches no tracked module"):
        GradientCollector(tiny_lm, include=[MLP], head_cfgs={QKV: HeadConfig(4, 24)})
    with pytest.raises(ValueError, match="head_dim"):
        HeadConfig(4, 24, head_dim=1)


def test_module_patterns_that_match_nothing(tiny_lm):
    with pytest.raises(
        ValueError, match=r"'\*\.attn\.\*' matches no nn.Linear.*available modules include"
    ):
        GradientCollector(tiny_lm, include=["*.attn.*"])
    with pytest.raises(ValueError, match="leave no module"):
        GradientCollector(tiny_lm, include=["*.mlp.*"], exclude=["*"])


def test_glob_selection(tiny_lm):
    c = GradientCollector(tiny_lm, include=["*.mlp.*"], exclude=["*.layers.1.*"])
    assert list(c.modules) == [
        "gpt_neox.layers.0.mlp.dense_h_to_4h",
        "gpt_neox.layers.0.mlp.dense_4h_to_h",
    ]


def test_batch_invariance(tiny_lm, lm_data):
    """An example's row does not depend on the other examples of its batch."""
    rows = collect(tiny_lm, lm_data, projection_dim=4)
    sub = {k: v[[3, 1]] for k, v in lm_data.items()}
    sub_rows = collect(tiny_lm, sub, projection_dim=4)
    for name in rows:
        torch.testing.assert_close(sub_rows[name], rows[name][[3, 1]], rtol=1e-5, atol=1e-6)


def test_deferred_processing_uses_later_normalizers(tiny_lm, lm_data):
    norms = _random_moments(tiny_lm, [MLP], bias=False, kind="adafactor")
    direct = collect(tiny_lm, lm_data, projection_dim=4, include=[MLP], normalizers=norms)
    got = {}
    with GradientCollector(
        tiny_lm,
        projection_dim=4,
        include=[MLP],
        defer=True,
        closure=lambda k, r: got.__setitem__(k, r),
    ) as c:
        out = tiny_lm(input_ids=lm_data["input_ids"], attention_mask=lm_data["attention_mask"])
        example_losses(out.logits, lm_data["labels"]).sum().backward()
        assert not got  # nothing processed before the normalizer is known
        c.set_normalizers(norms)
        c.process_pending()
    torch.testing.assert_close(got[MLP], direct[MLP])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("normalized", [False, True])
def test_stacked_layers_equal_explicit_projection(
    tiny_lm, lm_data, oracle, monkeypatch, bias, normalized
):
    """Deferred layers of equal shapes processed together (``stack_layers``) give each
    layer's ``L diag(r) G_i diag(c) R^T``, with row and column moments drawn apart."""
    from lightning_bergson.capture import grouped, hooks

    p, seed, gen = 4, 3, torch.Generator().manual_seed(5)
    names = list(GradientCollector(tiny_lm).modules)  # both layers of each shape
    norms = {}
    for name in names:
        w = tiny_lm.get_submodule(name).weight
        norms[name] = AdafactorNormalizer(
            torch.rand(w.shape[0], generator=gen) + 0.1,  # mean(r) != mean(c)
            3 * torch.rand(w.shape[1] + bias, generator=gen) + 0.5,
        )
    stacks = []
    monkeypatch.setattr(hooks, "stacked_rows", lambda *a, **k: stacks.append(len(a[0])) or
                        grouped.stacked_rows(*a, **k))  # fmt: skip
    got = {}
    with GradientCollector(
        tiny_lm, projection_dim=p, seed=seed, include_bias=bias, defer=True, stack_layers=True,
        closure=lambda k, r: got.__setitem__(k, r),
    ) as c:  # fmt: skip
        out = tiny_lm(input_ids=lm_data["input_ids"], attention_mask=lm_data["attention_mask"])
        example_losses(out.logits, lm_data["labels"]).sum().backward()
        c.set_normalizers(norms if normalized else {})
        c.process_pending()
    assert sorted(stacks) == [2, 2, 2, 2]  # 4 layer shapes x 2 layers, each stacked
    for name in names:
        full = module_grad(oracle, name, bias=bias)  # (B, O, I(+1))
        if normalized:
            r, col = norms[name].row, norms[name].col
            full = full / (r[:, None] * col[None, :] / r.mean()).sqrt()
        left = projection_matrix(p, full.shape[1], seed=seed, key=name, side="left")
        right = projection_matrix(p, full.shape[2], seed=seed, key=name, side="right")
        assert rel_err(got[name], (left @ full @ right.T).flatten(1)) <= 1e-5, name


def test_normalizer_shape_mismatch(tiny_lm):
    with pytest.raises(ValueError, match=r"has shape \(3, 3\)"):
        GradientCollector(
            tiny_lm, include=[MLP], normalizers={MLP: AdamNormalizer(torch.ones(3, 3))}
        )


def test_disabled_collector_and_no_grad_capture_nothing(tiny_lm, lm_data):
    with GradientCollector(tiny_lm, projection_dim=2) as c:
        with torch.no_grad():
            tiny_lm(input_ids=lm_data["input_ids"])
        c.enabled = False
        tiny_lm(input_ids=lm_data["input_ids"]).logits.sum().backward()
    assert c.gradients == {}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_fast_path_gives_the_general_paths_rows_bit_for_bit(tiny_lm, lm_data, bias, dtype):
    """One-head modules without a normalizer take a shorter path in the hooks; with that
    path switched off the same modules go through the general one: rows must be identical."""
    model = tiny_lm.to(dtype)
    try:
        fast = collect(model, lm_data, projection_dim=4, seed=3, include_bias=bias)
        with GradientCollector(model, projection_dim=4, seed=3, include_bias=bias) as col:
            assert col._plain_names == set(col.plans)  # every module of this model is plain
            col._plain_names = set()
            out = model(input_ids=lm_data["input_ids"], attention_mask=lm_data["attention_mask"])
            example_losses(out.logits, lm_data["labels"], "sum").sum().backward()
        assert fast.keys() == col.gradients.keys()
        for name, rows in fast.items():
            assert rows.dtype == dtype
            assert torch.equal(rows, col.gradients[name]), name
    finally:
        tiny_lm.float()


def test_a_normalizer_or_heads_take_the_module_off_the_plain_path(tiny_lm):
    cfg = HeadConfig(2, tiny_lm.config.hidden_size * 3 // 2)
    col = GradientCollector(tiny_lm, projection_dim=4, head_cfgs={QKV: cfg})
    assert QKV not in col._plain_names and DENSE in col._plain_names
    hidden = tiny_lm.config.hidden_size
    col.set_normalizers({DENSE: AdafactorNormalizer(torch.ones(hidden), torch.ones(hidden))})
    assert DENSE not in col._plain_names and MLP in col._plain_names


def _deferred(model, data, norms=None, take=False, **kwargs):
    """Rows of the deferred path: captured in backward, processed after ``set_normalizers``;
    with ``take`` the triples are handed over first and passed back explicitly."""
    got = {}
    with GradientCollector(
        model, defer=True, closure=lambda k, r: got.__setitem__(k, r), **kwargs
    ) as c:
        out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
        example_losses(out.logits, data["labels"]).sum().backward()
        c.set_normalizers(norms or {})
        if take:
            pending = c.take_pending()
            assert c.take_pending() == []  # handed over, not kept
            c.process_pending(pending)
        else:
            c.process_pending()
    return got


@pytest.mark.parametrize("take", [False, True])
@pytest.mark.parametrize("stack", [None, False])
def test_deferred_rows_of_every_module_equal_the_immediate_ones(tiny_lm, lm_data, take, stack):
    # Unstacked (the CPU default), every module is processed on its own and delivered.
    want = collect(tiny_lm, lm_data, projection_dim=4, seed=2)
    got = _deferred(tiny_lm, lm_data, take=take, projection_dim=4, seed=2, stack_layers=stack)
    assert sorted(got) == sorted(want) and len(got) == 8
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_layers_are_stacked_on_accelerators_only_and_only_plain_projected_ones(tiny_lm):
    from lightning_bergson.capture import hooks

    cpu, meta = torch.device("cpu"), torch.device("meta")

    def key(name, device, **kwargs):
        c = GradientCollector(tiny_lm, **{"projection_dim": 4, "defer": True, **kwargs})
        plan = c.plans[name]
        a = torch.empty(2, 5, plan.in_f - plan.bias, device=device)
        g = torch.empty(2, 5, plan.out_f, device=device)
        return c._stack_key(name, a, g)

    assert key(MLP, meta) is not None  # default: stacked on an accelerator
    assert key(MLP, cpu) is None  # and not on the CPU
    assert key(MLP, cpu, stack_layers=True) is not None
    assert key(MLP, meta, stack_layers=False) is None
    assert key(MLP, meta, projection_dim=0) is None  # exact rows are never stacked
    o, i = tiny_lm.get_submodule(MLP).weight.shape
    adam = {MLP: AdamNormalizer(torch.ones(o, i))}
    factored = {MLP: AdafactorNormalizer(torch.ones(o), torch.ones(i))}
    assert key(MLP, meta, normalizers=adam) is None  # Adam's scales are not rank one
    assert key(MLP, meta, normalizers=factored) is not None
    assert key(QKV, meta, head_cfgs={QKV: HeadConfig(4, 24)}) is None  # heads
    assert key(QKV, meta, head_cfgs={QKV: HeadConfig(4, 24, sections=3)}) is None
    c = GradientCollector(tiny_lm, projection_dim=4, defer=True, stack_layers=True)
    projected = hooks._Projected(torch.empty(2, 5, 4))
    assert c._stack_key(MLP, projected, torch.empty(2, 5, o)) is None  # already projected
    net = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3))  # a convolution, not a matmul layer
    c = GradientCollector(net, projection_dim=2, stack_layers=True, defer=True)
    assert c._stack_key("0", torch.empty(2, 3, 7), torch.empty(2, 8, 5)) is None


def test_stacks_are_capped_by_their_numbers(tiny_lm, monkeypatch):
    from lightning_bergson.capture import hooks

    assert hooks._STACK_NUMEL * 4 == 512 * 2**20  # float32 copies of at most 512 MiB
    c = GradientCollector(tiny_lm, projection_dim=4, defer=True, stack_layers=True)
    # three same-shaped triples of 6 + 2 = 8 numbers each (the key reads only shapes)
    items = [(MLP, torch.zeros(1, 1, 6), torch.zeros(1, 1, 2)) for _ in range(3)]

    def sizes(cap):
        monkeypatch.setattr(hooks, "_STACK_NUMEL", cap)
        groups = c._stacks(items)
        assert [x for grp in groups for x in grp] == items  # every triple once, in order
        return [len(grp) for grp in groups]

    assert sizes(2**27) == [3]
    assert sizes(9) == [1, 1, 1]  # running totals 8, 16, 24 -> stacks 0, 1, 2
    assert sizes(12) == [1, 1, 1]  # 0, 1, 2
    assert sizes(17) == [2, 1]  # 0, 0, 1
    # triples that cannot be stacked each stay alone, in order
    alone = [(MLP, torch.zeros(1, 1, 6), torch.zeros(1, 1, 2)) for _ in range(3)]
    c.stack_layers = False
    assert c._stacks(alone) == [[x] for x in alone]


def test_stacked_float64_rows_stay_float64(tiny_lm, lm_data):
    import copy

    model = copy.deepcopy(tiny_lm).double()
    stacked = _deferred(model, lm_data, projection_dim=4, seed=1, stack_layers=True)
    alone = _deferred(model, lm_data, projection_dim=4, seed=1, stack_layers=False)
    assert sorted(stacked) == sorted(alone)
    for name, rows in alone.items():
        assert rows.dtype == stacked[name].dtype == torch.float64, name
        torch.testing.assert_close(stacked[name], rows, rtol=1e-12, atol=1e-14)
    stacked32 = _deferred(tiny_lm, lm_data, projection_dim=4, seed=1, stack_layers=True)
    assert all(r.dtype == torch.float32 for r in stacked32.values())


def test_plain_matrices_are_made_once_per_dtype_and_device(tiny_lm):
    c = GradientCollector(tiny_lm, projection_dim=4, seed=3)
    cpu = torch.device("cpu")
    first = c._plain(MLP, torch.float32, cpu)
    again = c._plain(MLP, torch.float32, cpu)
    assert all(x is y for x, y in zip(first, again, strict=True))  # cached
    double = c._plain(MLP, torch.float64, cpu)
    assert all(x.dtype == torch.float64 for x in double if x is not None)
    on_meta = c._plain(MLP, torch.float32, torch.device("meta"))
    assert all(x.device.type == "meta" for x in on_meta if x is not None)
    right_t, _, left_t = first
    o, i = tiny_lm.get_submodule(MLP).weight.shape
    torch.testing.assert_close(right_t, proj(4, i, seed=3, key=MLP, side="right").T)
    torch.testing.assert_close(left_t, proj(4, o, seed=3, key=MLP, side="left").T)


def test_head_permutation_moves_to_the_device_asked_for(tiny_lm):
    c = GradientCollector(tiny_lm, head_cfgs={QKV: HeadConfig(4, 24, sections=3)})
    plan = c.plans[QKV]
    order = HeadConfig(4, 24, sections=3).permutation(96)
    assert plan.permutation(torch.device("cpu")).tolist() == order
    assert plan.permutation(torch.device("meta")).device.type == "meta"


def test_head_configs_that_cannot_be_right_are_refused_with_the_fix(tiny_lm):
    from oracles import tiny_gpt2

    heads = {DENSE: HeadConfig(4, 8, axis="input")}
    msg = (
        f"module {DENSE!r}: include_bias cannot be combined with an input-axis HeadConfig "
        "(the bias belongs to no head); set include_bias=False"
    )
    with pytest.raises(ValueError) as err:
        GradientCollector(tiny_lm, head_cfgs=heads, include_bias=True)
    assert str(err.value) == msg
    GradientCollector(tiny_lm, head_cfgs=heads, include_bias=False)  # fine without the bias
    GradientCollector(tiny_lm, head_cfgs={QKV: HeadConfig(4, 24)}, include_bias=True)

    net = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3, groups=2))
    with pytest.raises(ValueError) as err:
        GradientCollector(net, head_cfgs={"0": HeadConfig(2, 2)})
    assert str(err.value) == (
        "module '0' is a grouped convolution (groups=2): its block is not split into heads; "
        "drop it from head_cfgs"
    )

    gpt2 = tiny_gpt2()
    c_attn = "transformer.h.0.attn.c_attn"
    with pytest.raises(ValueError) as err:  # [q | k | v] of 32 each: contiguous 24s cut across
        GradientCollector(gpt2, include=[c_attn], head_cfgs={c_attn: HeadConfig(4, 24)})
    assert str(err.value) == (
        f"module {c_attn!r} is a GPT-2 style fused attention projection whose 96 outputs are "
        "3 sections of 32 (q, k, v for all heads), so HeadConfig(num_heads=4, head_size=24, "
        "sections=1) would not select heads. Use HeadConfig(num_heads=4, head_size=24, "
        "sections=3)."
    )
    GradientCollector(gpt2, include=[c_attn], head_cfgs={c_attn: HeadConfig(4, 24, sections=3)})


def test_a_bfloat16_layers_input_is_projected_in_float32():
    # Heads take the forward-hook projection (a R^T while a is hot): a bfloat16 input must be
    # widened first, so the rows are the float32 projection of the bfloat16 values.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False)).to(torch.bfloat16)
    x = torch.randn(3, 5, 8).to(torch.bfloat16)
    seen = []
    with GradientCollector(net, projection_dim=2, seed=4, head_cfgs={"0": HeadConfig(2, 3)}) as c:
        out = net(x)
        out.register_hook(seen.append)
        out.float().square().sum().backward()
    full = torch.einsum("bso,bsi->boi", seen[0].double(), x.double())  # (B, O, I)
    for h in range(2):
        key = f"0.head_{h}"
        left = proj(2, 3, seed=4, key=key, side="left").double()
        right = proj(2, 8, seed=4, key=key, side="right").double()
        want = (left @ full[:, 3 * h : 3 * h + 3] @ right.T).flatten(1)
        assert c.gradients[key].dtype == torch.float32
        torch.testing.assert_close(c.gradients[key].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("path", ["plain", "heads", "deferred", "exact"])
def test_rows_under_bfloat16_autocast_are_the_true_gradients(path, backward_inside):
    # Under CPU autocast a float32 layer multiplies its input rounded to bfloat16 and returns
    # bfloat16: its weight gradient is g^T bf16(a). Every path must take that input, widen
    # the bfloat16 output gradient, and project in float32 (not autocast's bfloat16).
    # Oracles: autograd's weight gradient (the rows' sum, exact rows) and the explicit
    # float64 projection of g^T bf16(a) per example.
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6))
    x = torch.randn(3, 5, 8)
    p = 0 if path == "exact" else 2
    kwargs = {"projection_dim": p, "seed": 5, "include_bias": True}
    if path == "heads":
        kwargs["head_cfgs"] = {"0": HeadConfig(2, 3)}
    got, seen = {}, []
    with GradientCollector(
        net, defer=path == "deferred", closure=lambda k, r: got.__setitem__(k, r), **kwargs
    ) as c:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            assert out.dtype == torch.bfloat16
            out.register_hook(seen.append)
            if backward_inside:  # allowed, if unusual: the hooks' matmuls must not go bf16
                out.float().square().sum().backward()
                if path == "deferred":
                    c.set_normalizers({})
                    c.process_pending()
        if not backward_inside:
            out.float().square().sum().backward()
            if path == "deferred":
                c.set_normalizers({})
                c.process_pending()
    a = torch.cat([x.bfloat16().double(), torch.ones(3, 5, 1, dtype=torch.float64)], -1)
    full = torch.einsum("bso,bsi->boi", seen[0].double(), a)  # (B, O, I + 1)
    autograd = torch.cat([net[0].weight.grad, net[0].bias.grad[:, None]], 1).double()
    torch.testing.assert_close(full.sum(0), autograd, rtol=1e-2, atol=1e-2)  # bf16 sums
    if path == "heads":
        blocks = {f"0.head_{h}": full[:, 3 * h : 3 * h + 3] for h in range(2)}
    else:
        blocks = {"0": full}
    assert sorted(got) == sorted(blocks)
    for key, block in blocks.items():
        want = block.flatten(1)
        if p:
            left = proj(p, block.shape[1], seed=5, key=key, side="left").double()
            right = proj(p, 9, seed=5, key=key, side="right").double()
            want = (left @ block @ right.T).flatten(1)
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)


def test_a_module_called_twice_adds_both_calls_rows():
    # A layer applied twice in one forward (weight tying, recurrence): its per-example
    # gradient is the sum over both calls. Oracle: torch.func per-example gradients.
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 2, 4)
    with GradientCollector(torch.nn.Sequential(lin), projection_dim=0, include_bias=True) as c:
        lin(torch.tanh(lin(x))).square().sum().backward()
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def loss_one(p, xi):
        inner = functional_call(lin, p, (xi[None],))
        return functional_call(lin, p, (torch.tanh(inner),)).square().sum()

    per = vmap(grad(loss_one), in_dims=(None, 0))(params, x)
    want = torch.cat([per["weight"], per["bias"][..., None]], -1).flatten(1)
    torch.testing.assert_close(c.gradients["0"], want, rtol=1e-5, atol=1e-6)


def test_layers_on_a_device_without_autocast_are_hooked():
    # The meta device has no autocast state to ask for: the hooks must still run there.
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).to("meta")
    with GradientCollector(net, projection_dim=2, defer=True) as c:
        net(torch.empty(2, 5, 4, device="meta")).sum().backward()
        ((name, a, g),) = c.take_pending()
    assert name == "0" and a.device.type == g.device.type == "meta"


MLP_OUT = "gpt_neox.layers.1.mlp.dense_4h_to_h"  # 64 -> 32: not square


@pytest.mark.parametrize("p", [0, 3])
def test_input_axis_sections_of_a_non_square_layer(tiny_lm, lm_data, oracle, p):
    # The gathered order of an input-axis split runs over the input features (64), not the
    # output features (32).
    cfg = HeadConfig(4, 16, axis="input", sections=2)
    rows = collect(tiny_lm, lm_data, projection_dim=p, include=[MLP_OUT],
                   head_cfgs={MLP_OUT: cfg}, seed=2)  # fmt: skip
    full = module_grad(oracle, MLP_OUT)[:, :, torch.tensor(cfg.permutation(64))]  # (B, 32, 64)
    for h in range(4):
        key, want = f"{MLP_OUT}.head_{h}", full[:, :, 16 * h : 16 * (h + 1)]
        if p:
            left = proj(p, 32, seed=2, key=key, side="left")
            want = left @ want @ proj(p, 16, seed=2, key=key, side="right").T
        assert rel_err(rows[key], want.flatten(1)) <= 1e-5, key


def test_frozen_layers_are_captured_through_a_grad_requiring_copy_of_their_output():
    # Default leaf_outputs: a tracked layer whose output needs no grad (frozen, and nothing
    # upstream needs grad) gets its row from a grad-requiring copy of that output.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    net[0].requires_grad_(False)
    x = torch.randn(3, 2, 4)
    with GradientCollector(net, projection_dim=0, include=["*"]) as c:
        out = net(x)
        out.square().sum().backward()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_one(p, xi):
        return functional_call(net, p, (xi[None],)).square().sum()

    per = vmap(grad(loss_one), in_dims=(None, 0))(params, x)
    assert sorted(c.gradients) == ["0", "2"]
    torch.testing.assert_close(c.gradients["0"], per["0.weight"].flatten(1))
    torch.testing.assert_close(c.gradients["2"], per["2.weight"].flatten(1))
    assert net[0].weight.grad is None  # still frozen
    with GradientCollector(net, projection_dim=0, include=["*"], leaf_outputs=False) as c:
        net(x).square().sum().backward()
    assert sorted(c.gradients) == ["2"]  # without the copy, the frozen layer has no row


def test_a_grouped_convolution_of_two_groups_gives_per_group_rows():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 6, 3, groups=2)
    net = torch.nn.Sequential(conv)
    x = torch.randn(3, 4, 7)
    with GradientCollector(net, projection_dim=0) as c:
        net(x).square().sum().backward()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_one(p, xi):
        return functional_call(net, p, (xi[None],)).square().sum()

    per = vmap(grad(loss_one), in_dims=(None, 0))(params, x)["0.weight"]  # (B, 6, 2, 3)
    torch.testing.assert_close(c.gradients["0"], per.flatten(1), rtol=1e-5, atol=1e-6)


def test_exact_adafactor_rows_keep_the_layers_dtype(tiny_lm, lm_data, oracle):
    norms = _random_moments(tiny_lm, [MLP], bias=False, kind="adafactor")
    rows = collect(tiny_lm, lm_data, projection_dim=0, include=[MLP], normalizers=norms)
    norm = norms[MLP]
    want = module_grad(oracle, MLP) / (norm.row[:, None] * norm.col / norm.row.mean()).sqrt()
    assert rows[MLP].dtype == torch.float32
    assert rel_err(rows[MLP], want.flatten(1)) <= 1e-5


def test_a_float64_layer_under_autocast_keeps_float64_inputs():
    # autocast leaves float64 alone, so the layer multiplies the float64 input itself.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    seen = []
    with GradientCollector(net, projection_dim=0) as c:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.float64
        out.register_hook(seen.append)
        out.square().sum().backward()
    want = torch.einsum("bso,bsi->boi", seen[0], x).flatten(1)
    torch.testing.assert_close(c.gradients["0"], want, rtol=1e-12, atol=1e-14)


def test_collector_argument_errors_name_the_value_and_the_fix(tiny_lm):
    with pytest.raises(ValueError) as err:
        GradientCollector(tiny_lm, projection_dim=-1)
    assert str(err.value) == "projection_dim must be >= 0 (0 = exact), got -1"
    c = GradientCollector(tiny_lm, include_bias=True)
    with pytest.raises(KeyError) as err:
        c.set_normalizers({"nope": AdamNormalizer(torch.ones(2, 2))})
    assert err.value.args[0] == "normalizer given for 'nope', which is not a tracked module"
    for bias, (o, i) in ((True, (64, 33)), (False, (64, 32))):
        c = GradientCollector(tiny_lm, include_bias=bias)
        with pytest.raises(ValueError) as err:
            c.set_normalizers({MLP: AdamNormalizer(torch.ones(3, 3))})
        tail = " + bias" if bias else ""
        assert str(err.value) == (
            f"normalizer for {MLP!r} has shape (3, 3) but the module's gradient is "
            f"({o}, {i}) (out, in{tail})"
        )
    ten = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(ValueError) as err:
        GradientCollector(ten, head_cfgs={"*.nothing": HeadConfig(2, 1)})
    assert str(err.value) == (  # the first eight of the ten
        "head_cfgs key '*.nothing' matches no tracked module; tracked modules include: "
        "0, 1, 2, 3, 4, 5, 6, 7"
    )


def test_a_frozen_layer_under_autocast_keeps_its_row():
    # The grad-requiring copy of a frozen layer's output must replace the output on the
    # autocast path too, or the layer's row is lost.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    net[0].requires_grad_(False)
    with GradientCollector(net, projection_dim=2, include=["*"]) as c:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(torch.randn(3, 2, 4))
        out.float().square().sum().backward()
    assert sorted(c.gradients) == ["0", "2"]
    assert c.gradients["0"].abs().sum() > 0


def test_blocks_name_their_module_and_head(tiny_lm):
    from lightning_bergson.capture.hooks import Block

    heads = {QKV: HeadConfig(4, 24)}
    c = GradientCollector(tiny_lm, include=[QKV, MLP], head_cfgs=heads, projection_dim=3)
    assert c.blocks == [Block(f"{QKV}.head_{h}", (3, 3), QKV, h) for h in range(4)] + [
        Block(MLP, (3, 3), MLP, None)
    ]
    exact = GradientCollector(tiny_lm, include=[MLP], include_bias=True, projection_dim=0)
    assert exact.blocks == [Block(MLP, (64, 33), MLP, None)]
