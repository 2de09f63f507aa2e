"""Write analysis results: Cloud-Optimised GeoTIFF, zarr, GeoParquet of points with their vectors.

Every writer checks its path before computing (writable; not the store or file the result is still
read from, which writing would destroy), refuses an existing path unless ``overwrite=True``, and
writes through a temporary sibling renamed onto the path at the end: a failure leaves the old file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ..store import (atomic_output, check_output_path, embedding_to_dataset, serialisable_attrs, sources_of,
                     temporary_sibling, write_zarr)
from ._grid import EMBEDDING_DIM, check_embedding, is_lazy
from .cluster import require_some_valid, valid_flags


COG_BLOCK = 512
"""Tile size of the COG (and of the tiled staging GeoTIFF the chunks are written into)."""


class _WindowWriter:
    """``dask.array.store`` target: each (band?, y, x) block written as a rasterio window."""

    def __init__(self, dst, bands: bool, nodata: float) -> None:
        self.dst, self.bands, self.nodata = dst, bands, nodata

    def __setitem__(self, key: tuple[slice, ...], block: np.ndarray) -> None:
        from rasterio.windows import Window

        *band, rows, cols = key
        block = np.asarray(block, dtype=np.float32)
        if np.isfinite(self.nodata):
            block = np.where(np.isnan(block), np.float32(self.nodata), block)
        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        if self.bands:
            indexes = list(range(band[0].start + 1, band[0].stop + 1))
            self.dst.write(block, indexes=indexes, window=window)
        else:
            self.dst.write(block, indexes=1, window=window)


def to_cog(da: xr.DataArray, path: str | Path, nodata: float = np.nan, overwrite: bool = False) -> Path:
    """Write a (y, x), (y, x, band/embedding) or (band, y, x) map as a Cloud-Optimised GeoTIFF.

    Written window by window: a dask-backed ``da`` (a lazy :func:`cluster` or
    ``Classifier.predict`` map of :func:`terrafm.open_embedding`) is computed chunk by chunk into
    a tiled staging GeoTIFF (``dask.array.store``), which GDAL's COG driver copies into the COG
    (DEFLATE, 512-pixel tiles, overviews), so memory is bounded by the chunks, not the area. An
    in-memory ``da`` takes the same path as one block: both give the same file. Values are
    float32; NaN becomes ``nodata`` when it is a number. An existing ``path`` is replaced only with
    ``overwrite=True``, through a temporary sibling (a failure leaves the old file); never the
    file ``da`` is read from.

    Examples
    --------
    >>> to_cog(to_rgb(emb), "rgb.tif")   # doctest: +SKIP
    >>> to_cog(cluster(open_embedding("country.zarr"), k=12), "clusters.tif")   # streamed  # doctest: +SKIP
    """
    import rasterio
    import rasterio.shutil

    if not isinstance(da, xr.DataArray):
        raise TypeError(f"to_cog writes an xarray.DataArray, got {type(da).__name__}; for a Dataset pick one variable, "
                        "e.g. to_cog(ds['class'], path)")
    if "time" in da.dims:
        raise ValueError("COG holds one date; select it with da.isel(time=i) (or write zarr for a time series)")
    if da.rio.crs is None:
        raise ValueError("array has no CRS; COGs must be georeferenced (da.rio.write_crs(...))")
    missing = {"y", "x"} - set(da.dims)
    if missing:
        raise ValueError(f"array has dims {da.dims} but a GeoTIFF needs 'y' and 'x' (missing {sorted(missing)})")
    other = [d for d in da.dims if d not in ("y", "x")]
    if len(other) > 1:
        raise ValueError(f"too many dims {da.dims} for a GeoTIFF; keep y, x and at most one band dim")
    if not isinstance(nodata, (int, float, np.integer, np.floating)) or isinstance(nodata, (bool, np.bool_)):
        raise ValueError(f"nodata={nodata!r}: nodata must be a number (NaN by default)")
    arr = da.transpose(*other, "y", "x")
    if 0 in arr.shape:
        raise ValueError(f"array has an empty dim {dict(arr.sizes)}; nothing to write")
    count = arr.sizes[other[0]] if other else 1
    profile = {"driver": "GTiff", "width": arr.sizes["x"], "height": arr.sizes["y"], "count": count,
               "dtype": "float32", "crs": arr.rio.crs, "transform": arr.rio.transform(recalc=True),
               "nodata": float(nodata), "tiled": True, "blockxsize": COG_BLOCK, "blockysize": COG_BLOCK,
               "BIGTIFF": "IF_SAFER"}
    tags = serialisable_attrs(arr.attrs)
    path = Path(path)
    with atomic_output(path, overwrite=overwrite, reads=sources_of(da)) as tmp:
        staging = temporary_sibling(tmp, "tiles")
        try:
            with rasterio.open(staging, "w", **profile) as dst:
                writer = _WindowWriter(dst, bands=bool(other), nodata=float(nodata))
                if arr.chunks is not None:
                    import threading

                    import dask.array as dsa

                    dsa.store(arr.data, writer, lock=threading.Lock())
                else:
                    writer[tuple(slice(0, n) for n in arr.shape)] = arr.values
                if tags:
                    dst.update_tags(**tags)
            rasterio.shutil.copy(staging, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=COG_BLOCK,
                                 BIGTIFF="IF_SAFER")
        finally:
            staging.unlink(missing_ok=True)
    return path


def to_zarr(obj: xr.DataArray | xr.Dataset, path: str | Path, mode: str = "w", overwrite: bool = False) -> Path:
    """Write to zarr keeping ``spatial_ref`` (CRS + transform) so the result re-opens georeferenced.

    An embedding DataArray (dims ``(..., embedding)``) is stored in the layout of
    ``terrafm.embed(out=...)``; read it back with :func:`terrafm.open_embedding`. Any other
    DataArray is stored under its name; read it with ``xr.open_zarr(path, decode_coords="all")``.

    ``mode="w"`` writes a new store: an existing ``path`` is replaced only with ``overwrite=True``
    (a zarr store or a file, never another directory), and never the store ``obj`` is still read
    from (load it first: ``obj.load()``). ``mode="a"`` or ``"r+"`` add to an existing store in place
    (xarray's rules).

    Examples
    --------
    >>> to_zarr(emb, "emb.zarr"); terrafm.open_embedding("emb.zarr").rio.crs  # doctest: +SKIP
    """
    if isinstance(obj, xr.DataArray) and EMBEDDING_DIM in obj.dims:
        ds = embedding_to_dataset(obj)
    elif isinstance(obj, xr.DataArray):
        name = obj.name or "data"
        if name in obj.coords:
            name = f"{name}_values"
        ds = obj.to_dataset(name=name)
    else:
        ds = obj.copy()
    ds.attrs = serialisable_attrs(ds.attrs)
    for name in ds.data_vars:
        ds[name].attrs = serialisable_attrs(ds[name].attrs)
    path = Path(path)
    if mode not in ("w", "w-", "a", "a-", "r+"):
        raise ValueError(f"mode={mode!r}; use 'w' (a new store; overwrite=True to replace one) or 'a'/'r+' "
                         "(add to an existing store)")
    if mode in ("w", "w-"):
        with atomic_output(path, overwrite=overwrite and mode == "w", reads=sources_of(obj)) as tmp:
            write_zarr(ds, tmp, mode="w-")
    else:
        check_output_path(path, overwrite=True, reads=sources_of(obj) if mode == "r+" else ())
        ds.to_zarr(path, mode=mode)
    return path


def to_geoparquet(emb: xr.DataArray, path: str | Path | None = None, extra: dict | None = None,
                  overwrite: bool = False):
    """Valid positions as points (cell centres, map CRS) with a ``vector`` list column; optionally written.

    Columns: ``row``, ``col`` (grid indices), ``time`` (with a time dim), the ``extra`` columns,
    ``vector`` (float32 list) and ``geometry``; rows in grid C order ((time,) y, x), invalid
    positions left out. ``extra`` maps column names to (y, x) or (time, y, x) DataArrays on the
    same grid (e.g. cluster ids).

    A dask-backed ``emb`` (:func:`terrafm.open_embedding`) or ``extra`` written to ``path`` is
    streamed: one Parquet row group per date and row of chunks (pyarrow ``ParquetWriter``), so memory is bounded
    by one row of chunks, not the area, and the function returns ``path``. Otherwise the
    GeoDataFrame is built in memory and returned (and written when ``path`` is given). Both give
    the same table, in the same order. An existing ``path`` is replaced only with
    ``overwrite=True``, through a temporary sibling; never a store ``emb`` is read from.

    Examples
    --------
    >>> gdf = to_geoparquet(emb, "emb.parquet", extra={"cluster": cluster(emb, 8)})  # doctest: +SKIP
    >>> to_geoparquet(open_embedding("country.zarr"), "country.parquet")   # streamed  # doctest: +SKIP
    """
    import geopandas as gpd

    check_embedding(emb)
    extra = dict(extra or {})
    emb_t = emb.transpose(..., "y", "x", EMBEDDING_DIM)
    dims = tuple(emb_t.dims[:-1])
    for name, da in extra.items():
        if not isinstance(da, xr.DataArray) or set(da.dims) - set(dims) or not {"y", "x"} <= set(da.dims):
            shown = da.dims if isinstance(da, xr.DataArray) else type(da).__name__
            raise ValueError(f"extra[{name!r}] is {shown}; extra columns are (y, x) or {dims} DataArrays on the "
                             "embedding grid, e.g. extra={'cluster': cluster(emb, 8)}")
        if any(da.sizes[d] != emb_t.sizes[d] for d in da.dims):
            raise ValueError(f"extra[{name!r}] has sizes {dict(da.sizes)} but the embedding grid is "
                             f"{dict((d, emb_t.sizes[d]) for d in dims)}; compute it from the same embedding")
        if name in ("row", "col", "time", "vector", "geometry"):
            raise ValueError(f"extra column name {name!r} is taken; choose another name")
    reads = sources_of([emb, *extra.values()])
    if path is not None:
        check_output_path(path, overwrite=overwrite, reads=reads)
    require_some_valid(emb)
    stream = path is not None and (is_lazy(emb) or any(is_lazy(da) for da in extra.values()))
    pieces = _row_bands(emb_t, extra) if stream else [_piece(emb_t, extra, {})]
    if stream:
        with atomic_output(path, overwrite=overwrite, reads=reads) as tmp:
            _write_parquet(pieces, tmp, emb.rio.crs)
        return Path(path)
    (piece,) = pieces
    columns = {name: values for name, values in piece.items() if name not in ("vector", "x", "y")}
    columns["vector"] = list(piece["vector"])
    gdf = gpd.GeoDataFrame(columns, geometry=gpd.points_from_xy(piece["x"], piece["y"]), crs=emb.rio.crs)
    if path is not None:
        with atomic_output(path, overwrite=overwrite, reads=reads) as tmp:
            _write_parquet([piece], tmp, emb.rio.crs)
    return gdf


def _row_bands(emb_t: xr.DataArray, extra: dict):
    """One piece per date and row of chunks, in grid C order."""
    y_chunks = emb_t.data.chunks[emb_t.dims.index("y")] if is_lazy(emb_t) else (emb_t.sizes["y"],)
    starts = np.cumsum((0, *y_chunks))
    dates = range(emb_t.sizes["time"]) if "time" in emb_t.dims else [None]
    for t in dates:
        for y0, y1 in zip(starts[:-1], starts[1:]):
            where = {"y": slice(int(y0), int(y1))} | ({} if t is None else {"time": slice(t, t + 1)})
            yield _piece(emb_t, extra, where)


def _piece(emb_t: xr.DataArray, extra: dict, where: dict) -> dict:
    """Columns of the valid positions of ``emb_t.isel(where)`` (numpy), with grid-wide row/col indices."""
    dims = tuple(emb_t.dims[:-1])
    part = emb_t.isel(where)
    vectors = np.asarray(part.values)
    ok = np.isfinite(vectors).all(-1)
    flags = valid_flags(part)
    if flags is not None:
        ok &= flags
    index = np.nonzero(ok)
    offset = {d: where[d].start if d in where else 0 for d in dims}
    piece = {"row": index[-2] + offset["y"], "col": index[-1] + offset["x"]}
    if "time" in dims:
        piece["time"] = part["time"].values[index[0]]
    for name, da in extra.items():
        values = np.asarray(da.isel({d: s for d, s in where.items() if d in da.dims}).transpose(
            *[d for d in dims if d in da.dims]).values)
        piece[name] = values[index[-values.ndim:]]
    piece["vector"] = (vectors.reshape(-1, vectors.shape[-1]) if ok.all() else vectors[ok]).astype(np.float32, copy=False)
    piece["x"] = part["x"].values[index[-1]]
    piece["y"] = part["y"].values[index[-2]]
    return piece


_WKB_POINT = np.dtype([("order", "u1"), ("kind", "<u4"), ("x", "<f8"), ("y", "<f8")])   # 21 bytes, packed


def _wkb_points(xs: np.ndarray, ys: np.ndarray):
    """A pyarrow binary array of little-endian 2-D WKB points (what ``shapely.to_wkb(points)`` gives).

    Encoded with numpy: shapely builds a Python-level geometry per point first, ten times slower
    than reading the vectors for a row of chunks.
    """
    import pyarrow as pa

    records = np.empty(len(xs), dtype=_WKB_POINT)
    records["order"], records["kind"], records["x"], records["y"] = 1, 1, xs, ys
    offsets = np.arange(len(xs) + 1, dtype=np.int32) * _WKB_POINT.itemsize
    return pa.Array.from_buffers(pa.binary(), len(xs), [None, pa.py_buffer(offsets),
                                                         pa.py_buffer(records.view(np.uint8))])


def _write_parquet(pieces, path: Path, crs) -> None:
    """GeoParquet 1.0 (WKB points): one row group per piece, written as each piece is computed."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyproj

    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Point"],
                                    "crs": pyproj.CRS.from_user_input(crs).to_json_dict()}}}
    writer = None
    try:
        for piece in pieces:
            vectors = piece["vector"]
            n, depth = vectors.shape
            arrays = {name: pa.array(values) for name, values in piece.items() if name not in ("vector", "x", "y")}
            arrays["vector"] = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * depth),
                                                        pa.array(vectors.reshape(-1)))
            arrays["geometry"] = _wkb_points(piece["x"], piece["y"])
            table = pa.table(arrays)
            del arrays, vectors
            if writer is None:               # dictionary encoding only where values repeat (not vectors, points)
                writer = pq.ParquetWriter(path, table.schema.with_metadata({"geo": json.dumps(geo)}),
                                          use_dictionary=[c for c in table.column_names if c not in ("vector", "geometry")])
            elif not n:
                continue                     # a row of chunks without valid positions: no empty row group
            if not table.schema.equals(writer.schema):
                table = table.cast(writer.schema)
            writer.write_table(table, row_group_size=max(len(table), 1))    # one row group per piece
            del table
    finally:
        if writer is not None:
            writer.close()
