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


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_torch_adafactor_normalizer_is_the_applied_update(layer):
    """torch's Adafactor moves by ``alpha * G / sqrt(r c^T / mean r)`` (d huge: no RMS clip),
    ``alpha = max(eps2, RMS(param)) * min(lr, 1 / sqrt(step))``; the normalizer is that update
    divided by ``alpha``, values and not only direction. HF ``Conv1D`` stores ``[in, out]``,
    so its row and column statistics swap roles."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = (nn.Linear(6, 4) if layer == "linear" else Conv1D(4, 6)).double()
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


# ------------------------------------------------- convolutions, amsgrad, frozen weights


def _conv_steps(module: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 1):
    """Yield (step, weight RMS before the step, grad block [O, C*k*k], delta block) per step."""
    gen = torch.Generator().manual_seed(seed)
    w = module.weight
    for step in range(1, steps + 1):
        rms = float(w.detach().norm() / w.numel() ** 0.5)
        before = w.detach().clone()
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        w.grad = noise * torch.rand(w.shape, generator=gen, dtype=torch.float64)
        grad = w.grad.clone()
        opt.step()
        delta = w.detach() - before
        yield step, rms, grad.reshape(w.shape[0], -1), delta.reshape(w.shape[0], -1)


@pytest.mark.parametrize("conv", ["conv1d", "conv2d"])
@pytest.mark.parametrize("which", ["torch", "hf"])
def test_adafactor_conv_weight_normalizer_is_the_applied_update(which, conv):
    """Adafactor factors a ``[O, C, kh, kw]`` weight over its last two dims, which is not a
    factorization of the block ``[O, C*kh*kw]``; the normalizer of the block is still the update
    the optimizer applied, entry by entry, divided by its step size (as in the 2-D tests)."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    if conv == "conv1d":
        module = nn.Conv1d(3, 4, kernel_size=6, bias=False).double()
    else:
        module = nn.Conv2d(3, 4, kernel_size=(2, 3), bias=False).double()
    if which == "torch":
        opt = torch.optim.Adafactor(module.parameters(), lr=0.01, d=1e9, weight_decay=0.0)
    else:
        opt = Adafactor(
            module.parameters(), lr=0.01, relative_step=False, scale_parameter=False,
            warmup_init=False, clip_threshold=1e9,
        )  # fmt: skip
    for step, rms, grad, delta in _conv_steps(module, opt):
        alpha = max(1e-3, rms) * min(0.01, step**-0.5) if which == "torch" else 0.01
        norm = normalizers_from_optimizer(opt, {"m": module}, "adam")["m"]
        assert norm.shape == (4, 18)
        got = norm.normalize(grad[None])[0]
        torch.testing.assert_close(got, -delta / alpha, rtol=1e-9, atol=0)


def test_amsgrad_normalizer_is_the_applied_denominator():
    """With ``amsgrad=True`` (and beta1 = 0) AdamW divides by the running *maximum* of the second
    moment, ``sqrt(max v / (1 - beta2^t)) + eps``; a large first gradient and small later ones
    make the maximum differ from the current moment, weight and bias alike."""
    torch.manual_seed(0)
    module = nn.Linear(5, 4).double()
    opt = torch.optim.AdamW(
        module.parameters(), lr=0.1, betas=(0.0, 0.9), weight_decay=0.0, amsgrad=True
    )
    gen = torch.Generator().manual_seed(3)
    for scale in (10.0, 0.1, 0.1):
        before = [p.detach().clone() for p in (module.weight, module.bias)]
        for p in (module.weight, module.bias):
            p.grad = scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        grad = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
        opt.step()
        delta = [p.detach() - b for p, b in zip((module.weight, module.bias), before, strict=True)]
        delta = torch.cat([delta[0], delta[1][:, None]], dim=1)
        norm = normalizers_from_optimizer(opt, {"m": module}, "adam", include_bias=True)["m"]
        torch.testing.assert_close(norm.normalize(grad[None])[0], -delta / 0.1)


def test_weight_and_bias_in_different_param_groups_use_their_own_betas():
    """Each parameter's bias correction uses the ``betas`` of *its* param group, and a bias
    column uses the weight's ``eps`` (here both groups share it): weight and bias columns
    are still the denominators AdamW applied."""
    torch.manual_seed(0)
    module = nn.Linear(5, 4).double()
    opt = torch.optim.AdamW(
        [
            {"params": [module.weight], "betas": (0.0, 0.99)},
            {"params": [module.bias], "betas": (0.0, 0.5)},
        ],
        lr=0.1, eps=0.5, weight_decay=0.0,
    )  # fmt: skip
    for grad, delta in _steps(module, opt, steps=2):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adam", include_bias=True)["m"]
        assert norm.eps == 0.5
        torch.testing.assert_close(norm.normalize(grad[None])[0], -delta / 0.1)


