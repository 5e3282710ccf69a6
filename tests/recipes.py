"""Recipes nobody here wrote, as users bring them, and a backward-loop per-example oracle.

Each recipe is a LightningModule around a model from Lightning's demos, Hugging Face
configs or plain torch. ``contract=True`` adds the two lines of the per-example loss
contract (``example_loss`` next to ``loss``); ``contract=False`` is the recipe as shipped.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from oracles import Rows, assert_rows_match, example_losses, rows_by_id
from oracles import tiny_gpt2 as oracle_gpt2
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_bergson import GradientStore


def trainer(*callbacks, strategy="auto", accumulate=1, max_steps=-1, max_epochs=1, **kw):
    """A quiet CPU ``Trainer`` (no logger, checkpoints, progress bar or summary)."""
    return L.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def fit_with_capture(module, data, callback, *, batch_size=3, shuffle=False, **trainer_kw):
    """Fit ``module`` on the batch dict ``data`` with ``callback``; returns the trainer.

    Args:
        shuffle: Shuffle with a fixed generator (each epoch another order, every run the same).
        trainer_kw: ``accumulate``, ``max_epochs``, ``max_steps``, ... of :func:`trainer`.
    """
    fit = trainer(callback, **trainer_kw)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(Rows(data), batch_size=batch_size, shuffle=shuffle, generator=gen)
    fit.fit(module, loader)
    return fit


def weight_block(module: nn.Module, grad: Tensor) -> Tensor:
    """A weight gradient in the store's block layout ``[O, I]``."""
    if type(module).__name__ == "Conv1D":  # HF Conv1D keeps its weight [in, out]
        return grad.T
    return grad.reshape(grad.shape[0], -1)


def loop_oracle(network: nn.Module, names: list[str], loss_of: callable, ids) -> dict[int, Tensor]:
    """Per-example rows by a plain backward loop: ``{id: cat_m vec(grad_W_m loss_of(id))}``."""
    modules = dict(network.named_modules())
    weights = [modules[n].weight for n in names]
    out = {}
    for i in ids:
        grads = torch.autograd.grad(loss_of(int(i)), weights, allow_unused=True)
        parts = [
            weight_block(modules[n], torch.zeros_like(w) if g is None else g).flatten()
            for n, w, g in zip(names, weights, grads, strict=True)
        ]
        out[int(i)] = torch.cat(parts).detach().float()
    return out


def summed_lm_loss(network: nn.Module, batch: dict[str, Tensor]):
    """``loss_of(i)``: example ``i``'s summed shifted token loss, the example run alone."""

    def loss_of(i: int) -> Tensor:
        logits = network(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
        ).logits
        return example_losses(logits, batch["labels"][i : i + 1])[0]

    return loss_of


def assert_store_matches(path, want: dict[int, Tensor], tol: float = 1e-5) -> GradientStore:
    """Every stored row equals the oracle row of its example (relative L2 error <= tol)."""
    store = GradientStore.open(path)
    assert_rows_match(rows_by_id(store), want, tol)
    return store


def stored_modules(path) -> list[str]:
    return [b.parent for b in GradientStore.open(path).modules]


# ---------------------------------------------------------------------------- recipes


class TokenPairs(torch.utils.data.Dataset):
    """``(inputs, target)`` token pairs: the demo transformer's tuple batches."""

    def __init__(self, n: int = 8, seq: int = 6, vocab: int = 23, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, seq), generator=gen)
        self.y = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def demo_transformer(vocab: int = 23):
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    return Transformer(vocab_size=vocab, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.0)


