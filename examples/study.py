"""The training run shared by ``memorization.py`` and ``behaviours.py``, and its scorers.

One small GPT-NeoX is trained with gradient capture on the corpus of
:func:`lightning_bergson.analysis.make_memorization_corpus` (canaries at 1-16 copies, their
near-duplicates and paraphrases, related documents, telegram-style documents and biography
facts). At the end of every epoch a callback records how many continuation tokens of every
canary greedy decoding reproduces (k-extractability), so each canary's memorization step is
known. The run (model, tokenizer, store, history) is kept in ``--workdir`` and reused by the
next study with the same settings.

Scorers rank every training document for a batch of queries with each method of the
package (captured rows with and without the TrackStar preconditioner, cosine or inner
product, via ``Attributor``; EK-FAC via ``EkfacModule``) and two baselines (BM25, mean
hidden-state cosine). All scores are ``[Q, N]``, higher = more helpful.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from lightning_bergson import (
    Attributor,
    CausalLMModule,
    EkfacModule,
    GradientCaptureCallback,
    HeadConfig,
    TextDataModule,
)
from lightning_bergson.analysis import (
    MemorizationCorpus,
    bm25_scores,
    extraction_lengths,
    hidden_state_cosine,
    make_memorization_corpus,
)
from lightning_bergson.data import collate_batch

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
RUN_VERSION = 2  # bump when the training code changes, so cached runs are not reused


@dataclass
class StudyConfig:
    """Corpus, model and capture settings of the shared run (all of them key the cache)."""

    people: int = 40
    copies: tuple[int, ...] = (1, 2, 4, 8, 16)
    canaries_per_level: int = 4
    epochs: int = 24
    hidden: int = 128
    layers: int = 2
    lr: float = 5e-3
    batch_size: int = 32
    projection_dim: int = 16
    k: int = 6
    m: int = 12
    seed: int = 0
    workdir: str = "runs/memorization"
    threads: int = 0
    ekfac: bool = True
    damping: float = 0.1

    def key(self) -> str:
        skip = {"workdir", "threads", "ekfac", "damping"}
        setup = {k: v for k, v in asdict(self).items() if k not in skip}
        setup["run_version"] = RUN_VERSION
        return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def add_arguments(p: argparse.ArgumentParser, workdir: str = StudyConfig.workdir) -> None:
    """The shared run's options (defaults: the results in ``examples/results``)."""
    d = StudyConfig()
    p.add_argument("--people", type=int, default=d.people, help="biography people (4 facts each)")
    p.add_argument("--copies", type=int, nargs="+", default=list(d.copies), help="duplicates")
    p.add_argument("--canaries_per_level", type=int, default=d.canaries_per_level)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--hidden", type=int, default=d.hidden, help="GPT-NeoX hidden size")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--projection_dim", type=int, default=d.projection_dim)
    p.add_argument("--k", type=int, default=d.k, help="prefix tokens of k-extractability")
    p.add_argument("--m", type=int, default=d.m, help="continuation tokens that must match")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", default=workdir, help="model, store, factors (reused)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: default)")
    p.add_argument("--no_ekfac", dest="ekfac", action="store_false", help="skip EK-FAC")
    p.add_argument("--damping", type=float, default=d.damping, help="preconditioner damping")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    names = StudyConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names}
    values["copies"] = tuple(values["copies"])
    return StudyConfig(**values)


@dataclass
class Run:
    """A trained model with its corpus, data, store and memorization history."""

    cfg: StudyConfig
    corpus: MemorizationCorpus
    data: TextDataModule
    model: nn.Module
    store: Path
    history: np.ndarray  # (T, C) extraction lengths of every canary after each epoch
    steps: list[int]  # (T,) global step of each evaluation
    train_seconds: float
    canary_ids: list[list[int]] = field(default_factory=list)  # tokens of each canary


class ExtractionHistory(L.Callback):
    """After every epoch: extraction lengths of the canaries (greedy, k-token prefix)."""

    def __init__(self, sequences: list[list[int]], k: int, m: int) -> None:
        self.sequences, self.k, self.m = sequences, k, m
        self.lengths: list[list[int]] = []
        self.steps: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lengths = extraction_lengths(pl_module.model, self.sequences, self.k, self.m)
        self.lengths.append(lengths.tolist())
        self.steps.append(trainer.global_step)


def _trainer(epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def data_module(cfg: StudyConfig, corpus: MemorizationCorpus) -> TextDataModule:
    """The corpus as a JSON-lines dataset (example id = line), with a locally trained BPE."""
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.texts))
    dm = TextDataModule(
        "json",
        data_files=str(path),
        batch_size=cfg.batch_size,
        max_length=48,
        seed=cfg.seed,
        cache_dir=str(work / "cache"),
    )
    dm.setup("fit")
    return dm


