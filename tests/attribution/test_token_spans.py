"""Per-token attribution: the adjoint of capture, a planted span, and the refusals.

``parameter_directions`` is checked against its definition (``u . row == <P^T u, grad>``
with the row made by the collector's hooks and the gradient by autograd); the planted span
is a constructed case whose answer is known; each refusal is triggered on purpose.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import lm_batch, tiny_gpt_neox
from recipes import fit_with_capture
from torch import nn

from lightning_bergson import CausalLMModule, GradientCaptureCallback, HeadConfig
from lightning_bergson.attribution import Attributor
from lightning_bergson.attribution.directions import parameter_directions
from lightning_bergson.attribution.token_scores import TokenScoreMismatchError
from lightning_bergson.capture import AdafactorNormalizer, AdamNormalizer, GradientCollector
from lightning_bergson.losses import LossFnContractError


class _Net(nn.Module):
    """A Linear with a bias and output heads, an HF Conv1D, a grouped Conv1d."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.hf = Conv1D(4, 6)  # [in=6, out=4]
        self.conv = nn.Conv1d(4, 4, kernel_size=2, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, 5)
        h = torch.tanh(self.hf(torch.tanh(self.fc(x))))  # (B, S, 4)
        return self.conv(h.transpose(1, 2)).sum((1, 2))  # (B,)


@pytest.mark.parametrize("p", [0, 3])
def test_parameter_directions_are_the_adjoint_of_capture(p):
    """``u . row(loss) == <P^T u, d loss / d theta>``, the row by the hooks, the gradient by
    autograd: projection, heads (permuted), bias column, Adam and Adafactor normalizers."""
    torch.manual_seed(0)
    net = _Net().double()
    heads = {"fc": HeadConfig(num_heads=3, head_size=2, sections=2)}  # permuted
    col = GradientCollector(net, projection_dim=p, include=["fc", "hf", "conv"],
                            head_cfgs=heads, include_bias=True)  # fmt: skip
    col.set_normalizers({
        "fc": AdamNormalizer(torch.rand(6, 6, dtype=torch.float64) + 0.1),
        "hf": AdafactorNormalizer(torch.rand(4) + 0.5, torch.rand(7) + 0.5),
    })  # fmt: skip
    x = torch.randn(1, 7, 5, dtype=torch.float64)
    rows: dict[str, torch.Tensor] = {}
    col.closure = lambda name, r: rows.__setitem__(name, r.detach().double())
    weights = [m.weight for m in col.modules.values()]
    with col:
        torch.autograd.grad(net(x).sum(), weights)
    row = torch.cat([rows[b.name] for b in col.blocks], 1)  # (1, D)
    u = torch.randn(2, row.shape[1], dtype=torch.float64)
    dirs = parameter_directions(col, u, [b.name for b in col.blocks])
    params = dict(net.named_parameters())
    grads = torch.autograd.grad(net(x).sum(), [params[n] for n in dirs])
    got = sum((d * g).flatten(1).sum(1) for d, g in zip(dirs.values(), grads, strict=True))
    torch.testing.assert_close(got, (u @ row.T)[:, 0], rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``(path, network)``: a projected store of every linear module of a tiny GPT-NeoX."""
    net = tiny_gpt_neox()
    path = tmp_path_factory.mktemp("spans") / "g.zarr"
    cb = GradientCaptureCallback(path, dtype="float32", projection_dim=8)
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0, weight_decay=0.0),
                     lm_batch(num=3, seq=8), cb)  # fmt: skip
    return path, net


def _lm(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("unit_norm", [False, True])
def test_a_planted_span_is_the_highest_scoring_span(store, seed, unit_norm):
    """Document 0 holds the query's 6 tokens at positions 10-15 amid random tokens: the
    5-token window with the highest summed token scores, over all documents, is the one
    that predicts the span's tokens 11-15 (the loss of position 10's token is predicted from
    the random context before it)."""
    path, net = store
    gen = torch.Generator().manual_seed(seed)
    span = torch.randint(0, 97, (6,), generator=gen)
    docs = torch.randint(0, 97, (4, 24), generator=gen)
    docs[0, 10:16] = span
    attr = Attributor(path, dtype=torch.float64, unit_norm=unit_norm, preconditioner=None)
    scores = attr.token_scores(_lm(span[None]), net, _lm(docs))[0]  # (B, S)
    windows = scores.unfold(1, 5, 1).sum(-1)  # (B, S - 4): window t covers t..t+4
    best = divmod(int(windows.argmax()), windows.shape[1])
    assert best == (0, 11), windows.max(1)


def test_token_scores_refuse_what_they_cannot_check(store):
    path, net = store
    attr = Attributor(path, dtype=torch.float64, preconditioner=None)
    docs = lm_batch(num=2, seq=6, seed=5)
    q = attr.query_gradients(net, docs)
    with pytest.raises(LossFnContractError, match="token_loss_fn"):
        attr.token_scores(q, net, docs["input_ids"])  # not a causal-LM batch
    dense = net.gpt_neox.layers[1].attention.dense

    def tied(model, batch):  # a tracked weight used outside its module: the hooks miss it
        from lightning_bergson.losses import causal_lm_token_loss_fn

        losses = causal_lm_token_loss_fn()(model, batch)
        return losses + 0.1 * (dense.weight**2).sum() * (losses != 0)

    with pytest.raises(TokenScoreMismatchError, match="tied weights"):
        attr.token_scores(q, net, docs, token_loss_fn=tied)
    with pytest.raises(KeyError, match=r"\[999\]"):
        attr.query_token_scores(net, docs, example_ids=[100, 999])
    maxed = Attributor(path, preconditioner=None, example_reduce="max")
    with pytest.raises(ValueError, match="example_reduce='max'"):
        maxed.query_token_scores(net, docs)
