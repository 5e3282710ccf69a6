"""MAGIC test fixtures: a float64-exact tiny GPT-NeoX, a fixed run, finite-difference retrains.

Hugging Face's eager attention computes the softmax in float32 even for a float64 model; that
rounding puts ~1e-10 of noise on retrained losses, more than a central difference with
h = 1e-5 tolerates. ``"eager_float64"`` is the same attention with the softmax in the input
dtype (registered through ``AttentionInterface``), so finite differences converge to ~1e-8.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as L
import torch
from oracles import Rows, lm_batch, tiny_gpt_neox
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import AttentionInterface, GPTNeoXForCausalLM

from lightning_bergson.magic.functional import OptimizerConfig, batch_weights
from lightning_bergson.magic.reverse import metagradients
from lightning_bergson.magic.step import FunctionalTrainer
from lightning_bergson.magic.trajectory import Trajectory

VOCAB = 37


def eager_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """GPT-NeoX eager attention without the float32 softmax upcast."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, S, S)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (B, S, H, D)


AttentionInterface.register("eager_float64", eager_float64)


def tiny_model(attn: str = "eager_float64", dropout: float = 0.0) -> GPTNeoXForCausalLM:
    """1 layer, hidden 16, float64, fixed init."""
    return tiny_gpt_neox(
        0,
        VOCAB,
        torch.float64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation=attn,
        dropout=dropout,
    )


def tiny_batches(num: int = 6, batch: int = 2, seq: int = 6, seed: int = 1) -> list[dict]:
    """``num / batch`` right-padded batches with example ids ``0..num-1``."""
    data = lm_batch(num, seq, VOCAB, seed=seed)
    data["example_id"] = torch.arange(num)
    return [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, num, batch)]


def tiny_rows(num: int = 6, seq: int = 6, seed: int = 1) -> Rows:
    """The examples of :func:`tiny_batches` as a map-style dataset (rows ``0..num-1``)."""
    data = lm_batch(num, seq, VOCAB, seed=seed)
    data["example_id"] = torch.arange(num)
    return Rows(data)


def lightning_fit(
    module: L.LightningModule,
    data: list[dict] | DataLoader,
    *,
    epochs: int = 2,
    precision: str = "64-true",
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> L.Trainer:
    """``L.Trainer(...).fit(module, data)`` quietly on CPU; a list of batches is one epoch."""
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    loader = DataLoader(data, batch_size=None) if isinstance(data, list) else data
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def relative_error(scores: Tensor, reference: Tensor) -> float:
    """Largest ``|scores - reference| / |reference|``."""
    return float(((scores - reference) / reference).abs().max())


def tiny_query(num: int = 2) -> dict[str, Tensor]:
    return {k: v for k, v in lm_batch(num, 6, VOCAB, seed=5).items() if k != "example_id"}


def train(
    cfg: OptimizerConfig,
    batches: Sequence[dict],
    weights: Tensor | None = None,
    *,
    schedule: str = "sqrt",
    granularity: str = "example",
    directory=None,
    dropout: float = 0.0,
) -> tuple[FunctionalTrainer, Trajectory]:
    """The pure training path (what MagicModule.training_step runs) from the fixed init."""
    model = tiny_model(dropout=dropout)
    trainer = FunctionalTrainer(model, cfg, granularity)  # type: ignore[arg-type]
    state = trainer.init_state(torch.manual_seed(7).get_state())
    traj = Trajectory(len(batches), schedule, directory)  # type: ignore[arg-type]
    like = next(iter(state.params.values()))
    for b in batches:
        traj.record(state, b)
        w = batch_weights(weights, b["example_id"], b["input_ids"].shape[1], granularity, like)  # type: ignore[arg-type]
        state, _ = trainer.step(state, b, w)
    traj.finish(state)
    return trainer, traj


def retrained_query_loss(cfg, batches, weights, query, **kw) -> Tensor:
    trainer, traj = train(cfg, batches, weights, **kw)
    assert traj.final is not None
    return trainer.query_losses(traj.final.params, query)


def central_difference(cfg, batches, query, index, shape, h: float = 1e-5, **kw) -> Tensor:
    """``(L(w + h e) - L(w - h e)) / 2h`` per query, at ``w = 1``, ``e`` the ``index`` unit."""
    plus, minus = torch.ones(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
    plus[index] += h
    minus[index] -= h
    up = retrained_query_loss(cfg, batches, plus, query, **kw)
    down = retrained_query_loss(cfg, batches, minus, query, **kw)
    return (up - down) / (2 * h)


def magic(cfg, batches, query, num_examples, **kw) -> Tensor:
    trainer, traj = train(cfg, batches, **kw)
    return metagradients(trainer, traj, query, num_examples=num_examples)