class DemoTransformerModule(L.LightningModule):
    """``lightning.pytorch.demos.LightningTransformer``'s step, optionally with the contract."""

    def __init__(self, contract: bool, vocab: int = 23) -> None:
        super().__init__()
        self.model = demo_transformer(vocab)
        self.contract = contract

    def example_losses(self, inputs: Tensor, target: Tensor) -> Tensor:
        out = self.model(inputs, target)  # (B*S, V) log-probabilities
        nll = F.nll_loss(out, target.reshape(-1), reduction="none")  # (B*S,)
        return nll.view(inputs.shape[0], -1).mean(1)  # (B,)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        if not self.contract:  # the demo as shipped
            output = self.model(inputs, target)
            return F.nll_loss(output, target.view(-1))
        example_loss = self.example_losses(inputs, target)
        return {"loss": example_loss.mean(), "example_loss": example_loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


class ContractBoringModel:
    """``BoringModel`` with the contract added (built lazily: the demos import is slow)."""

    @staticmethod
    def make(contract: bool):
        from lightning.pytorch.demos.boring_classes import BoringModel

        class Boring(BoringModel):
            def training_step(self, batch, batch_idx):
                if not contract:
                    return super().training_step(batch, batch_idx)
                out = self(batch)  # (B, 2)
                example_loss = (out - 1).square().mean(1)  # (B,) mse per example
                return {"loss": example_loss.mean(), "example_loss": example_loss}

        torch.manual_seed(0)
        return Boring()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=31,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg)


def classification_batch(n: int = 8, seq: int = 7, vocab: int = 31, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    lengths = torch.randint(3, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (n,), generator=gen),
        "example_id": torch.arange(n),
    }


class ClassifierModule(L.LightningModule):
    """A sequence classifier trained on Hugging Face's own ``.loss``, or with the contract."""

    def __init__(self, model: nn.Module, contract: bool, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.contract, self.lr = model, contract, lr

    def training_step(self, batch, batch_idx):
        inputs = {k: v for k, v in batch.items() if k != "example_id"}
        if not self.contract:
            return self.model(**inputs).loss
        logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        example_loss = F.cross_entropy(logits.logits, inputs["labels"], reduction="none")
        return {"loss": example_loss.mean(), "example_loss": example_loss}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class HFCausalModule(L.LightningModule):
    """A causal LM trained on Hugging Face's ``.loss`` (no contract: the causal-LM rule)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return self.model(**{k: v for k, v in batch.items() if k != "example_id"}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def tiny_gpt2(vocab: int = 41):
    return oracle_gpt2(vocab_size=vocab)


def tiny_llama(vocab: int = 41):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


class AdvantageModule(L.LightningModule):
    """Policy-gradient style: ``loss = mean_i A_i * CE_i`` with per-example advantages."""

    def __init__(self, model: nn.Module, advantages: Tensor) -> None:
        super().__init__()
        self.model, self.advantages = model, advantages

    def example_losses(self, batch) -> Tensor:
        from lightning_bergson.losses import causal_lm_losses

        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce, _ = causal_lm_losses(logits.logits, batch["labels"])  # (B,) summed token losses
        return self.advantages[batch["example_id"]] * ce

    def training_step(self, batch, batch_idx):
        example_loss = self.example_losses(batch)
        return {"loss": example_loss.mean(), "example_loss": example_loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class SmallCNN(nn.Module):
    """Conv2d -> Conv1d -> Linear on ``[B, 1, 8, 8]`` images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv2 = nn.Conv2d(1, 3, kernel_size=3, padding=1, stride=2)
        self.conv1 = nn.Conv1d(3, 4, kernel_size=2, dilation=2)
        self.head = nn.Linear(4 * 14, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(x))  # (B, 3, 4, 4)
        h = torch.tanh(self.conv1(h.flatten(2)))  # (B, 4, 14)
        return self.head(h.flatten(1))  # (B, 5)


class ImageLabels(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seed: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 5, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class CNNModule(L.LightningModule):
    def __init__(self, contract: bool = True) -> None:
        super().__init__()
        self.model, self.contract = SmallCNN(), contract

    def training_step(self, batch, batch_idx):
        x, y = batch
        example_loss = F.cross_entropy(self.model(x), y, reduction="none")  # (B,)
        if not self.contract:
            return example_loss.mean()
        return {"loss": example_loss.mean(), "example_loss": example_loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def tiny_lora_llama():
    from peft import LoraConfig, get_peft_model

    net = tiny_llama()
    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    return get_peft_model(net, cfg)
