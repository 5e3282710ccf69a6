"""Shared test fixtures: tiny models and the torch.func per-example gradient oracle."""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def tiny_gpt_neox(
    seed: int = 0,
    vocab_size: int = 97,
    dtype: torch.dtype = torch.float32,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 64,
    attn_implementation: str = "eager",
    dropout: float = 0.0,
):
    """A GPT-NeoX small enough for exact oracles (2 layers by default, no dropout).

    The one definition of the tiny test LM: the MAGIC tests use a 1-layer float64 variant
    with their own attention, the index tests save one with ``save_pretrained``.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        attn_implementation=attn_implementation,
        hidden_dropout=dropout,
        attention_dropout=dropout,
    )
    return GPTNeoXForCausalLM(cfg).to(dtype)


def lm_batch(
    num: int = 6, seq: int = 10, vocab_size: int = 97, seed: int = 1, *, prompt: bool = False
) -> dict[str, Tensor]:
    """A right-padded causal-LM batch with uneven lengths and example ids.

    Args:
        prompt: Mask a prompt of 2 .. length-2 tokens in every example (labels -100 where
            the attention mask is 1), so supervised tokens differ from attended tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (num,), generator=gen)
    lengths[0] = seq
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    if prompt:
        cut = [int(torch.randint(2, max(int(n) - 1, 3), (1,), generator=gen)) for n in lengths]
        for i, c in enumerate(cut):
            labels[i, :c] = -100  # (S,): the prompt is attended to but not supervised
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
    """A GPT-NeoX small enough for dense (E)K-FAC blocks in brute-force oracles (``MICRO``)."""
    keys = {k: v for k, v in MICRO.items() if k not in ("model_type", "vocab_size")}
    return tiny_gpt_neox(0, MICRO["vocab_size"], dtype, **keys)


def batch_rows(*batches: dict[str, Tensor], drop: tuple[str, ...] = ()) -> list[dict[str, Tensor]]:
    """Dict batches as one list of per-example dicts (a dataset a DataLoader re-collates).

    Args:
        drop: Keys left out (e.g. ``("example_id",)`` for a dataset without ids).
    """
    return [
        {k: v[i] for k, v in batch.items() if k not in drop}
        for batch in batches
        for i in range(len(next(iter(batch.values()))))
    ]


# ---------------------------------------------------------------- stored rows against oracles


def rows_by_id(
    store, *, modules=None, dtype: torch.dtype = torch.float32, with_step: bool = False
) -> dict:
    """Stored rows keyed by example id, or by ``(example id, step)`` (a later row wins).

    Args:
        store: A ``GradientStore`` or the path of one.
        modules: Block selection passed to ``GradientStore.read``.
        dtype: Dtype of the returned rows.
        with_step: Key by ``(example_id, step)``, so several epochs of an id stay apart.
    """
    from lightning_bergson import GradientStore

    if not isinstance(store, GradientStore):
        store = GradientStore.open(store)
    rows = store.read(slice(None), modules=modules, dtype=dtype)
    keys = (
        [(int(i), int(s)) for i, s in zip(store.example_ids, store.steps, strict=True)]
        if with_step
        else [int(i) for i in store.example_ids]
    )
    return dict(zip(keys, rows, strict=True))


def assert_rows_match(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Same keys, and every row within ``tol`` relative L2 error of its oracle row."""
    assert sorted(got) == sorted(want)  # none missing, none doubled
    for key, row in want.items():
        row = row.double()
        err = float((got[key].double() - row).norm() / row.norm().clamp(min=1e-30))
        assert err <= tol, (key, err)


# ---------------------------------------------------------------- independent oracles


def documented_projection(
    p: int, features: int, *, seed: int, key: str, side: str, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The projection matrix by the rule DESIGN.md documents, written out independently.

    ``sha256("<seed>/<key>/<side>")``, its first 8 bytes little-endian, top bit cleared, seed a
    CPU generator; ``p x features`` bits from it become ``+-1/sqrt(p)``.
    """
    digest = hashlib.sha256(f"{seed}/{key}/{side}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    bits = torch.randint(0, 2, (p, features), generator=gen, dtype=torch.int8, device="cpu")
    return ((bits.double() * 2 - 1) / p**0.5).to(dtype)


def explicit_covariances(model: nn.Module, batch: dict[str, Tensor], names, bias: bool) -> dict:
    """EK-FAC's ``A`` and ``S`` by token-by-token sums of ``a a^T`` and ``g g^T`` (float64).

    ``g`` is the ``.grad`` of each module's retained output after backpropagating the summed
    shifted token losses of ``batch["labels"]``; sums run over the tokens the attention mask
    keeps and are divided by their number.
    """
    inputs, outputs = {}, {}

    def keep(name, module, args, out):
        inputs[name] = args[0].detach()
        out.retain_grad()
        outputs[name] = out

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(partial(keep, n)) for n in names]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    example_losses(logits, batch["labels"]).sum().backward()
    for h in hooks:
        h.remove()
    tokens = batch["attention_mask"].nonzero().tolist()
    out = {}
    for n in names:
        a, g = inputs[n].double(), outputs[n].grad.double()
        if bias:
            a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
        a_sum = sum(torch.outer(a[b, t], a[b, t]) for b, t in tokens)
        g_sum = sum(torch.outer(g[b, t], g[b, t]) for b, t in tokens)
        out[n] = (a_sum / len(tokens), g_sum / len(tokens))
    model.zero_grad()
    return out
