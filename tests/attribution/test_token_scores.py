"""Per-token attribution: token scores against the stored rows' scores, a per-token autograd
oracle with every processing step written out, a planted span, and the refusals.

Stores are captured with ``lr=0`` so a document's stored row is the row of the parameters
the token scores are computed with.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from oracles import lm_batch, tiny_gpt_neox
from recipes import fit_with_capture

from lightning_bergson import CausalLMModule, GradientCaptureCallback, GradientStore, HeadConfig
from lightning_bergson.attribution import Attributor
from lightning_bergson.capture import AdafactorNormalizer
from lightning_bergson.capture.normalizers import load_normalizers, save_normalizers
from lightning_bergson.capture.projection import projection_matrix

QKV = "gpt_neox.layers.0.attention.query_key_value"
DENSE = "gpt_neox.layers.1.attention.dense"
MLP = "gpt_neox.layers.1.mlp.dense_4h_to_h"
NEOX = {
    "heads": {  # output- and input-axis heads, projected, Adafactor from a file
        "projection_dim": 4,
        "include": [QKV, DENSE, MLP],
        "head_cfgs": {
            QKV: HeadConfig(num_heads=4, head_size=24),
            DENSE: HeadConfig(num_heads=2, head_size=16, axis="input"),
        },
        "normalizer": "adafactor",
    },
    "exact_mean_bias": {  # exact gradients, a bias column, token means
        "projection_dim": 0,
        "include": [DENSE, "gpt_neox.layers.0.attention.dense"],
        "include_bias": True,
        "loss_reduction": "mean",
    },
}
SCORINGS = [(False, None), (False, "fit"), (True, None), (True, "fit")]  # (unit_norm, pre)


def _docs(num: int = 5, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    return lm_batch(num=num, seq=seq, seed=seed)


def _query() -> dict[str, torch.Tensor]:
    batch = lm_batch(num=2, seq=7, seed=11)
    batch["labels"][0, :4] = -100  # the first query scores only its last tokens (an answer)
    return batch


def _store(tmp, net, settings: dict) -> tuple:
    kwargs = dict(settings)
    norms = None
    if kwargs.get("normalizer") == "adafactor":
        gen = torch.Generator().manual_seed(3)
        norms = {
            name: AdafactorNormalizer(
                torch.rand(mod.out_features, generator=gen) + 0.5,
                torch.rand(mod.in_features + kwargs.get("include_bias", False), generator=gen)
                + 0.5,
            )
            for name, mod in ((m, net.get_submodule(m)) for m in kwargs["include"])
        }
        save_normalizers(tmp / "norms.safetensors", norms)
        kwargs.update(normalizer_source="file", normalizer_path=str(tmp / "norms.safetensors"))
    cb = GradientCaptureCallback(tmp / "g.zarr", dtype="float32", **kwargs)
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0, weight_decay=0.0), _docs(), cb)
    return tmp / "g.zarr"


@pytest.fixture(scope="module", params=list(NEOX))
def neox(request, tmp_path_factory):
    """``(case, store path, network)``: a tiny GPT-NeoX and a store of ``_docs()``."""
    net = tiny_gpt_neox()
    return (
        request.param,
        _store(tmp_path_factory.mktemp(request.param), net, NEOX[request.param]),
        net,
    )


def _columns(attr: Attributor, ids: np.ndarray, docs: dict) -> list[int]:
    where = {int(i): j for j, i in enumerate(ids)}
    return [where[int(i)] for i in docs["example_id"]]


@pytest.mark.parametrize(("unit_norm", "pre"), SCORINGS)
def test_document_token_scores_add_up_to_the_stored_rows_scores(neox, unit_norm, pre):
    """Inner product: the sum over positions is the document's score exactly; cosine: the
    document's normalization applied to each token, so it sums to the cosine."""
    _, path, net = neox
    attr = Attributor(path, dtype=torch.float64, unit_norm=unit_norm, preconditioner=pre)
    docs = _docs()
    q = attr.query_gradients(net, _query())  # (2, D)
    tokens = attr.token_scores(q, net, docs)  # (Q, B, S)
    want, ids = attr.scores(q)  # (Q, N), stored float32 rows
    assert tokens.shape == (2, 5, 9) and tokens.dtype == torch.float64
    want = want[:, _columns(attr, ids, docs)]
    # The stored rows are float32 (relative rounding ~6e-8 each entry): the error a score can
    # carry is |u| |row| times that, u the processed query (H^-1 amplifies it where the
    # stored rows span few directions); cosines are bounded by 1.
    stored = GradientStore.open(path).read(slice(None), dtype=torch.float64)
    rows = stored[_columns(attr, ids, docs)]
    u = _explicit_preconditioned(attr.store, q, -1.0) if pre else q
    bound = 1e-6 * u.norm(dim=1)[:, None] * rows.norm(dim=1)[None, :]
    err = (tokens.sum(-1) - want).abs()
    assert (err <= (1e-4 if unit_norm else bound)).all(), (err, bound)
    unsupervised = docs["labels"] == -100
    unsupervised[:, 0] = True  # position 0 is never predicted
    assert (tokens[:, unsupervised] == 0).all()
    # a query batch is encoded with the same encoder
    torch.testing.assert_close(attr.token_scores(_query(), net, docs), tokens)


