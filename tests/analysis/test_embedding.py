"""Mean hidden states against each row run alone (padding must not change them)."""

from __future__ import annotations

import torch
from oracles import lm_batch, tiny_gpt_neox

from lightning_bergson.analysis import hidden_state_cosine, mean_hidden_states


def _alone(model, batch):
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        row = ids[mask.bool()][None]  # (1, S_i), no padding
        with torch.no_grad():
            h = model(input_ids=row, output_hidden_states=True).hidden_states[-1][0]  # (S_i, H)
        out.append(h.mean(0))
    return torch.stack(out)


def test_mean_hidden_states_ignore_padding():
    model = tiny_gpt_neox().eval()
    batch = lm_batch(num=4, seq=9)
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    torch.testing.assert_close(
        mean_hidden_states(model, batch), _alone(model, batch), atol=1e-5, rtol=1e-5
    )


def test_hidden_state_cosine_is_the_cosine():
    model = tiny_gpt_neox().eval()
    q, docs = lm_batch(num=2, seed=3), [lm_batch(num=3, seed=4), lm_batch(num=2, seed=5)]
    got = hidden_state_cosine(model, q, docs)  # (2, 5)
    a = _alone(model, q)
    b = torch.cat([_alone(model, d) for d in docs])
    want = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
