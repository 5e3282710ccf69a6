"""EK-FAC factor math (pure torch): covariances, eigenbases, eigenvalue correction, iHVPs.

For one Linear layer with per-token inputs ``a_t`` (``I`` features, a trailing 1 when the
bias is tracked) and per-token output gradients ``g_t`` (``O`` features) of each example's
*summed* token loss, and per-example gradients ``G_i = sum_t g_it a_it^T`` (``O x I``):

    A = sum_t a_t a_t^T / N_tokens           S = sum_t g_t g_t^T / N_tokens
    A = Q_A diag(e_A) Q_A^T                  S = Q_S diag(e_S) Q_S^T        (float64 eigh)
    Lambda = sum_i (Q_S^T G_i Q_A)^2 / N_examples                          (elementwise square)
    H^-1 V ~= Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T               (EK-FAC)

K-FAC replaces ``Lambda`` by ``e_S e_A^T``. ``N_tokens`` counts the tokens the attention
mask keeps and ``N_examples`` the examples, exactly as Kronfluence normalizes, so the two
libraries' factors and scores agree. ``damping`` is absolute, or relative to ``mean(Lambda)``
of the module (``0.1`` relative is Kronfluence's heuristic ``damping_factor=None``).

Example:
    >>> g = torch.randn(16, 3, 4, dtype=torch.float64)  # 16 examples, O=3, I=4
    >>> q_s, q_a = torch.linalg.qr(torch.randn(3, 3))[0], torch.linalg.qr(torch.randn(4, 4))[0]
    >>> lam = eigenvalue_correction_sum(g, q_s.double(), q_a.double()) / 16
    >>> v = ekfac_ihvp(g[:2], q_s.double(), q_a.double(), lam, damping=0.1)
    >>> v.shape
    torch.Size([2, 3, 4])

References:
    - Grosse et al., "Studying Large Language Model Generalization with Influence Functions",
      2023, arXiv:2308.03296.
    - George et al., "Fast Approximate Natural Gradient Descent in a Kronecker-factored
      Eigenbasis", 2018, arXiv:1806.03884.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NonFiniteFactorError",
    "check_finite",
    "covariance_sum",
    "eigendecompose",
    "eigenvalue_correction_sum",
    "ekfac_ihvp",
    "kfac_eigenvalues",
    "kfac_ihvp",
    "masked_token_rows",
    "per_example_gradient",
    "resolve_damping",
    "rotate",
    "self_influence",
    "unrotate",
    "with_bias_column",
]


class NonFiniteFactorError(FloatingPointError):
    """A covariance, eigendecomposition or eigenvalue correction holds NaN or Inf."""


def check_finite(t: Tensor, *, module: str, factor: str) -> Tensor:
    """Return ``t`` or raise :class:`NonFiniteFactorError` naming the module and factor."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteFactorError(
            f"EK-FAC {factor} of module {module!r} has {bad} non-finite (NaN/Inf) entries of "
            f"{t.numel()}. The model produced NaN/Inf activations or gradients on the fitting "
            "data: check the checkpoint and the data, run in float32 instead of float16, or "
            "exclude the module with `exclude=[...]`."
        )
    return t


def with_bias_column(a: Tensor) -> Tensor:
    """Append a constant-1 input feature (the bias is the weight of that column): ``[..., I+1]``."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def masked_token_rows(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Flatten ``x`` ``[B, S, D]`` to token rows ``[B*S, D]``, zeroing rows the mask drops.

    Returns:
        ``(rows [B*S, D], count)``: ``count`` is the number of kept tokens (all rows when
        ``mask`` is None or does not have ``B*S`` entries, e.g. a layer that mixes tokens).
    """
    rows = x.reshape(-1, x.shape[-1])  # (B*S, D)
    if mask is None or mask.numel() != rows.shape[0]:
        return rows, torch.tensor(float(rows.shape[0]), dtype=torch.float64)
    keep = mask.reshape(-1, 1).to(rows.dtype)  # (B*S, 1)
    return rows * keep, keep.sum().to(torch.float64)


