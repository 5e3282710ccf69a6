"""CausalLMModule: a LightningModule around any Hugging Face causal language model.

Run: ``python -m lightning_bergson fit --config configs/quickstart.yaml``
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from .losses import batch_losses, causal_lm_losses
from .networks import (
    build_network,
    can_build_now,
    check_model_source,
    config_dict,
    vocab_from_datamodule,
)
from .strategy import BergsonStrategyMixin as _registers_strategy_names  # noqa: F401

# losses and check_model_source re-exported (their homes: losses.py, networks.py)
__all__ = ["CausalLMModule", "batch_losses", "causal_lm_losses", "check_model_source"]

_build_network = build_network  # the old private name, still imported by magic/module.py


def _fully_shard(model: nn.Module, mesh: Any) -> None:
    """FSDP2: shard each transformer block, then the root (data-parallel mesh dimension)."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    blocks = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and m is not model
    ]
    for layer in blocks[0] if blocks else []:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


class CausalLMModule(L.LightningModule):
    """Train a causal LM with AdamW (or Adafactor) on batches of ``input_ids``/``labels``.

    ``training_step`` returns the batch loss Hugging Face would compute (mean over
    every supervised token of the batch) and, as ``example_loss``, each example's summed
    token loss in the graph of that loss: the per-example loss contract of
    :class:`~lightning_bergson.GradientCaptureCallback`, whose rows are then the gradients
    of those sums (their means with ``loss_reduction="mean"``).

    Args:
        model: A Hugging Face model name, a local directory written by ``save_pretrained``,
            or an ``nn.Module`` (a ``PreTrainedModel``) to wrap as is.
        config: Build a fresh model from config keys instead, e.g.
            ``{"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2}``
            (a ``PretrainedConfig`` works too).
        vocab_size: Override the vocabulary size (the CLI links it from the data module).
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or ``"adafactor"``
            (``torch.optim.Adafactor``).
        lr: Learning rate.
        weight_decay: Decoupled weight decay.
        betas: Adam betas (AdamW only).
        eps: Adam epsilon (AdamW only).
        warmup_steps: Linear learning-rate warmup steps (0 = constant).
        attn_implementation: ``"eager"`` (exact, twice differentiable) or ``"sdpa"``.
        seed: Initialization seed for models built from ``config``.

    Example:
        >>> module = CausalLMModule(config={"model_type": "gpt_neox", "vocab_size": 64,
        ...     "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...     "intermediate_size": 32})
        >>> module(torch.randint(0, 64, (2, 5))).shape
        torch.Size([2, 5, 64])

        Without ``vocab_size`` in ``config`` the network is built in ``configure_model``
        with the vocabulary of the trainer's data module (``datamodule.vocab_size``).
    """

    example_loss_is_token_sum = True  # `example_loss` is each example's summed token loss

    def __init__(
        self,
        model: str | nn.Module | None = None,
        *,
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        optimizer: Literal["adamw", "adafactor"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        attn_implementation: str = "eager",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer={optimizer!r} is not one of 'adamw', 'adafactor'")
        if model is None and config is None:
            raise ValueError(
                "CausalLMModule needs `model` (a Hugging Face name, a local directory or an "
                "nn.Module) or `config` (e.g. {'model_type': 'gpt_neox', 'hidden_size': 64})"
            )
        if isinstance(model, nn.Module):
            # Keep the network's config in the hyperparameters (not the weights object), so
            # `load_from_checkpoint` rebuilds the same architecture and loads the weights.
            self.save_hyperparameters(ignore=["model"])
            if config is None and hasattr(model, "config"):
                self.hparams.config = config_dict(model.config)
        else:
            self.save_hyperparameters()
        self.model: nn.Module | None = None
        if can_build_now(model, config, vocab_size):
            self.model = build_network(model, config, vocab_size, attn_implementation, seed)
        self._source = model if isinstance(model, str) else None  # never a second module ref

    @override
    def configure_model(self) -> None:
        """Build the network once the data module's vocabulary is known; shard it under FSDP2."""
        if self.model is None:
            self._build_from_datamodule()
        if self._device_mesh is not None and not getattr(self, "_sharded", False):
            _fully_shard(self.model, self._device_mesh)
            self._sharded = True

    def _build_from_datamodule(self) -> None:
        vocab_size = vocab_from_datamodule(self, "CausalLMModule")
        hp = self.hparams
        self.model = build_network(
            self._source, hp.config, vocab_size, hp.attn_implementation, hp.seed
        )

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, S, V]``."""
        assert self.model is not None, "the network is built in configure_model"
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch_losses(self(batch["input_ids"], batch.get("attention_mask")), batch)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss, example_loss = self._losses(batch)
        if self._trainer is not None:  # also usable as a plain function in tests and notebooks
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return {"loss": loss, "example_loss": example_loss}

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._losses(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adafactor":
            opt: torch.optim.Optimizer = torch.optim.Adafactor(
                params, lr=hp.lr, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.AdamW(
                params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
            )
        if not hp.warmup_steps:
            return opt
        warmup = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / hp.warmup_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
