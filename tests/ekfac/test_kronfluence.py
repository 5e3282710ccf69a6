"""Our EK-FAC pairwise scores against Kronfluence's on the same tiny GPT-NeoX and documents.

Same setting on both sides: empirical Fisher (dataset labels), summed token losses for
training and query gradients, attention-masked token counts, every Linear but the output
embedding (``lm_head``) with biases, damping ``0.1 * mean(Lambda)`` per module
(Kronfluence's ``damping_factor=None``; our ``damping=0.1, relative_damping=True``),
float32, no AMP.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from oracles import batch_rows, lm_batch, tiny_gpt_neox
from recipes import trainer
from torch.utils.data import DataLoader

from lightning_bergson import EkfacModule
from lightning_bergson.models import causal_lm_losses

pytestmark = pytest.mark.compare

NUM_TRAIN, NUM_QUERY, SEQ = 32, 4, 12


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def kronfluence_scores(model, train_rows, query_rows, tracked, out_dir, batch_size=8):
    """Kronfluence's EK-FAC pairwise scores ``[Q, N]`` (model is deep-copied: it gets wrapped)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            assert not sample, "the comparison uses the empirical Fisher"
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            return causal_lm_losses(logits, batch["labels"])[0].sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(tracked)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LMTask()
    wrapped = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer("cmp", wrapped, task, cpu=True, output_dir=str(out_dir), disable_tqdm=True)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    analyzer.fit_all_factors(
        "ekfac",
        train_rows,
        factor_args=factor_args,
        per_device_batch_size=batch_size,
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        query_rows,
        train_rows,
        per_device_query_batch_size=len(query_rows),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("scores")["all_modules"]


def test_pairwise_scores_match_kronfluence(tmp_path):
    pytest.importorskip("kronfluence")
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model = tiny_gpt_neox(0)
    train, queries = lm_batch(NUM_TRAIN, SEQ, seed=11), lm_batch(NUM_QUERY, SEQ, seed=12)
    ek = EkfacModule(model, factors_dir=str(tmp_path / "ours"))
    train_loader = DataLoader(batch_rows(train, drop=("example_id",)), batch_size=8)
    trainer(max_epochs=ek.num_phases).fit(ek, train_loader)
    ours = ek.pairwise_scores(
        DataLoader(batch_rows(queries, drop=("example_id",)), batch_size=NUM_QUERY),
        train_loader,
        damping=0.1,
        relative_damping=True,
    )
    theirs = kronfluence_scores(
        model,
        batch_rows(train, drop=("example_id",)),
        batch_rows(queries, drop=("example_id",)),
        ek.tracked,
        tmp_path / "kf",
    )
    assert theirs.shape == ours.shape == (NUM_QUERY, NUM_TRAIN)
    for q in range(NUM_QUERY):
        rho = _spearman(ours[q], theirs[q].to(ours))
        assert rho >= 0.999, (q, rho)
        assert ours[q].topk(5).indices.tolist() == theirs[q].topk(5).indices.tolist(), q
    rel = float((ours - theirs.to(ours)).norm() / theirs.norm())
    rhos = [round(_spearman(ours[q], theirs[q].to(ours)), 6) for q in range(NUM_QUERY)]
    print(f"per-query Spearman vs Kronfluence: {rhos}; relative score difference {rel:.2e}")
    assert rel <= 1e-5, rel  # the README quotes 5e-7 (float32 on both sides)
    assert min(rhos) >= 0.9999, rhos
