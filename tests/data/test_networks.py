"""networks.py, the one home for building and loading a network.

Oracles: a plain per-document backward loop for the rows of an indexed Llama (whose
backbone attribute is called ``.model``, like the LightningModule's network), and the data
module's vocabulary for networks built in ``configure_model``.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from oracles import lm_batch, rows_by_id
from recipes import fit_with_capture, loop_oracle, tiny_llama

from lightning_bergson import CausalLMModule, EkfacModule, GradientCaptureCallback, IndexModule
from lightning_bergson.attribution import Attributor
from lightning_bergson.capture import DEFAULT_EXCLUDE, select_modules
from lightning_bergson.networks import load_network, unwrap_network

TINY = {"model_type": "gpt_neox", "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16}  # fmt: skip


def test_only_a_lightning_module_is_unwrapped():
    llama = tiny_llama()
    assert isinstance(llama.model, torch.nn.Module)  # its backbone, not the network
    assert unwrap_network(llama) is llama
    assert unwrap_network(IndexModule(llama)) is llama
    assert unwrap_network(CausalLMModule(llama)) is llama


def test_a_bare_llama_is_indexed_and_queried_as_itself(tmp_path):
    llama = tiny_llama()
    data = lm_batch(num=5, seq=7, vocab_size=41)
    cb = GradientCaptureCallback(tmp_path / "g.zarr", projection_dim=0, dtype="float32")
    fit_with_capture(IndexModule(llama), data, cb, batch_size=2)

    oracle_net = copy.deepcopy(llama).requires_grad_(True)
    names = list(select_modules(oracle_net, None, DEFAULT_EXCLUDE))

    def loss_of(i):
        ids = data["input_ids"][i : i + 1, : int(data["attention_mask"][i].sum())]
        logits = oracle_net(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")

    want = loop_oracle(oracle_net, names, loss_of, range(5))
    ids = data["example_id"].tolist()
    stored = rows_by_id(tmp_path / "g.zarr", dtype=torch.float64)
    assert sorted(stored) == ids
    got = Attributor(tmp_path / "g.zarr").query_gradients(llama, data)  # the bare model
    for i, example in enumerate(ids):
        _assert_row_close(stored[example], want[i])
        _assert_row_close(got[i], want[i])


def _attach(module, vocab_size):
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(vocab_size=vocab_size))
    return module


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CausalLMModule(config=TINY), "CausalLMModule was given no vocab_size"),
        (
            lambda: EkfacModule(config=TINY, factors_dir="unused"),
            "EkfacModule was given `config` without vocab_size",
        ),
    ],
)
def test_vocabulary_arrives_in_configure_model(make, message):
    module = make()
    assert module.model is None
    with pytest.raises(ValueError, match=message + r".*pass vocab_size=\.\.\."):
        _attach(module, None).configure_model()
    module = _attach(make(), 37)
    module.configure_model()
    assert module.model.get_input_embeddings().num_embeddings == 37
    assert module.hparams.vocab_size == 37  # so a checkpoint rebuilds the same network


def test_a_missing_checkpoint_is_named():
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'no/such/run\.ckpt' does not exist"):
        load_network("no/such/run.ckpt")


def _assert_row_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Relative L2 error of a whole row (float32 sums reorder)."""
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))
    assert err <= tol, err
