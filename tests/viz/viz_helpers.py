"""Georeferenced embedding DataArrays for the viz tests (terrafm.embed contract, 160 m UTM grid)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr
from pyproj import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from analysis_helpers import CRS, ORIGIN, RES  # noqa: E402,F401
from analysis_helpers import make_embedding as _make_embedding  # noqa: E402


def make_embedding(values, crs: str = CRS, origin=ORIGIN, times=None) -> xr.DataArray:
    """The analysis tests' contract embedding; a time series gets monthly dates from June 2021."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 4 and times is None:
        times = (np.datetime64("2021-06-01") + 30 * np.arange(values.shape[0])).astype("datetime64[ns]")
    return _make_embedding(values, crs=crs, origin=origin, times=times)


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
