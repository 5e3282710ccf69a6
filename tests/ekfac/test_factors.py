"""EK-FAC factors against explicit accumulation, per-example oracles and closed forms."""

from __future__ import annotations

import re

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
from lightning_bergson.ekfac import factors as F
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


# ------------------------------------------ factor math against explicit sums and matrices


def _f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_factor_math_token_rows_bias_column_and_covariance():
    x = torch.arange(12.0).reshape(2, 3, 2)  # (B=2, S=3, D=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows, count = F.masked_token_rows(x, mask)
    want = [[0, 1], [2, 3], [0, 0], [6, 7], [0, 0], [0, 0]]
    assert torch.equal(rows, torch.tensor(want, dtype=torch.float32))
    assert count.dtype == torch.float64 and float(count) == 3
    for m in (None, torch.ones(2, 2)):  # no mask, or one that is not per token: all rows
        rows, count = F.masked_token_rows(x, m)
        assert torch.equal(rows, x.reshape(6, 2)) and count.dtype == torch.float64
        assert float(count) == 6
    rows, _ = F.masked_token_rows(x, mask.double())  # a float64 mask keeps float32 rows
    assert rows.dtype == torch.float32 and torch.equal(
        rows, torch.tensor(want, dtype=torch.float32)
    )
    rows, count = F.masked_token_rows(x.double(), mask.bool())
    assert rows.dtype == torch.float64 and float(count) == 3
    assert torch.equal(rows[3], _f64([6, 7])) and not rows[2].any()

    a = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (2, 1, 2)
    assert torch.equal(F.with_bias_column(a), torch.tensor([[[1.0, 2, 1]], [[3, 4, 1]]]))
    r = _f64([[1, 2, 0], [0, 1, 3]])
    explicit = sum(torch.outer(row, row) for row in r)
    assert torch.equal(F.covariance_sum(r), explicit)


def test_factor_math_eigendecomposition_in_float64():
    # [[2, 1.5], [0.5, 2]] is symmetrized to [[2, 1], [1, 2]]: eigenvalues 1 and 3,
    # eigenvectors (1, -1) / sqrt 2 and (1, 1) / sqrt 2
    vals, vecs = F.eigendecompose(_f64([[2, 1.5], [0.5, 2]]), module="m", factor="f")
    assert vals.dtype == vecs.dtype == torch.float64
    assert torch.allclose(vals, _f64([1, 3]), atol=1e-12)
    want = _f64([[1, 1], [-1, 1]]) / 2**0.5
    assert torch.allclose(vecs.abs(), want.abs(), atol=1e-12)
    assert float(vecs[0, 0] * vecs[1, 0]) < 0 < float(vecs[0, 1] * vecs[1, 1])
    big = torch.full((2, 2), 3e38)  # float32: its sums overflow unless taken in float64
    vals, _ = F.eigendecompose(big, module="m", factor="f")
    top = 2 * float(big[0, 0])  # eigenvalues 0 and 2c of [[c, c], [c, c]]
    assert abs(float(vals[0])) <= 1e-6 * top and abs(float(vals[1]) / top - 1) <= 1e-12
    want = (
        "EK-FAC gradient covariance of module 'mlp' has 2 non-finite (NaN/Inf) entries of 4. "
        "The model produced NaN/Inf activations or gradients on the fitting data: check the "
        "checkpoint and the data, run in float32 instead of float16, or exclude the module "
        "with `exclude=[...]`."
    )
    with pytest.raises(NonFiniteFactorError, match=f"^{re.escape(want)}$"):
        F.eigendecompose(_f64([[1, float("nan")], [float("inf"), 1]]), module="mlp",
                         factor="gradient covariance")  # fmt: skip
    with pytest.raises(NonFiniteFactorError, match=r"^EK-FAC A eigenvectors of module 'fc' has 4 "):
        # finite, but 0.5 * (C + C^T) overflows: the decomposition is NaN
        F.eigendecompose(torch.full((2, 2), 1e308, dtype=torch.float64), module="fc", factor="A")
    t = _f64([1, 2])
    assert F.check_finite(t, module="m", factor="f") is t


