"""EK-FAC factors against explicit accumulation, per-example oracles and closed forms."""

from __future__ import annotations

import pytest
import torch
from oracles import (
    batch_rows,
    explicit_covariances,
    lm_batch,
    module_grad,
    oracle_lm_grads,
    tiny_gpt_neox,
)
from recipes import trainer
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

from lightning_bergson import EkfacModule
from lightning_bergson.ekfac import EkfacFactors, NonFiniteFactorError, Preconditioner
from lightning_bergson.ekfac.accumulate import finalize_covariances

NUM, SEQ, BATCH = 12, 10, 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.fixture(scope="module", params=[(torch.float32, True), (torch.float64, False)])
def fitted(request, tmp_path_factory):
    dtype, bias = request.param
    model = tiny_gpt_neox(0, dtype=dtype)
    batch = lm_batch(NUM, SEQ, seed=3, prompt=True)  # labels -100 on attended prompt tokens
    ek = EkfacModule(
        model,
        factors_dir=str(tmp_path_factory.mktemp("ekfac")),
        include_bias=bias,
        factor_dtype="float64" if dtype == torch.float64 else "float32",
    )
    trainer(max_epochs=ek.num_phases).fit(ek, DataLoader(batch_rows(batch), batch_size=BATCH))
    return ek, batch, bias


def test_covariances_equal_explicit_token_sums(fitted):
    ek, batch, bias = fitted
    factors = EkfacFactors.load(ek.factors_dir)
    names = list(ek.tracked)
    assert len(names) == 8 and all("embed_out" not in n for n in names)
    explicit = explicit_covariances(ek.network, batch, names, bias)
    for n in names:
        f = factors.modules[n]
        assert _rel(f.activation_covariance, explicit[n][0]) <= 1e-5, n
        assert _rel(f.gradient_covariance, explicit[n][1]) <= 1e-5, n
        assert f.activation_covariance.shape[0] == ek.shapes[n][1]
    # A and S average over the tokens the attention mask keeps, prompt tokens included: their
    # outputs feed the later supervised tokens, so they are part of each example's gradient.
    tokens = int(batch["attention_mask"].sum())
    assert tokens > int((batch["labels"] != -100).sum())  # the prompts make the two differ
    assert set(factors.counts["activation"].values()) == {tokens}
    assert set(factors.counts["gradient"].values()) == {tokens}
    assert set(factors.counts["lambda"].values()) == {NUM}


def test_eigendecomposition_reconstructs_covariances(fitted):
    ek, _, _ = fitted
    for n, f in EkfacFactors.load(ek.factors_dir).modules.items():
        for cov, ev, q in [
            (f.activation_covariance, f.activation_eigenvalues, f.activation_eigenvectors),
            (f.gradient_covariance, f.gradient_eigenvalues, f.gradient_eigenvectors),
        ]:
            q, ev = q.double(), ev.double()
            eye = torch.eye(len(ev), dtype=torch.float64)
            assert torch.allclose(q.T @ q, eye, atol=1e-5), n
            assert _rel(q @ torch.diag(ev) @ q.T, cov) <= 1e-5, n
            assert bool((ev[1:] >= ev[:-1]).all())


def test_eigenvalue_correction_equals_rotated_oracle_gradients(fitted):
    ek, batch, bias = fitted
    oracle = oracle_lm_grads(ek.network, batch)  # torch.func vmap(grad) per example
    for n, f in EkfacFactors.load(ek.factors_dir).modules.items():
        g = module_grad(oracle, n, bias=bias).double()  # (B, O, I)
        q_s, q_a = f.gradient_eigenvectors.double(), f.activation_eigenvectors.double()
        explicit = torch.stack([(q_s.T @ g[i] @ q_a) ** 2 for i in range(NUM)]).mean(0)
        assert _rel(f.eigenvalue_correction, explicit) <= 1e-5, n


def test_true_fisher_is_independent_of_batching(tmp_path):
    batch = lm_batch(8, SEQ, seed=5)
    lams = []
    for size, fisher in [(2, "true"), (4, "true"), (4, "empirical")]:
        ek = EkfacModule(
            tiny_gpt_neox(0), factors_dir=str(tmp_path / f"{size}{fisher}"), fisher=fisher
        )
        trainer(max_epochs=ek.num_phases).fit(ek, DataLoader(batch_rows(batch), batch_size=size))
        lams.append(
            EkfacFactors.load(ek.factors_dir).modules["gpt_neox.layers.1.mlp.dense_4h_to_h"]
        )
    assert _rel(lams[0].gradient_covariance, lams[1].gradient_covariance) <= 1e-5
    assert _rel(lams[0].eigenvalue_correction, lams[1].eigenvalue_correction) <= 1e-4
    assert _rel(lams[0].gradient_covariance, lams[2].gradient_covariance) > 1e-2  # sampled labels
    assert _rel(lams[0].activation_covariance, lams[2].activation_covariance) <= 1e-6  # no labels


