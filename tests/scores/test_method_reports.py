"""EK-FAC and MAGIC score arrays go through the same report as gradient scores."""

from __future__ import annotations

import json
import re

import lightning.pytorch as L
import numpy as np
import torch
from oracles import batch_rows as _rows
from oracles import lm_batch
from oracles import micro_gpt_neox as _micro
from torch.utils.data import DataLoader

from lightning_bergson import EkfacModule
from lightning_bergson.cli.report import report
from lightning_bergson.ekfac import top_influences
from lightning_bergson.scores import ScoreSettings, write_scores


def _table_ids(markdown: str, heading: str) -> list[int]:
    """Example ids of the first table after ``heading``, in order."""
    section = markdown.split(heading, 1)[1].split("**", 1)[0]
    return [int(m) for m in re.findall(r"^\| \d+ \| [^|]+ \| (\d+) \|", section, re.M)]


def _texts(tmp_path, ids) -> str:
    path = tmp_path / "texts.json"
    path.write_text(json.dumps({str(i): f"training text {i}" for i in ids}))
    return str(path)


def test_metagradient_report_puts_the_most_negative_first(tmp_path):
    scores = np.array([[0.5, -1.0, 2.0, 0.1, -0.3]])  # dL/dw: negative = helpful
    ids = [10, 11, 12, 13, 14]
    write_scores(tmp_path / "m.zarr", scores, ids, method="magic", convention="metagradient")
    report(str(tmp_path / "m.zarr"), str(tmp_path / "rep"), top_k=2, texts=_texts(tmp_path, ids))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert _table_ids(md, "**Top (most helpful)**") == [11, 14]
    assert _table_ids(md, "**Bottom**") == [12, 10]
    assert "training text 11" in md and (tmp_path / "rep" / "report.html").is_file()
    assert "- **sign convention**: metagradient: d L_query / d w_i" in md
    assert f"- **scores**: {tmp_path / 'm.zarr'}" in md


def test_report_command_shows_the_arrays_settings_and_each_rows_epoch(tmp_path):
    ids, epochs = [10, 11, 10], [0, 0, 1]  # example 10 was trained in two epochs
    settings = ScoreSettings(store="g.zarr", preconditioner="none", columns="rows")
    write_scores(tmp_path / "r.zarr", np.array([[0.3, -1.0, 0.5]]), ids, method="gradient_cosine",
                 convention="influence", settings=settings, epochs=epochs,
                 steps=[4, 4, 9])  # fmt: skip
    report(str(tmp_path / "r.zarr"), str(tmp_path / "rep"), top_k=2, texts=_texts(tmp_path, ids))
    md = (tmp_path / "rep" / "report.md").read_text()
    top = md.split("**Top (most helpful)**", 1)[1].split("**", 1)[0]
    assert "| 1 | +0.500 | 10 | 1 | 9 | training text 10 |" in top
    assert "| 2 | +0.300 | 10 | 0 | 4 | training text 10 |" in top
    assert "- **store**: g.zarr" in md and "- **preconditioner**: none" in md
    assert "- **scored**: 3 rows of 2 training examples, per query" in md


def test_ekfac_scores_report_their_top_influences(tmp_path):
    model = _micro()
    train, queries = lm_batch(8, 10, seed=1), lm_batch(2, 10, seed=2)
    ek = EkfacModule(model, factors_dir=str(tmp_path / "ek"), factor_dtype="float64")
    L.Trainer(
        accelerator="cpu",
        max_epochs=ek.num_phases,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(ek, DataLoader(_rows(train), batch_size=4))
    scores = ek.pairwise_scores(
        DataLoader(_rows(queries), batch_size=2),
        DataLoader(_rows(train), batch_size=4),
        out=str(tmp_path / "ek.zarr"),
    )
    ids = train["example_id"].tolist()
    report(str(tmp_path / "ek.zarr"), str(tmp_path / "rep"), top_k=3, texts=_texts(tmp_path, ids))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "- **preconditioner**: ekfac inverse Fisher (relative damping 0.1; factors" in md
    top = top_influences(torch.as_tensor(scores), k=3, example_ids=torch.tensor(sorted(ids)))
    for q, section in enumerate(md.split("## Query")[1:]):
        assert _table_ids(section, "**Top (most helpful)**") == top.positive_ids[q].tolist()
        assert _table_ids(section, "**Bottom**") == top.negative_ids[q].tolist()
