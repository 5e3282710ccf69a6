"""Running sums behind the EK-FAC factors, as flat ``{key: tensor}`` dicts.

The sums are plain tensors keyed ``"<module>/<what>"`` so that a strategy can reduce them
across ranks (sum) and a checkpoint can hold them, and finalization divides by the counts.

Example:
    >>> acc = CovarianceSums({"fc": False})
    >>> a, g = torch.ones(2, 3, 4), torch.ones(2, 3, 5)  # [B, S, I], [B, S, O]
    >>> acc.update([("fc", a, g)], mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    >>> cov = finalize_covariances(acc.sums, ["fc"])
    >>> cov["fc"][0][0, 0].item(), acc.sums["fc/activation_count"].item()
    (1.0, 3.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .factors import (
    check_finite,
    covariance_sum,
    eigenvalue_correction_sum,
    masked_token_rows,
    per_example_gradient,
    with_bias_column,
)

__all__ = ["CovarianceSums", "LambdaSums", "finalize_covariances", "finalize_lambda"]

Pairs = Iterable[tuple[str, Tensor, Tensor]]


def _add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()


class CovarianceSums:
    """``sum a a^T``, ``sum g g^T`` and token counts per module.

    Args:
        bias: Module name -> append a constant-1 column to its inputs.
        dtype: Accumulation dtype.
    """

    def __init__(self, bias: Mapping[str, bool], dtype: torch.dtype = torch.float32) -> None:
        self.bias, self.dtype = dict(bias), dtype
        self.sums: dict[str, Tensor] = {}

    def init(self, shapes: Mapping[str, tuple[int, int]], device: torch.device | str) -> None:
        """Zero sums for every module, so every rank reduces the same keys even without data."""
        for name, (out_f, in_f) in shapes.items():
            self.sums[f"{name}/activation_sum"] = torch.zeros(
                in_f, in_f, dtype=self.dtype, device=device
            )
            self.sums[f"{name}/activation_count"] = torch.zeros(
                (), dtype=torch.float64, device=device
            )
            self.sums[f"{name}/gradient_sum"] = torch.zeros(
                out_f, out_f, dtype=self.dtype, device=device
            )
            self.sums[f"{name}/gradient_count"] = torch.zeros(
                (), dtype=torch.float64, device=device
            )

    def update(self, pairs: Pairs, mask: Tensor | None) -> None:
        """Add one batch: ``(name, a [B, S, I], g [B, S, O])`` per call; padding masked out."""
        for name, a, g in pairs:
            a = a.to(self.dtype)
            if self.bias[name]:
                a = with_bias_column(a)  # (B, S, I+1)
            a_rows, a_count = masked_token_rows(a, mask)  # (B*S, I)
            g_rows, g_count = masked_token_rows(g.to(self.dtype), mask)  # (B*S, O)
            _add(self.sums, f"{name}/activation_sum", covariance_sum(a_rows))
            _add(self.sums, f"{name}/activation_count", a_count.to(a.device))
            _add(self.sums, f"{name}/gradient_sum", covariance_sum(g_rows))
            _add(self.sums, f"{name}/gradient_count", g_count.to(a.device))


class LambdaSums:
    """``sum_i (Q_S^T G_i Q_A)^2`` and example counts per module.

    Args:
        bias: Module name -> append a constant-1 column to its inputs.
        eigenvectors: Module name -> ``(Q_S [O, O], Q_A [I, I])``.
        dtype: Accumulation dtype (the eigenvectors are cast to it).
    """

    def __init__(
        self,
        bias: Mapping[str, bool],
        eigenvectors: Mapping[str, tuple[Tensor, Tensor]],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.bias, self.dtype = dict(bias), dtype
        self.eigenvectors = {k: (s.to(dtype), a.to(dtype)) for k, (s, a) in eigenvectors.items()}
        self.sums: dict[str, Tensor] = {}

    def init(self, shapes: Mapping[str, tuple[int, int]], device: torch.device | str) -> None:
        """Zero sums for every module, so every rank reduces the same keys even without data."""
        for name, (out_f, in_f) in shapes.items():
            self.sums[f"{name}/lambda_sum"] = torch.zeros(
                out_f, in_f, dtype=self.dtype, device=device
            )
            self.sums[f"{name}/lambda_count"] = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, pairs: Pairs) -> None:
        """Add one batch: per-example gradients are summed over a module's calls first."""
        grads: dict[str, Tensor] = {}
        for name, a, g in pairs:
            a = a.to(self.dtype)
            if self.bias[name]:
                a = with_bias_column(a)
            _add(grads, name, per_example_gradient(a, g.to(self.dtype)))  # (B, O, I)
        for name, grad in grads.items():
            q_s, q_a = (q.to(grad.device) for q in self.eigenvectors[name])
            _add(self.sums, f"{name}/lambda_sum", eigenvalue_correction_sum(grad, q_s, q_a))
            count = torch.tensor(float(grad.shape[0]), dtype=torch.float64, device=grad.device)
            _add(self.sums, f"{name}/lambda_count", count)


def _count(sums: Mapping[str, Tensor], key: str, module: str) -> Tensor:
    if key not in sums or float(sums[key]) <= 0:
        raise RuntimeError(
            f"module {module!r} saw no tokens while fitting EK-FAC factors: it is never called "
            "in the model's forward (or every token was masked). Exclude it with `exclude=[...]`."
        )
    return sums[key]


def finalize_covariances(
    sums: Mapping[str, Tensor], modules: Iterable[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (A, S)}``: sums divided by their token counts, checked finite."""
    out = {}
    for name in modules:
        a_sum = sums[f"{name}/activation_sum"]
        a = a_sum / _count(sums, f"{name}/activation_count", name).to(a_sum.dtype)
        g_sum = sums[f"{name}/gradient_sum"]
        s = g_sum / _count(sums, f"{name}/gradient_count", name).to(g_sum.dtype)
        check_finite(a, module=name, factor="activation covariance")
        check_finite(s, module=name, factor="gradient covariance")
        out[name] = (a, s)
    return out


def finalize_lambda(sums: Mapping[str, Tensor], modules: Iterable[str]) -> dict[str, Tensor]:
    """``{module: Lambda}``: the correction sums divided by the example counts, checked finite."""
    out = {}
    for name in modules:
        count = _count(sums, f"{name}/lambda_count", name)
        total = sums[f"{name}/lambda_sum"]
        lam = total / count.to(total.dtype)
        out[name] = check_finite(lam, module=name, factor="eigenvalue correction")
    return out
