"""IndexModule: build a gradient store post hoc from an already trained model (Bergson's ``build``).

``fit`` with this module runs the model once over a dataset: every training step computes
the batch loss and backpropagates it (manual optimization, no optimizer, parameters never
change), so the attached :class:`~lightning_bergson.GradientCaptureCallback` stores exactly
the rows it would capture for the same parameters during training. Strategies, precision
and progress bars are Lightning's.

Run: ``python -m lightning_bergson index --config configs/index.yaml``
(``index`` is ``fit`` with this module; 1 epoch, no shuffling).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ..callbacks import GradientCaptureCallback
from ..losses import batch_losses
from .compat import resolve_network
from .loading import load_model

__all__ = ["IndexModule"]


class IndexModule(L.LightningModule):
    """Backpropagate a trained causal LM's loss over a dataset without updating it.

    The loss is Hugging Face's batch mean over supervised tokens (as ``CausalLMModule``);
    the capture callback measures each example's scale in it (the causal-LM rule), so the
    rows are the gradients of each document's summed token loss. Dropout is off (the
    network runs in eval mode).

    Args:
        model: A Lightning checkpoint of a ``CausalLMModule`` (a ``.ckpt`` file or a
            directory holding checkpoints: the newest is used), a ``save_pretrained``
            directory, a Hugging Face model name (e.g. ``EleutherAI/pythia-14m``), or an
            ``nn.Module``.

    Example:
        >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        >>> net = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> module = IndexModule(net)
        >>> module.automatic_optimization, module.configure_optimizers()
        (False, None)
    """

    def __init__(self, model: str | nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.automatic_optimization = False
        loaded = model if isinstance(model, nn.Module) else load_model(model)[0]
        self.model = resolve_network(loaded, "auto")
        for p in self.model.parameters():
            p.requires_grad_(True)

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, S, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @override
    def on_fit_start(self) -> None:
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GradientCaptureCallback) and cb.deferred:
                raise ValueError(
                    f"GradientCaptureCallback(normalizer={cb.normalizer!r}, "
                    "normalizer_source='optimizer') needs optimizer steps, but IndexModule takes "
                    "none. Use normalizer_source='file' with normalizer_path=<normalizers."
                    "safetensors> (e.g. <training store>/normalizers/normalizers.safetensors)."
                )
        if self.trainer.max_epochs != 1:
            rank_zero_warn(
                f"IndexModule with max_epochs={self.trainer.max_epochs} stores every example "
                "once per epoch with identical parameters; set trainer.max_epochs=1"
            )

    @override
    def on_train_epoch_start(self) -> None:
        self.model.eval()  # no dropout: a post-hoc index describes the deterministic model

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss, example_loss = batch_losses(logits, batch)  # token_mean, as Hugging Face
        self.manual_backward(loss)
        for p in self.model.parameters():
            p.grad = None  # nothing accumulates: there is no optimizer step
        self.log("index/loss", loss.detach(), prog_bar=True, batch_size=len(example_loss))
        return {"loss": loss.detach()}  # the callback stores the causal-LM losses itself

    @override
    def configure_optimizers(self) -> Any:
        return None
