"""PNG plots of fitted EK-FAC factors (Kronfluence's ``inspect_factors`` example).

For one module: heatmaps of ``A``, ``S`` and ``Lambda``, and its eigenvalue spectra (``e_A``,
``e_S``, the corrected ``Lambda`` beside K-FAC's ``e_S e_A^T``); for all modules, their
``Lambda`` spectra on one plot. Matplotlib is imported only here, without pyplot (no global
backend state).

Example:
    >>> import tempfile
    >>> from lightning_bergson.ekfac.storage import ModuleFactors
    >>> eye = torch.eye(3)
    >>> f = ModuleFactors(eye, eye, torch.ones(3), eye, torch.ones(3), eye, torch.ones(3, 3))
    >>> paths = plot_module_factors("fc", f, tempfile.mkdtemp())
    >>> [p.name for p in paths]
    ['fc_heatmaps.png', 'fc_spectra.png']
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .factors import kfac_eigenvalues
from .storage import EkfacFactors, ModuleFactors

__all__ = ["inspect_factors", "plot_lambda_spectra", "plot_module_factors"]


def _figure(ncols: int, width: float = 4.2, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _descending(values: Tensor) -> Tensor:
    return values.flatten().double().sort(descending=True).values.clamp(min=1e-30)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def plot_module_factors(name: str, factors: ModuleFactors, out_dir: str | Path) -> list[Path]:
    """Write ``<name>_heatmaps.png`` and ``<name>_spectra.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mats = [
        ("A (activation covariance)", factors.activation_covariance),
        ("S (gradient covariance)", factors.gradient_covariance),
    ]
    if factors.eigenvalue_correction is not None:
        mats.append(("Lambda (eigenvalue correction)", factors.eigenvalue_correction))
    fig, axes = _figure(len(mats))
    for ax, (title, mat) in zip(axes, mats, strict=True):
        image = ax.imshow(mat.double().cpu().numpy(), cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.suptitle(name, fontsize=10)
    heatmaps = out_dir / f"{_safe(name)}_heatmaps.png"
    fig.savefig(heatmaps, dpi=90)

    fig, axes = _figure(2)
    axes[0].semilogy(_descending(factors.activation_eigenvalues).numpy(), label="e_A")
    axes[0].semilogy(_descending(factors.gradient_eigenvalues).numpy(), label="e_S")
    axes[0].set_title("eigenvalues of A and S", fontsize=9)
    kfac = kfac_eigenvalues(
        factors.gradient_eigenvalues.double(), factors.activation_eigenvalues.double()
    )
    axes[1].semilogy(_descending(kfac).numpy(), label="K-FAC e_S e_A^T")
    if factors.eigenvalue_correction is not None:
        axes[1].semilogy(_descending(factors.eigenvalue_correction).numpy(), label="EK-FAC Lambda")
    axes[1].set_title("eigenvalues in the Kronecker eigenbasis", fontsize=9)
    for ax in axes:
        ax.set_xlabel("rank")
        ax.legend(fontsize=8)
    fig.suptitle(name, fontsize=10)
    spectra = out_dir / f"{_safe(name)}_spectra.png"
    fig.savefig(spectra, dpi=90)
    return [heatmaps, spectra]


def plot_lambda_spectra(factors: EkfacFactors, out_dir: str | Path) -> Path:
    """``lambda_spectra.png``: every module's sorted ``Lambda`` (or K-FAC eigenvalues)."""
    fig, axes = _figure(1, width=6.5, height=4.5)
    for name, f in factors.modules.items():
        values = f.eigenvalue_correction
        if values is None:
            values = kfac_eigenvalues(
                f.gradient_eigenvalues.double(), f.activation_eigenvalues.double()
            )
        ranks = torch.linspace(0, 1, values.numel())
        axes[0].semilogy(ranks.numpy(), _descending(values).numpy(), label=name, linewidth=1)
    axes[0].set_xlabel("rank / size")
    axes[0].set_title("eigenvalue spectra of all modules", fontsize=9)
    axes[0].legend(fontsize=6)
    path = Path(out_dir) / "lambda_spectra.png"
    fig.savefig(path, dpi=90)
    return path


def inspect_factors(
    factors_dir: str | Path, module: str | None = None, out_dir: str | Path | None = None
) -> list[Path]:
    """Plot the factors of ``module`` (default: the first) and every module's spectrum.

    Args:
        factors_dir: Directory written by EkfacModule.
        module: Module to draw heatmaps of.
        out_dir: Where PNGs go (default ``<factors_dir>/inspect``).

    Returns:
        Paths of the PNG files written.
    """
    factors = EkfacFactors.load(factors_dir)
    name = module if module is not None else next(iter(factors.modules))
    if name not in factors.modules:
        raise KeyError(f"module {name!r} has no factors; available: {sorted(factors.modules)}")
    out = Path(out_dir) if out_dir is not None else Path(factors_dir) / "inspect"
    paths = plot_module_factors(name, factors.modules[name], out)
    return [*paths, plot_lambda_spectra(factors, out)]