def prepare(cfg: StudyConfig) -> Run:
    """Train (or reload the cached run of the same settings) and return it."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    corpus = make_memorization_corpus(
        cfg.people, copies=cfg.copies, canaries_per_level=cfg.canaries_per_level, seed=cfg.seed
    )
    dm = data_module(cfg, corpus)
    first = {c: corpus.class_docs(c)["exact"] for c in range(len(corpus.canaries))}
    canary_ids = [list(dm.train_dataset[min(first[c])]["input_ids"]) for c in sorted(first)]
    work = Path(cfg.workdir)
    meta = work / "run.json"
    if meta.is_file() and json.loads(meta.read_text())["key"] == cfg.key():
        saved = json.loads(meta.read_text())
        model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="eager")
        history = np.array(saved["history"])
        return Run(cfg, corpus, dm, model, work / "train.zarr", history, saved["steps"],
                   saved["train_seconds"], canary_ids)  # fmt: skip
    shutil.rmtree(work / "ekfac", ignore_errors=True)  # factors of an earlier model
    start = time.perf_counter()
    module, hist = _train(cfg, dm, canary_ids)
    seconds = time.perf_counter() - start
    module.model.save_pretrained(work / "model")
    dm.tokenizer.save_pretrained(work / "model")
    meta.write_text(json.dumps({"key": cfg.key(), "config": asdict(cfg), "history": hist.lengths,
                                "steps": hist.steps, "train_seconds": seconds}))  # fmt: skip
    return Run(cfg, corpus, dm, module.model, work / "train.zarr", np.array(hist.lengths),
               hist.steps, seconds, canary_ids)  # fmt: skip


class CosineLM(CausalLMModule):
    """``CausalLMModule`` with a linear warmup then a cosine decay of the learning rate to
    a tenth: without the decay, canaries are memorized and forgotten from epoch to epoch."""

    def __init__(self, *args, total_steps: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.total_steps = total_steps

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        warm, total = self.hparams.warmup_steps, self.total_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _train(cfg: StudyConfig, dm: TextDataModule, canary_ids: list[list[int]]):
    config = {
        "model_type": "gpt_neox",
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * cfg.hidden,
        "max_position_embeddings": 64,
    }
    steps = cfg.epochs * math.ceil(len(dm.train_dataset) / cfg.batch_size)
    module = CosineLM(
        config=config, vocab_size=dm.vocab_size, lr=cfg.lr, warmup_steps=20, total_steps=steps
    )
    capture = GradientCaptureCallback(
        Path(cfg.workdir) / "train.zarr",
        projection_dim=cfg.projection_dim,
        normalizer="adafactor",  # AdamW's second moments after each row's step
        head_cfgs={"*.attention.query_key_value": HeadConfig(4, 3 * cfg.hidden // 4)},
        overwrite=True,
    )
    hist = ExtractionHistory(canary_ids, cfg.k, cfg.m)
    _trainer(cfg.epochs, [capture, hist]).fit(module, dm)
    return module, hist


# ---------------------------------------------------------------- queries


def token_query(rows: list[list[int]], labelled: list[list[bool]]) -> dict[str, Tensor]:
    """A query batch from token ids, each token's label kept where ``labelled``."""
    items = [
        {
            "input_ids": ids,
            "labels": [t if keep else IGNORE for t, keep in zip(ids, mask, strict=True)],
            "example_id": i,
        }
        for i, (ids, mask) in enumerate(zip(rows, labelled, strict=True))
    ]
    return collate_batch(items, pad_token_id=0)


def canary_query(run: Run, canaries: list[int]) -> dict[str, Tensor]:
    """Prefix of k tokens (not scored) then the m continuation tokens (scored)."""
    k, m = run.cfg.k, run.cfg.m
    rows = [run.canary_ids[c][: k + m] for c in canaries]
    return token_query(rows, [[False] * k + [True] * m for _ in rows])


# ---------------------------------------------------------------- scorers


def document_batches(run: Run, batch_size: int = 64):
    """Every training document in example-id order, as padded batches."""
    ds = run.data.train_dataset
    for start in range(0, len(ds), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        yield collate_batch(rows, run.data.pad_token_id)


def attributor_scores(run: Run, batch, *, cosine: bool, preconditioner: bool) -> np.ndarray:
    """``[Q, N]`` scores against the captured rows (each document's rows averaged)."""
    attr = Attributor(
        run.store,
        unit_norm=cosine,
        preconditioner="fit" if preconditioner else None,
        damping=run.cfg.damping,
        example_reduce="mean",
        check_model="shapes",  # a reloaded run's config differs only in serialization
    )
    scores, ids = attr.scores(attr.query_gradients(run.model, batch))
    full = np.full((len(scores), len(run.corpus)), -np.inf)
    full[:, ids] = scores.numpy()
    return full


def ekfac_scores(run: Run, batch) -> np.ndarray:
    """``[Q, N]`` EK-FAC influence (factors fitted once per run, empirical Fisher)."""
    factors = Path(run.cfg.workdir) / "ekfac"
    ek = EkfacModule(run.model, factors_dir=str(factors), overwrite=True)
    if not (factors / "config.json").is_file():
        _trainer(ek.num_phases, []).fit(ek, run.data.train_dataloader())
    return ek.pairwise_scores([batch], document_batches(run)).numpy()


def method_scores(run: Run, batch, texts: list[str]) -> dict[str, np.ndarray]:
    """Every method's ``[Q, N]`` scores for the query ``batch`` (``texts``: its text)."""
    out = {}
    for cosine in (True, False):
        for pre in (True, False):
            name = f"{'cosine' if cosine else 'inner product'}, " + (
                "preconditioner" if pre else "no preconditioner"
            )
            out[name] = attributor_scores(run, batch, cosine=cosine, preconditioner=pre)
    if run.cfg.ekfac:
        out["EK-FAC"] = ekfac_scores(run, batch)
    out["BM25"] = bm25_scores(texts, run.corpus.texts)
    docs = document_batches(run)
    out["mean hidden state cosine"] = hidden_state_cosine(run.model, batch, docs).numpy()
    return out
