"""A store in xarray and dask: ``to_dask``/``to_xarray`` (checked reads of the committed
rows) and the rank groups opened directly by ``xarray.open_zarr``/``dask.array.from_zarr``,
on the local S3 server and on local disk. The oracle is the store's own rows as written."""

from __future__ import annotations

import numpy as np
import pytest
from test_integrity_remote import CHUNK, ROWS, damage, write

from lightning_bergson.store import GradientStore, StoreIntegrityError, to_dask, to_xarray
from lightning_bergson.store.location import Location

xr = pytest.importorskip("xarray", reason="needs the xarray extra")
da = pytest.importorskip("dask.array", reason="needs the xarray extra")


@pytest.fixture(params=["s3", "local"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "g.zarr")
    return f"{request.getfixturevalue('bucket')}/g.zarr"


def test_dask_and_xarray_see_the_written_rows(url):
    grads = write(url)
    store = GradientStore.open(url)
    lazy = to_dask(store)
    assert lazy.shape == (ROWS, 10) and lazy.chunks[0][0] == CHUNK
    np.testing.assert_array_equal(lazy.compute(), grads)
    np.testing.assert_array_equal(to_dask(store, ["b"]).compute(), grads[:, 6:])
    ds = to_xarray(store)
    np.testing.assert_array_equal(ds.example_id.values, np.arange(ROWS))
    assert ds.block.values.tolist() == ["a"] * 6 + ["b"] * 4
    np.testing.assert_array_equal(ds.gradients.sel(column=ds.block == "b").values, grads[:, 6:])
    np.testing.assert_allclose(
        ds.gradients.groupby("epoch").sum().values[0], grads.sum(axis=0), rtol=1e-5
    )
    # a rank group is a plain Zarr v3 group with named dimensions
    group = Location(url) / "rank_0"
    raw = group.zarr_store(read_only=True) if group.remote else str(group)
    opened = xr.open_zarr(raw, consolidated=False)
    assert opened.gradients.dims == ("row", "column")
    np.testing.assert_array_equal(opened.gradients.values[:ROWS], grads)
    np.testing.assert_array_equal(opened.example_id.values[:ROWS], np.arange(ROWS))
    np.testing.assert_array_equal(da.from_zarr(raw, component="gradients")[:ROWS], grads)


@pytest.mark.parametrize("how", ["deleted", "overwritten"])
def test_damage_is_refused_by_dask(bucket, how):
    url = f"{bucket}/g.zarr"
    write(url)
    store = GradientStore.open(url)
    damage(url, "gradients", 1, how)
    lazy = to_dask(store)
    np.testing.assert_array_equal(lazy[:CHUNK].compute(), store.read(slice(0, CHUNK)).numpy())
    with pytest.raises(StoreIntegrityError, match="chunk 1"):
        lazy.sum().compute()
