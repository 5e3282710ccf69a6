"""CausalLMModule: the ways to give it a model, and its losses against Hugging Face's."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from oracles import example_losses, lm_batch, tiny_gpt_neox

from lightning_bergson import CausalLMModule, TextDataModule

TINY = {
    "model_type": "gpt_neox",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}


def test_local_directory_written_by_save_pretrained(tmp_path):
    net = tiny_gpt_neox()
    net.save_pretrained(tmp_path / "tiny")
    module = CausalLMModule(str(tmp_path / "tiny"))
    for (name, a), (_, b) in zip(
        net.state_dict().items(), module.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_losses_match_hugging_face():
    net = tiny_gpt_neox()
    module = CausalLMModule(net)
    batch = lm_batch(num=5, seq=9)
    out = module.training_step(batch, 0)
    hf = net(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    torch.testing.assert_close(out["loss"], hf.loss)
    # The per-example loss contract: each example's summed token loss, in the graph of `loss`.
    torch.testing.assert_close(
        out["example_loss"], example_losses(hf.logits, batch["labels"], "sum")
    )
    assert out["example_loss"].requires_grad
    total = batch["labels"][:, 1:].ne(-100).sum()
    torch.testing.assert_close(out["loss"], out["example_loss"].sum() / total)


def test_config_takes_vocab_from_the_data_module_and_survives_a_checkpoint(tmp_path):
    data = TextDataModule(num_people=6, batch_size=8, cache_dir=str(tmp_path / "cache"))
    module = CausalLMModule(config=TINY)
    assert module.model is None  # built in configure_model, once the vocabulary is known
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert module.model.get_input_embeddings().num_embeddings == data.vocab_size
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    back = CausalLMModule.load_from_checkpoint(tmp_path / "last.ckpt")
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(back.model.state_dict()[name], value)


def test_adafactor_optimizer_and_warmup():
    module = CausalLMModule(
        config={**TINY, "vocab_size": 50}, optimizer="adafactor", warmup_steps=4
    )
    conf = module.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.Adafactor)
    assert conf["lr_scheduler"]["scheduler"].get_last_lr()[0] == pytest.approx(1e-3 / 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs `model`"):
        CausalLMModule()
    with pytest.raises(ValueError, match="'model_type'"):
        CausalLMModule(config={"hidden_size": 8, "vocab_size": 10})
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        CausalLMModule(config=TINY, optimizer="sgd")


def test_checkpoint_of_a_wrapped_module_rebuilds_it(tmp_path):
    net = tiny_gpt_neox()
    module = CausalLMModule(net)
    assert not any(k.startswith("_source") for k in module.state_dict())  # weights stored once
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader([lm_batch(num=2, seq=6)], batch_size=None))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    back = CausalLMModule.load_from_checkpoint(tmp_path / "m.ckpt")
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(back.model.state_dict()[name], value)
