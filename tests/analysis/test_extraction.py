"""k-extractability against a lookup-table model (hand-computed) and Hugging Face generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import tiny_gpt_neox
from torch import nn

from lightning_bergson.analysis import (
    extraction_lengths,
    greedy_continuation,
    k_extractable,
    memorization_steps,
)

V = 7


class ChainLM(nn.Module):
    """Predicts ``next(t) = (3 t + 1) mod 7`` after token t: 0 -> 1 -> 4 -> 6 -> 5 -> 2 -> 0."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(
            10 * nn.functional.one_hot((3 * torch.arange(V) + 1) % V, V).float()
        )

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]  # (B, S, V)


def test_greedy_continuation_follows_the_chain():
    got = greedy_continuation(ChainLM(), torch.tensor([[0, 1], [3, 3]]), 4)
    assert got.tolist() == [[4, 6, 5, 2], [3, 3, 3, 3]]  # 3 -> (10 mod 7) = 3


def test_extraction_lengths_by_hand():
    seqs = [
        [0, 1, 4, 6, 5, 2],  # the chain: all 4 continuation tokens match
        [0, 1, 4, 3, 5, 2],  # second continuation token wrong (6 expected): 1
        [0, 1, 2, 6, 5, 2],  # first wrong: 0
        [9, 9, 0, 1, 4, 6, 5, 2, 9],  # longer sequence; start=2 reads the chain
    ]
    lengths = extraction_lengths(ChainLM(), seqs[:3], k=2, m=4)
    assert lengths.tolist() == [4, 1, 0]
    assert k_extractable(ChainLM(), seqs[:3], k=2, m=4).tolist() == [True, False, False]
    assert extraction_lengths(ChainLM(), seqs[3:], k=2, m=4, start=2).tolist() == [4]
    # k = 1 from token 4: 6, 5, 2, 0 expected
    assert extraction_lengths(ChainLM(), [[4, 6, 5, 2, 0]], k=1, m=4).tolist() == [4]


def test_short_sequences_are_named():
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        extraction_lengths(ChainLM(), [[0, 1, 4, 6, 5, 2], [0, 1, 4]], k=2, m=4)


def test_batched_greedy_equals_hugging_face_generate():
    torch.manual_seed(0)
    model = tiny_gpt_neox(vocab_size=50)
    model.train()
    prefixes = torch.randint(0, 50, (5, 4))
    got = greedy_continuation(model, prefixes, 6, batch_size=2)  # batches of 2, 2, 1
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        want = model.generate(
            prefixes,
            attention_mask=torch.ones_like(prefixes),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )[:, 4:]
    assert torch.equal(got, want)
    # a sequence made of the model's own continuation is extractable, its edit is not
    seqs = torch.cat([prefixes, want], dim=1)
    edited = seqs.clone()
    edited[:, 7] = (edited[:, 7] + 1) % 50
    assert k_extractable(model, seqs, k=4, m=6).all()
    assert extraction_lengths(model, edited, k=4, m=6).tolist() == [3] * 5


def test_memorization_steps_by_hand():
    history = np.array(
        [  # 4 evaluations x 4 sequences
            [0, 1, 1, 0],
            [1, 0, 1, 0],
            [1, 1, 1, 0],
            [1, 1, 0, 0],
        ],
        dtype=bool,
    )
    # seq 0 from step 20 on; seq 1 forgot at 20 and came back at 30; seq 2 forgot at the end
    assert memorization_steps(history, [10, 20, 30, 40]).tolist() == [20, 30, -1, -1]
    with pytest.raises(ValueError, match="steps must increase"):
        memorization_steps(history, [10, 30, 20, 40])
    with pytest.raises(ValueError, match="history must be"):
        memorization_steps(history, [10, 20])
