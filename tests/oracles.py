"""Shared test fixtures: tiny models and the torch.func per-example gradient oracle."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def tiny_gpt_neox(seed: int = 0, vocab_size: int = 97, dtype: torch.dtype = torch.float32):
    """A 2-layer GPT-NeoX small enough for exact oracles (eager attention, no dropout)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(cfg).to(dtype)


def lm_batch(num: int = 6, seq: int = 10, vocab_size: int = 97, seed: int = 1) -> dict[str, Tensor]:
    """A right-padded causal-LM batch with uneven lengths and example ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (num,), generator=gen)
    lengths[0] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "example_id": torch.arange(100, 100 + num),
    }


def example_losses(logits: Tensor, labels: Tensor, reduction: str = "sum") -> Tensor:
    """Per-example causal-LM loss ``[B]``: sum or mean over supervised (shifted) tokens."""
    tgt = labels[:, 1:]
    tok = nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), tgt, ignore_index=-100, reduction="none"
    )  # (B, S-1)
    total = tok.sum(1)
    if reduction == "mean":
        return total / (tgt != -100).sum(1).clamp(min=1)
    return total


def oracle_lm_grads(model: nn.Module, batch: dict[str, Tensor], reduction: str = "sum"):
    """``torch.func.vmap(grad(L_i))`` for every example: name -> ``[B, *param.shape]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, ids, mask, labels):
        out = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return example_losses(out.logits, labels[None], reduction)[0]

    fn = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))
    return fn(params, batch["input_ids"], batch["attention_mask"], batch["labels"])


def module_grad(grads: dict[str, Tensor], name: str, *, bias: bool = False, conv1d=False) -> Tensor:
    """Per-example ``[B, O, I(+1)]`` gradient of module ``name`` in Linear orientation."""
    w = grads[f"{name}.weight"]
    if conv1d:
        w = w.transpose(1, 2)
    if bias:
        w = torch.cat([w, grads[f"{name}.bias"][..., None]], dim=-1)
    return w


class Rows(torch.utils.data.Dataset):
    """Rows of a padded batch dict, so default collation rebuilds batches of it."""

    def __init__(self, batch: dict[str, Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


class ToyConv1DNet(nn.Module):
    """Embedding -> HF Conv1D -> tanh -> Linear, to cover the transposed layer type."""

    def __init__(self, vocab: int = 11, hidden: int = 6) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(vocab, hidden)
        self.conv = Conv1D(8, hidden)  # nf=8 outputs, nx=hidden inputs
        self.out = nn.Linear(8, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.conv(self.emb(ids))))


def per_example_grads(model: nn.Module, inputs: Tensor, loss_fn) -> dict[str, Tensor]:
    """``torch.func.vmap(grad(...))`` of ``loss_fn(model(x_i[None]))``: name -> ``[B, *shape]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x):
        return loss_fn(functional_call(model, p, (x[None],)))

    return vmap(grad(loss_one), in_dims=(None, 0))(params, inputs)


def block_grad(grads: dict[str, Tensor], name: str, *, bias: bool = False) -> Tensor:
    """Per-example ``[B, O, C * prod(k) (+1)]`` gradient of a conv (or Linear) ``name``."""
    w = grads[f"{name}.weight"].flatten(2)  # (B, O, C * prod(k))
    if bias:
        w = torch.cat([w, grads[f"{name}.bias"][..., None]], dim=-1)
    return w


class ToyCNN(nn.Module):
    """Conv3d -> Conv2d (reflect, dilation) -> grouped Conv2d ('same') -> Conv1d -> Linear.

    Input ``[B, 2, 3, 8, 8]``; covers stride, zero/reflect/circular padding, dilation, groups.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c3d = nn.Conv3d(
            2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), dilation=(1, 1, 2)
        )
        self.c2d = nn.Conv2d(8, 6, (2, 3), padding=(1, 2), dilation=(2, 1), padding_mode="reflect")
        self.grouped = nn.Conv2d(6, 6, 3, groups=3, padding="same")
        self.c1d = nn.Conv1d(6, 5, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c3d(x))  # (B, 4, 2, 4, 3)
        h = torch.tanh(self.c2d(h.flatten(1, 2)))  # (B, 6, 4, 5)
        h = torch.tanh(self.grouped(h)).flatten(2)  # (B, 6, 20)
        h = torch.tanh(self.c1d(h))  # (B, 5, 10)
        return self.fc(h.transpose(1, 2))  # (B, 10, 3)


def tiny_gpt2(seed: int = 0, vocab_size: int = 97):
    """A 2-layer GPT-2 (HF Conv1D layers, fused [q | k | v] c_attn), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg)


# Small enough for dense (E)K-FAC blocks in the brute-force oracle (largest block 24 x 9).
MICRO = {
    "model_type": "gpt_neox",
    "vocab_size": 97,
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 32,
}


def micro_gpt_neox(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A GPT-NeoX small enough for dense (E)K-FAC blocks in brute-force oracles."""
    from lightning_bergson import CausalLMModule

    return CausalLMModule(config=MICRO).model.to(dtype)


def batch_rows(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """A dict batch as a list of per-example dicts (a dataset a DataLoader re-collates)."""
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
