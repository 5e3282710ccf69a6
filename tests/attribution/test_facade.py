"""The Attributor facade and its parts: streamed scores against explicit matrix products,
the old private entry points, and every import path a concept had before it moved."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from lightning_bergson.attribution import Attributor, SecondMomentPreconditioner
from lightning_bergson.store import GradientStoreWriter, layout_blocks

BLOCKS = layout_blocks([("a", (2, 3), "a", None), ("b", (2, 2), "b", None)])
DIM = 10
IDS = np.r_[0:9, 0:9, 20:23]  # two epochs of 9 examples, then 3 more: 21 rows


@pytest.fixture()
def store_rows(tmp_path):
    path = tmp_path / "g.zarr"
    grads = torch.randn(len(IDS), DIM, generator=torch.Generator().manual_seed(0))
    meta = {"projection": {"dim": 0, "seed": 0}, "capture": {}}
    with GradientStoreWriter(
        path, modules=BLOCKS, dtype="float32", chunk_rows=4, metadata=meta
    ) as w:
        w.append(grads, example_id=IDS, step=0, epoch=0)
    return path, grads.double()


def _oracle(q, g, *, unit_norm, preconditioned, damping=0.1):
    """Scores ``[Q, N]`` by explicit algebra, block by block: ``H_b = G_b^T G_b / N`` damped,
    ``q H^-1 g`` summed over blocks, or the cosine of ``H^-1/2 q`` and ``H^-1/2 g``."""
    qs, gs = [], []
    for b in BLOCKS:
        qb, gb = q[:, b.offset : b.offset + b.size], g[:, b.offset : b.offset + b.size]
        if preconditioned:
            evals, evecs = torch.linalg.eigh(gb.T @ gb / len(gb))
            evals = evals.clamp(min=0)
            power = -0.5 if unit_norm else -1.0
            m = evecs @ torch.diag((evals + damping * evals.mean()) ** power) @ evecs.T
            qb, gb = qb @ m, (gb @ m if unit_norm else gb)
        qs.append(qb)
        gs.append(gb)
    q, g = torch.cat(qs, 1), torch.cat(gs, 1)
    if unit_norm:
        q, g = q / q.norm(dim=1, keepdim=True), g / g.norm(dim=1, keepdim=True)
    return q @ g.T


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_iter_scores_equal_explicit_products(store_rows, unit_norm, preconditioned):
    path, g = store_rows
    q = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    attr = Attributor(path, unit_norm=unit_norm, chunk_rows=5, dtype=torch.float64,
                      preconditioner="fit" if preconditioned else None)  # fmt: skip
    want = _oracle(q, g, unit_norm=unit_norm, preconditioned=preconditioned)
    for _ in range(2):  # the second scan reuses the cached row norms (cosine + H)
        chunks = list(attr.iter_scores(q))
        assert [c.start for c in chunks] == [0, 5, 10, 15, 20]
        np.testing.assert_array_equal(np.concatenate([c.example_ids for c in chunks]), IDS)
        got = torch.cat([c.scores for c in chunks], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_reduced_scores_and_the_module_subset(store_rows):
    """``example_reduce`` reduces in ``scores``/``search`` but never in ``iter_scores``;
    ``iter_scores(modules=...)`` scores only those blocks, chunk by chunk."""
    path, g = store_rows
    q = torch.randn(2, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    attr = Attributor(path, example_reduce="mean", chunk_rows=5, dtype=torch.float64)
    rows = torch.cat([c.scores for c in attr.iter_scores(q)], dim=1)
    torch.testing.assert_close(rows, q @ g.T)
    scores, ids = attr.scores(q)
    uniq = np.unique(IDS)
    want = torch.stack([(q @ g[i == IDS].T).mean(dim=1) for i in uniq], dim=1)
    np.testing.assert_array_equal(ids, uniq)
    assert scores.dtype == torch.float64  # reduced in the scoring dtype, not float32
    torch.testing.assert_close(scores, want, rtol=1e-12, atol=1e-12)
    top = attr.search(q, k=2)
    best = want.topk(2, dim=1)
    torch.testing.assert_close(top.scores, best.values)
    assert torch.equal(top.indices, torch.from_numpy(uniq)[best.indices])
    plain = Attributor(path, chunk_rows=5, dtype=torch.float64)
    seen = [(c.start, c.scores) for c in plain.iter_scores(q, modules=["b"])]
    b = BLOCKS[1]
    torch.testing.assert_close(
        torch.cat([s for _, s in seen], 1), q[:, b.offset :] @ g[:, b.offset :].T
    )
    assert [start for start, _ in seen] == [0, 5, 10, 15, 20]
    assert plain.encoder.rows(q).shape == (2, DIM)


MOVED = [  # "old module:old name" -> "new module:new name" (under lightning_bergson)
    ("attribution.reading:iter_rows", "store.scan:iter_rows"),
    ("attribution.scoring:prefetch", "store.scan:prefetch"),
    ("attribution.compat:check_model", "attribution.store_match:check_model"),
    ("attribution.compat:StoreMismatchError", "attribution.store_match:StoreMismatchError"),
    ("attribution.compat:resolve_network", "attribution.store_match:resolve_network"),
    ("attribution.loading:load_model", "networks:load_model"),
    ("attribution.loading:find_checkpoint", "networks:find_checkpoint"),
    ("attribution.loading:load_text_data", "data:load_text_data"),
    ("attribution.index:IndexModule", "index:IndexModule"),
    ("attribution:IndexModule", "index:IndexModule"),
    (":IndexModule", "index:IndexModule"),
    ("attribution:Preconditioner", "attribution.preconditioners:SecondMomentPreconditioner"),
    ("attribution.preconditioners:Preconditioner", "attribution:SecondMomentPreconditioner"),
    ("ekfac:Preconditioner", "ekfac.influence:EkfacPreconditioner"),
    ("models:check_model_source", "networks:check_model_source"),
    ("models:_build_network", "networks:build_network"),
]


def _resolve(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"lightning_bergson.{module}".rstrip(".")), name)


@pytest.mark.parametrize(("old", "new"), MOVED)
def test_old_import_paths_give_the_object_of_its_new_home(old, new):
    assert _resolve(old) is _resolve(new)


def test_the_two_preconditioners_have_distinct_names():
    from lightning_bergson.ekfac import EkfacPreconditioner

    assert SecondMomentPreconditioner.__name__ != EkfacPreconditioner.__name__
    assert not hasattr(Attributor, "process_queries")
