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


LARGE_SHAPE = (2, 768, 1024, 64)  # (time, y, x, embedding): 403 MB of float32
LARGE_CHUNKS = (1, 64, 128, 64)    # 2 MiB zarr chunks
LARGE_CLASSES = 4                  # land-cover-like patches of 4 cluster centres
LARGE_CHANGED = (slice(512, 768), slice(640, 1024))  # (rows, cols) that change class between the dates
LARGE_CLOUD_ROWS = slice(64, 96)   # rows invalid (NaN, valid=False) at time 0


def large_class_map(rows: np.ndarray, cols: np.ndarray, time: int) -> np.ndarray:
    """Class of each (row, col) of the ``large_store`` at ``time``: 64-cell patches, shifted in the changed box."""
    classes = ((rows[:, None] // 64) + 2 * (cols[None, :] // 64)) % LARGE_CLASSES
    if time == 1:
        inside = ((rows[:, None] >= LARGE_CHANGED[0].start) & (rows[:, None] < LARGE_CHANGED[0].stop)
                  & (cols[None, :] >= LARGE_CHANGED[1].start) & (cols[None, :] < LARGE_CHANGED[1].stop))
        classes = np.where(inside, (classes + 1) % LARGE_CLASSES, classes)
    return classes


def large_centres(depth: int = LARGE_SHAPE[-1]) -> np.ndarray:
    """The (LARGE_CLASSES, depth) cluster centres of the ``large_store`` vectors."""
    return np.random.default_rng(7).normal(scale=2.0, size=(LARGE_CLASSES, depth)).astype(np.float32)


def large_embedding(shape=LARGE_SHAPE, chunks=LARGE_CHUNKS) -> xr.DataArray:
    """A lazy contract embedding (time, y, x, embedding): class centres + unit noise, a cloud strip.

    The noise of a chunk is one shared tile of unit normal vectors rolled by the chunk's position
    (generating fresh noise for 10^8 values would take longer than the 10 s budget of the fixture),
    so the values do not depend on how the array is chunked when computed.
    """
    import dask.array as dask_array

    centres = large_centres(shape[-1])
    tile = np.random.default_rng(11).standard_normal((chunks[1] * chunks[2], shape[-1]), np.float32)

    def block(block_info=None):
        (t0, t1), (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        count = (t1 - t0) * (r1 - r0) * (c1 - c0)
        noise = np.roll(np.resize(tile, (count, shape[-1])), 7919 * (t0 * 3 + r0 * 5 + c0 * 7) + 1, axis=0)
        noise = noise.reshape(t1 - t0, r1 - r0, c1 - c0, shape[-1])
        for t in range(t0, t1):
            noise[t - t0] += centres[large_class_map(np.arange(r0, r1), np.arange(c0, c1), t)]
            if t == 0:
                cloud = np.arange(r0, r1)
                cloud = (cloud >= LARGE_CLOUD_ROWS.start) & (cloud < LARGE_CLOUD_ROWS.stop)
                noise[t - t0, cloud] = np.nan
        return noise

    values = dask_array.map_blocks(block, chunks=tuple(
        tuple(min(c, n - i) for i in range(0, n, c)) for n, c in zip(shape, chunks)), dtype=np.float32)
    rows = np.arange(shape[1])
    cloud = (rows >= LARGE_CLOUD_ROWS.start) & (rows < LARGE_CLOUD_ROWS.stop)
    valid = np.ones(shape[:3], bool)
    valid[0, cloud] = False
    valid = dask_array.from_array(valid, chunks=values.chunks[:3])
    nt, ny, nx, depth = shape
    xs = ORIGIN[0] + RES * (np.arange(nx) + 0.5)
    ys = ORIGIN[1] - RES * (np.arange(ny) + 0.5)
    times = np.array(["2020-07-01", "2024-07-01"], dtype="datetime64[ns]")[:nt]
    da = xr.DataArray(values, dims=("time", "y", "x", "embedding"), name="embedding",
                      coords={"time": times, "y": ys, "x": xs, "embedding": np.arange(depth)})
    da = da.assign_coords(valid=(("time", "y", "x"), valid))
    da.attrs.update({"model": "test", "level": "patch"})
    return da.rio.write_crs(CRS).rio.write_transform(Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1]))


def write_large_store(path, emb: xr.DataArray | None = None):
    """Write ``emb`` (default :func:`large_embedding`) in the ``open_embedding`` layout, uncompressed (fast)."""
    from terrafm.store import EMBEDDING_VAR, embedding_to_dataset

    ds = embedding_to_dataset(large_embedding() if emb is None else emb)
    ds[EMBEDDING_VAR].encoding["compressors"] = None  # keeps the grid_mapping encoding (CRS on reopen)
    ds.to_zarr(path, mode="w-", consolidated=False)
    return path
