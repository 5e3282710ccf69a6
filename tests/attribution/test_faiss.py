"""The optional FAISS index (faiss-cpu): an exact ``Flat`` index equals the brute-force top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_fixtures import brute_scores

from lightning_bergson.attribution import Attributor

pytestmark = pytest.mark.compare


@pytest.fixture(autouse=True)
def faiss():
    """Each test needs faiss-cpu (the compare extra); a skip is a failure under CI=true."""
    return pytest.importorskip("faiss")


@pytest.mark.parametrize(("cosine", "pre"), [(False, None), (True, None), (True, "fit")])
def test_flat_index_equals_the_scan(make_store, cosine, pre):
    path, rows, ids = make_store(num=30)
    q = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    kwargs = {"unit_norm": cosine, "preconditioner": pre}
    scan = Attributor(path, **kwargs)
    index = Attributor(path, faiss="Flat", **kwargs)
    for reverse in (False, True):
        want, got = scan.search(q, k=5, reverse=reverse), index.search(q, k=5, reverse=reverse)
        np.testing.assert_array_equal(got.rows.numpy(), want.rows.numpy())
        np.testing.assert_array_equal(got.indices.numpy(), ids[want.rows.numpy()])
        np.testing.assert_allclose(got.scores.numpy(), want.scores.numpy(), rtol=1e-4, atol=1e-5)
    if pre is None:  # and against float64 brute force
        order = np.argsort(-brute_scores(q.double().numpy(), rows, cosine=cosine), axis=1)
        np.testing.assert_array_equal(index.search(q, k=5).rows.numpy(), order[:, :5])
    saved = list((path / "faiss").glob("*.index"))
    assert len(saved) == 1 and saved[0].with_suffix(".json").is_file()
    reused = Attributor(path, faiss="Flat", **kwargs)  # loads the saved index
    assert torch.equal(reused.search(q, k=5).rows, index.search(q, k=5).rows)


def test_faiss_refuses_what_it_cannot_do(make_store):
    path, _, _ = make_store(num=5, epochs=1)
    with pytest.raises(ValueError, match="example_reduce='none'"):
        Attributor(path, faiss="Flat", example_reduce="mean")
    with pytest.raises(ValueError, match="modules=None"):
        Attributor(path, faiss="Flat").search(torch.zeros(1, 24), k=1, modules=["fc"])
