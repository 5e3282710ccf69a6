"""The batch contract: ids in any batch type, stripping only what the strategy added,
modules that need ids keeping them, and the pure scaling rule against closed forms."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as L
import pytest
import torch
from magic_oracles import tiny_batches, tiny_model, tiny_query
from oracles import batch_rows, lm_batch, tiny_gpt_neox
from recipes import trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader

import lightning_bergson.strategy  # noqa: F401  (registers the "bergson" strategies by name)
from lightning_bergson import EkfacModule, MagicModule
from lightning_bergson.batch import (
    IdStamped,
    MissingExampleIdError,
    batch_size,
    causal_lm_labels,
    example_ids,
    lm_fields,
    stamp,
    supervised_tokens,
    unstamp,
)
from lightning_bergson.capture.heads import HeadConfig
from lightning_bergson.capture.scaling import declared_scales, lm_logit_scales, row_scales
from lightning_bergson.capture.settings import CaptureSettings
from lightning_bergson.loader import make_resumable


@dataclasses.dataclass
class Pair:
    x: torch.Tensor
    y: torch.Tensor


def _batches():
    from transformers import BatchEncoding

    x = torch.arange(6).reshape(3, 2)
    return {
        "dict": {"x": x},
        "tuple": (x, x),
        "list": [x, x],
        "tensor": x,
        "batch_encoding": BatchEncoding({"input_ids": x}),
        "dataclass": Pair(x, x),
    }


@pytest.mark.parametrize("kind", list(_batches()))
def test_every_batch_type_is_stamped_and_unstamped_unchanged(kind):
    batch = _batches()[kind]
    ids = torch.tensor([4, 8, 15])
    stamped, added = stamp(batch, ids)
    assert added and example_ids(stamped).tolist() == [4, 8, 15]
    assert batch_size(stamped) == 3
    inner = unstamp(stamped)
    if kind in ("dict", "batch_encoding"):  # mappings carry the key itself
        assert inner is batch and inner["example_id"] is ids
    else:
        assert inner is batch and isinstance(stamped, IdStamped)


def test_an_existing_key_is_kept_and_missing_ids_name_the_fix():
    batch = {"example_id": torch.tensor([1]), "x": torch.zeros(1)}
    assert stamp(batch, torch.tensor([9])) == (batch, False)
    assert example_ids(batch).tolist() == [1]
    with pytest.raises(MissingExampleIdError, match=r"tuple batch.*strategy='bergson'"):
        example_ids((torch.zeros(1),))
    with pytest.raises(MissingExampleIdError, match=r"keys \['x'\].*with_indices=True"):
        example_ids({"x": torch.zeros(1)})


def test_the_loader_stamps_sampler_rows_into_tuple_batches():
    data = [(torch.tensor([float(i)]), torch.tensor(i)) for i in range(5)]
    loader = make_resumable(DataLoader(data, batch_size=2, shuffle=False))
    got = list(loader)
    assert [example_ids(b).tolist() for b in got] == [[0, 1], [2, 3], [4]]
    assert torch.equal(unstamp(got[1])[0], torch.tensor([[2.0], [3.0]]))


def test_labels_rule_and_supervised_tokens_follow_the_labels_not_the_mask():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [1, 2, 3, -100]])  # a prompt masked in row 0
    assert causal_lm_labels({"input_ids": ids, "attention_mask": mask}).tolist()[1] == [
        1, 2, 3, -100
    ]  # fmt: skip
    assert supervised_tokens(labels).tolist() == [2, 2]  # the mask would say [3, 2]
    assert lm_fields({"input_ids": ids, "labels": labels[:, 0]}) is None  # 1-D labels
    assert lm_fields((ids, labels)) is None
    assert lm_fields({"input_ids": ids, "labels": labels})[1] is labels


def test_token_losses_refuse_logits_with_the_vocabulary_in_the_middle():
    """``[B, V, S]`` logits are named as such, not a cross-entropy size mismatch (with
    ``V == S`` no shape can tell; the docs say ``[B, S, V]``)."""
    from lightning_bergson.losses import token_losses

    logits, labels = torch.randn(2, 4, 4), torch.randint(0, 4, (2, 4))
    loss, _ = token_losses(logits, labels)  # [B, S, V]: the oracle is F.cross_entropy
    want = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    torch.testing.assert_close(loss[:, 1:], want)
    with pytest.raises(ValueError, match=r"need logits \[B, S, V\].*transpose"):
        token_losses(torch.randn(2, 4, 3), labels[:, :3])  # [B, V=4, S=3], labels [B, 3]
    with pytest.raises(ValueError, match="do not fit labels"):
        token_losses(torch.randn(8, 4), labels)


def test_logit_scales_recover_weights_and_flag_other_losses():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4, 5], [0, -100, 2, -100, -100], [-100] * 5])
    weights = torch.tensor([0.3, -2.0, 5.0])
    sums = torch.stack(
        [F.cross_entropy(logits[i, :-1], labels[i, 1:], reduction="sum") for i in range(2)]
        + [logits[2].sum() * 0]
    )
    (weights * sums).sum().backward()
    c, residual = lm_logit_scales(logits.detach(), labels, logits.grad)
    torch.testing.assert_close(c, torch.tensor([0.3, -2.0, 0.0], dtype=torch.float64))
    assert residual.max() < 1e-12
    # Label smoothing is not a function of the summed token loss: a large residual.
    logits.grad = None
    F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.1
    ).backward()
    _, residual = lm_logit_scales(logits.detach(), labels, logits.grad)
    assert residual[:2].min() > 1e-2


@pytest.mark.parametrize("chunk", [2, 256])
def test_logit_scales_over_positions_in_several_chunks(monkeypatch, chunk):
    """Long sequences are scanned in chunks of positions: every chunk counts (S=9 > chunk=2),
    with V != S so positions and vocabulary are not confused, in float32 and bfloat16."""
    from lightning_bergson.capture import scaling

    monkeypatch.setattr(scaling, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 9), generator=gen)
    labels[1, :5] = -100  # a masked prompt: example 1's supervised tokens all in late chunks
    sums = torch.stack([F.cross_entropy(logits[i, :-1], labels[i, 1:], reduction="sum")
                        for i in range(2)])  # fmt: skip
    (torch.tensor([0.25, 4.0], dtype=torch.float64) * sums).sum().backward()
    c, residual = lm_logit_scales(logits.detach().float(), labels, logits.grad.float())
    assert c.dtype == residual.dtype == torch.float64
    torch.testing.assert_close(c, torch.tensor([0.25, 4.0], dtype=torch.float64), rtol=1e-5, atol=0)
    assert float(residual.max()) < 1e-5
    # bfloat16 logits: the residual direction is formed in float32, so c stays accurate
    low = logits.detach().bfloat16()
    logits2 = low.double().requires_grad_(True)
    sums2 = torch.stack([F.cross_entropy(logits2[i, :-1], labels[i, 1:], reduction="sum")
                         for i in range(2)])  # fmt: skip
    (torch.tensor([0.25, 4.0], dtype=torch.float64) * sums2).sum().backward()
    c16, _ = lm_logit_scales(low, labels, logits2.grad.float())
    torch.testing.assert_close(
        c16, torch.tensor([0.25, 4.0], dtype=torch.float64), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("chunk", [2, 3, 256])
def test_logit_scales_are_the_least_squares_fit(monkeypatch, chunk):
    """For a gradient not of the rule's form, ``c_i = <G_i, D_i> / <D_i, D_i>`` and the residual
    ``|G_i - c_i D_i| / |G_i|`` over all positions, written out with an explicit ``D``;
    example 1 has a single, well-predicted supervised token (``<D, D>`` well below 1)."""
    from lightning_bergson.capture import scaling

    monkeypatch.setattr(scaling, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 7), generator=gen)
    labels[1] = -100
    labels[1, 4] = 2
    logits[1, 3, 2] = 6.0  # position 3 predicts label 2 with p ~ 0.98
    grad = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    d = torch.softmax(logits, -1)  # (B, S, V)
    target = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # (B, S)
    keep = target != -100
    d = d - F.one_hot(target.clamp(min=0), 5).double()
    d = d * keep[..., None]
    assert float(d[1].square().sum()) < 0.01
    want_c = (grad * d).sum((1, 2)) / d.square().sum((1, 2))
    want_res = (grad - want_c[:, None, None] * d).norm(dim=(1, 2)) / grad.norm(dim=(1, 2))
    c, residual = lm_logit_scales(logits, labels, grad)
    torch.testing.assert_close(c, want_c)
    torch.testing.assert_close(residual, want_res)


def test_declared_scales_clamp_empty_examples_and_sum():
    """An example with one supervised token weighs 1 / (B * 1); one with none is clamped to a
    count of 1 (it gets no gradient anyway); ``"sum"`` weighs every example 1."""
    tokens = torch.tensor([0, 1, 4])
    torch.testing.assert_close(
        declared_scales("example_mean", tokens),
        torch.tensor([1 / 3, 1 / 3, 1 / 12], dtype=torch.float64),
    )
    torch.testing.assert_close(
        declared_scales("token_mean", torch.tensor([0, 1])), torch.ones(2, dtype=torch.float64)
    )
    torch.testing.assert_close(
        declared_scales("sum", tokens, accumulate=4, loss_scale=2.0),
        torch.full((3,), 0.5, dtype=torch.float64),
    )
    with pytest.raises(
        ValueError, match=r"'mean' is not one of 'token_mean', 'example_mean', 'sum'$"
    ):
        declared_scales("mean", tokens)


def test_row_scales_are_float64_whatever_c_is():
    c = torch.tensor([0.1, 3.0], dtype=torch.float32)
    got = row_scales(c, torch.tensor([3, 7], dtype=torch.int32))
    assert got.dtype == torch.float64 and row_scales(c).dtype == torch.float64
    torch.testing.assert_close(
        got, 1 / (c.double() * torch.tensor([3.0, 7.0], dtype=torch.float64))
    )


def test_residual_tolerance_by_dtype():
    from lightning_bergson.capture.scaling import residual_tolerance

    assert residual_tolerance(torch.float32) == residual_tolerance(torch.float64) == 1e-3
    assert residual_tolerance(torch.float16) == residual_tolerance(torch.bfloat16) == 5e-2


def test_declared_scales_and_row_scales_closed_forms():
    tokens = torch.tensor([2, 3, 5])
    torch.testing.assert_close(
        declared_scales("token_mean", tokens, accumulate=2, loss_scale=8.0),
        torch.full((3,), 8.0 / 2 / 10, dtype=torch.float64),
    )
    torch.testing.assert_close(
        declared_scales("example_mean", tokens),
        1.0 / (3 * tokens.double()),
    )
    c = torch.tensor([0.25, 0.5, 0.0], dtype=torch.float64)
    assert row_scales(c).tolist() == [4.0, 2.0, 0.0]
    assert row_scales(c, tokens).tolist() == [2.0, 2.0 / 3.0, 0.0]


def test_capture_settings_round_trip_and_name_the_differing_fields():
    s = CaptureSettings(
        projection_dim=4,
        normalizer="adafactor",
        normalizer_source="file",
        normalizer_path="n.safetensors",
        include=["*.mlp.*"],
        head_cfgs={"attn": HeadConfig(num_heads=2, head_size=6)},
        loss_reduction="mean",
    )
    import json

    assert CaptureSettings.from_attrs(json.loads(json.dumps(s.to_attrs()))) == s
    other = dataclasses.replace(s, seed=3, include=None)
    assert s.diff(other) == ["seed", "include"]
    assert "seed: 0 != 3" in s.describe_diff(other)


# ------------------------------------------------------------------ strategies keep ids


def test_magic_module_under_the_bergson_strategy_keeps_example_ids():
    rows = batch_rows(*tiny_batches())
    without_ids = [{k: v for k, v in r.items() if k != "example_id"} for r in rows]
    scores = []
    for strategy, data in (("auto", rows), ("bergson", without_ids)):
        mm = MagicModule(tiny_model(), num_examples=6, optimizer="adamw", lr=1e-2)
        trainer(strategy=strategy, max_epochs=2).fit(
            mm, DataLoader(data, batch_size=2, shuffle=False)
        )
        scores.append(mm.attribute(tiny_query()))
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)


def test_ekfac_true_fisher_under_the_bergson_strategy_seeds_per_example(tmp_path):
    train = lm_batch(8, 6, seed=4)
    rows = batch_rows(train)
    rows = [{**r, "example_id": r["example_id"] - 100} for r in rows]  # dataset rows 0..7
    without_ids = [{k: v for k, v in r.items() if k != "example_id"} for r in rows]
    factors = []
    for strategy, data in (("auto", rows), ("bergson", without_ids)):
        net = tiny_gpt_neox(0, dtype=torch.float64, hidden_size=8, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=16)  # fmt: skip
        ek = EkfacModule(
            net, factors_dir=str(tmp_path / strategy), fisher="true", factor_dtype="float64"
        )
        trainer(strategy=strategy, max_epochs=ek.num_phases).fit(
            ek, DataLoader(data, batch_size=4, shuffle=False)
        )
        factors.append(ek)
    queries = DataLoader(batch_rows(lm_batch(2, 6, seed=9)), batch_size=2)
    train_loader = DataLoader(rows, batch_size=4)
    a = factors[0].pairwise_scores(queries, train_loader)
    b = factors[1].pairwise_scores(queries, train_loader)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


class KeysSeen(L.LightningModule):
    """``self.model(**batch).loss`` as a plain recipe writes it; records the keys it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.seen = tiny_gpt_neox(), []

    def training_step(self, batch, batch_idx):
        self.seen.append(sorted(batch))
        if "example_id" in batch:
            return self.model(**{k: v for k, v in batch.items() if k != "example_id"}).loss
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class KeysNeeded(KeysSeen):
    needs_example_id = True


@pytest.mark.parametrize(
    ("strategy", "module", "keeps"),
    [("bergson", KeysSeen, False), ("bergson", KeysNeeded, True), ("auto", KeysSeen, True)],
)
def test_the_strategy_strips_example_id_before_training_step(tmp_path, strategy, module, keeps):
    """The Bergson strategy removes ``example_id`` from the batch ``training_step`` sees (unless
    the module declares ``needs_example_id``); the rows still carry the ids."""
    from lightning_bergson import GradientCaptureCallback, GradientStore

    data = lm_batch(num=4, seq=6)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=2)
    net = module()
    trainer(cb, strategy=strategy).fit(net, DataLoader(batch_rows(data), batch_size=2))
    want = ["attention_mask", "input_ids", "labels"] + (["example_id"] if keeps else [])
    assert net.seen == [sorted(want)] * 2
    assert sorted(GradientStore.open(tmp_path / "g.zarr").example_ids.tolist()) == [
        100,
        101,
        102,
        103,
    ]
