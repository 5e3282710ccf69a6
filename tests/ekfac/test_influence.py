"""EK-FAC influence scores against brute force; stores, checkpoints, plots and the CLI."""

from __future__ import annotations

import pytest
import torch
import yaml
from oracles import MICRO, lm_batch, micro_gpt_neox, module_grad, oracle_lm_grads
from oracles import batch_rows as _rows
from recipes import trainer
from torch.utils.data import DataLoader

from lightning_bergson import CausalLMModule, EkfacModule, GradientCaptureCallback, TextDataModule
from lightning_bergson.cli import main
from lightning_bergson.ekfac import EkfacFactors, top_influences
from lightning_bergson.scores import ScoreArray

SEQ = 10
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model = micro_gpt_neox()
    train, queries = lm_batch(10, SEQ, seed=1), lm_batch(3, SEQ, seed=2)
    ek = EkfacModule(model, factors_dir=str(tmp_path_factory.mktemp("ek")), factor_dtype="float64")
    loader = DataLoader(_rows(train), batch_size=5)
    trainer(max_epochs=ek.num_phases).fit(ek, loader)
    assert ek.phase == "done"
    return ek, train, queries


def _brute_force(ek, train, queries, method: str, damping: float = 0.1):
    """sum_modules vec(G_q)^T (H + d I)^-1 vec(G_t) with dense H from the stored factors."""
    gq, gt = oracle_lm_grads(ek.network, queries), oracle_lm_grads(ek.network, train)
    total = 0
    for n, f in EkfacFactors.load(ek.factors_dir).modules.items():
        q = module_grad(gq, n, bias=True).reshape(len(queries["input_ids"]), -1)
        t = module_grad(gt, n, bias=True).reshape(len(train["input_ids"]), -1)
        if method == "ekfac":
            eig = f.eigenvalue_correction.reshape(-1)
        else:
            eig = torch.outer(f.gradient_eigenvalues, f.activation_eigenvalues).reshape(-1)
        u = torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)
        dense = u @ torch.diag(eig + damping * eig.mean()) @ u.T
        total = total + torch.linalg.solve(dense, q.T).T @ t.T
    return total


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_pairwise_scores_equal_brute_force(fitted, tmp_path, method):
    ek, train, queries = fitted
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shuffled = DataLoader([_rows(train)[i] for i in perm], batch_size=4)
    out = tmp_path / "scores.zarr"
    scores = ek.pairwise_scores(
        DataLoader(_rows(queries), batch_size=2), shuffled, method=method, out=out
    )
    want = _brute_force(ek, train, queries, method)
    assert scores.shape == (3, 10)
    assert torch.allclose(scores.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max())
    saved = ScoreArray.open(out)
    assert (saved.method, saved.convention) == ("ekfac", "influence")
    assert saved.example_ids.tolist() == list(range(100, 110))  # columns by example id
    assert saved.query_ids.tolist() == [100, 101, 102]
    top = top_influences(scores, k=3, example_ids=torch.as_tensor(saved.example_ids))
    order = want.argsort(dim=1, descending=True)
    assert torch.equal(top.positive_ids, order[:, :3] + 100)
    assert torch.equal(top.negative_ids, want.argsort(dim=1)[:, :3] + 100)


def test_self_scores_are_the_diagonal(fitted):
    ek, train, _ = fitted
    loader = DataLoader(_rows(train), batch_size=4)
    pair = ek.pairwise_scores(loader, loader, damping=1e-3, relative_damping=False)
    self_scores = ek.self_scores(loader, damping=1e-3, relative_damping=False)
    assert torch.allclose(self_scores, torch.diagonal(pair), rtol=1e-8)
    assert bool((self_scores > 0).all())


