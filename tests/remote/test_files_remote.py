"""Score arrays and EK-FAC factors on the S3 server: written, read back equal, and their
integrity rules kept (an incomplete score array is refused, a missing chunk is an error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_bergson.ekfac.storage import (
    FACTOR_KINDS,
    FORMAT,
    EkfacFactors,
    read_factor,
    write_json,
    write_shard,
)
from lightning_bergson.scores import ScoreArray, ScoreArrayWriter, ScoreHeader, write_scores
from lightning_bergson.store import StoreIntegrityError
from lightning_bergson.store.location import Location


def test_score_array_round_trip(bucket, s3_env):
    scores = np.random.default_rng(0).standard_normal((3, 11)).astype(np.float32)
    url = f"{bucket}/scores.zarr"
    write_scores(url, scores, range(100, 111), method="demo", convention="influence")
    back = ScoreArray.open(url, storage_options={"endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    np.testing.assert_array_equal(back.scores, scores)
    assert back.example_ids.tolist() == list(range(100, 111))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_scores(url, scores, range(11), method="demo", convention="influence")
    write_scores(url, -scores, range(11), method="demo", convention="influence", overwrite=True)
    np.testing.assert_array_equal(ScoreArray.open(url).scores, -scores)


def test_incomplete_or_damaged_score_array_is_refused(bucket):
    url = f"{bucket}/partial.zarr"
    writer = ScoreArrayWriter(url, ScoreHeader("demo", "influence"), num_queries=1,
                              example_ids=range(6), chunk_cols=2)  # fmt: skip
    writer.add(np.ones((1, 4)))  # two of three chunks, never closed (a crashed `score`)
    with pytest.raises(ValueError, match="incomplete"):
        ScoreArray.open(url)
    done = f"{bucket}/done.zarr"
    with ScoreArrayWriter(done, ScoreHeader("demo", "influence"), num_queries=1,
                          example_ids=range(6), chunk_cols=2) as complete:  # fmt: skip
        complete.add(np.ones((1, 6)))
    assert ScoreArray.open(done).scores.tolist() == [[1.0] * 6]
    chunk = Location(done) / "scores" / "c" / "0" / "1"
    chunk.fs.rm(chunk.key)
    with pytest.raises(StoreIntegrityError, match="1 of its 3 chunks are missing"):
        ScoreArray.open(done)


def test_ekfac_factors_round_trip(bucket):
    url = f"{bucket}/ekfac"
    gen = torch.Generator().manual_seed(0)
    a, s = torch.randn(3, 3, generator=gen), torch.randn(2, 2, generator=gen)
    shards = {
        "activation_covariance": {"fc": a},
        "gradient_covariance": {"fc": s},
        "activation_eigen": {"fc.eigenvalues": a[0].clone(), "fc.eigenvectors": a},
        "gradient_eigen": {"fc.eigenvalues": s[0].clone(), "fc.eigenvectors": s},
        "eigenvalue_correction": {"fc": torch.ones(2, 3)},
    }
    for kind in FACTOR_KINDS:
        write_shard(url, kind, 0, shards[kind])
    write_shard(url, "eigenvalue_correction", 1, {"other": torch.zeros(1)})
    config = {"format": FORMAT, "modules": {"fc": {}}, "phases_completed": list(FACTOR_KINDS)}
    write_json(f"{url}/config.json", config)
    write_json(f"{url}/counts.json", {"tokens": 5})
    factors = EkfacFactors.load(url)
    assert factors.counts == {"tokens": 5}
    fc = factors.modules["fc"]
    assert torch.equal(fc.activation_covariance, a) and torch.equal(fc.gradient_eigenvectors, s)
    assert torch.equal(fc.eigenvalue_correction, torch.ones(2, 3))
    assert set(read_factor(url, "eigenvalue_correction")) == {"fc", "other"}  # both shards
    with pytest.raises(FileNotFoundError, match="no EK-FAC factors"):
        EkfacFactors.load(f"{bucket}/nothing")