def test_factor_math_gradients_rotations_and_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)  # (B, S, I)
    g = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)  # (B, S, O)
    explicit = torch.stack([sum(torch.outer(g[b, t], a[b, t]) for t in range(4)) for b in range(3)])
    grads = F.per_example_gradient(a, g)
    assert grads.shape == (3, 5, 2) and torch.allclose(grads, explicit, atol=1e-12)
    q_s = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(2, 2, generator=gen, dtype=torch.float64))[0]
    rotated = F.rotate(grads, q_s, q_a)
    for b in range(3):
        assert torch.allclose(rotated[b], q_s.T @ grads[b] @ q_a, atol=1e-12)
    assert torch.allclose(F.unrotate(rotated, q_s, q_a), grads, atol=1e-12)
    lam = F.eigenvalue_correction_sum(grads, q_s, q_a)
    assert torch.allclose(lam, sum((q_s.T @ grads[b] @ q_a) ** 2 for b in range(3)), atol=1e-12)
    e_s, e_a = _f64([1, 2, 3, 4, 5]), _f64([10, 100])
    outer = F.kfac_eigenvalues(e_s, e_a)
    assert torch.equal(outer, _f64([[10 * s, 100 * s] for s in range(1, 6)]))


def test_factor_math_damping():
    lam = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert float(F.resolve_damping(lam, 0.5, relative=True)) == 0.5 * 3.0  # times the mean
    d = F.resolve_damping(lam.double(), 0.25, relative=False)
    assert d.dtype == torch.float64 and d.shape == () and float(d) == 0.25
    assert float(F.resolve_damping(lam, 0.0, relative=False)) == 0.0  # no damping is allowed
    on_meta = F.resolve_damping(torch.ones(2, device="meta"), 0.25, relative=False)
    assert on_meta.device.type == "meta"  # on the eigenvalues' device
    with pytest.raises(ValueError, match=r"^damping=-0\.1 must be >= 0$"):
        F.resolve_damping(lam, -0.1, relative=False)


def test_factor_math_ihvps_and_self_influence_equal_dense_solves():
    gen = torch.Generator().manual_seed(1)
    o, i, damping = 3, 2, 0.3
    grads = torch.randn(4, o, i, generator=gen, dtype=torch.float64)
    q_s = torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0]
    lam = torch.rand(o, i, generator=gen, dtype=torch.float64) + 0.1
    e_s = torch.rand(o, generator=gen, dtype=torch.float64) + 0.1
    e_a = torch.rand(i, generator=gen, dtype=torch.float64) + 0.1
    u = torch.kron(q_s, q_a)  # vec(Q_S X Q_A^T) = U vec(X), row-major vec of [O, I]
    eye = torch.eye(o * i, dtype=torch.float64)
    vecs = grads.reshape(4, -1).T
    ekfac = u @ torch.diag(lam.reshape(-1)) @ u.T + damping * eye
    want = torch.linalg.solve(ekfac, vecs).T.reshape(4, o, i)
    assert torch.allclose(F.ekfac_ihvp(grads, q_s, q_a, lam, damping), want, atol=1e-12)
    s_mat, a_mat = q_s @ torch.diag(e_s) @ q_s.T, q_a @ torch.diag(e_a) @ q_a.T
    kfac = torch.kron(s_mat, a_mat) + damping * eye
    want_k = torch.linalg.solve(kfac, vecs).T.reshape(4, o, i)
    assert torch.allclose(F.kfac_ihvp(grads, q_s, e_s, q_a, e_a, damping), want_k, atol=1e-12)
    self_inf = (vecs * torch.linalg.solve(ekfac, vecs)).sum(0)  # <g_i, H^-1 g_i>
    assert torch.allclose(F.self_influence(grads, q_s, q_a, lam, damping), self_inf, atol=1e-12)
