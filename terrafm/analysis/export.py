"""Write analysis results: Cloud-Optimised GeoTIFF, zarr, GeoParquet of points with their vectors.

Every writer checks its path before computing (writable; not the store or file the result is still
read from, which writing would destroy), refuses an existing path unless ``overwrite=True``, and
writes through a temporary sibling renamed onto the path at the end: a failure leaves the old file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ..store import atomic_output, check_output_path, embedding_to_dataset, serialisable_attrs, sources_of
from ._grid import EMBEDDING_DIM, flatten_valid


def to_cog(da: xr.DataArray, path: str | Path, nodata: float = np.nan, overwrite: bool = False) -> Path:
    """Write a (y, x), (y, x, band/embedding) or (band, y, x) map as a Cloud-Optimised GeoTIFF.

    An existing ``path`` is replaced only with ``overwrite=True``; never the file ``da`` is read from.

    Examples
    --------
    >>> to_cog(to_rgb(emb), "rgb.tif")   # doctest: +SKIP
    """
    if "time" in da.dims:
        raise ValueError("COG holds one date; select it with da.isel(time=i) (or write zarr for a time series)")
    if da.rio.crs is None:
        raise ValueError("array has no CRS; COGs must be georeferenced (da.rio.write_crs(...))")
    other = [d for d in da.dims if d not in ("y", "x")]
    if len(other) > 1:
        raise ValueError(f"too many dims {da.dims} for a GeoTIFF; keep y, x and at most one band dim")
    arr = da.transpose(*other, "y", "x") if other else da
    arr = arr.astype("float32").rio.write_nodata(nodata, encoded=False)
    arr.attrs = serialisable_attrs(arr.attrs)
    path = Path(path)
    with atomic_output(path, overwrite=overwrite, reads=sources_of(da)) as tmp:
        arr.rio.to_raster(tmp, driver="COG", compress="DEFLATE")
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
            ds.to_zarr(tmp, mode="w-")
    else:
        check_output_path(path, overwrite=True, reads=sources_of(obj) if mode == "r+" else ())
        ds.to_zarr(path, mode=mode)
    return path


def to_geoparquet(emb: xr.DataArray, path: str | Path | None = None, extra: dict | None = None,
                  overwrite: bool = False):
    """Valid positions as points (cell centres, map CRS) with a ``vector`` list column; optionally written.

    ``extra`` maps column names to (y, x) DataArrays on the same grid (e.g. cluster ids). An existing
    ``path`` is replaced only with ``overwrite=True``; never a store ``emb`` is read from.

    Examples
    --------
    >>> gdf = to_geoparquet(emb, "emb.parquet", extra={"cluster": cluster(emb, 8)})  # doctest: +SKIP
    """
    import geopandas as gpd

    if path is not None:
        check_output_path(path, overwrite=overwrite, reads=sources_of([emb, *(extra or {}).values()]))
    vectors, mask = flatten_valid(emb)
    mask_np = np.asarray(mask.values)
    index = np.nonzero(mask_np)
    ys = mask["y"].values[index[-2]]
    xs = mask["x"].values[index[-1]]
    columns = {"row": index[-2], "col": index[-1]}
    if "time" in mask.dims:
        columns["time"] = mask["time"].values[index[0]]
    for name, da in (extra or {}).items():
        columns[name] = np.asarray(da.transpose(*mask.dims).values)[mask_np]
    columns["vector"] = list(vectors)
    gdf = gpd.GeoDataFrame(columns, geometry=gpd.points_from_xy(xs, ys), crs=emb.rio.crs)
    if path is not None:
        with atomic_output(path, overwrite=overwrite, reads=sources_of([emb, *(extra or {}).values()])) as tmp:
            gdf.to_parquet(tmp)
    return gdf
