"""``python -m lightning_bergson fit`` on the shipped quickstart config, shrunk."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_bergson import GradientStore
from lightning_bergson.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _small_quickstart(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False)
    cfg["trainer"]["callbacks"][0]["init_args"]["path"] = str(tmp_path / "grads.zarr")
    cfg["data"]["init_args"].update(num_people=8, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_from_config_writes_a_store(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        main(["fit", "--config", str(_small_quickstart(tmp_path))])
    store = GradientStore.open(tmp_path / "grads.zarr")
    assert store.complete and len(store) == len(set(store.example_ids.tolist()))
    assert store.attrs["projection"]["dim"] == 16
    assert store.attrs["normalizer"] == {
        "kind": "adafactor",
        "source": "optimizer",
        "timing": "after_step",
    }
    heads = [m.name for m in store.modules if m.head is not None]
    assert heads[:4] == [f"gpt_neox.layers.0.attention.query_key_value.head_{h}" for h in range(4)]
    assert (tmp_path / "grads.zarr" / "normalizers" / "normalizers.safetensors").is_file()
    assert f"Gradient store: {(tmp_path / 'grads.zarr').resolve()}" in caplog.text


def test_print_config_shows_the_callback(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_small_quickstart(tmp_path)), "--print_config"])
    out = yaml.safe_load(capsys.readouterr().out)
    callback = out["trainer"]["callbacks"][0]
    assert callback["class_path"] == "lightning_bergson.GradientCaptureCallback"
    assert callback["init_args"]["normalizer"] == "adafactor"
    assert callback["init_args"]["loss_reduction"] == "sum"  # defaults are shown too


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_bergson", "fit", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "--trainer.callbacks" in out and "--print_config" in out
