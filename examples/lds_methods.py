"""Every attribution method of ``examples/lds.py``, on the model ``MagicModule`` trained.

Each scorer returns ``[Q, N]`` scores in its own sign convention (``"influence"``: positive
= helpful; ``"metagradient"``: negative = helpful), columns in example-id order:

* :func:`trajectory_store` + :func:`trackstar_scores`: TrackStar over rows captured along
  MAGIC's own recorded trajectory. For step ``t`` every example of the step's batch gets the
  gradient of its summed token loss at the parameters before step ``t``, projected, and
  divided elementwise by the optimizer's denominator after step ``t`` (``sqrt(v_hat +
  eps_root) + eps``, torchopt's AdamW); the query is normalized with the final state. These
  are the rows ``GradientCaptureCallback`` writes during a torch AdamW fit, made with the
  same ``GradientCollector``; scores go through ``Attributor`` (cosine or inner product,
  with or without the TrackStar preconditioner, summed over each example's rows).
* :func:`exact_gradient_scores`: inner product and cosine of exact (unprojected,
  unnormalized) per-example gradients of the final model.
* :func:`ekfac_scores`: EK-FAC influence of the final model (``EkfacModule``).
* :func:`hidden_scores`: mean last-hidden-state cosine (no gradients).
* :func:`bergson_scores`: Bergson's own TrackStar and EK-FAC on the same final model, when
  ``bergson`` is importable.
* :func:`tail_patch`: TrackStar's tail-patch score of any scores: one more optimizer step
  from the final state on each query's top-k documents, and the drop of the query loss.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor, nn
from torchopt.pytree import tree_flatten

from lightning_bergson import Attributor, EkfacModule, GradientCollector, MagicModule
from lightning_bergson.analysis import hidden_state_cosine
from lightning_bergson.capture.fingerprint import model_fingerprint
from lightning_bergson.capture.normalizers import AdamNormalizer, save_normalizers
from lightning_bergson.capture.settings import CaptureSettings
from lightning_bergson.data import collate_batch
from lightning_bergson.losses import token_losses
from lightning_bergson.scores import helpfulness
from lightning_bergson.store import GradientStoreWriter, layout_blocks

Batches = Iterable[dict[str, Tensor]]


def ordered_batches(dataset, pad_token_id: int, batch_size: int = 32) -> Batches:
    """Every training example in example-id order."""
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield collate_batch(rows, pad_token_id)


def summed_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` each example's summed token loss: the loss whose weight MAGIC differentiates."""
    return token_losses(logits, labels)[0].sum(1)


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


# ---------------------------------------------------------------- TrackStar on the trajectory


def adam_normalizers(mm: MagicModule, state, modules: dict[str, nn.Module]) -> dict:
    """AdamW's denominator in ``state`` as normalizers: ``avg_sq = v_hat + eps_root``, so
    ``sqrt(avg_sq) + eps`` is exactly torchopt's ``sqrt(v_hat + eps_root) + eps``."""
    adam = next(s for s in state.opt_state if hasattr(s, "nu"))  # torchopt's ScaleByAdamState
    names = tree_flatten({k: k for k in state.params})[0]  # the order of the state's leaves
    nu = dict(zip(names, tree_flatten(adam.nu)[0], strict=True))
    count = dict(zip(names, tree_flatten(adam.count)[0], strict=True))
    cfg = mm.optimizer_config
    out = {}
    for name in modules:
        key = f"{name}.weight"
        v_hat = nu[key] / (1 - cfg.betas[1] ** count[key].double())
        out[name] = AdamNormalizer(v_hat.float() + cfg.eps_root, eps=cfg.eps)
    return out


