"""Our inner-product scores rank training examples like Bergson's (same model, same documents)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from oracles import example_losses, lm_batch, tiny_gpt_neox
from recipes import fit_with_capture

from lightning_bergson import CausalLMModule, GradientCaptureCallback
from lightning_bergson.attribution import Attributor

pytestmark = pytest.mark.compare


def bergson_scores(net, docs: list[list[int]], query: dict, tmp_path) -> np.ndarray:
    """Scores ``[Q, N]`` (in document order) from Bergson's index and ``Attributor.trace``."""
    bergson = pytest.importorskip("bergson")
    from datasets import Dataset

    cfg = bergson.IndexConfig(run_path=str(tmp_path / "bergson"), projection_dim=0)
    cfg.drop_columns = False  # keep input_ids: Bergson's dataset needs a column left
    processor = bergson.GradientProcessor(projection_dim=None)
    bergson.collect_gradients(net, Dataset.from_dict({"input_ids": docs}), processor, cfg)
    attr = bergson.Attributor(cfg.partial_run_path, device="cpu")
    with attr.trace(net.base_model, k=None) as result:
        logits = net(input_ids=query["input_ids"], attention_mask=query["attention_mask"]).logits
        example_losses(logits, query["labels"]).sum().backward()  # each query's summed loss
    net.zero_grad()
    scores = np.empty(tuple(result.indices.shape))
    np.put_along_axis(scores, result.indices.numpy(), result.scores.double().numpy(), axis=1)
    return scores


def test_inner_products_rank_like_bergson(tmp_path):
    from scipy.stats import spearmanr

    net = tiny_gpt_neox()
    data = lm_batch(num=12, seq=10)
    pairs = zip(data["input_ids"], data["attention_mask"], strict=True)
    docs = [ids[m.bool()].tolist() for ids, m in pairs]
    query = lm_batch(num=3, seq=8, seed=7)
    want = bergson_scores(copy.deepcopy(net), docs, query, tmp_path)  # (3, 12)

    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=0, dtype="float32")
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0, weight_decay=0.0), data, cb)
    attr = Attributor(tmp_path / "g.zarr", dtype=torch.float64)
    got, ids = attr.scores(attr.query_gradients(net, query))
    got = got.numpy()[:, np.argsort(ids)]  # example ids 100.. are the document order

    for q in range(3):
        rho = spearmanr(got[q], want[q]).statistic
        assert rho >= 0.999, (q, rho)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
