"""Optimizer normalizers against the update the optimizer actually applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bergson.capture import normalizers_from_optimizer
from lightning_bergson.capture.normalizers import load_normalizers, save_normalizers


def _steps(module: nn.Module, opt: torch.optim.Optimizer, steps: int = 3):
    """Yield (grad [O, I+1], param delta [O, I+1]) after each step with random gradients."""
    gen = torch.Generator().manual_seed(0)
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


def test_torch_adafactor_normalizer_is_the_applied_direction():
    torch.manual_seed(0)
    module = nn.Linear(6, 4).double()
    opt = torch.optim.Adafactor(module.parameters(), lr=0.01, weight_decay=0.0)
    for grad, delta in _steps(module, opt):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
        got = norm.normalize(grad[None, :, :6])[0]
        ratio = -delta[:, :6] / got  # one scalar step size (relative step, RMS clipping)
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-9, atol=0)


def test_hf_adafactor_normalizer_is_the_applied_direction():
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    module = nn.Linear(6, 4).double()
    opt = Adafactor(
        module.parameters(), lr=0.01, relative_step=False, scale_parameter=False, warmup_init=False
    )
    for grad, delta in _steps(module, opt):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
        got = norm.normalize(grad[None, :, :6])[0]
        ratio = -delta[:, :6] / got
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-9, atol=0)


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
