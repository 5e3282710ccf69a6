"""DDP (2 CPU processes, gloo): EK-FAC factors equal the single-process factors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracles import explicit_covariances, lm_batch, module_grad, oracle_lm_grads, tiny_gpt_neox

from lightning_bergson.ekfac import EkfacFactors
from lightning_bergson.ekfac.storage import read_factor

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ekfac_fit.py"


def _script():
    spec = importlib.util.spec_from_file_location("ekfac_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ekfac_ddp")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(root / "ddp"), "--devices", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "the distributed sampler repeated examples" in proc.stderr  # the padded run
    script = _script()
    for fisher in script.FISHERS:
        script.fit(root / "single" / fisher, fisher, devices=1)
    return root, script.FISHERS


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max())))


def _nonnull(eigenvalues: torch.Tensor) -> torch.Tensor:
    return eigenvalues > 1e-8 * eigenvalues.max()


@pytest.mark.slow
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_ddp_factors_equal_single_process(runs, fisher):
    root, _ = runs
    ddp, single = (
        EkfacFactors.load(root / "ddp" / fisher),
        EkfacFactors.load(root / "single" / fisher),
    )
    assert ddp.config["world_size"] == 2 and single.config["world_size"] == 1
    assert ddp.counts == single.counts  # no example padded in or dropped
    for name, s in single.modules.items():
        d = ddp.modules[name]
        assert _close(d.activation_covariance, s.activation_covariance), name
        assert _close(d.gradient_covariance, s.gradient_covariance), name
        assert _close(d.activation_eigenvalues, s.activation_eigenvalues), name
        assert _close(d.gradient_eigenvalues, s.gradient_eigenvalues), name
        # Eigenvectors are defined up to sign (Lambda squares it away) and, in degenerate
        # eigenspaces, up to rotation: 53 tokens leave S of the 96-wide qkv layer with a
        # 51-dim null space whose basis eigh picks arbitrarily from the rounding of the sums.
        # Lambda is compared where both eigenvalues are numerically nonzero.
        keep = _nonnull(s.gradient_eigenvalues)[:, None] & _nonnull(s.activation_eigenvalues)[None]
        lam_d, lam_s = d.eigenvalue_correction, s.eigenvalue_correction
        assert _close(lam_d[keep], lam_s[keep]), name


def test_ddp_writes_one_shard_per_rank_with_disjoint_modules(runs):
    root, _ = runs
    factors_dir = root / "ddp" / "empirical"
    config = EkfacFactors.load(factors_dir).config
    for kind in ("activation_covariance", "eigenvalue_correction"):
        shards = sorted((factors_dir / f"{kind}_sharded").glob("shard_*.safetensors"))
        assert [p.name for p in shards] == ["shard_0.safetensors", "shard_1.safetensors"]
        merged = read_factor(factors_dir, kind)
        assert sorted(merged) == sorted(config["modules"])
    assert {m["shard"] for m in config["modules"].values()} == {0, 1}


@pytest.mark.slow
def test_ddp_factors_equal_an_independent_single_process_oracle(runs):
    """Against plain autograd in one process (not the package): A and S are token sums of
    a a^T and g g^T over the attention mask, Lambda the mean of (Q_S^T G_i Q_A)^2 with G_i
    from torch.func per-example gradients (in the DDP run's own eigenbasis)."""
    root, _ = runs
    factors = EkfacFactors.load(root / "ddp" / "empirical")
    script = _script()
    batch = lm_batch(script.NUM_EXAMPLES, 10, seed=1)  # the script's documents
    net = tiny_gpt_neox(0, dtype=torch.float64)
    names = list(factors.modules)
    explicit = explicit_covariances(net, batch, names, bias=True)
    grads = oracle_lm_grads(net, batch)
    for n, f in factors.modules.items():
        assert _close(f.activation_covariance, explicit[n][0], rtol=1e-9), n
        assert _close(f.gradient_covariance, explicit[n][1], rtol=1e-9), n
        g = module_grad(grads, n, bias=True).double()  # (N, O, I+1)
        q_s, q_a = f.gradient_eigenvectors.double(), f.activation_eigenvectors.double()
        lam = torch.stack([(q_s.T @ g[i] @ q_a) ** 2 for i in range(len(g))]).mean(0)
        assert _close(f.eigenvalue_correction, lam, rtol=1e-8), n
