"""Georeferenced embedding DataArrays for the viz tests (terrafm.embed contract, 160 m UTM grid)."""

from __future__ import annotations

import numpy as np
import rioxarray  # noqa: F401
import xarray as xr
from affine import Affine
from pyproj import Transformer

RES = 160.0
CRS = "EPSG:32633"
ORIGIN = (404_000.0, 5_342_400.0)  # upper-left corner (x, y), near Linz


def make_embedding(values, crs: str = CRS, origin=ORIGIN, times=None) -> xr.DataArray:
    """Wrap (y, x, D) or (t, y, x, D) values: NaN rows -> valid False; CRS + transform written."""
    values = np.asarray(values, dtype=np.float32)
    ny, nx = values.shape[-3], values.shape[-2]
    xs = origin[0] + RES * (np.arange(nx) + 0.5)
    ys = origin[1] - RES * (np.arange(ny) + 0.5)
    dims = ("y", "x", "embedding")
    coords = {"y": ys, "x": xs, "embedding": np.arange(values.shape[-1])}
    if values.ndim == 4:
        dims = ("time",) + dims
        coords["time"] = times if times is not None else (
            np.datetime64("2021-06-01") + 30 * np.arange(values.shape[0])).astype("datetime64[ns]")
    da = xr.DataArray(values, dims=dims, coords=coords, name="embedding")
    da = da.assign_coords(valid=(dims[:-1], np.isfinite(values).all(-1)))
    da.attrs.update({"model": "test", "level": "patch"})
    return da.rio.write_crs(crs).rio.write_transform(Affine(RES, 0, origin[0], 0, -RES, origin[1]))


def two_region_embedding(ny=16, nx=20, depth=8, seed=0, noise=0.05) -> xr.DataArray:
    """Left half ~ prototype A, right half ~ prototype B (orthogonal), small noise."""
    rng = np.random.default_rng(seed)
    a = np.zeros(depth, np.float32); a[0] = 1.0
    b = np.zeros(depth, np.float32); b[1] = 1.0
    values = np.where((np.arange(nx) < nx // 2)[None, :, None], a, b) + noise * rng.normal(size=(ny, nx, depth))
    return make_embedding(values.astype(np.float32))


def cell_lonlat(emb: xr.DataArray, row: int, col: int) -> tuple[float, float]:
    """(lon, lat) of the centre of grid cell (row, col)."""
    to_lonlat = Transformer.from_crs(emb.rio.crs, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform(float(emb["x"].values[col]), float(emb["y"].values[row]))
    return float(lon), float(lat)


def click(app, lon: float, lat: float) -> None:
    """Deliver a click the way the browser does: a leaflet 'interaction' message to the map widget."""
    app.map._handle_leaflet_event(None, {"event": "interaction", "type": "click", "coordinates": [lat, lon]}, [])


def decode_png(url: str) -> np.ndarray:
    """RGBA pixels of a ``data:image/png;base64`` URL."""
    import base64
    import io

    from PIL import Image

    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def pixel_lonlat(bounds, shape, rows, cols):
    """lon/lat of overlay pixel centres: Leaflet stretches the image linearly in Web Mercator."""
    (south, west), (north, east) = bounds
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    left, bottom = to_merc.transform(west, south)
    right, top = to_merc.transform(east, north)
    h, w = shape
    mx = left + (np.asarray(cols) + 0.5) * (right - left) / w
    my = top - (np.asarray(rows) + 0.5) * (top - bottom) / h
    return Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(mx, my)
