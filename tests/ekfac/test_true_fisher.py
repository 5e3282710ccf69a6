"""EK-FAC's true Fisher against the exact expectation over the model's own predictions.

With ``fisher="true"`` the labels of every supervised position are drawn from the model's
predictive distribution at the position that predicts them. A model whose logits at position
``t`` depend only on the token ``x_t`` (one-hot input, one Linear ``proj`` giving the logits)
has a predictive distribution ``p(x_t) = softmax(W x_t)`` known in closed form, and the output
gradient of a token's loss is ``g_t = p(x_t) - onehot(y_t)``. Hence, over the labels:

    E[g_t g_t^T] = diag(p) - p p^T                         (the softmax Fisher)
    S = sum_{t supervised} (diag(p_t) - p_t p_t^T) / tokens
    Lambda_jk = sum_t (Q_S^T F(p_t) Q_S)_jj (Q_A^T a_t)_k^2  (the g_t are independent, mean 0)

Every example is the same sequence ``0 1 2 3``; its draws are seeded per example id, so 2000
examples are 2000 independent draws and the fitted factors are Monte Carlo estimates of these.
"""

from __future__ import annotations

import torch
from recipes import trainer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers.modeling_outputs import CausalLMOutput

from lightning_bergson import EkfacModule
from lightning_bergson.ekfac import EkfacFactors

V, NUM = 4, 2000
# Row x: the logits after token x (distinct distributions at every position).
LOGITS = torch.tensor(
    [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.5, -1.0], [0.3, 0.0, -0.3, 0.0], [2.0, 0.0, 0.0, 1.0]],
    dtype=torch.float64,
)
P = torch.softmax(LOGITS, dim=-1)  # (V, V): P[x] = predictive distribution after token x
SEQ = torch.arange(V)  # positions 0..2 predict 1..3; position 3 predicts nothing
TOL = 0.1  # relative Frobenius error; the Monte Carlo error of 2000 draws is about 0.03


class OneHotLM(nn.Module):
    """Logits ``W onehot(x_t)``: position ``t``'s prediction depends on token ``x_t`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(V, V, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.copy_(LOGITS.T)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CausalLMOutput:
        return CausalLMOutput(logits=self.proj(F.one_hot(input_ids, V).double()))  # (B, S, V)


def softmax_fisher(p: Tensor) -> Tensor:
    """``E_{y ~ p}[(p - e_y)(p - e_y)^T] = diag(p) - p p^T``."""
    return torch.diag(p) - torch.outer(p, p)


def label_fisher(p: Tensor, y: Tensor) -> Tensor:
    """``E_y[(p - e_y)(p - e_y)^T]`` for labels drawn from the distribution ``y``."""
    return torch.outer(p, p) - torch.outer(p, y) - torch.outer(y, p) + torch.diag(y)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_design_tells_wrong_label_draws_apart():
    """The exact S of right draws is far (> 3 TOL) from the S of plausible wrong draws."""
    exact = sum(softmax_fisher(P[x]) for x in SEQ[:-1]) / V
    wrong = {
        "the next position": sum(softmax_fisher(P[x]) for x in SEQ[1:]) / V,
        "uniform labels": sum(
            label_fisher(P[x], torch.full((V,), 1 / V).double()) for x in SEQ[:-1]
        )
        / V,
        "dataset labels": sum(label_fisher(P[x], F.one_hot(x + 1, V).double()) for x in SEQ[:-1])
        / V,
    }
    for name, s in wrong.items():
        assert _rel(s, exact) > 3 * TOL, name


def test_true_fisher_factors_equal_the_exact_expectation(tmp_path):
    rows = [
        {
            "input_ids": SEQ.clone(),
            "attention_mask": torch.ones(V, dtype=torch.long),
            "labels": SEQ.clone(),
            "example_id": torch.tensor(i),
        }
        for i in range(NUM)
    ]
    ek = EkfacModule(
        OneHotLM(), factors_dir=str(tmp_path / "f"), fisher="true", factor_dtype="float64"
    )
    trainer(max_epochs=ek.num_phases).fit(ek, DataLoader(rows, batch_size=500))
    f = EkfacFactors.load(tmp_path / "f").modules["proj"]

    tokens = [F.one_hot(x, V).double() for x in SEQ]  # a_t = onehot(x_t)
    torch.testing.assert_close(f.activation_covariance, sum(torch.outer(a, a) for a in tokens) / V)
    exact_s = sum(softmax_fisher(P[x]) for x in SEQ[:-1]) / V  # 4 attended tokens per example
    assert _rel(f.gradient_covariance, exact_s) < TOL

    q_s, q_a = f.gradient_eigenvectors.double(), f.activation_eigenvectors.double()
    exact_lambda = sum(
        torch.diagonal(q_s.T @ softmax_fisher(P[x]) @ q_s)[:, None] * (q_a.T @ tokens[x])[None] ** 2
        for x in SEQ[:-1]
    )  # (O, I)
    assert _rel(f.eigenvalue_correction, exact_lambda) < TOL