# ---------------------------------------------------------------- closed forms on a toy model


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ToyEkfac(EkfacModule):
    """EK-FAC of a token classifier: overriding example_losses is all a new task needs."""

    def example_losses(self, batch, *, sample=False):
        logits = self.network(batch["x"])  # (B, T, C)
        return nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["y"], reduction="none"
        ).sum(1)


def _toy(tmp_path, num: int = 64, tokens: int = 3):
    torch.manual_seed(0)
    net = ToyNet().double()
    data = {
        "x": torch.randn(num, tokens, 3, dtype=torch.float64),
        "y": torch.randint(0, 5, (num, tokens)),
    }
    ek = ToyEkfac(net, factors_dir=str(tmp_path / "toy"), factor_dtype="float64")
    trainer(max_epochs=ek.num_phases).fit(ek, DataLoader(batch_rows(data), batch_size=16))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, x, y):
        logits = functional_call(net, p, (x[None],))
        return nn.functional.cross_entropy(logits[0], y, reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, data["x"], data["y"])
    return ek, grads


def test_ihvp_matches_closed_forms_and_reports_error_to_exact_fisher(tmp_path):
    ek, grads = _toy(tmp_path)
    factors = EkfacFactors.load(ek.factors_dir)
    damping = 1e-3
    ekfac = Preconditioner.from_factors(
        factors, damping=damping, relative_damping=False, dtype=torch.float64
    )
    kfac = Preconditioner.from_factors(
        factors, damping=damping, relative_damping=False, method="kfac", dtype=torch.float64
    )
    for n in ("fc1", "fc2"):
        f = factors.modules[n]
        g = module_grad(grads, n, bias=True)  # (N, O, I)
        v = g[:4]
        o, i = g.shape[1:]
        eye = torch.eye(o * i, dtype=torch.float64)
        # K-FAC closed form: (S (x) A + damping I)^-1 vec(V) (row-major vec of [O, I]).
        dense_kfac = torch.kron(f.gradient_covariance, f.activation_covariance)
        want = torch.linalg.solve(dense_kfac + damping * eye, v.reshape(4, -1).T).T
        assert _rel(kfac.ihvp({n: v})[n].reshape(4, -1), want) <= 1e-8
        # EK-FAC closed form: U diag(vec Lambda) U^T with U = Q_S (x) Q_A.
        u = torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)
        dense_ekfac = u @ torch.diag(f.eigenvalue_correction.reshape(-1)) @ u.T
        want = torch.linalg.solve(dense_ekfac + damping * eye, v.reshape(4, -1).T).T
        assert _rel(ekfac.ihvp({n: v})[n].reshape(4, -1), want) <= 1e-8
        # Lambda is the diagonal of the exact (empirical) Fisher block in the eigenbasis ...
        flat = g.reshape(len(g), -1)
        fisher = flat.T @ flat / len(g)
        assert _rel(torch.diagonal(u.T @ fisher @ u), f.eigenvalue_correction.reshape(-1)) <= 1e-10
        # ... so EK-FAC is at least as close to it as K-FAC (Frobenius), and we report both.
        err_ek, err_k = _rel(dense_ekfac, fisher), _rel(dense_kfac, fisher)
        exact = torch.linalg.solve(fisher + damping * eye, v.reshape(4, -1).T).T
        ihvp_ek = _rel(ekfac.ihvp({n: v})[n].reshape(4, -1), exact)
        ihvp_k = _rel(kfac.ihvp({n: v})[n].reshape(4, -1), exact)
        print(
            f"{n}: block error EK-FAC {err_ek:.3f} K-FAC {err_k:.3f}; iHVP error "
            f"EK-FAC {ihvp_ek:.3f} K-FAC {ihvp_k:.3f}"
        )
        assert err_ek <= err_k


# ---------------------------------------------------------------- bad input


def test_non_finite_covariance_names_the_module(tmp_path):
    sums = {
        "fc/activation_sum": torch.ones(2, 2),
        "fc/activation_count": torch.tensor(2.0),
        "fc/gradient_sum": torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        "fc/gradient_count": torch.tensor(2.0),
    }
    with pytest.raises(NonFiniteFactorError, match="gradient covariance of module 'fc'"):
        finalize_covariances(sums, ["fc"])
    model = tiny_gpt_neox(0)
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[0, 0] = float("inf")
    ek = EkfacModule(model, factors_dir=str(tmp_path / "nan"))
    with pytest.raises(NonFiniteFactorError, match=r"module 'gpt_neox\.layers\.\d"):
        trainer(max_epochs=ek.num_phases).fit(
            ek, DataLoader(batch_rows(lm_batch(4, SEQ)), batch_size=4)
        )


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="fisher='exact' is not one of"):
        EkfacModule(tiny_gpt_neox(0), fisher="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs `model`"):
        EkfacModule()
    ek = EkfacModule(tiny_gpt_neox(0), factors_dir=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trainer(max_epochs=ek.num_phases).fit(
            ek, DataLoader(batch_rows(lm_batch(4, SEQ)), batch_size=4)
        )