def _token_losses(net, batch, i: int, reduction: str) -> list[torch.Tensor | None]:
    """Token losses of document ``i`` alone, written out (position t predicts token t;
    ``None`` where no loss is taken)."""
    logits = net(input_ids=batch["input_ids"][i : i + 1]).logits[0]  # (S, V)
    labels = batch["labels"][i]
    count = int((labels[1:] != -100).sum()) if reduction == "mean" else 1
    losses: list[torch.Tensor | None] = [None]
    for t in range(1, len(labels)):
        loss = torch.nn.functional.cross_entropy(logits[t - 1], labels[t])
        losses.append(None if labels[t] == -100 else loss / count)
    return losses


def _explicit_row(grads: dict, store: GradientStore, norms: dict | None) -> torch.Tensor:
    """A row by the store's definition: normalize, split heads, project ``L G R^T``."""
    p, seed = store.attrs["projection"]["dim"], store.attrs["projection"]["seed"]
    heads = store.attrs["capture"]["head_cfgs"]
    parts = []
    for block in store.modules:
        g = grads[block.parent]  # (O, I[+1])
        if norms is not None:
            r, c = norms[block.parent].row.double(), norms[block.parent].col.double()
            g = g / r.sqrt()[:, None] / (c / r.mean()).sqrt()[None, :]
        if block.head is not None:
            size, axis = heads[block.parent]["head_size"], heads[block.parent]["axis"]
            part = slice(block.head * size, (block.head + 1) * size)
            g = g[part] if axis == "output" else g[:, part]
        if p:
            left = projection_matrix(p, g.shape[0], seed=seed, key=block.name, side="left",
                                     dtype=torch.float64)  # fmt: skip
            right = projection_matrix(p, g.shape[1], seed=seed, key=block.name, side="right",
                                      dtype=torch.float64)  # fmt: skip
            g = left @ g @ right.T
        parts.append(g.flatten())
    return torch.cat(parts)


def _explicit_token_rows(net, batch, store: GradientStore, norms) -> torch.Tensor:
    """``[B, S, D]``: one ``autograd.grad`` per document and position, then ``_explicit_row``."""
    bias = store.attrs["capture"]["include_bias"]
    parents = list(dict.fromkeys(b.parent for b in store.modules))
    params = [net.get_submodule(m).weight for m in parents]
    params += [net.get_submodule(m).bias for m in parents] if bias else []
    batch_rows = []
    for i in range(len(batch["input_ids"])):
        losses = _token_losses(net, batch, i, store.attrs["loss_reduction"])
        rows = []
        for loss in losses:
            if loss is None:
                rows.append(torch.zeros(store.dim, dtype=torch.float64))
                continue
            got = torch.autograd.grad(loss, params, retain_graph=True)
            grads = {m: got[k] for k, m in enumerate(parents)}
            if bias:
                grads = {m: torch.cat([g, got[len(parents) + k][:, None]], 1)
                         for k, (m, g) in enumerate(grads.items())}  # fmt: skip
            rows.append(_explicit_row(grads, store, norms))
        batch_rows.append(torch.stack(rows))
    return torch.stack(batch_rows)  # (B, S, D)


@functools.cache
def _explicit_powers(path: str, power: float) -> tuple[torch.Tensor, ...]:
    """``(H + c tr(H)/d I)^power`` per block, ``H = G^T G / N`` of the stored rows ``G``, in
    closed form from the thin SVD ``G = U S V^T``: ``lam^p I + V ((S^2/N + lam)^p - lam^p) V^T``
    (no ``d x d`` eigendecomposition, as the preconditioner does)."""
    store = GradientStore.open(path)
    rows = store.read(slice(None), dtype=torch.float64)
    mats = []
    for b in store.modules:
        g = rows[:, b.offset : b.offset + b.size]  # (N, d)
        _, sv, vt = torch.linalg.svd(g, full_matrices=False)
        ev = sv**2 / len(g)  # the non-zero eigenvalues of H
        lam = 0.1 * float(ev.sum()) / b.size  # c * mean eigenvalue, c = 0.1
        mid = (ev + lam) ** power - lam**power
        mats.append(
            lam**power * torch.eye(b.size, dtype=torch.float64) + vt.T @ (mid[:, None] * vt)
        )
    return tuple(mats)


