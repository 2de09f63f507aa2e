"""Helpers of the bad-input tables (tests/bad_inputs)."""

from __future__ import annotations

import numpy as np
import xarray as xr

SEE = r"see README, 'Validation rules'"
"""What every validation error ends with."""

RES, CRS, ORIGIN = 160.0, "EPSG:32632", (500_000.0, 5_000_000.0)


def run(ds, model, **kw):
    """``terrafm.embed`` with the small settings every table uses."""
    import terrafm

    return terrafm.embed(ds, model=model, chip_size=64, overlap=0, device="cpu", progress=False, **kw)


def make_embedding(values: np.ndarray) -> xr.DataArray:
    """An embedding DataArray (y, x, embedding) on a 160 m UTM grid, valid where every value is finite."""
    import rioxarray  # noqa: F401
    from affine import Affine

    ny, nx = values.shape[:2]
    da = xr.DataArray(values.astype(np.float32), dims=("y", "x", "embedding"),
                      coords={"y": ORIGIN[1] - RES * (np.arange(ny) + 0.5),
                              "x": ORIGIN[0] + RES * (np.arange(nx) + 0.5), "embedding": np.arange(values.shape[2])})
    da = da.assign_coords(valid=(("y", "x"), np.isfinite(values).all(-1)))
    return da.rio.write_crs(CRS).rio.write_transform(Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1]))