def covariance_sum(rows: Tensor) -> Tensor:
    """``rows^T rows``: the unnormalized second moment ``[D, D]`` of ``rows`` ``[N, D]``."""
    return rows.T @ rows


def eigendecompose(cov: Tensor, *, module: str, factor: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a covariance, in float64.

    The input is symmetrized first (accumulated sums are symmetric only up to rounding).

    Raises:
        NonFiniteFactorError: the covariance or its decomposition holds NaN/Inf.
    """
    check_finite(cov, module=module, factor=factor)
    sym = cov.to(torch.float64)
    sym = 0.5 * (sym + sym.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)  # (D,), (D, D)
    check_finite(eigenvectors, module=module, factor=f"{factor} eigenvectors")
    return eigenvalues, eigenvectors


def per_example_gradient(a: Tensor, g: Tensor) -> Tensor:
    """``G_i = sum_t g_it a_it^T`` ``[B, O, I]`` from ``a`` ``[B, S, I]``, ``g`` ``[B, S, O]``."""
    return torch.bmm(g.transpose(1, 2), a)  # (B, O, I)


def rotate(grad: Tensor, q_s: Tensor, q_a: Tensor) -> Tensor:
    """``Q_S^T G Q_A`` for ``G`` ``[..., O, I]`` (into the Kronecker-factored eigenbasis)."""
    return q_s.T @ grad @ q_a


def unrotate(rotated: Tensor, q_s: Tensor, q_a: Tensor) -> Tensor:
    """``Q_S R Q_A^T``: the inverse of :func:`rotate`."""
    return q_s @ rotated @ q_a.T


def eigenvalue_correction_sum(grads: Tensor, q_s: Tensor, q_a: Tensor) -> Tensor:
    """``sum_i (Q_S^T G_i Q_A)^2`` over examples ``[B, O, I]`` -> ``[O, I]``."""
    return rotate(grads, q_s, q_a).square().sum(0)


def kfac_eigenvalues(eig_s: Tensor, eig_a: Tensor) -> Tensor:
    """K-FAC's eigenvalues in the same basis: ``e_S e_A^T`` ``[O, I]``."""
    return torch.outer(eig_s, eig_a)


def resolve_damping(eigenvalues: Tensor, damping: float, relative: bool) -> Tensor:
    """The damping added to ``eigenvalues``: ``damping`` or ``damping * mean(eigenvalues)``."""
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0")
    if relative:
        return damping * eigenvalues.mean()
    return torch.tensor(damping, dtype=eigenvalues.dtype, device=eigenvalues.device)


def ekfac_ihvp(
    grads: Tensor, q_s: Tensor, q_a: Tensor, eigenvalues: Tensor, damping: float | Tensor
) -> Tensor:
    """``(H + damping I)^-1 G`` for ``G`` ``[..., O, I]`` with ``H`` in its eigenbasis.

    ``eigenvalues`` ``[O, I]`` is Lambda for EK-FAC or :func:`kfac_eigenvalues` for K-FAC.
    """
    return unrotate(rotate(grads, q_s, q_a) / (eigenvalues + damping), q_s, q_a)


def kfac_ihvp(
    grads: Tensor, q_s: Tensor, eig_s: Tensor, q_a: Tensor, eig_a: Tensor, damping: float | Tensor
) -> Tensor:
    """``(S (x) A + damping I)^-1 G`` (K-FAC), through the eigenbases of ``S`` and ``A``."""
    return ekfac_ihvp(grads, q_s, q_a, kfac_eigenvalues(eig_s, eig_a), damping)


def self_influence(
    grads: Tensor, q_s: Tensor, q_a: Tensor, eigenvalues: Tensor, damping: float | Tensor
) -> Tensor:
    """``<G_i, (H + damping I)^-1 G_i>`` per example ``[B]`` without rotating back."""
    rotated = rotate(grads, q_s, q_a)  # (B, O, I)
    return (rotated.square() / (eigenvalues + damping)).sum((-2, -1))
