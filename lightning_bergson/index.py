"""IndexModule: build a gradient store post hoc from an already trained model (Bergson's ``build``).

``fit`` with this module runs the model once over a dataset: every training step computes
each document's loss and backpropagates their sum (manual optimization, no optimizer,
parameters never change), so the attached :class:`~lightning_bergson.GradientCaptureCallback`
stores each document's gradient. Strategies, precision and progress bars are Lightning's.

No work is wasted on weights: every parameter is frozen, and the capture hooks give the
lowest tracked layers outputs that require grad, so backward computes only the activation
gradients from the loss down to them (no weight gradient, no embedding gradient).

Run: ``python -m lightning_bergson index --model EleutherAI/pythia-14m --dataset texts.jsonl``
or ``python -m lightning_bergson index --config configs/index.yaml``
(``index`` is ``fit`` with this module; 1 epoch, no shuffling).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .batch import causal_lm_labels
from .callbacks import GradientCaptureCallback, capture_example_loss
from .capture.selection import trackable_modules
from .losses import causal_lm_losses
from .networks import load_model, unwrap_network

__all__ = ["IndexModule"]

DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


class IndexModule(L.LightningModule):
    """Backpropagate each document's loss of a trained causal LM without updating it.

    Each step backpropagates ``sum_i A_i * L_i``, where ``L_i`` is document ``i``'s summed
    token loss (its supervised tokens only: completions, assistant turns) and ``A_i`` its
    advantage when the batch has an ``advantage`` column (reward-weighted gradients, Dr. GRPO),
    else 1. Each ``A_i * L_i`` is handed to the capture callback as the example's loss
    (:func:`~lightning_bergson.capture_example_loss`), so rows are ``grad A_i L_i``
    (``loss_reduction="mean"``: divided by the document's supervised tokens) and the store's
    ``loss`` column holds the same quantity. Dropout is off (eval mode).

    Args:
        model: A Lightning checkpoint of a ``CausalLMModule`` (a ``.ckpt`` file or a
            directory holding checkpoints: the newest is used), a ``save_pretrained``
            directory, a Hugging Face model name (e.g. ``EleutherAI/pythia-14m``), or an
            ``nn.Module``.
        dtype: Parameter dtype: ``"float32"`` (default), ``"float64"``, ``"bfloat16"``,
            ``"float16"``, or ``"auto"`` (as saved). Mixed precision is the trainer's
            ``precision`` instead.

    Example:
        >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        >>> net = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
        >>> module = IndexModule(net)
        >>> module.automatic_optimization, module.configure_optimizers()
        (False, None)
        >>> any(p.requires_grad for p in module.model.parameters())
        False
    """

    example_loss_is_token_sum = True  # without an advantage: each document's summed token loss

    def __init__(self, model: str | nn.Module, *, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(map(repr, DTYPES))}")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.automatic_optimization = False
        loaded = model if isinstance(model, nn.Module) else load_model(model, dtype=dtype)[0]
        network = unwrap_network(loaded)
        if isinstance(model, nn.Module) and dtype not in ("auto", "float32"):
            network = network.to(getattr(torch, dtype))
        # Capture what was trainable when the model came in (for PEFT: the adapters); then
        # freeze everything, so backward computes activation gradients only.
        self.capture_include = [
            name
            for name, mod in trackable_modules(network).items()
            if mod.weight.requires_grad  # type: ignore[union-attr]
        ]
        network.requires_grad_(False)
        self.model = network
        # DDP refuses a module without a trainable parameter: one scalar, added as 0 * it.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, S, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @override
    def setup(self, stage: str) -> None:
        """Refuse settings that cannot be right, before any callback opens its store."""
        if stage != "fit":
            return
        callbacks = [
            cb
            for cb in self.trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, GradientCaptureCallback)
        ]
        if not callbacks:
            rank_zero_warn(
                "IndexModule runs without a GradientCaptureCallback: nothing will be stored"
            )
        for cb in callbacks:
            _check_callback(cb)
        if self.trainer.max_epochs != 1:
            rank_zero_warn(
                f"IndexModule with max_epochs={self.trainer.max_epochs} stores every example "
                "once per epoch with identical parameters; set trainer.max_epochs=1"
            )
        self._check_vocabulary()

    def _check_vocabulary(self) -> None:
        """The data module's tokenizer must fit the model's embedding (no silent garbage)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        vocab = getattr(datamodule, "vocab_size", None)
        rows = self.model.get_input_embeddings().num_embeddings  # type: ignore[operator]
        if vocab is not None and int(vocab) > rows:
            name = getattr(datamodule, "tokenizer_name", None)
            raise ValueError(
                f"the data module's tokenizer ({name or 'trained on the texts'}) has "
                f"{int(vocab)} tokens but the model's embedding has {rows} rows: the texts "
                "were tokenized for another model. Pass the model's own tokenizer "
                "(data.init_args.tokenizer=<model>, or --tokenizer on the index command)."
            )

    @override
    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        batches = self.trainer.num_training_batches
        docs = f"{len(dataset)} documents" if dataset is not None else "the training data"
        _say(f"IndexModule: {docs} in {batches} batches per rank")
        self._loop = {"start": time.perf_counter(), "rows": 0, "tokens": 0}

    @override
    def on_train_end(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        seconds = time.perf_counter() - loop["start"]
        _say(
            f"IndexModule: gradient loop {seconds:.3f} s, {loop['rows']} rows, "
            f"{loop['tokens']} tokens ({loop['tokens'] / max(seconds, 1e-9):.0f} tokens/s, rank 0)"
        )

    @override
    def on_fit_end(self) -> None:
        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GradientCaptureCallback):
                _say(f"IndexModule: gradient store written to {cb.path}")

    @override
    def on_train_epoch_start(self) -> None:
        self.model.eval()  # no dropout: a post-hoc index describes the deterministic model

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        sums, counts = causal_lm_losses(logits, causal_lm_labels(batch))  # (B,), (B,)
        example_loss = sums
        advantage = batch.get("advantage")
        if advantage is not None:
            example_loss = sums * advantage.to(sums)
        capture_example_loss(self, example_loss)
        self.manual_backward(example_loss.sum() + 0.0 * self.ddp_anchor)
        self.ddp_anchor.grad = None  # nothing accumulates: there is no optimizer step
        if hasattr(self, "_loop"):
            self._loop["rows"] += len(sums)
            mask = batch.get("attention_mask")
            self._loop["tokens"] += (
                int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            )
        mean = sums.detach().sum() / counts.sum().clamp(min=1)
        self.log("index/loss", mean, prog_bar=True, batch_size=len(sums))
        return {"loss": example_loss.detach().sum()}

    @override
    def configure_optimizers(self) -> Any:
        return None


@rank_zero_only
def _say(message: str) -> None:
    """One line of progress on stderr, from rank 0 (next to Lightning's own lines)."""
    print(message, file=sys.stderr, flush=True)


def _check_callback(cb: GradientCaptureCallback) -> None:
    """Refuse callback settings that cannot be right for IndexModule's loss."""
    if cb.deferred:
        raise ValueError(
            f"GradientCaptureCallback(normalizer={cb.normalizer!r}, "
            "normalizer_source='optimizer') needs optimizer steps, but IndexModule takes "
            "none. Use normalizer_source='file' with normalizer_path=<normalizers."
            "safetensors> (e.g. <training store>/normalizers/normalizers.safetensors)."
        )
    if cb.batch_reduction not in ("auto", "sum"):
        raise ValueError(
            f"GradientCaptureCallback(batch_reduction={cb.batch_reduction!r}) does not match "
            "IndexModule, which backpropagates the sum of the documents' losses; leave "
            "batch_reduction='auto' (or 'sum'). Per-document length normalization is "
            "loss_reduction='mean'."
        )
