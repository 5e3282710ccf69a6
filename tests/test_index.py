"""Post-hoc index (IndexModule, ``index`` command): rows equal the callback's training rows."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml
from attribution_fixtures import assert_row_close, fit_with_capture, rows_by_id
from oracles import lm_batch, tiny_gpt_neox

from lightning_bergson import CausalLMModule, GradientCaptureCallback, HeadConfig, TextDataModule
from lightning_bergson.attribution import Attributor, query_batch
from lightning_bergson.attribution.index import IndexModule
from lightning_bergson.cli import main

ROOT = Path(__file__).resolve().parents[1]
QKV = "gpt_neox.layers.0.attention.query_key_value"


def capture(tmp_path, name, **kwargs):
    return GradientCaptureCallback(
        tmp_path / name,
        projection_dim=4,
        head_cfgs={QKV: HeadConfig(num_heads=4, head_size=24)},
        dtype="float32",
        **kwargs,
    )


def test_index_rows_equal_callback_rows(tmp_path):
    net = tiny_gpt_neox()
    data = lm_batch(num=7, seq=9)
    fit_with_capture(CausalLMModule(copy.deepcopy(net), lr=0.0), data, capture(tmp_path, "a.zarr"))
    before = copy.deepcopy(net.state_dict())
    fit_with_capture(IndexModule(net), data, capture(tmp_path, "b.zarr"), batch_size=4)
    want, got = rows_by_id(tmp_path / "a.zarr"), rows_by_id(tmp_path / "b.zarr")
    assert sorted(got) == sorted(want)
    for i in want:
        assert_row_close(got[i], want[i])
    for key, value in net.state_dict().items():  # no parameter changed
        assert torch.equal(value, before[key]), key


def test_index_refuses_optimizer_normalizers(tmp_path):
    cb = capture(tmp_path, "c.zarr", normalizer="adafactor")
    with pytest.raises(ValueError, match="normalizer_source='file'"):
        fit_with_capture(IndexModule(tiny_gpt_neox()), lm_batch(num=3, seq=5), cb)


def test_index_command_over_a_checkpoint(tmp_path):
    """``index --config`` over a CausalLMModule checkpoint: rows equal the query rows."""
    data = TextDataModule(num_people=3, batch_size=4, shuffle=False, cache_dir=str(tmp_path))
    config = {
        "model_type": "gpt_neox",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    trainer = L.Trainer(
        max_steps=2, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False
    )
    trainer.fit(CausalLMModule(config=config, lr=1e-2), data)
    cfg = yaml.safe_load((ROOT / "configs" / "index.yaml").read_text())
    init = cfg["trainer"]["callbacks"][0]["init_args"]
    init.update(path=str(tmp_path / "idx.zarr"), normalizer="none", head_cfgs=None, dtype="float32")
    cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(tmp_path))
    cfg["model"]["init_args"]["model"] = str(tmp_path / "run")
    cfg["data"]["init_args"].update(num_people=3, cache_dir=str(tmp_path))
    (tmp_path / "index.yaml").write_text(yaml.safe_dump(cfg))
    main(["index", "--config", str(tmp_path / "index.yaml")])

    stored = rows_by_id(tmp_path / "idx.zarr")
    assert sorted(stored) == list(range(len(data.texts)))
    model = IndexModule(str(tmp_path / "run")).model
    attr = Attributor(tmp_path / "idx.zarr", dtype=torch.float64)
    batch = query_batch(data.tokenizer, data.texts[:5], max_length=64, append_eos=True)
    got = attr.query_gradients(model, batch)
    for i in range(5):
        assert_row_close(got[i], stored[i])