def test_hf_adafactor_bias_column_is_the_mean_of_its_unfactored_moment():
    """Hugging Face's Adafactor keeps a bias's second moment as ``exp_avg_sq`` (no ``betas`` in
    its group, no bias correction); its column statistic is that moment's mean, and the
    normalizer keeps the optimizer's ``eps1``."""
    from transformers.optimization import Adafactor

    module = nn.Linear(6, 4).double()
    opt = Adafactor(module.parameters(), lr=0.01, relative_step=False, scale_parameter=False)
    for _ in _steps(module, opt, steps=2):
        pass
    w, b = opt.state[module.weight], opt.state[module.bias]
    norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor", include_bias=True)["m"]
    assert norm.shape == (4, 7) and norm.eps == 1e-30
    torch.testing.assert_close(norm.row, w["exp_avg_sq_row"])
    torch.testing.assert_close(norm.col[:6], w["exp_avg_sq_col"])
    torch.testing.assert_close(norm.col[6], b["exp_avg_sq"].mean())


def test_torch_adafactor_normalizer_keeps_eps1():
    """torch's Adafactor clamps with ``eps1`` (``eps[0]``, not ``eps2 = eps[1]``); the normalizer
    keeps it, with and without a bias column, and ``eps1=None`` means the weight dtype's eps."""
    module = nn.Linear(6, 4).double()
    opt = torch.optim.Adafactor(module.parameters(), lr=0.01, eps=(1e-4, 1e-2))
    for _ in _steps(module, opt, steps=1):
        pass
    for bias in (False, True):
        norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor", include_bias=bias)
        assert norm["m"].eps == 1e-4
    opt = torch.optim.Adafactor(module.parameters(), lr=0.01)  # eps=(None, 1e-3)
    for _ in _steps(module, opt, steps=1):
        pass
    norm = normalizers_from_optimizer(opt, {"m": module}, "adafactor")["m"]
    assert norm.eps == torch.finfo(torch.float64).eps


def test_bias_without_state_or_outside_the_optimizer_names_the_module():
    """A trained weight whose bias the optimizer never stepped (no gradient: no state) or does
    not hold at all cannot give a bias column; the error names the module and the reason."""
    module = nn.Linear(3, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    module.weight.grad = torch.ones_like(module.weight)  # the bias gets no gradient
    opt.step()
    want = r"module 'fc': the optimizer keeps no second moment for a bias \(state keys: \[\]\)"
    with pytest.raises(ValueError, match=want):
        normalizers_from_optimizer(opt, {"fc": module}, "adam", include_bias=True)
    opt = torch.optim.AdamW([module.weight], lr=0.1)
    opt.step()
    want = r"module 'fc': 'parameter is not handled by the optimizer'$"
    with pytest.raises(ValueError, match=want):
        normalizers_from_optimizer(opt, {"fc": module}, "adam", include_bias=True)


def test_sharded_state_is_gathered_and_half_precision_state_is_read_as_float32():
    """FSDP2 keeps state as ``DTensor``s: anything with ``full_tensor()`` is all-gathered first
    (a stand-in whose only content is ``full_tensor()`` shows it); bfloat16 state is read as
    float32, and the read is a copy that later steps do not change."""

    class Sharded:
        def __init__(self, full):
            self.full = full

        def full_tensor(self):
            return self.full

    module = nn.Linear(5, 3).double()
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    for _ in _steps(module, opt, steps=1):
        pass
    want = normalizers_from_optimizer(opt, {"m": module}, "adam")["m"].avg_sq
    state = opt.state[module.weight]
    state["exp_avg_sq"] = Sharded(state["exp_avg_sq"])
    got = normalizers_from_optimizer(opt, {"m": module}, "adam")["m"].avg_sq
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    half = nn.Linear(5, 3).to(torch.bfloat16)
    opt = torch.optim.Adafactor(half.parameters(), lr=0.01)
    for _ in _steps(half, opt, steps=1):
        pass
    norm = normalizers_from_optimizer(opt, {"m": half}, "adafactor")["m"]
    row = opt.state[half.weight]["row_var"]
    assert row.dtype == torch.bfloat16 and norm.row.dtype == torch.float32
    assert norm.eps == torch.finfo(torch.bfloat16).eps  # eps1=None: the weight dtype's eps
    torch.testing.assert_close(norm.row, row.float().reshape(-1), rtol=0, atol=0)


def test_frozen_or_unhandled_weights_and_missing_state_say_why():
    """The errors name the module and give the reason and the way out, word for word."""
    import re

    fixes = (
        ", so the optimizer keeps no state to normalize it with. Frozen modules need "
        "normalizer='none' or normalizer_source='file' (or drop them from include; "
        "include=None selects only modules whose weight requires grad)"
    )
    frozen, other = nn.Linear(3, 2), nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    want = "module 'fc': its weight is frozen (requires_grad=False)" + fixes
    with pytest.raises(ValueError, match=re.escape(want)):
        normalizers_from_optimizer(opt, {"fc": frozen}, "adam")
    want = "module 'fc': its weight is in no param group" + fixes
    with pytest.raises(ValueError, match=re.escape(want)):
        normalizers_from_optimizer(opt, {"fc": nn.Linear(3, 2)}, "adam")

    module = nn.Linear(3, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for _ in _steps(module, opt, steps=1):
        pass
    want = (
        "cannot read a normalizer for module 'fc': the optimizer keeps no second moment for "
        "this weight (state keys: ['momentum_buffer']); optimizer normalizers need Adam/AdamW "
        "or Adafactor, and the state exists only after the first optimizer step"
    )
    with pytest.raises(ValueError, match=re.escape(want)):
        normalizers_from_optimizer(opt, {"fc": module}, "adam")
