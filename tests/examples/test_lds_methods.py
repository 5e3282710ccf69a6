"""TrackStar rows captured along MAGIC's trajectory, against torch.func and a hand-run Adam."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from lds_methods import trajectory_store
from oracles import lm_batch, oracle_lm_grads, tiny_gpt_neox
from torch.func import functional_call

from lightning_bergson import Attributor, GradientStore, MagicModule
from lightning_bergson.magic.functional import weighted_lm_loss

BETA2, EPS, EPS_ROOT = 0.999, 1e-8, 1e-4


def _fit(steps: int = 3):
    data = lm_batch(num=2 * steps, seq=8)
    data["example_id"] = torch.arange(2 * steps)
    batches = [{k: v[2 * t : 2 * t + 2] for k, v in data.items()} for t in range(steps)]
    mm = MagicModule(
        tiny_gpt_neox(), num_examples=2 * steps, optimizer="adamw", lr=1e-2, eps=EPS,
        eps_root=EPS_ROOT, checkpoint_schedule="all",
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(mm, loader)  # fmt: skip
    return mm, batches


def _denominators(mm, batches):
    """AdamW's ``sqrt(v_hat + eps_root) + eps`` after each step, run by hand from the batch
    gradients at the recorded parameters (no clipping, unit weights: HF's token mean)."""
    net = mm.model
    v = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    out = []
    for t, batch in enumerate(batches):
        params = {k: p.detach().requires_grad_() for k, p in mm.trajectory.state(t).params.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = functional_call(net, params, (), inputs).logits
        grads = torch.autograd.grad(
            weighted_lm_loss(logits, batch["labels"]), list(params.values())
        )
        for (name, _), g in zip(params.items(), grads, strict=True):
            v[name] = BETA2 * v[name] + (1 - BETA2) * g.detach() ** 2
        out.append({n: (x / (1 - BETA2 ** (t + 1)) + EPS_ROOT).sqrt() + EPS for n, x in v.items()})
    return out


def _expected(net, params, batch, denom, blocks) -> torch.Tensor:
    """Rows ``[B, D]``: per-example summed-loss gradients (torch.func) / the denominator."""
    net = net.__class__(net.config)
    net.load_state_dict(params, strict=False)
    grads = oracle_lm_grads(net.eval(), batch, reduction="sum")
    return torch.cat(
        [(grads[f"{b.name}.weight"] / denom[f"{b.name}.weight"]).flatten(1) for b in blocks], dim=1
    )


def _close(got, want):
    """float32 gradients divided by denominators down to sqrt(eps_root): absolute tolerance
    relative to the largest entry."""
    want = want.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_trajectory_rows_and_query_match_the_oracle(tmp_path):
    mm, batches = _fit()
    path = trajectory_store(mm, tmp_path / "t.zarr", projection_dim=0, steps_per_epoch=3)
    store = GradientStore.open(path)
    assert store.steps.tolist() == [0, 0, 1, 1, 2, 2]
    assert store.example_ids.tolist() == [0, 1, 2, 3, 4, 5]
    denoms = _denominators(mm, batches)
    rows = store.read(list(range(6))).double()
    for t, batch in enumerate(batches):
        want = _expected(mm.model, mm.trajectory.state(t).params, batch, denoms[t], store.modules)
        _close(rows[2 * t : 2 * t + 2], want)

    query = lm_batch(num=2, seq=6, seed=9)  # normalized with the final state's denominator
    got = Attributor(path).query_gradients(mm.model, query)
    want = _expected(mm.model, mm.trajectory.final.params, query, denoms[-1], store.modules)
    _close(got, want)


def test_bergson_score_files_are_read_by_query(tmp_path):
    """A score directory in Bergson's layout (interleaved score/written pairs), made by hand."""
    import json

    import numpy as np
    from lds_methods import read_bergson_scores

    names = ["score_0", "written_0", "score_1", "written_1"]
    spec = {"names": names, "formats": ["float32", "bool"] * 2, "offsets": [0, 4, 8, 12],
            "itemsize": 16}  # fmt: skip
    arr = np.zeros(3, dtype=np.dtype(spec))
    arr["score_0"], arr["score_1"] = [1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]
    arr["written_0"] = arr["written_1"] = True
    arr.tofile(tmp_path / "scores.bin")
    info = {"num_items": 3, "num_scores": 2, "dtype": spec}
    (tmp_path / "info.json").write_text(json.dumps(info))
    got = read_bergson_scores(tmp_path)
    assert got.tolist() == [[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]  # [Q, N]

    arr["written_1"][2] = False
    arr.tofile(tmp_path / "scores.bin")
    with pytest.raises(RuntimeError, match="unwritten"):
        read_bergson_scores(tmp_path)