def _explicit_preconditioned(store: GradientStore, x: torch.Tensor, power: float) -> torch.Tensor:
    """``H^power x`` per block with ``H`` the stored rows' second moment (closed form)."""
    mats = _explicit_powers(str(store.path), power)
    x = x.to(torch.float64)
    return torch.cat([x[..., b.offset : b.offset + b.size] @ m
                      for b, m in zip(store.modules, mats, strict=True)], -1)  # fmt: skip


def _oracle_scores(q, c, store, unit_norm: bool, pre: bool) -> torch.Tensor:
    """``[Q, B, S]`` from query rows ``[Q, D]`` and token rows ``[B, S, D]``."""
    if not unit_norm:
        x = _explicit_preconditioned(store, q, -1.0) if pre else q
        return torch.einsum("qd,bsd->qbs", x, c)
    power = (lambda x: _explicit_preconditioned(store, x, -0.5)) if pre else (lambda x: x)
    qh = power(q)
    qh = qh / qh.norm(dim=1, keepdim=True)
    docs = power(c.sum(1)).norm(dim=1)  # (B,) |H^-1/2 row_i|
    return torch.einsum("qd,bsd->qbs", qh, power(c)) / docs[None, :, None]


@pytest.mark.parametrize(("unit_norm", "pre"), SCORINGS)
def test_document_token_scores_equal_a_per_token_autograd_oracle(neox, unit_norm, pre):
    case, path, net = neox
    net64 = copy.deepcopy(net).double()
    store = GradientStore.open(path)
    norms = load_normalizers(store.attrs["normalizer"]["path"]) if case == "heads" else None
    docs = _docs(num=3)
    c = _explicit_token_rows(net64, docs, store, norms)  # (B, S, D)
    query = _query()
    q = _explicit_token_rows(net64, query, store, norms).sum(1)  # (Q, D)
    attr = Attributor(path, dtype=torch.float64, unit_norm=unit_norm, preconditioner=pre)
    got = attr.token_scores(q, net64, docs)
    want = _oracle_scores(q, c, store, unit_norm, pre is not None)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))
    # query side: each query token's row against every stored row
    got_q, ids = attr.query_token_scores(net64, query)  # (Q, S_q, N)
    stored = store.read(slice(None), dtype=torch.float64)  # (N, D)
    cq = _explicit_token_rows(net64, query, store, norms)  # (Q, S_q, D)
    want_q = _oracle_scores_query(cq, stored, store, unit_norm, pre is not None)
    np.testing.assert_array_equal(ids, store.example_ids)
    torch.testing.assert_close(got_q, want_q, rtol=1e-7, atol=1e-9 * float(want_q.abs().max()))


def _oracle_scores_query(cq, stored, store, unit_norm: bool, pre: bool) -> torch.Tensor:
    """``[Q, S_q, N]``: each query token's share of its query's score against each stored row."""
    if not unit_norm:
        x = _explicit_preconditioned(store, cq, -1.0) if pre else cq
        return x @ stored.T
    power = (lambda x: _explicit_preconditioned(store, x, -0.5)) if pre else (lambda x: x)
    qnorm = power(cq.sum(1)).norm(dim=1)  # (Q,)
    g = power(stored)
    g = g / g.norm(dim=1, keepdim=True)
    return (power(cq) / qnorm[:, None, None]) @ g.T


@pytest.mark.parametrize("reduce", ["none", "mean"])
def test_query_token_scores_add_up_to_the_query_scores(neox, reduce):
    _, path, net = neox
    for unit_norm, pre in SCORINGS:
        attr = Attributor(path, dtype=torch.float64, unit_norm=unit_norm, preconditioner=pre,
                          example_reduce=reduce)  # fmt: skip
        query = _query()
        got, ids = attr.query_token_scores(net, query)  # (Q, S_q, n)
        want, want_ids = attr.scores(attr.query_gradients(net, query))
        np.testing.assert_array_equal(ids, want_ids)
        torch.testing.assert_close(got.sum(1), want, rtol=2e-5, atol=1e-6 * float(want.abs().max()))
        assert (got[0, :4] == 0).all()  # the prompt of query 0 takes no loss
        some, some_ids = attr.query_token_scores(net, query, example_ids=[103, 101])
        keep = np.isin(want_ids, [101, 103])
        np.testing.assert_array_equal(some_ids, want_ids[keep])
        torch.testing.assert_close(some, got[..., torch.from_numpy(keep)])