def trajectory_store(
    mm: MagicModule, path: Path, projection_dim: int, steps_per_epoch: int
) -> Path:
    """Rows of every recorded step (``checkpoint_schedule="all"``), as a gradient store."""
    traj = mm.trajectory
    if traj is None or len(traj.kept_steps) < traj.num_steps:
        raise ValueError("trajectory_store needs a MagicModule fit with checkpoint_schedule='all'")
    net = copy.deepcopy(mm.model).eval()
    blocks: dict[str, Tensor] = {}
    collector = GradientCollector(net, projection_dim=projection_dim, closure=blocks.__setitem__)
    layout = layout_blocks([(b.name, b.shape, b.parent, b.head) for b in collector.blocks])
    settings = CaptureSettings(projection_dim=projection_dim, normalizer="adam")
    meta = {"model": model_fingerprint(net), **settings.to_attrs()}
    weights = [m.weight for m in collector.modules.values()]
    with GradientStoreWriter(
        path, modules=layout, dtype="float32", metadata=meta, overwrite=True
    ) as w:
        for t in range(traj.num_steps):
            after = traj.state(t + 1) if t + 1 < traj.num_steps else traj.final
            net.load_state_dict(traj.state(t).params, strict=False)
            collector.set_normalizers(adam_normalizers(mm, after, collector.modules))
            for batch in traj.batches[t]:  # the step's micro-batches
                with collector:
                    logits = net(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                    torch.autograd.grad(summed_losses(logits, batch["labels"]).sum(), weights)
                rows = torch.cat([blocks[b.name] for b in layout], dim=1)  # (B, D)
                epoch = t // steps_per_epoch
                w.append(rows, example_id=batch["example_id"], step=t, epoch=epoch)
    final = adam_normalizers(mm, traj.final, collector.modules)
    (path / "normalizers").mkdir(exist_ok=True)
    save_normalizers(path / "normalizers" / "normalizers.safetensors", final)
    return path


def trackstar_scores(
    store: Path, model: nn.Module, query, *, cosine: bool, preconditioner: bool
) -> np.ndarray:
    """``[Q, N]`` (influence) over the trajectory store, each example's rows summed."""
    attr = Attributor(
        store,
        dtype=torch.float64,
        unit_norm=cosine,
        preconditioner="fit" if preconditioner else None,
        example_reduce="sum",
    )
    scores, ids = attr.scores(attr.query_gradients(model, query))
    return scores.numpy()[:, np.argsort(ids)]


# ---------------------------------------------------------------- final-model methods


def exact_gradient_scores(model: nn.Module, docs: Batches, query) -> dict[str, np.ndarray]:
    """Inner product and cosine ``[Q, N]`` of exact per-example gradients of every Linear."""

    def rows(batch: dict[str, Tensor]) -> Tensor:
        blocks: dict[str, Tensor] = {}
        with GradientCollector(model, projection_dim=0, closure=blocks.__setitem__):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            summed_losses(logits.logits, batch["labels"]).sum().backward()
        model.zero_grad(set_to_none=True)
        return torch.cat([blocks[k] for k in sorted(blocks)], dim=1).double()  # (B, D)

    model.eval()
    train = torch.cat([rows(b) for b in docs])  # (N, D)
    q = rows(query)  # (Q, D)
    unit = torch.nn.functional.normalize
    return {
        "inner product": (q @ train.T).numpy(),
        "cosine": (unit(q, dim=1) @ unit(train, dim=1).T).numpy(),
    }


def ekfac_scores(model: nn.Module, train_loader, docs: Batches, query, factors: Path) -> np.ndarray:
    """``[Q, N]`` EK-FAC influence (empirical Fisher, damping 0.1 relative)."""
    ek = EkfacModule(model, factors_dir=str(factors), overwrite=True)
    _trainer(ek.num_phases).fit(ek, train_loader)
    return ek.pairwise_scores([query], docs).numpy()


def hidden_scores(model: nn.Module, docs: Batches, query) -> np.ndarray:
    return hidden_state_cosine(model, query, docs).numpy()


# ---------------------------------------------------------------- tail-patch


def tail_patch(
    mm: MagicModule, query, helpful: np.ndarray, dataset, pad_token_id: int, k: int
) -> np.ndarray:
    """``[Q]`` drop of each query's loss after one more training step on its top ``k``.

    The step continues the forward run (``MagicModule``'s own step from its final parameters
    and optimizer state, unit weights) on a batch of the ``k`` documents ranked most helpful
    for that query; the score is the query loss (mean token loss of the answer, nats) before
    minus after: the increase of the answer's mean log-probability per token (TrackStar's
    tail-patch, arXiv:2410.17413, Sec. 4.2).

    Args:
        mm: The trained module (its trajectory holds the final state).
        query: The query batch.
        helpful: ``[Q, N]`` helpfulness (influence convention), example-id columns.
        dataset: Training rows by example id (``TextDataModule.train_dataset``).
        pad_token_id: Padding of the top-k batch.
        k: Documents per patch step.
    """
    final, step = mm.trajectory.final, mm.step_fn
    like = next(iter(final.params.values()))
    before = step.query_losses(final.params, query)  # (Q,)
    out = []
    for q in range(len(helpful)):
        top = np.argsort(-helpful[q], kind="stable")[:k]
        batch = collate_batch([dataset[int(i)] for i in top], pad_token_id)
        patched, _ = step.step(final, batch, torch.ones(k, dtype=like.dtype))
        out.append(float(before[q] - step.query_losses(patched.params, query)[q]))
    return np.array(out)


def random_helpfulness(num_queries: int, num_examples: int, seed: int) -> np.ndarray:
    """Random scores: the tail-patch of ``k`` random documents, the reference to beat."""
    return np.random.default_rng(seed).standard_normal((num_queries, num_examples))


def helpful_of(scores: np.ndarray, convention: str) -> np.ndarray:
    return np.asarray(helpfulness(scores, convention), dtype=np.float64)


# ---------------------------------------------------------------- Bergson

_BERGSON_MISSING = (
    "Bergson's own TrackStar and EK-FAC: skipped, `bergson` is not importable here "
    "(`pip install bergson` pulls another torch build; install it in its own environment "
    "beside this package and rerun)."
)


def bergson_scores(mm: MagicModule, tokenizer, dataset, query, workdir: Path, projection_dim: int):
    """Bergson's TrackStar and EK-FAC ``[Q, N]`` on the same final model, when importable.

    Runs ``python -m bergson trackstar`` and ``python -m bergson ekfac`` on the final model
    (``save_pretrained``), the training documents as token ids (the very tokens MAGIC
    trained on) and the queries as token ids with their labels, with Bergson's defaults
    otherwise; TrackStar's normalizer is MAGIC's final AdamW state, exported with Bergson's
    own ``save_second_moments_as_optimizer_pt``.

    Returns:
        ``({method: scores}, note)``: empty without ``bergson``, the note says why.
    """
    try:
        import bergson
        from bergson.utils.load_from_optimizer import save_second_moments_as_optimizer_pt
    except ImportError:
        return {}, _BERGSON_MISSING
    paths = _bergson_inputs(mm, tokenizer, dataset, query, workdir)
    cfg, final = mm.optimizer_config, mm.trajectory.final
    save_second_moments_as_optimizer_pt(mm.model, final.opt_state, paths["optimizer"],
                                        step=final.step, betas=cfg.betas, eps=cfg.eps,
                                        eps_root=cfg.eps_root)  # fmt: skip
    common = ["--model", str(paths["model"]), "--data.dataset", str(paths["train"]),
              "--query.dataset", str(paths["query"]), "--query.aggregation", "none",
              "--token_batch_size", str(mm.model.config.max_position_embeddings),
              "--overwrite", "true"]  # fmt: skip
    runs = {
        "Bergson TrackStar": ["trackstar", "--projection_dim", str(projection_dim),
                              "--optimizer_state", str(paths["optimizer"])],
        "Bergson EK-FAC": ["ekfac", "--method", "kfac", "--hessian_cfg.ev_correction", "true",
                           "--use_dataset_labels", "true"],
    }  # fmt: skip
    out = {}
    for name, (command, *options) in runs.items():
        run = workdir / command
        _run_bergson([command, str(run), *common, *options], workdir / f"{command}.log")
        out[name] = read_bergson_scores(run / "scores")
    return (
        out,
        f"Bergson {getattr(bergson, '__version__', '')} ran on the same model (logs in {workdir}).",
    )


def _bergson_inputs(mm, tokenizer, dataset, query, workdir: Path) -> dict[str, Path]:
    from datasets import Dataset

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {k: workdir / k for k in ("model", "train", "query")}
    paths["optimizer"] = workdir / "optimizer.pt"
    mm.model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    Dataset.from_dict({"input_ids": [list(r) for r in dataset["input_ids"]]}).save_to_disk(
        str(paths["train"])
    )
    keep = [m.bool() for m in query["attention_mask"]]
    rows = {
        "input_ids": [ids[k].tolist() for ids, k in zip(query["input_ids"], keep, strict=True)],
        "labels": [lab[k].tolist() for lab, k in zip(query["labels"], keep, strict=True)],
    }
    Dataset.from_dict(rows).save_to_disk(str(paths["query"]))
    return paths


def _run_bergson(args: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "bergson", *args], stdout=f, stderr=f)
    if proc.returncode:
        raise RuntimeError(f"bergson {args[0]} failed ({proc.returncode}); see {log}")


def read_bergson_scores(path: Path) -> np.ndarray:
    """``[Q, N]`` from a Bergson score directory (``info.json`` + ``scores.bin``)."""
    info = json.loads((path / "info.json").read_text())
    arr = np.memmap(path / "scores.bin", dtype=np.dtype(info["dtype"]), mode="r",
                    shape=(info["num_items"],))  # fmt: skip
    cols = range(info["num_scores"])
    if not all(arr[f"written_{q}"].all() for q in cols):
        raise RuntimeError(f"{path} holds unwritten scores: the Bergson run did not finish")
    return np.stack([np.asarray(arr[f"score_{q}"], dtype=np.float64) for q in cols])
