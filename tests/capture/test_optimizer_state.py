"""Optimizer normalizers against the update the optimizer actually applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bergson.capture import normalizers_from_optimizer
from lightning_bergson.capture.normalizers import (
    AdafactorNormalizer,
    AdamNormalizer,
    load_normalizers,
    save_normalizers,
)


def _steps(module: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 0):
    """Yield (grad [O, I+1], param delta [O, I+1]) after each step with random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        before = [p.detach().clone() for p in (module.weight, module.bias)]
        for p in (module.weight, module.bias):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = (noise * torch.rand(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
        grads = [module.weight.grad.clone(), module.bias.grad.clone()]
        opt.step()
        deltas = [p.detach() - b for p, b in zip((module.weight, module.bias), before, strict=True)]
        if type(module).__name__ == "Conv1D":  # weight stored [in, out]
            grads[0], deltas[0] = grads[0].T, deltas[0].T
        yield (
            torch.cat([grads[0], grads[1][:, None]], dim=1),
            torch.cat([deltas[0], deltas[1][:, None]], dim=1),
        )


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_adamw_normalizer_is_the_applied_denominator(layer):
    """With beta1 = 0 AdamW moves by exactly -lr * g / (sqrt(v_hat) + eps)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = (nn.Linear(5, 4) if layer == "linear" else Conv1D(4, 5)).double()
    opt = torch.optim.AdamW(module.parameters(), lr=0.1, betas=(0.0, 0.99), weight_decay=0.0)
    for grad, delta in _steps(module, opt):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adam", include_bias=True)["m"]
        torch.testing.assert_close(norm.normalize(grad[None])[0], -delta / 0.1)


def test_torch_adafactor_normalizer_is_the_applied_update():
    """torch's Adafactor moves by ``alpha * G / sqrt(r c^T / mean r)`` (d huge: no RMS clip),
    ``alpha = max(eps2, RMS(param)) * min(lr, 1 / sqrt(step))``; the normalizer is that update
    divided by ``alpha``, values and not only direction."""
    torch.manual_seed(0)
    module = nn.Linear(6, 4).double()
    opt = torch.optim.Adafactor(module.parameters(), lr=0.01, d=1e9, weight_decay=0.0)
    for step in range(1, 4):
        rms = float(module.weight.detach().norm() / module.weight.numel() ** 0.5)  # before
        grad, delta = next(_steps(module, opt, steps=1, seed=step))
        alpha = max(1e-3, rms) * min(0.01, step**-0.5)  # eps2 = 1e-3, torch's default
        norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
        got = norm.normalize(grad[None, :, :6])[0]
        torch.testing.assert_close(got, -delta[:, :6] / alpha, rtol=1e-9, atol=0)


def test_hf_adafactor_normalizer_is_the_applied_update():
    """Hugging Face's Adafactor (fixed lr, no relative step, clip_threshold huge) moves by
    exactly ``lr * G / sqrt(r c^T / mean r)``."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    module = nn.Linear(6, 4).double()
    opt = Adafactor(
        module.parameters(), lr=0.01, relative_step=False, scale_parameter=False,
        warmup_init=False, clip_threshold=1e9,
    )  # fmt: skip
    for grad, delta in _steps(module, opt):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
        got = norm.normalize(grad[None, :, :6])[0]
        torch.testing.assert_close(got, -delta[:, :6] / 0.01, rtol=1e-9, atol=0)


def test_adafactor_bias_column_is_the_mean_of_the_bias_second_moment():
    """With ``include_bias`` the bias is a last input column; its column statistic is the mean
    of the bias's own second moment (the I-divergence fit given the rows), the rows unchanged."""
    module = nn.Linear(6, 4).double()
    opt = torch.optim.Adafactor(module.parameters(), lr=0.01, weight_decay=0.0)
    for _ in _steps(module, opt, steps=2):
        pass
    w, b = opt.state[module.weight], opt.state[module.bias]
    norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor", include_bias=True)["m"]
    assert norm.shape == (4, 7)
    torch.testing.assert_close(norm.row, w["row_var"].reshape(-1))
    torch.testing.assert_close(norm.col[:6], w["col_var"].reshape(-1))
    torch.testing.assert_close(norm.col[6], b["variance"].mean())
    # the bias column's normalized entries: G_ib / sqrt(r_i c_b / mean r)
    grad = torch.randn(1, 4, 7, dtype=torch.float64)
    r, c_b = w["row_var"].reshape(-1), b["variance"].mean()
    want = grad[0, :, 6] / (r * c_b / r.mean()).sqrt()
    torch.testing.assert_close(norm.normalize(grad)[0, :, 6], want)


def test_adam_state_as_adafactor_is_row_and_column_means():
    module = nn.Linear(5, 3).double()
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    for _ in _steps(module, opt, steps=2):
        pass
    state = opt.state[module.weight]
    v_hat = state["exp_avg_sq"] / (1 - 0.999 ** state["step"].item())
    fact = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
    torch.testing.assert_close(fact.row, v_hat.mean(1))
    torch.testing.assert_close(fact.col, v_hat.mean(0))


def test_missing_state_names_the_module():
    module = nn.Linear(3, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"module 'fc'.*no second moment"):
        normalizers_from_optimizer(opt, {"fc": module}, "adam")


def test_normalizers_round_trip_through_safetensors(tmp_path):
    module = nn.Linear(5, 3)
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    for _ in _steps(module, opt, steps=1):
        pass
    for kind in ("adam", "adafactor"):
        norms = normalizers_from_optimizer(opt, {"a.b": module}, kind, include_bias=True)
        save_normalizers(tmp_path / f"{kind}.safetensors", norms)
        back = load_normalizers(tmp_path / f"{kind}.safetensors")
        grad = torch.randn(2, 3, 6)
        torch.testing.assert_close(back["a.b"].normalize(grad), norms["a.b"].normalize(grad))


# ---------------------------------------------------------------- closed forms


def test_adafactor_normalizer_closed_form_with_independent_moments():
    """``V = r c^T / mean(r)`` with mean(r) = 2.5 != mean(c) = 4.375, written out by hand."""
    norm = AdafactorNormalizer(torch.tensor([1.0, 4.0]), torch.tensor([2.5, 10.0, 0.625]))
    # V = [[1, 4, 0.25], [4, 16, 1]], sqrt(V) = [[1, 2, 0.5], [2, 4, 1]]
    grads = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    want = torch.tensor([[[1.0, 1.0, 6.0], [2.0, 1.25, 6.0]]])
    torch.testing.assert_close(norm.normalize(grads), want)
    row, col = norm.scales(torch.float64, torch.device("cpu"))
    torch.testing.assert_close(row, torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(col, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    adam = norm.to_adam()
    torch.testing.assert_close(adam.avg_sq, torch.tensor([[1.0, 4.0, 0.25], [4.0, 16.0, 1.0]]))
    assert adam.eps == 0.0


def test_adam_normalizer_closed_form():
    norm = AdamNormalizer(torch.tensor([[4.0, 1.0], [0.25, 9.0]]), eps=0.5)
    want = torch.tensor([[[1.0 / 2.5, 1.0 / 1.5], [1.0 / 1.0, 1.0 / 3.5]]])
    torch.testing.assert_close(norm.normalize(torch.ones(1, 2, 2)), want)
    fact = norm.to_adafactor()  # row and column means
    torch.testing.assert_close(fact.row, torch.tensor([2.5, 4.625]))
    torch.testing.assert_close(fact.col, torch.tensor([2.125, 5.0]))


def test_normalizers_follow_the_gradients_dtype_and_device():
    """Moments stored in float32 normalize float64 gradients in float64, on the gradients'
    device (``meta`` stands in for a GPU: a CPU moment would not combine with it)."""
    v = torch.tensor([[1 / 3, 2.0], [5.0, 1 / 7]])  # float32
    grads = torch.ones(1, 2, 2, dtype=torch.float64)
    want = 1 / (v.double().sqrt() + 0.5)
    torch.testing.assert_close(
        AdamNormalizer(v, eps=0.5).normalize(grads)[0], want, rtol=1e-12, atol=0
    )
    r, c = torch.tensor([1 / 3, 3.0]), torch.tensor([0.7, 1 / 9])  # float32
    fact = AdafactorNormalizer(r, c)
    rd, cd = r.double(), c.double()
    want = 1 / (rd[:, None] * cd[None] / rd.mean()).sqrt()
    torch.testing.assert_close(fact.normalize(grads)[0], want, rtol=1e-12, atol=0)
    meta = torch.ones(1, 2, 2, device="meta")
    assert AdamNormalizer(v).normalize(meta).device.type == "meta"
    assert fact.normalize(meta).device.type == "meta"


def test_conversions_and_bad_input_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    from lightning_bergson.capture.normalizers import convert, normalizer_from_tensors

    fact = AdafactorNormalizer(torch.tensor([1.0, 4.0]), torch.tensor([2.5, 10.0, 0.625]))
    adam = convert(fact, "adam")
    assert isinstance(adam, AdamNormalizer) and convert(adam, "adam") is adam
    torch.testing.assert_close(adam.avg_sq, torch.tensor([[1.0, 4.0, 0.25], [4.0, 16.0, 1.0]]))
    assert isinstance(convert(adam, "adafactor"), AdafactorNormalizer)
    with pytest.raises(ValueError, match="cannot convert a normalizer to 'sgd'"):
        convert(fact, "sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown normalizer kind 'sgd'; expected 'adam' or"):
        normalizer_from_tensors("sgd", {}, 0.0)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors is not a lightning_bergson normal"):
        load_normalizers(tmp_path / "other.safetensors")


def test_saved_normalizers_keep_their_eps(tmp_path):
    norms = {
        "a": AdamNormalizer(torch.full((2, 3), 4.0), eps=0.5),
        "b": AdafactorNormalizer(torch.ones(2), torch.ones(3), eps=1e-3),
    }
    save_normalizers(tmp_path / "n.safetensors", norms)
    back = load_normalizers(tmp_path / "n.safetensors")
    assert (back["a"].eps, back["b"].eps) == (0.5, 1e-3)
    assert back["a"].kind == "adam" and back["b"].kind == "adafactor"
