"""Attribution against a store on the local S3 server equals attribution against its copy
on disk: the same query rows (normalizers read from the bucket), the same preconditioner
(fitted, saved into the bucket, loaded back), the same top-k and scores."""

from __future__ import annotations

import pytest
import torch
from captures import QUERY
from oracles import lm_batch, tiny_gpt_neox

from lightning_bergson import Attributor
from lightning_bergson.attribution.preconditioners import FILE_NAME


@pytest.mark.parametrize("unit_norm", [True, False])
def test_search_on_s3_equals_local(remote_capture, local_capture, unit_norm):
    model, batch = tiny_gpt_neox(), lm_batch(**QUERY)
    results = []
    for store in (remote_capture, local_capture):
        attr = Attributor(store.location, dtype=torch.float64, unit_norm=unit_norm,
                          preconditioner="fit", chunk_rows=3)  # fmt: skip
        queries = attr.query_gradients(model, batch)
        top, bottom = attr.extremes(queries, k=5)
        results.append((queries, top, bottom, attr.scores(queries)[0]))
    (q_r, top_r, low_r, all_r), (q_l, top_l, low_l, all_l) = results
    torch.testing.assert_close(q_r, q_l, rtol=0, atol=0)
    torch.testing.assert_close(all_r, all_l, rtol=0, atol=0)
    for mine, ref in ((top_r, top_l), (low_r, low_l)):
        assert torch.equal(mine.indices, ref.indices) and torch.equal(mine.scores, ref.scores)
    # the fitted preconditioner went into the bucket, and a second Attributor loads it
    saved = remote_capture.aux("preconditioners") / FILE_NAME
    assert saved.is_file()
    again = Attributor(str(remote_capture.location), preconditioner="fit")
    assert (
        again.preconditioner.info
        == Attributor(local_capture.path, preconditioner="fit").preconditioner.info
    )
