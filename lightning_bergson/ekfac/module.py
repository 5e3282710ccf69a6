"""EkfacModule: fit EK-FAC influence factors with a Lightning Trainer, then score queries.

Run: ``python -m lightning_bergson fit --config configs/ekfac.yaml``

Each epoch of ``fit`` is one fitting phase over the training data (no optimizer steps):

0. ``covariance``: ``A = E[a a^T]`` and ``S = E[g g^T]`` per tracked Linear over tokens, summed
   across ranks, then eigendecomposed in float64 (each rank decomposes the modules of its
   shard, the eigenvectors are shared with every rank);
1. ``eigenvalue_correction``: ``Lambda = E[(Q_S^T G_i Q_A)^2]`` over examples.

Factors are written to ``factors_dir`` (see :mod:`lightning_bergson.ekfac.storage`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ..capture.conv import CONV_TYPES
from ..capture.fingerprint import model_fingerprint
from ..capture.hooks import DEFAULT_EXCLUDE, _features, select_modules
from ..networks import can_build_now, load_network, vocab_from_datamodule
from .accumulate import CovarianceSums, LambdaSums, finalize_covariances, finalize_lambda
from .factors import eigendecompose
from .losses import lm_example_losses
from .scoring import ScoringMixin
from .storage import FORMAT, SCHEMA_VERSION, read_factor, read_json, write_json, write_shard
from .taps import LinearTaps

__all__ = ["PHASES", "EkfacModule"]

PHASES = ("covariance", "eigenvalue_correction")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class EkfacModule(ScoringMixin, L.LightningModule):
    """Kronfluence-style EK-FAC influence functions as a LightningModule.

    ``Trainer(max_epochs=ek.num_phases).fit(ek, train_dataloader)`` fits the factors (any
    strategy, precision, logger or progress bar of the Trainer applies); then
    :meth:`pairwise_scores` and :meth:`self_scores` score queries against training examples.

    Conventions (the same as Kronfluence's, so scores agree): an example's loss is the *sum*
    of its supervised token losses; ``A`` and ``S`` are averaged over the tokens the attention
    mask keeps (``sum_t a_t a_t^T / tokens``); ``Lambda`` over examples; the bias is an extra
    input column. ``num_phases`` is 2: the float64 eigendecomposition runs at the end of the
    covariance epoch, so no data pass is spent on it. Under DDP the sums are reduced across
    ranks at each epoch end and rank ``r`` writes ``shard_<r>`` with the modules it owns.
    Mixed precision: ``"bf16-mixed"`` works as is; ``"16-mixed"`` applies no loss scaling
    here, so tiny output gradients may underflow (prefer bf16 or 32-bit).

    Args:
        model: The trained network: a Hugging Face name or local directory, a ``.ckpt`` of
            :class:`~lightning_bergson.CausalLMModule`, an ``nn.Module``, or a LightningModule
            holding the network in ``.model``.
        factors_dir: Directory of the factors (safetensors shards plus JSON).
        fisher: ``"empirical"`` (dataset labels) or ``"true"`` (labels sampled from the model
            with a generator seeded by ``seed`` and each ``example_id``).
        include: fnmatch globs of tracked module names (relative to the network).
        exclude: Globs of modules to skip (the output embedding by default).
        include_bias: Track biases as an extra input column (modules without bias have none).
        factor_dtype: ``"float32"`` or ``"float64"`` accumulation and storage of the factors;
            eigendecompositions always run in float64.
        config: Build an untrained network from these config keys instead of ``model``
            (e.g. ``{"model_type": "gpt_neox", "hidden_size": 64}``).
        vocab_size: Vocabulary of a network built from ``config`` (default: the data module's).
        attn_implementation: Attention implementation of networks loaded or built here.
        seed: Seed of networks built from ``config`` and of true-Fisher label sampling.
        overwrite: Replace factors already in ``factors_dir``.

    Example:
        >>> import tempfile
        >>> from torch.utils.data import DataLoader
        >>> ek = EkfacModule(config={"model_type": "gpt_neox", "vocab_size": 32, "hidden_size": 8,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
        ...     factors_dir=tempfile.mkdtemp(), overwrite=True)
        >>> data = [{"input_ids": torch.arange(i, i + 6), "example_id": i} for i in range(4)]
        >>> train = DataLoader(data, batch_size=2)
        >>> L.Trainer(max_epochs=ek.num_phases, logger=False, enable_checkpointing=False,
        ...     enable_progress_bar=False, enable_model_summary=False).fit(ek, train)
        >>> ek.pairwise_scores(train, train).shape, ek.self_scores(train).shape
        (torch.Size([4, 4]), torch.Size([4]))

    References:
        Grosse et al., "Studying Large Language Model Generalization with Influence Functions",
        2023, arXiv:2308.03296.
    """

    needs_example_id = True  # the Bergson strategies keep batch["example_id"] for it

    def __init__(
        self,
        model: str | nn.Module | None = None,
        *,
        factors_dir: str = "runs/ekfac",
        fisher: Literal["empirical", "true"] = "empirical",
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        include_bias: bool = True,
        factor_dtype: Literal["float32", "float64"] = "float32",
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        attn_implementation: str = "eager",
        seed: int = 0,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher={fisher!r} is not one of 'empirical', 'true'")
        if factor_dtype not in _DTYPES:
            raise ValueError(f"factor_dtype={factor_dtype!r} is not one of {tuple(_DTYPES)}")
        if model is None and config is None:
            raise ValueError(
                "EkfacModule needs `model` (a Hugging Face name or directory, a CausalLMModule "
                ".ckpt, or an nn.Module) or `config` (e.g. {'model_type': 'gpt_neox', ...})"
            )
        self.automatic_optimization = False  # no optimizer: each step only accumulates factors
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.factors_dir = Path(factors_dir)
        self.factor_dtype = _DTYPES[factor_dtype]
        self.model: nn.Module | None = None
        if can_build_now(model, config, vocab_size):
            self.model = load_network(model, config, vocab_size, attn_implementation, seed)
        self._source = None if isinstance(model, nn.Module) else model  # not a 2nd submodule
        self._phase = 0
        self._sums: CovarianceSums | LambdaSums | None = None
        self._eigenvectors: dict[str, tuple[Tensor, Tensor]] | None = None
        self._factors = None
        self._tracked: tuple[nn.Module, dict[str, bool]] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def num_phases(self) -> int:
        """Epochs of ``fit`` needed: covariances (+ eigendecomposition), eigenvalue correction."""
        return len(PHASES)

    @property
    def phase(self) -> str:
        """The phase the next epoch runs (``"done"`` once every factor is written)."""
        return PHASES[self._phase] if self._phase < len(PHASES) else "done"

    @property
    def network(self) -> nn.Module:
        """The wrapped network (built in ``configure_model`` when only ``config`` was given)."""
        if self.model is None:
            raise RuntimeError("the network is built in configure_model (call Trainer.fit first)")
        return self.model

    @property
    def tracked(self) -> dict[str, bool]:
        """Tracked module names -> whether the bias column is included (cached per network)."""
        net = self.network
        if self._tracked is None or self._tracked[0] is not net:
            mods = select_modules(net, self.hparams.include, self.hparams.exclude)
            convs = [n for n, m in mods.items() if isinstance(m, CONV_TYPES)]
            if convs:
                rank_zero_warn(
                    f"EK-FAC factors cover nn.Linear and HF Conv1D only; the conv modules "
                    f"{convs[:6]} are not tracked (exclude them to silence this warning)"
                )
                mods = {n: m for n, m in mods.items() if n not in convs}
            bias = self.hparams.include_bias
            flags = {n: bias and getattr(m, "bias", None) is not None for n, m in mods.items()}
            self._tracked = (net, flags)
        return dict(self._tracked[1])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(O, I)`` of each tracked module's gradient (``I`` counts the bias column)."""
        mods = dict(self.network.named_modules())
        return {
            n: (_features(mods[n])[0], _features(mods[n])[1] + int(b))
            for n, b in self.tracked.items()
        }

    # ------------------------------------------------------------------ model

    @override
    def configure_model(self) -> None:
        """Build the network from ``config`` with the data module's vocabulary if needed."""
        if self.model is not None:
            return
        given = "`config` without vocab_size"
        vocab_size = vocab_from_datamodule(self, "EkfacModule", given=given)
        hp = self.hparams
        self.model = load_network(
            self._source, hp.config, vocab_size, hp.attn_implementation, hp.seed
        )

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, S, V]`` of the network."""
        return self.network(input_ids=input_ids, attention_mask=attention_mask).logits

    def example_losses(self, batch: Any, *, sample: bool = False) -> Tensor:
        """Per-example losses ``[B]``: summed token losses. Override for other tasks.

        Args:
            batch: A batch of the dataloader.
            sample: Use labels sampled from the model (true Fisher) instead of ``labels``.
        """
        return lm_example_losses(
            self.network, batch, sample=sample, seed=self.hparams.seed, salt=self._phase
        )

    @override
    def configure_optimizers(self) -> list:
        """No optimizer (an empty list, so Lightning does not warn): weights never change."""
        return []

    # ------------------------------------------------------------------ fitting

    @override
    def on_fit_start(self) -> None:
        if self._phase == 0:
            self._prepare_factors_dir()
        elif self._phase >= len(PHASES):
            rank_zero_warn(f"EK-FAC factors in {self.factors_dir} are complete; nothing to fit")

    @override
    def on_train_epoch_start(self) -> None:
        dtype, tracked = self.factor_dtype, self.tracked
        if self._phase == 0:
            self._sums = CovarianceSums(tracked, dtype)
            self._sums.init(self.shapes, self.device)
        elif self._phase == 1:
            if self._eigenvectors is None:
                self._eigenvectors = _read_eigenvectors(self.factors_dir, tracked)
            self._sums = LambdaSums(tracked, self._eigenvectors, dtype)
            self._sums.init(self.shapes, self.device)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self._sums is None:
            return None  # every phase is done
        net = self.network
        if net.training:
            net.eval()  # no dropout while fitting factors
        with LinearTaps(net, self.tracked) as taps:
            losses = self.example_losses(batch, sample=self.hparams.fisher == "true")
            pairs = taps.backward(losses.sum())
        if isinstance(self._sums, CovarianceSums):
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            self._sums.update(pairs, mask)
        else:
            self._sums.update(pairs)
        self.log("ekfac/loss", losses.detach().mean(), prog_bar=True, batch_size=len(losses))
        return None

    @override
    def on_train_epoch_end(self) -> None:
        if self._sums is None:
            return
        sums = {k: self._reduce_sum(v) for k, v in self._sums.sums.items()}
        if self._phase == 0:
            self._finish_covariance(sums)
        else:
            self._finish_lambda(sums)
        self._sums = None
        self._phase += 1
        self.trainer.strategy.barrier("ekfac_phase")
        if self._phase >= len(PHASES):
            self.trainer.should_stop = True

    @override
    def on_fit_end(self) -> None:
        if self._phase < len(PHASES):
            rank_zero_warn(
                f"EK-FAC fitting stopped after {self._phase} of {len(PHASES)} phases "
                f"(next: {self.phase!r}); run Trainer(max_epochs=ek.num_phases)"
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ekfac"] = {"phase": self._phase, "factors_dir": str(self.factors_dir)}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume at the phase after the last completed one (factors are read from disk)."""
        self._phase = int(checkpoint.get("ekfac", {}).get("phase", 0))

    def _finish_covariance(self, sums: dict[str, Tensor]) -> None:
        covs = finalize_covariances(sums, self.tracked)
        owner, rank = self._owners(), self.global_rank
        eigen, dtype = {}, self.factor_dtype
        for name, (a, s) in covs.items():
            parts = [
                torch.zeros(d, device=a.device, dtype=torch.float64) for d in _eig_shapes(a, s)
            ]
            if owner[name] == rank:
                (ev_a, q_a), (ev_s, q_s) = (
                    eigendecompose(a, module=name, factor="activation covariance"),
                    eigendecompose(s, module=name, factor="gradient covariance"),
                )
                parts = [ev_a, q_a, ev_s, q_s]
            # a sum of zeros and the owner's values: a broadcast any strategy can do
            eigen[name] = [self._reduce_sum(p) for p in parts]
        mine = [n for n in covs if owner[n] == rank]
        write_shard(self.factors_dir, "activation_covariance", rank, {n: covs[n][0] for n in mine})
        write_shard(self.factors_dir, "gradient_covariance", rank, {n: covs[n][1] for n in mine})
        for kind, offset in (("activation_eigen", 0), ("gradient_eigen", 2)):
            tensors = {}
            for n in mine:
                tensors[f"{n}.eigenvalues"] = eigen[n][offset].to(dtype)
                tensors[f"{n}.eigenvectors"] = eigen[n][offset + 1].to(dtype)
            write_shard(self.factors_dir, kind, rank, tensors)
        self._eigenvectors = {n: (e[3].to(dtype), e[1].to(dtype)) for n, e in eigen.items()}
        self._write_json("covariance", sums, ("activation", "gradient"))

    def _finish_lambda(self, sums: dict[str, Tensor]) -> None:
        lam = finalize_lambda(sums, self.tracked)
        owner, rank = self._owners(), self.global_rank
        mine = {n: v for n, v in lam.items() if owner[n] == rank}
        write_shard(self.factors_dir, "eigenvalue_correction", rank, mine)
        self._write_json("eigenvalue_correction", sums, ("lambda",))
        self._factors = None  # scoring reloads the complete factors
        self._warn_if_padded(max(float(sums[f"{n}/lambda_count"]) for n in lam))

    def _warn_if_padded(self, examples: float) -> None:
        """A DistributedSampler pads a dataset not divisible by the world size with repeats."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        size = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        if size is not None and examples > size:
            rank_zero_warn(
                f"EK-FAC counted {int(examples)} examples but the dataset has {size}: the "
                "distributed sampler repeated examples to give every rank the same number, so "
                "they weigh twice in the factors. Use a dataset size divisible by the world "
                "size, or Trainer(use_distributed_sampler=False) with your own sampler."
            )

    def _reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks (contiguous first: collectives read raw storage, and eigh's
        eigenvectors are column-major)."""
        return self.trainer.strategy.reduce(t.contiguous(), reduce_op="sum")

    def _owners(self) -> dict[str, int]:
        return assign_shards(self.shapes, self.trainer.world_size)

    def _prepare_factors_dir(self) -> None:
        config = self.factors_dir / "config.json"
        if config.exists() and not self.hparams.overwrite:
            raise FileExistsError(
                f"EK-FAC factors already exist in {self.factors_dir}; pass overwrite=True or "
                "choose another factors_dir"
            )
        if self.trainer.is_global_zero and self.factors_dir.exists():
            for sub in self.factors_dir.glob("*_sharded"):
                shutil.rmtree(sub)  # stale shards of another world size would be merged
            config.unlink(missing_ok=True)
        self.trainer.strategy.barrier("ekfac_prepare")

    def _write_json(self, phase: str, sums: dict[str, Tensor], kinds: Sequence[str]) -> None:
        if not self.trainer.is_global_zero:
            return
        path = self.factors_dir / "counts.json"
        counts = read_json(path) if path.exists() and phase != "covariance" else {}
        for kind in kinds:
            counts[kind] = {n: round(float(sums[f"{n}/{kind}_count"])) for n in self.tracked}
        write_json(path, counts)
        done = list(PHASES[: PHASES.index(phase) + 1])
        write_json(self.factors_dir / "config.json", self._config(done))

    def _config(self, done: list[str]) -> dict[str, Any]:
        owner = self._owners()
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "method": "ekfac",
            "fisher": self.hparams.fisher,
            "include_bias": self.hparams.include_bias,
            "factor_dtype": self.hparams.factor_dtype,
            "world_size": self.trainer.world_size,
            "modules": {n: {"shape": list(s), "shard": owner[n]} for n, s in self.shapes.items()},
            "phases_completed": done,
            "normalization": {
                "example_loss": "sum of supervised token losses",
                "activation_covariance": "sum over attention-masked tokens / token count",
                "gradient_covariance": "sum over attention-masked tokens / token count",
                "eigenvalue_correction": "sum over examples / example count",
            },
            "model": model_fingerprint(self.network),
        }


def assign_shards(shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """Owner rank of each module: largest eigendecompositions first, to the least-loaded rank."""
    load = [0] * max(world_size, 1)
    owner = {}
    for name in sorted(shapes, key=lambda n: (-(shapes[n][0] ** 3 + shapes[n][1] ** 3), n)):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += shapes[name][0] ** 3 + shapes[name][1] ** 3
    return owner


def _eig_shapes(a: Tensor, s: Tensor) -> list[tuple[int, ...]]:
    return [(a.shape[0],), tuple(a.shape), (s.shape[0],), tuple(s.shape)]


def _read_eigenvectors(
    factors_dir: Path, tracked: dict[str, bool]
) -> dict[str, tuple[Tensor, Tensor]]:
    act, grad = (
        read_factor(factors_dir, "activation_eigen"),
        read_factor(factors_dir, "gradient_eigen"),
    )
    return {n: (grad[f"{n}.eigenvectors"], act[f"{n}.eigenvectors"]) for n in tracked}
