"""On-disk EK-FAC factors: safetensors shards (one per rank) plus JSON config and counts.

Layout of ``factors_dir`` (no pickle: tensors are safetensors, metadata JSON)::

    config.json                                 format, schema, fisher, modules {name: shape,
                                                shard}, world_size, normalization, phases done
    counts.json                                 tokens / examples behind every factor
    activation_covariance_sharded/shard_<r>.safetensors   {module: A [I, I]}
    gradient_covariance_sharded/shard_<r>.safetensors     {module: S [O, O]}
    activation_eigen_sharded/shard_<r>.safetensors        {module.eigenvalues [I],
                                                           module.eigenvectors [I, I]}
    gradient_eigen_sharded/shard_<r>.safetensors          {module.eigenvalues [O], ...}
    eigenvalue_correction_sharded/shard_<r>.safetensors   {module: Lambda [O, I]}

Covariances and Lambda are stored normalized (``A = sum a a^T / tokens``, ``Lambda = mean``);
``counts.json`` gives the divisors. Rank ``r`` writes the modules it owns (``config.json``
``modules[name]["shard"]``); readers merge all shards. ``factors_dir`` may be a URL
(``s3://bucket/ekfac``, with ``storage_options``): every file is written whole, atomically
(locally a temporary file renamed into place, on object storage one PUT).

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = write_shard(d, "eigenvalue_correction", 0, {"fc": torch.ones(2, 3)})
    >>> read_factor(d, "eigenvalue_correction")["fc"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor

from ..store.location import Location, StorePath

__all__ = [
    "FACTOR_KINDS",
    "FORMAT",
    "EkfacFactors",
    "ModuleFactors",
    "read_factor",
    "read_json",
    "write_json",
    "write_shard",
]

FORMAT = "lightning_bergson.ekfac_factors"
SCHEMA_VERSION = 1
FACTOR_KINDS = (
    "activation_covariance",
    "gradient_covariance",
    "activation_eigen",
    "gradient_eigen",
    "eigenvalue_correction",
)


def _shard_dir(factors_dir: StorePath, kind: str) -> Location:
    if kind not in FACTOR_KINDS:
        raise ValueError(f"factor kind {kind!r} is not one of {FACTOR_KINDS}")
    return Location.of(factors_dir) / f"{kind}_sharded"


def write_shard(
    factors_dir: StorePath, kind: str, rank: int, tensors: dict[str, Tensor]
) -> Path | Location:
    """Write ``<kind>_sharded/shard_<rank>.safetensors`` atomically (temp file, then rename;
    on object storage one PUT of the whole file)."""
    path = _shard_dir(factors_dir, kind) / f"shard_{rank}.safetensors"
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path.write_bytes(save(data, metadata={"format": FORMAT, "kind": kind, "rank": str(rank)}))
    return path.path


def read_factor(factors_dir: StorePath, kind: str) -> dict[str, Tensor]:
    """All shards of one factor kind merged into ``{key: tensor}``.

    Raises:
        FileNotFoundError: no shard of ``kind`` exists (the phase that writes it did not run).
    """
    folder = _shard_dir(factors_dir, kind)
    names = folder.children() if folder.is_dir() else []
    shards = [folder / n for n in names if fnmatch.fnmatchcase(n, "shard_*.safetensors")]
    if not shards:
        raise FileNotFoundError(
            f"no {kind} factors in {factors_dir} (expected {kind}_sharded/shard_<r>.safetensors); "
            "fit them first: Trainer(max_epochs=ek.num_phases).fit(ek, train_dataloader)"
        )
    merged: dict[str, Tensor] = {}
    for shard in shards:
        merged.update(load(shard.read_bytes()))
    return merged


def write_json(path: StorePath, obj: dict[str, Any]) -> None:
    """Write ``obj`` as indented JSON atomically (local or a URL)."""
    Location.of(path).write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: StorePath) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`."""
    return Location.of(path).read_json()


@dataclass
class ModuleFactors:
    """The EK-FAC factors of one Linear module (``O`` outputs, ``I`` inputs incl. bias)."""

    activation_covariance: Tensor  # (I, I)
    gradient_covariance: Tensor  # (O, O)
    activation_eigenvalues: Tensor  # (I,)
    activation_eigenvectors: Tensor  # (I, I), columns
    gradient_eigenvalues: Tensor  # (O,)
    gradient_eigenvectors: Tensor  # (O, O), columns
    eigenvalue_correction: Tensor | None = None  # (O, I)


@dataclass
class EkfacFactors:
    """All modules' factors with the fitting config and counts, as written by EkfacModule."""

    modules: dict[str, ModuleFactors]
    config: dict[str, Any]
    counts: dict[str, Any]

    @classmethod
    def load(
        cls, factors_dir: StorePath, *, storage_options: dict[str, Any] | None = None
    ) -> EkfacFactors:
        """Read the factors in ``factors_dir`` (Lambda is ``None`` if its phase did not run).

        Args:
            factors_dir: A local directory or a URL (``s3://bucket/ekfac``).
            storage_options: Options of a URL's fsspec filesystem.
        """
        factors_dir = Location.of(factors_dir, storage_options)
        if not (factors_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no EK-FAC factors at {factors_dir} (config.json missing); fit them with "
                "Trainer(max_epochs=ek.num_phases).fit(ek, train_dataloader)"
            )
        config = read_json(factors_dir / "config.json")
        if config.get("format") != FORMAT:
            raise ValueError(f"{factors_dir}/config.json is not {FORMAT!r}")
        counts = read_json(factors_dir / "counts.json")
        act, grad = (read_factor(factors_dir, k) for k in FACTOR_KINDS[:2])
        act_eig, grad_eig = (read_factor(factors_dir, k) for k in FACTOR_KINDS[2:4])
        done = "eigenvalue_correction" in config.get("phases_completed", [])
        lam = read_factor(factors_dir, "eigenvalue_correction") if done else {}
        modules = {
            name: ModuleFactors(
                act[name],
                grad[name],
                act_eig[f"{name}.eigenvalues"],
                act_eig[f"{name}.eigenvectors"],
                grad_eig[f"{name}.eigenvalues"],
                grad_eig[f"{name}.eigenvectors"],
                lam.get(name),
            )
            for name in config["modules"]
        }
        return cls(modules, config, counts)

    def to(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> EkfacFactors:
        """A copy with every tensor cast to ``dtype`` on ``device``."""

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        modules = {
            name: ModuleFactors(*(cast(getattr(f, k)) for k in ModuleFactors.__dataclass_fields__))  # type: ignore[arg-type]
            for name, f in self.modules.items()
        }
        return EkfacFactors(modules, self.config, self.counts)
