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




BEN_BANDS = ("B02", "B03", "B04", "B08")  # 10 m bands, 120x120 px per patch
CELLS = 8  # sub-blocks per patch side: 15x15 px each


def bigearthnet_features():
    """Real BigEarthNet S2 example patches as an 'embedding' of known separability.

    Each 120x120 patch is split into 8x8 blocks of 15x15 px; a block's vector is the mean and std
    of log(1 + DN) of the four 10 m bands. Returns (features (P, 8, 8, 8), names, labels) where
    labels are the patches' BigEarthNet-19 label lists (bigearthnet_common's mapping).
    """
    import json
    from pathlib import Path

    import rasterio
    from bigearthnet_common.constants import OLD2NEW_LABELS_DICT
    from bigearthnet_common.example_data import get_s2_example_folder_path

    root = Path(get_s2_example_folder_path())
    feats, names, labels = [], [], []
    for patch in sorted(p for p in root.iterdir() if p.is_dir()):
        bands = []
        for band in BEN_BANDS:
            with rasterio.open(patch / f"{patch.name}_{band}.tif") as src:
                bands.append(np.log1p(src.read(1).astype(np.float64)))
        cube = np.stack(bands, -1).reshape(CELLS, 15, CELLS, 15, len(BEN_BANDS))
        feats.append(np.concatenate([cube.mean((1, 3)), cube.std((1, 3))], -1))
        meta = json.loads((patch / f"{patch.name}_labels_metadata.json").read_text())
        labels.append([OLD2NEW_LABELS_DICT[x] for x in meta["labels"] if OLD2NEW_LABELS_DICT.get(x)])
        names.append(patch.name)
    return np.stack(feats), names, labels
