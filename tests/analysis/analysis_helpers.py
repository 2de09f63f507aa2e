"""Helpers: georeferenced embedding DataArrays at a 160 m UTM grid, following the terrafm.embed contract."""

from __future__ import annotations

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
from affine import Affine

RES = 160.0
CRS = "EPSG:32633"
ORIGIN = (404_000.0, 5_342_400.0)  # upper-left corner (x, y)


def make_embedding(values: np.ndarray, crs: str = CRS, origin=ORIGIN, times=None) -> xr.DataArray:
    """Wrap (y, x, D) or (t, y, x, D) values as a contract embedding: NaN -> valid False."""
    values = np.asarray(values, dtype=np.float32)
    ny, nx = values.shape[-3], values.shape[-2]
    xs = origin[0] + RES * (np.arange(nx) + 0.5)
    ys = origin[1] - RES * (np.arange(ny) + 0.5)
    dims = ("y", "x", "embedding")
    coords = {"y": ys, "x": xs, "embedding": np.arange(values.shape[-1])}
    if values.ndim == 4:
        dims = ("time",) + dims
        coords["time"] = times if times is not None else np.arange(values.shape[0]).astype("datetime64[D]")
    da = xr.DataArray(values, dims=dims, coords=coords, name="embedding")
    da = da.assign_coords(valid=(dims[:-1], np.isfinite(values).all(-1)))
    da.attrs.update({"model": "test", "level": "patch"})
    da = da.rio.write_crs(crs).rio.write_transform(Affine(RES, 0, origin[0], 0, -RES, origin[1]))
    return da


def assert_georef(result, like) -> None:
    """CRS, transform and x/y coordinates identical to ``like``."""
    assert result.rio.crs == like.rio.crs
    assert "spatial_ref" in result.coords
    assert tuple(result.rio.transform(recalc=True)) == pytest.approx(tuple(like.rio.transform(recalc=True)))
    np.testing.assert_allclose(result["x"].values, like["x"].values)
    np.testing.assert_allclose(result["y"].values, like["y"].values)