def test_inspect_factors_writes_pngs(fitted, tmp_path):
    ek, _, _ = fitted
    paths = ek.inspect_factors("gpt_neox.layers.0.mlp.dense_h_to_4h", tmp_path)
    assert [p.name for p in paths] == [
        "gpt_neox.layers.0.mlp.dense_h_to_4h_heatmaps.png",
        "gpt_neox.layers.0.mlp.dense_h_to_4h_spectra.png",
        "lambda_spectra.png",
    ]
    assert all(
        p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths
    )
    with pytest.raises(KeyError, match="available"):
        ek.inspect_factors("nope", tmp_path)


def test_store_gradients_checkpoint_and_projected_store(tmp_path):
    """Train a CausalLMModule at lr=0 with exact capture; EK-FAC from its checkpoint and store."""
    train = lm_batch(8, SEQ, seed=4)
    loader = DataLoader(_rows(train), batch_size=4)
    lm = CausalLMModule(config=MICRO, lr=0.0)
    cbs = [
        GradientCaptureCallback(
            tmp_path / "exact.zarr", projection_dim=0, include_bias=True, dtype="float32"
        ),
        GradientCaptureCallback(tmp_path / "proj.zarr", projection_dim=4),
    ]
    run = trainer(*cbs, max_epochs=1)
    run.fit(lm, loader)
    run.save_checkpoint(tmp_path / "lm.ckpt")
    ek = EkfacModule(str(tmp_path / "lm.ckpt"), factors_dir=str(tmp_path / "ek"))
    for p, q in zip(ek.network.parameters(), lm.model.parameters(), strict=True):
        assert torch.equal(p, q)
    trainer(max_epochs=ek.num_phases).fit(ek, loader)
    queries = DataLoader(_rows(lm_batch(2, SEQ, seed=9)), batch_size=2)
    live = ek.pairwise_scores(queries, loader)
    stored = ek.pairwise_scores(queries, store=tmp_path / "exact.zarr")
    assert torch.allclose(stored, live, rtol=1e-4, atol=1e-4 * live.abs().max())
    with pytest.raises(ValueError, match=r"randomly projected.*projection_dim=0"):
        ek.pairwise_scores(queries, store=tmp_path / "proj.zarr")
    with pytest.raises(ValueError, match="exactly one of"):
        ek.self_scores(loader, store=tmp_path / "exact.zarr")


def test_resume_from_a_phase_checkpoint(fitted, tmp_path):
    ek_ref, train, _ = fitted
    loader = DataLoader(_rows(train), batch_size=5)
    ek = EkfacModule(micro_gpt_neox(), factors_dir=str(tmp_path / "f"), factor_dtype="float64")
    run = trainer(max_epochs=1)
    with pytest.warns(UserWarning, match="stopped after 1 of 2 phases"):
        run.fit(ek, loader)
    run.save_checkpoint(tmp_path / "phase1.ckpt")
    assert ek.phase == "eigenvalue_correction"
    ek2 = EkfacModule(micro_gpt_neox(), factors_dir=str(tmp_path / "f"), factor_dtype="float64")
    trainer(max_epochs=ek2.num_phases).fit(ek2, loader, ckpt_path=tmp_path / "phase1.ckpt")
    got = EkfacFactors.load(tmp_path / "f").modules
    ref = EkfacFactors.load(ek_ref.factors_dir).modules
    for n, f in ref.items():
        assert torch.allclose(got[n].eigenvalue_correction, f.eigenvalue_correction, rtol=1e-10)


def test_cli_fit_with_the_shipped_config(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "ekfac.yaml").read_text())
    assert cfg["model"]["class_path"] == "lightning_bergson.EkfacModule"
    cfg["trainer"].update(default_root_dir=str(tmp_path), enable_progress_bar=False)
    cfg["model"]["init_args"]["factors_dir"] = str(tmp_path / "factors")
    cfg["model"]["init_args"]["config"].update(hidden_size=16, intermediate_size=32)
    cfg["data"]["init_args"].update(num_people=8, max_length=24, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "ekfac.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    factors = EkfacFactors.load(tmp_path / "factors")
    assert factors.config["phases_completed"] == ["covariance", "eigenvalue_correction"]
    documents = len(TextDataModule(num_people=8).texts)
    assert set(factors.counts["lambda"].values()) == {documents}
