"""AMP loss scaling on the CPU: a precision plugin that scales the loss as Lightning's AMP does.

Lightning's ``MixedPrecision`` multiplies the loss by the GradScaler's scale in ``pre_backward``
and unscales the parameter gradients before the optimizer step; the callback reads the scale
from ``trainer.precision_plugin.scaler.get_scale()``. ``FixedScalePrecision`` does exactly
that with a fixed scale and no float16, so every activation gradient the hooks see is
``SCALE`` times too large and the rows must still equal the torch.func oracle.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from oracles import (
    assert_rows_match,
    lm_batch,
    module_grad,
    oracle_lm_grads,
    rows_by_id,
    tiny_gpt_neox,
)
from recipes import HFCausalModule, fit_with_capture

from lightning_bergson import CausalLMModule, GradientCaptureCallback

SCALE = 1024.0
MODULES = ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.mlp.dense_4h_to_h"]


class FixedScaler:
    """The part of ``torch.amp.GradScaler``'s interface Lightning's AMP plugin uses."""

    def __init__(self, scale: float) -> None:
        self.value = scale

    def get_scale(self) -> float:
        return self.value

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.value)

    def step(self, optimizer: torch.optim.Optimizer, **kwargs):
        return optimizer.step(**kwargs)

    def update(self) -> None:
        pass


class FixedScalePrecision(Precision):
    """``MixedPrecision``'s loss scaling (``pre_backward`` scales, the step unscales), fp32."""

    def __init__(self, scale: float = SCALE) -> None:
        super().__init__()
        self.scaler = FixedScaler(scale)

    def pre_backward(self, tensor, module):
        return super().pre_backward(self.scaler.scale(tensor), module)

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        result = closure()
        if result is None and model.automatic_optimization:
            return result  # backward skipped
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        out = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return out


def _module(kind: str, net, lr: float = 0.0):
    if kind == "causal_lm":  # the per-example loss contract (example_loss)
        return CausalLMModule(net, lr=lr, weight_decay=0.0)
    return HFCausalModule(net, lr=lr)  # Hugging Face's .loss: the causal-LM rule


@pytest.mark.parametrize("kind", ["causal_lm", "hf_loss"])
@pytest.mark.parametrize("declared", ["auto", "token_mean"])
def test_the_loss_scale_is_divided_out(tmp_path, kind, declared):
    """Rows equal the oracle although backward carried SCALE; a declared reduction is
    checked against the measured weights with accumulation and the scale included."""
    net = tiny_gpt_neox()
    data = lm_batch(num=8, seq=9, prompt=True)
    grads = oracle_lm_grads(copy.deepcopy(net), data, "sum")
    full = torch.cat([module_grad(grads, m).flatten(1) for m in MODULES], dim=1)
    want = dict(zip(data["example_id"].tolist(), full, strict=True))
    cb = GradientCaptureCallback(
        tmp_path / "g.zarr", projection_dim=0, include=MODULES, dtype="float32",
        batch_reduction=declared,
    )  # fmt: skip
    fit_with_capture(_module(kind, net), data, cb, batch_size=2, accumulate=2,
                     plugins=[FixedScalePrecision()])  # fmt: skip
    assert_rows_match(rows_by_id(tmp_path / "g.zarr"), want)


def test_training_and_optimizer_normalizers_do_not_see_the_scale(tmp_path):
    """With lr > 0 and Adam normalizers from the live optimizer, the scaled run stores the
    rows of the unscaled run: the plugin unscales before the step, the callback divides."""
    net, data = tiny_gpt_neox(), lm_batch(num=8, seq=9)
    stores = {}
    for name, plugins in (("plain", []), ("scaled", [FixedScalePrecision()])):
        cb = GradientCaptureCallback(tmp_path / f"{name}.zarr", projection_dim=2, dtype="float32",
                                     normalizer="adam")  # fmt: skip
        fit_with_capture(_module("causal_lm", copy.deepcopy(net), lr=1e-2), data, cb,
                         batch_size=4, max_epochs=2, plugins=plugins)  # fmt: skip
        stores[name] = rows_by_id(tmp_path / f"{name}.zarr", with_step=True)
    assert_rows_match(stores["scaled"], stores["plain"], tol=1e-4)
