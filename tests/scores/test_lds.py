"""Linear datamodeling score: Spearman, subsets, sign conventions, and the ``lds`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from lightning_bergson.cli import main
from lightning_bergson.magic.lds import (
    linear_datamodeling_score,
    predicted_losses,
    retrain_losses,
    sample_subsets,
    spearman,
)
from lightning_bergson.scores import ScoreArray

ROOT = Path(__file__).resolve().parents[2]


def test_spearman_matches_the_closed_form_and_scipy_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (20 * (20**2 - 1)))
    stats = pytest.importorskip("scipy.stats")
    x, y = np.array([1.0, 2, 2, 3, 3, 3, 0]), np.array([1.0, 3, 2, 4, 4, 0, 1])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_subsets_are_seeded_and_keep_the_fraction():
    masks = sample_subsets(40, 6, 0.25, seed=3)
    assert masks.shape == (6, 40) and masks.sum(1).tolist() == [10] * 6
    assert torch.equal(masks, sample_subsets(40, 6, 0.25, seed=3))
    assert not torch.equal(masks, sample_subsets(40, 6, 0.25, seed=4))
    with pytest.raises(ValueError, match=r"keep_fraction=1\.0 must be in"):
        sample_subsets(40, 6, 1.0, seed=3)


def test_exactly_linear_losses_give_lds_one_in_either_convention(tmp_path):
    rng = np.random.default_rng(1)
    meta = rng.normal(size=(3, 30))  # (Q, N) dL/dw
    masks = sample_subsets(30, 12, 0.5, seed=0)
    calls = []

    def retrain(mask):  # L(w) = L(1) + sum_i dL/dw_i (w_i - 1): removing i changes L by -meta_i
        calls.append(1)
        return 2.0 - meta @ (1.0 - mask.double().numpy()), "order"

    cache = tmp_path / "retrains.safetensors"
    retrain_losses(retrain, masks[:5], cache, data_order="order")  # an interrupted evaluation
    measured = retrain_losses(retrain, masks, cache, data_order="order")  # resumes at subset 5
    assert len(calls) == 12 and load_file(str(cache))["losses"].shape == (12, 3)
    ids = np.arange(30)
    as_meta = predicted_losses(meta, "metagradient", masks, ids)
    as_influence = predicted_losses(-meta, "influence", masks, ids)
    np.testing.assert_allclose(linear_datamodeling_score(as_meta, measured), 1.0)
    np.testing.assert_allclose(linear_datamodeling_score(as_influence, measured), 1.0)
    flipped = predicted_losses(meta, "influence", masks, ids)
    np.testing.assert_allclose(linear_datamodeling_score(flipped, measured), -1.0)
    with pytest.raises(ValueError, match="another data order"):
        retrain_losses(retrain, masks, tmp_path / "other.safetensors", data_order="shuffled")


def test_fit_then_lds_commands_on_the_shipped_config(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "magic.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False)
    cfg["model"]["init_args"].update(
        query_facts=[0, 1],
        scores_path=str(tmp_path / "scores.zarr"),
        reverse_state_path=str(tmp_path / "reverse.safetensors"),
    )
    cfg["data"]["init_args"].update(num_people=2, batch_size=8, cache_dir=str(tmp_path / "c"))
    path = tmp_path / "magic.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    scores = ScoreArray.open(tmp_path / "scores.zarr")
    assert scores.convention == "metagradient" and scores.method == "magic"
    assert scores.scores.shape == (2, len(scores.example_ids)) and np.isfinite(scores.scores).all()
    assert not (tmp_path / "reverse.safetensors").exists()
    out, cache = tmp_path / "lds.json", tmp_path / "retrains.safetensors"
    lds_args = ["--fit_config", str(path), "--num_subsets", "4", "--output", str(out)]
    main(["lds", "--scores", str(tmp_path / "scores.zarr"), *lds_args, "--retrains", str(cache)])
    per_query = json.loads(out.read_text())["lds"][str(tmp_path / "scores.zarr")]
    assert "magic" in capsys.readouterr().out
    # by hand: predicted loss of subset m = sum of the kept examples' metagradients (removing
    # example i changes the loss by about -score_i), Spearman by 1 - 6 sum d^2 / (n (n^2 - 1))
    saved = load_file(str(cache))
    masks, measured = saved["masks"].astype(bool), saved["losses"]  # (4, N), (4, Q)
    assert masks.shape[0] == 4 and measured.shape == (4, 2)
    kept = masks[:, scores.example_ids].astype(np.float64)  # (4, N')
    for q in range(2):
        predicted = kept @ scores.scores[q].astype(np.float64)  # (4,)
        d = np.argsort(np.argsort(predicted)) - np.argsort(np.argsort(measured[:, q]))
        assert per_query[q] == pytest.approx(1 - 6 * (d**2).sum() / (4 * (4**2 - 1)))
