"""MagicModule: train a causal LM as a differentiable function of data weights, then attribute.

Run: ``python -m lightning_bergson fit --config configs/magic.yaml``

**Sign and units.** A score is ``d L_query / d w_i`` at ``w = 1``: the first-order change of
the query loss (mean token loss of the query, in nats) per unit of weight on training example
``i`` (or token). Negative = upweighting the example lowers the query loss (it helps);
removing example ``i`` changes the query loss by about ``-score_i``. Score arrays are written
with ``convention="metagradient"`` (see :mod:`lightning_bergson.scores`).

**Data order.** The module records every batch it trains on (token tensors and
``example_id``, kept on CPU), so the reverse pass replays exactly those batches in that
order; retrains (finite differences, LDS) need a deterministic loader (``TextDataModule``
is seeded per epoch), which :attr:`MagicModule.data_order` lets callers check.

**Lightning features.** ``Trainer(accumulate_grad_batches=k)``: one MAGIC step takes all
``k`` micro-batches (normalized by the step's token count, so it equals one batch of all of
them; :mod:`.loop`). ``Trainer(strategy="ddp", devices=N)``: every rank trains on and
replays its shard of each global batch, and :meth:`MagicModule.attribute` returns the full
scores on every rank (:mod:`.distributed`). ``Trainer.fit(..., ckpt_path=...)`` resumes an
interrupted forward fit exactly (:mod:`.resume`; across processes with ``checkpoint_dir``).
The reverse pass is resumable on its own (``reverse_state_path``).

**Metasmoothness.** Metagradients predict retrained losses only as well as training is
smooth in the data weights. Adam's ``sqrt(v + eps_root)`` is sign-like for parameters with
tiny gradients; a larger ``eps_root`` smooths it. The default, ``1e-4``, gives LDS 0.98
against 0.90 at ``1e-8`` on the biography corpus (``examples/results/lds.md``); it damps the
steps of parameters whose gradient RMS is below ``sqrt(eps_root)``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from ..networks import build_network, can_build_now, vocab_from_datamodule
from ..scores import ScoreSettings, write_scores
from .forward import ForwardFit, force_eager_attention
from .functional import (
    DEFAULT_EPS_ROOT,
    Granularity,
    OptimizerConfig,
    Schedule,
    metasmoothness_score,
)
from .queries import query_batch
from .reverse import metagradients, replay
from .step import FunctionalTrainer
from .trajectory import Trajectory

__all__ = ["MagicModule", "force_eager_attention"]

_PRECONDITIONER = "none (exact metagradients)"  # what a MAGIC score array states


class MagicModule(ForwardFit):
    """MAGIC: exact metagradients of a query loss w.r.t. every training example's weight.

    ``fit`` trains with a functional optimizer (:mod:`.optim`, manual optimization) on the loss
    ``sum_i w_i L_i / n`` (see :mod:`lightning_bergson.magic.functional`), records every batch
    and keeps (parameters, optimizer state, RNG state) on ``checkpoint_schedule``.
    :meth:`attribute` then runs the reverse pass. The same module with ``data_weights``
    retrains on reweighted data (finite differences, LDS).

    Args:
        model: A Hugging Face name, a ``save_pretrained`` directory or an ``nn.Module``.
        config: Build a fresh model from config keys instead (as ``CausalLMModule``).
        vocab_size: Vocabulary size (default: the data module's).
        num_examples: ``N``, the number of training rows (default: the data module's
            ``train_dataset`` length); ``example_id`` must be below it.
        optimizer: ``"adamw"`` or ``"sgd"``.
        lr: Learning rate (constant).
        weight_decay: AdamW decoupled weight decay, or SGD L2 penalty.
        betas: Adam betas.
        eps: Adam epsilon outside the square root.
        eps_root: Adam epsilon inside the square root (> 0, for differentiability at 0;
            default 1e-4 for smooth metagradients, see ``OptimizerConfig``).
        momentum: SGD momentum.
        max_grad_norm: Clip gradients to this global norm (differentiated through).
        warmup_steps: Linear learning-rate warmup steps (0: constant learning rate).
        checkpoint_schedule: ``"sqrt"`` (default), ``"all"`` or ``"log"``.
        checkpoint_dir: Keep checkpoints and batches on disk there (safetensors) instead of
            in memory; needed to resume the forward fit in a new process (under DDP each
            rank writes ``<checkpoint_dir>/rank_<r>``).
        weight_granularity: ``"example"`` (scores ``[N]``) or ``"token"`` (``[N, S]``, the
            weight at position ``t`` scales the loss of predicting token ``t``).
        data_weights: Training weights ``[N]`` (or ``[N, S]``); ``None`` = all ones.
        queries: Query texts scored after ``fit`` when ``scores_path`` is set.
        query_facts: Fact ids of the data module's biography corpus (loss on the answer).
        per_query: After ``fit``, one score row per query (else one aggregate row).
        scores_path: Write the scores after ``fit`` to this Zarr score array.
        reverse_state_path: Save the reverse pass there to resume it after an interruption.
        save_every: Reverse steps between saves of the reverse state.
        seed: Initialization seed for models built from ``config``.

    Example:
        >>> import lightning.pytorch as L
        >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        >>> net = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=11, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        ...     attn_implementation="eager"))
        >>> ids = torch.randint(0, 11, (4, 5))
        >>> data = torch.utils.data.DataLoader([{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2],
        ...     "example_id": torch.arange(i, i + 2)} for i in (0, 2)], batch_size=None)
        >>> mm = MagicModule(net, num_examples=4, optimizer="sgd", lr=0.1)
        >>> L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False).fit(mm, data)
        >>> mm.attribute({"input_ids": ids[:1], "labels": ids[:1]}).shape
        torch.Size([1, 4])
    """

    needs_example_id = True  # the Bergson strategies keep batch["example_id"] for it

    def __init__(
        self,
        model: str | nn.Module | None = None,
        *,
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        num_examples: int | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_root: float = DEFAULT_EPS_ROOT,
        momentum: float = 0.0,
        max_grad_norm: float | None = None,
        warmup_steps: int = 0,
        checkpoint_schedule: Schedule = "sqrt",
        checkpoint_dir: str | None = None,
        weight_granularity: Granularity = "example",
        data_weights: Tensor | None = None,
        queries: list[str] | None = None,
        query_facts: list[int] | None = None,
        per_query: bool = True,
        scores_path: str | None = None,
        reverse_state_path: str | None = None,
        save_every: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if model is None and config is None:
            raise ValueError(
                "MagicModule needs `model` (a Hugging Face name, a directory or an nn.Module) or"
                " `config` (e.g. {'model_type': 'gpt_neox', 'hidden_size': 64})"
            )
        if checkpoint_schedule not in ("all", "sqrt", "log"):
            raise ValueError(
                f"checkpoint_schedule={checkpoint_schedule!r} is not one of 'all', 'sqrt', 'log'"
            )
        self.automatic_optimization = False
        ignore = ["model", "data_weights"] if isinstance(model, nn.Module) else ["data_weights"]
        self.save_hyperparameters(ignore=ignore)
        self.optimizer_config = OptimizerConfig(
            optimizer,
            lr,
            weight_decay,
            tuple(betas),
            eps,
            eps_root,
            momentum,
            max_grad_norm,
            warmup_steps,
        )
        self.granularity: Granularity = weight_granularity
        self.num_examples = num_examples
        self.data_weights = data_weights
        self.scores_path = scores_path
        self.trajectory: Trajectory | None = None
        self.model: nn.Module | None = None
        self._step_fn: FunctionalTrainer | None = None
        self._state = None
        self._pending: list[dict[str, Tensor]] = []  # micro-batches of the step in progress
        self._resume_record: dict[str, Any] | None = None
        self._source = None if isinstance(model, nn.Module) else model  # not a 2nd submodule
        if can_build_now(model, config, vocab_size):
            self._set_network(build_network(model, config, vocab_size, "eager", seed))

    def _set_network(self, net: nn.Module) -> None:
        force_eager_attention(net)
        self.model = net
        self._step_fn = FunctionalTrainer(net, self.optimizer_config, self.granularity)

    @property
    def step_fn(self) -> FunctionalTrainer:
        """The functional training step (built with the network)."""
        if self._step_fn is None:
            raise RuntimeError(
                "the network is built in configure_model; fit first or pass vocab_size"
            )
        return self._step_fn

    @property
    def data_weights(self) -> Tensor | None:
        """Training weights ``[N]`` or ``[N, S]`` (``None``: all ones)."""
        return self._data_weights

    @data_weights.setter
    def data_weights(self, weights: Tensor | None) -> None:
        if weights is not None:
            weights = torch.as_tensor(weights)
            ndim = 1 if self.granularity == "example" else 2
            if weights.ndim != ndim:
                raise ValueError(
                    f"data_weights has shape {tuple(weights.shape)}; weight_granularity="
                    f"{self.granularity!r} needs {'[N]' if ndim == 1 else '[N, S]'}"
                )
        self._data_weights = weights

    @override
    def configure_model(self) -> None:
        """Build the network with the data module's vocabulary; read ``num_examples`` from it."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if self.num_examples is None and hasattr(datamodule, "train_dataset"):
            self.num_examples = len(datamodule.train_dataset)  # type: ignore[union-attr]
        if self.model is not None:
            return
        vocab_size = vocab_from_datamodule(self, "MagicModule")
        hp = self.hparams
        self._set_network(build_network(self._source, hp.config, vocab_size, "eager", hp.seed))

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, S, V]`` of the current network."""
        assert self.model is not None, "the network is built in configure_model"
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @override
    def on_fit_end(self) -> None:
        if self.scores_path is None:
            return
        batch = self.default_query_batch()
        scores = self.attribute(batch, per_query=self.hparams.per_query)  # every rank
        scores = scores if self.hparams.per_query else scores[None]
        if self.trainer.is_global_zero:
            path = self.write_scores(self.scores_path, scores, per_query=self.hparams.per_query)
            rank_zero_info(f"MAGIC scores {tuple(scores.shape)}: {Path(path).resolve()}")

    def default_query_batch(self) -> dict[str, Tensor]:
        """The query batch of ``queries`` and ``query_facts`` (tokenized by the data module)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("queries need the data module's tokenizer; fit with a TextDataModule")
        facts = []
        if self.hparams.query_facts:
            corpus = getattr(datamodule, "corpus", None)
            if corpus is None:
                raise ValueError("query_facts need dataset='bios' (the biography corpus)")
            facts = [corpus.facts[i] for i in self.hparams.query_facts]
        return query_batch(tokenizer, self.hparams.queries or (), facts)

    def attribute(
        self,
        query: dict[str, Tensor],
        *,
        per_query: bool = True,
        state_path: str | Path | None = None,
        save_every: int | None = None,
    ) -> Tensor:
        """Metagradients ``dL_query/dw``: ``[Q, N]`` (``[Q, N, S]`` per token).

        After a data-parallel fit every rank must call it (the reverse pass runs on every
        rank's shard in lockstep); every rank gets the full scores.

        Args:
            query: ``input_ids``, ``labels`` (``-100`` = not scored), ``attention_mask``.
            per_query: One row per query; ``False`` gives one row ``[N]`` (``[N, S]``) for
                the aggregate loss (mean over all supervised query tokens).
            state_path: Resumable reverse state (default: ``reverse_state_path``).
            save_every: Reverse steps between saves (default: ``save_every``).
        """
        if self.trajectory is None or self.trajectory.final is None:
            raise RuntimeError("attribute() needs a finished fit (or load_trajectory(...)) first")
        num = self._num_examples()
        scores = metagradients(
            self.step_fn,
            self.trajectory,
            query,
            num_examples=num,
            data_weights=self.data_weights,
            per_query=per_query,
            state_path=state_path or self.hparams.reverse_state_path,
            save_every=self.hparams.save_every if save_every is None else save_every,
        )
        return scores if per_query else scores[0]

    @torch.no_grad()
    def query_loss(self, query: dict[str, Tensor], *, per_query: bool = True) -> Tensor:
        """Query losses after training: ``[Q]`` mean token losses (or the aggregate scalar)."""
        if self.trajectory is not None and self.trajectory.final is not None:
            params = self.trajectory.final.params
        else:
            params = {n: p for n, p in self.step_fn.model.named_parameters() if p.requires_grad}
        device = next(iter(params.values())).device
        losses = self.step_fn.query_losses(
            params, {k: v.to(device) for k, v in query.items()}, per_query=per_query
        )
        return losses if per_query else losses[0]

    def metasmoothness(self, *, h: float = 0.1, seed: int = 0, warn_below: float = 0.9) -> float:
        """Empirical metasmoothness of this fit: how linearly training responds to weights.

        Retrains twice from the recorded initial state over the recorded batches, with data
        weights ``w + h v`` and ``w + 2h v`` (``v ~ N(0, I)`` over the examples, or tokens,
        seeded by ``seed``), and returns :func:`~lightning_bergson.magic.functional.
        metasmoothness_score` of the three final parameter vectors (arXiv 2503.13751, Def. 2;
        1 = linear). It needs no LDS retrain bank and costs two forward trainings. Below
        ``warn_below`` a warning names the knobs that smooth training (``eps_root``,
        ``lr``, ``warmup_steps``, ``max_grad_norm``). On the biography LDS example
        (``examples/lds.py``, ``h=0.1``): 0.997 with ``eps_root=1e-4`` (LDS 0.98) and
        0.656 with ``1e-8`` (LDS 0.90, 0.82 with 95% kept). After a data-parallel fit every
        rank must call it (the retrains sum gradients over ranks).
        """
        traj = self.trajectory
        if traj is None or traj.final is None:
            raise RuntimeError("metasmoothness() needs a finished fit first")
        start = traj.state(0)
        assert start is not None, "the state before step 0 is always kept"
        like = next(iter(start.params.values()))
        shape: tuple[int, ...] = (self._num_examples(),)
        if self.granularity == "token":
            shape = (*shape, max(b["input_ids"].shape[1] for step in traj.batches for b in step))
        base = (
            torch.ones(shape, dtype=like.dtype)
            if self.data_weights is None
            else self.data_weights.to(like.dtype).cpu()
        )
        gen = torch.Generator().manual_seed(seed)
        direction = torch.randn(base.shape, generator=gen, dtype=torch.float64).to(like.dtype)
        finals = [traj.final.params]
        for k in (1, 2):
            state = replay(self.step_fn, traj, start, traj.num_steps, base + k * h * direction)
            finals.append(state.params)
        flat = [torch.cat([p.detach().reshape(-1) for p in f.values()]) for f in finals]
        score = metasmoothness_score(*flat)
        if score < warn_below:
            warnings.warn(
                f"metasmoothness {score:.3f} < {warn_below}: training is rough in the data "
                "weights, so metagradients will predict retrains poorly. Smooth it: a larger "
                f"eps_root (now {self.optimizer_config.eps_root:g}), a smaller lr, "
                "warmup_steps, or max_grad_norm.",
                stacklevel=2,
            )
        return score

    def load_trajectory(self, directory: str | Path) -> None:
        """Reopen a finished forward run saved with ``checkpoint_dir`` (e.g. to attribute in
        a new process; after a data-parallel fit, one rank's ``rank_<r>`` directory)."""
        self.trajectory = Trajectory.load(directory, like=self.step_fn.init_state())

    def _num_examples(self) -> int:
        """``N``: ``num_examples``, else one more than the largest recorded ``example_id``."""
        if self.num_examples is not None:
            return self.num_examples
        assert self.trajectory is not None
        num = 1 + max(int(b["example_id"].max()) for step in self.trajectory.batches for b in step)
        group = self.step_fn.group
        return num if group is None else group.max_int(num)

    @property
    def data_order(self) -> str:
        """Hash of the example ids of every step (this rank's), to check that retrains saw
        the same order."""
        if self.trajectory is None:
            return ""
        digest = hashlib.sha256()
        for step in self.trajectory.batches:
            ids = b"".join(b["example_id"].cpu().numpy().tobytes() for b in step)
            digest.update(ids + b"|")
        return digest.hexdigest()[:16]

    def write_scores(self, path: str | Path, scores: Tensor, *, per_query: bool = True) -> Path:
        """Write ``[Q, N(, S)]`` scores as a ``convention="metagradient"`` score array.

        Args:
            path: Output directory (``*.zarr``).
            scores: :meth:`attribute`'s scores; ``[1, N(, S)]`` for the aggregate query.
            per_query: Whether the rows are the queries' own scores (``False``: one row for
                the aggregate query loss, the token-weighted mean of the queries' rows).
        """
        meta = {
            "units": "d(query mean token loss) / d(weight); negative = helpful",
            "weight_granularity": self.granularity,
            "optimizer": {k: v for k, v in vars(self.optimizer_config).items()},
            "num_steps": self.trajectory.num_steps if self.trajectory else 0,
            "data_order": self.data_order,
            "queries": list(self.hparams.queries or []),
            "query_facts": list(self.hparams.query_facts or []),
            "per_query": per_query,
        }
        settings = ScoreSettings(
            preconditioner=_PRECONDITIONER,
            columns="examples",
            query_reduce="none" if per_query else "token-weighted mean",
        )
        ids = torch.arange(scores.shape[1])
        return write_scores(
            path,
            scores,
            ids,
            method="magic",
            convention="metagradient",
            metadata=meta,
            settings=settings,
            overwrite=True,
        )
