"""Helpers for the embedding tests: small georeferenced S1+S2 Datasets."""

from __future__ import annotations

import numpy as np
import xarray as xr

from terrafm import sensors


def make_dataset(height: int = 160, width: int = 192, times: int = 1, seed: int = 0,
                 crs: str | None = "EPSG:32618", s1: bool = True, s2: bool = True,
                 x0: float = 500000.0, y0: float = 4100000.0) -> xr.Dataset:
    """Smooth random S2 L2A DN (``s2_l2a_B01``...) + S1 power (``s1_vv``, ``s1_vh``) fields on a 10 m UTM
    grid, dims (time, y, x)."""
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    rng = np.random.default_rng(seed)
    gbox = GeoBox.from_bbox((x0, y0 - 10 * height, x0 + 10 * width, y0), crs or "EPSG:32618", resolution=10)
    coords = dict(xr_coords(gbox, crs_coord_name="spatial_ref"))
    coords["time"] = np.array([f"2024-0{i + 1}-15" for i in range(times)], "datetime64[ns]")
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    data = {}
    for i, band in enumerate(sensors.S2_BANDS if s2 else ()):
        field = 1500 + 800 * np.sin(xx / (17 + i) + i) * np.cos(yy / (23 + i))
        cube = field[None] + rng.normal(0, 50, (times, height, width))
        data[f"s2_l2a_{band}"] = (("time", "y", "x"), np.clip(cube, 1, None).astype("uint16"), {"modality": "s2_l2a"})
    for j, band in enumerate(sensors.S1_BANDS if s1 else ()):
        cube = 10 ** ((-12 - 6 * j + 3 * np.sin(xx / 11.0 + yy / 29.0))[None] / 10) * rng.uniform(0.8, 1.2, (times, height, width))
        data[f"s1_{band}"] = (("time", "y", "x"), cube.astype("float32"), {"modality": "s1"})
    ds = xr.Dataset(data, coords=coords)
    if crs is None:
        ds = ds.drop_vars("spatial_ref")
        ds["x"].attrs, ds["y"].attrs = {}, {}
    return ds
