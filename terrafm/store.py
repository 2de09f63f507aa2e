"""The on-disk layout of an embedding zarr, shared by ``embed(out=...)`` and ``analysis.to_zarr``.

A zarr variable may not be named like one of its dimensions (xarray would make it an index), so
the contract's ``"embedding"`` DataArray is stored as :data:`EMBEDDING_VAR`; its validity
coordinates (``valid``, ``valid_<modality>``) are stored as variables of their own and its attrs
as the variable's attrs. :func:`open_embedding` gives back the contract's DataArray.

Examples
--------
>>> import terrafm                                                          # doctest: +SKIP
>>> emb = terrafm.open_embedding("aoi.zarr")                                # doctest: +SKIP
>>> emb.dims, emb.rio.crs                                                   # doctest: +SKIP
(('time', 'y', 'x', 'embedding'), CRS.from_epsg(32618))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import xarray as xr

__all__ = ["EMBEDDING_VAR", "ZARR_FORMAT", "IncompleteStoreWarning", "open_embedding", "embedding_to_dataset",
           "with_cf_georeferencing", "write_zarr",
           "serialisable_attrs", "sources_of", "check_output_path", "atomic_output", "is_zarr_store",
           "write_stac_item", "stac_item_path"]

logger = logging.getLogger(__name__)

EMBEDDING_VAR = "embedding_vectors"
"""Name of the embedding array inside a zarr store."""

ZARR_FORMAT = 2
"""Zarr format of the stores terrafm writes. Version 2 because GDAL (3.10, the one rasterio and
QGIS ship) cannot decode zarr-python 3's version-3 codecs ("Unsupported codec: bytes"); stores of
either version are read."""

_CF_AXES = {"x": ("projection_x_coordinate", "longitude", "degrees_east"),
            "y": ("projection_y_coordinate", "latitude", "degrees_north")}


def with_cf_georeferencing(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with the CF attributes GDAL's zarr driver georeferences by: ``standard_name`` on the
    ``x``/``y`` coordinates (``projection_x_coordinate``, or ``longitude``/``latitude`` in a
    geographic CRS), so it takes them as the raster's columns and rows and the other dims
    (``embedding``, ``time``) as bands instead of the last two dims; and ``grid_mapping`` on every
    data variable over ``y``/``x`` naming the ``spatial_ref`` coordinate (the CRS). ``ds`` is not
    modified.

    Examples
    --------
    >>> ds = xr.Dataset({"v": (("y", "x"), np.zeros((1, 2)))}, coords={"x": [5.0, 15.0], "y": [5.0]})
    >>> out = with_cf_georeferencing(ds.assign_coords(spatial_ref=0))
    >>> out["x"].attrs["standard_name"], out["v"].attrs["grid_mapping"], "standard_name" in ds["x"].attrs
    ('projection_x_coordinate', 'spatial_ref', False)
    """
    geographic = False
    if "spatial_ref" in ds.coords and ds["spatial_ref"].attrs.get("crs_wkt"):
        from pyproj import CRS

        geographic = CRS.from_wkt(ds["spatial_ref"].attrs["crs_wkt"]).is_geographic
    out = ds.copy()
    for dim, (projected, angular, unit) in _CF_AXES.items():
        if dim in out.coords:
            attrs = dict(out[dim].attrs, standard_name=angular if geographic else projected)
            if geographic:
                attrs["units"] = unit
            out[dim] = out[dim].copy()
            out[dim].attrs = attrs
    if "spatial_ref" in out.coords:
        for name, var in out.data_vars.items():
            if {"y", "x"} <= set(var.dims):
                # as an attribute, not xarray's encoding: then xarray also lists spatial_ref in the
                # variable's "coordinates", which plain xr.open_zarr + rioxarray read the CRS from
                out[name].encoding = {k: v for k, v in var.encoding.items() if k != "grid_mapping"}
                out[name].attrs = dict(var.attrs, grid_mapping="spatial_ref")
    return out


def write_zarr(ds: xr.Dataset, path: str | os.PathLike, **to_zarr_kwargs: Any) -> Any:
    """``ds.to_zarr(path, ...)`` in the layout every terrafm store has: :data:`ZARR_FORMAT`, CF axes
    (:func:`with_cf_georeferencing`) and the CF ``spatial_ref`` coordinate ``ds`` carries, so GDAL, rioxarray
    and xarray read it georeferenced.

    Examples
    --------
    >>> import tempfile, zarr
    >>> path = Path(tempfile.mkdtemp()) / "v.zarr"
    >>> _ = write_zarr(xr.Dataset({"v": (("y", "x"), np.zeros((1, 2)))}, coords={"x": [5.0, 15.0], "y": [5.0]}),
    ...                path, consolidated=False)
    >>> zarr.open_group(str(path), mode="r").metadata.zarr_format == ZARR_FORMAT
    True
    """
    return with_cf_georeferencing(ds).to_zarr(path, zarr_format=ZARR_FORMAT, **to_zarr_kwargs)


def serialisable_attrs(attrs: dict) -> dict:
    """Attrs that zarr and GeoTIFF metadata can hold: scalars kept, lists of scalars as JSON text.

    Examples
    --------
    >>> serialisable_attrs({"model": "terrafm_base", "modalities": ["s1"], "obj": object()})
    {'model': 'terrafm_base', 'modalities': '["s1"]'}
    """
    out = {}
    for key, value in attrs.items():
        if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            out[key] = json.dumps(list(value))
    return out


def _restore_attrs(attrs: dict) -> dict:
    out = dict(attrs)
    for key, value in attrs.items():
        if isinstance(value, str) and value.startswith("["):
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass
    return out


def _is_validity(name: str) -> bool:
    return name == "valid" or name.startswith("valid_")


def embedding_to_dataset(emb: xr.DataArray) -> xr.Dataset:
    """The store layout of an embedding DataArray (``dims (..., y, x, embedding)``).

    Examples
    --------
    >>> import numpy as np
    >>> emb = xr.DataArray(np.zeros((2, 2, 3), "float32"), dims=("y", "x", "embedding"),
    ...                    name="embedding").assign_coords(valid=(("y", "x"), np.ones((2, 2), bool)))
    >>> sorted(embedding_to_dataset(emb).data_vars)
    ['embedding_vectors', 'valid']
    """
    validity = [str(c) for c in emb.coords if _is_validity(str(c))]
    values = emb.drop_vars(validity)
    values.name = EMBEDDING_VAR
    values.attrs = serialisable_attrs(emb.attrs)
    ds = values.to_dataset()
    for name in validity:
        ds[name] = emb.coords[name].variable
    return ds


VECTOR_DIM_NAMES = ("embedding", "band", "bands", "feature", "features", "dim", "channel")
"""Names of the vector dimension recognised in zarr stores written by other tools."""

RASTER_SUFFIXES = (".tif", ".tiff", ".gtiff", ".vrt")


def open_embedding(path: str | os.PathLike, chunks: dict | str | None = "auto", vector_dim: str | None = None,
                   variable: str | None = None) -> xr.DataArray:
    """Open embeddings: a terrafm store, or vectors written by other tools (GeoTIFF/COG or zarr).

    Parameters
    ----------
    path : str or PathLike
        A zarr store written by ``terrafm.embed(out=...)`` or ``analysis.to_zarr``; a GeoTIFF/COG
        whose bands are the vector's dimensions; or a zarr of vectors with dims ``([time,] y, x, <vector_dim>)``
        in any order.
    chunks : dict, "auto" or None
        Lazy dask arrays by default; ``None`` loads eagerly.
    vector_dim : str, optional
        The vector dimension of a foreign zarr (default: the one of ``"embedding"``, ``"band"``,
        ``"feature"``, ``"dim"``... it has). Renamed to ``"embedding"``.
    variable : str, optional
        The array of a foreign zarr holding the vectors (default: the only one with spatial dims
        and the vector dim).

    Returns
    -------
    xarray.DataArray
        Named ``"embedding"``, dims ``([time,] y, x, embedding)``, with the ``valid`` (and for terrafm
        stores ``valid_<modality>``) coordinates, ``spatial_ref`` and the attrs it was written with.
        For foreign files ``valid`` is where every component is finite and not the nodata value
        (those cells become NaN; values are float32).

    Raises
    ------
    ValueError
        A 1-band raster, a file without CRS, or a zarr without ``y``/``x`` dims or without a vector dim.

    Warns
    -----
    IncompleteStoreWarning
        The store's ``terrafm.embed(out=...)`` run has not finished: the warning says how many
        blocks are missing (their cells are NaN with ``valid=False``) and how to finish them.

    Examples
    --------
    >>> emb = open_embedding("aoi.zarr")                                    # doctest: +SKIP
    >>> emb.where(emb.valid).mean(("y", "x"))                               # doctest: +SKIP
    >>> other = open_embedding("vectors_cog.tif")   # bands -> embedding    # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such zarr store; write one with terrafm.embed(..., out='{path}')")
    if path.is_file():
        return _open_raster_vectors(path, chunks)
    ds = xr.open_zarr(path, consolidated=False, decode_coords="all", chunks=chunks)
    if EMBEDDING_VAR not in ds:
        return _foreign_zarr_vectors(path, ds, vector_dim, variable)
    emb = ds[EMBEDDING_VAR]
    emb = emb.assign_coords({name: ds[name] for name in ds.data_vars if _is_validity(str(name))})
    if "spatial_ref" in ds.coords:
        emb = emb.assign_coords(spatial_ref=ds["spatial_ref"])
    emb.attrs = _restore_attrs(emb.attrs)
    emb.name = "embedding"
    if "blocks_done" in ds:
        done = np.asarray(ds["blocks_done"].values)
        missing = int((done == 0).sum())
        if missing:
            warnings.warn(
                f"{path} is unfinished: {missing} of {done.size} blocks are not computed (their cells are NaN with "
                f"valid=False). Finish it by rerunning terrafm.embed(ds, ..., out={str(path)!r}) with the same "
                "Dataset and settings (finished blocks are kept)", IncompleteStoreWarning, stacklevel=2)
    return emb


def _as_contract(values: xr.DataArray, nodata: Any, source: str) -> xr.DataArray:
    """Foreign vectors -> float32 ``(..., y, x, embedding)`` with NaN at nodata and a ``valid`` coord."""
    if values.rio.crs is None:
        raise ValueError(f"{source} has no CRS, so its vectors cannot be placed on a map; write one first "
                         "(e.g. gdal_edit.py -a_srs EPSG:32618 file.tif, or da.rio.write_crs(...) before saving)")
    lead = [d for d in values.dims if d not in ("y", "x", "embedding")]
    values = values.transpose(*lead, "y", "x", "embedding")
    if values.sizes["embedding"] < 2:
        raise ValueError(f"{source} holds {values.sizes['embedding']} value per position, not a vector: an "
                         "embedding file needs one band (or vector component) per embedding dimension")
    values = values.astype("float32")
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        values = values.where(values != np.float32(nodata))
    valid = np.isfinite(values).all("embedding")
    values = values.where(valid)
    crs = values.rio.crs
    values = values.drop_vars([c for c in values.coords if c not in ("y", "x", "time", "spatial_ref")])
    values = values.assign_coords(valid=valid.drop_vars([c for c in valid.coords if c not in ("y", "x", "time")]))
    values = values.rio.write_crs(crs)
    values.name = "embedding"
    values.attrs = {"source": source}
    return values


def _open_raster_vectors(path: Path, chunks: dict | str | None) -> xr.DataArray:
    import rioxarray

    if path.suffix.lower() not in RASTER_SUFFIXES:
        raise ValueError(f"{path} is a file but not a GeoTIFF/COG ({', '.join(RASTER_SUFFIXES)}); open_embedding "
                         "reads terrafm zarr stores, zarr stores of vectors, and GeoTIFFs whose bands are vectors")
    raster = rioxarray.open_rasterio(path, chunks=chunks, masked=False)
    nodata = raster.rio.nodata
    raster = raster.rename(band="embedding")
    return _as_contract(raster, nodata, str(path))


def _foreign_zarr_vectors(path: Path, ds: xr.Dataset, vector_dim: str | None, variable: str | None) -> xr.DataArray:
    spatial = [n for n, v in ds.data_vars.items()
               if {"y", "x"} <= set(v.dims) and set(v.dims) - {"time", "y", "x"}
               and (vector_dim is None or vector_dim in v.dims)]
    if not spatial and variable is None:
        shown = {n: v.dims for n, v in list(ds.data_vars.items())[:6]}
        raise ValueError(
            f"{path} is not a terrafm embedding store (no '{EMBEDDING_VAR}' array) nor vectors of another tool: "
            f"no array has spatial dims 'y' and 'x' plus a vector dim{f' {vector_dim!r}' if vector_dim else ''} "
            f"(arrays: {shown}"
            f"{' ...' if len(ds.data_vars) > 6 else ''}). Rename its dims (ds.rename(lat='y', lon='x')) and save "
            "it again, or write embeddings with terrafm.embed(..., out=...)")
    if variable is None:
        if len(spatial) > 1:
            raise ValueError(f"{path} holds several arrays with spatial dims {spatial}: pass variable= to choose one")
        variable = spatial[0]
    elif variable not in ds.data_vars:
        raise ValueError(f"{path} has no array {variable!r}; it has {sorted(ds.data_vars)}")
    values = ds[variable]
    others = [d for d in values.dims if d not in ("y", "x", "time")]
    if vector_dim is None:
        named = [d for d in others if d in VECTOR_DIM_NAMES]
        if len(others) == 1:
            vector_dim = others[0]
        elif len(named) == 1:
            vector_dim = named[0]
        else:
            raise ValueError(f"{path}:{variable} has dims {values.dims}; pass vector_dim= naming the dimension "
                             "of the vectors (one of " + ", ".join(map(repr, others)) + ")")
    if vector_dim not in values.dims:
        raise ValueError(f"{path}:{variable} has no dim {vector_dim!r} (its dims are {values.dims}); pass the "
                         "vector dimension's name as vector_dim=")
    extra = [d for d in others if d != vector_dim]
    if extra:
        raise ValueError(f"{path}:{variable} has dims {extra} besides (time, y, x, {vector_dim}); select them "
                         "away and save it again")
    values = values.rename({vector_dim: "embedding"}) if vector_dim != "embedding" else values
    if "spatial_ref" in ds.coords and "spatial_ref" not in values.coords:
        values = values.assign_coords(spatial_ref=ds["spatial_ref"])
    nodata = values.attrs.get("_FillValue", values.encoding.get("_FillValue"))
    emb = _as_contract(values, nodata, f"{path}:{variable}")
    if "valid" in ds.data_vars and set(ds["valid"].dims) <= set(emb.dims):
        emb = emb.assign_coords(valid=emb.valid & ds["valid"].astype(bool))
    return emb


class IncompleteStoreWarning(UserWarning):
    """:func:`open_embedding` opened a store whose ``terrafm.embed(out=...)`` run has not finished."""


# ---------------------------------------------------------------------- where data is read from
def _local_path(location: Any) -> Path | None:
    text = os.fspath(location) if isinstance(location, (str, os.PathLike)) else None
    if not text:
        return None
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    return Path(text).expanduser().resolve()


def _zarr_array_path(array: Any) -> Path | None:
    store_path = getattr(array, "store_path", None)
    store = getattr(store_path, "store", None)
    if store is None:
        return None
    protocol = getattr(getattr(store, "fs", None), "protocol", "file")
    if isinstance(protocol, str):
        protocol = (protocol,)
    if not {"file", "local"} & set(protocol):
        return None
    root = getattr(store, "root", None) or getattr(store, "path", None)
    root = _local_path(root) if root is not None else None
    return root / store_path.path if root is not None and store_path.path else root


def _backing_paths(node: Any, found: set[Path], depth: int = 0) -> None:
    """Local files behind one lazily-read array (xarray's backend adapters, zarr, rasterio)."""
    if node is None or depth > 12 or isinstance(node, (np.ndarray, str, bytes, int, float)):
        return
    if isinstance(node, (tuple, list)):
        for item in node:
            _backing_paths(item, found, depth + 1)
        return
    zarr_path = _zarr_array_path(node)
    if zarr_path is not None:
        found.add(zarr_path)
        return
    get_array = getattr(node, "get_array", None)          # xarray's zarr wrapper
    if callable(get_array):
        with contextlib.suppress(Exception):
            _backing_paths(get_array(), found, depth + 1)
    manager = getattr(node, "manager", None)              # rioxarray / xarray file managers
    if manager is not None and callable(getattr(manager, "acquire", None)):
        with contextlib.suppress(Exception):
            path = _local_path(getattr(manager.acquire(needs_lock=False), "name", None))
            if path is not None:
                found.add(path)
    inner = getattr(node, "array", None)                  # xarray's lazy indexing adapters
    if inner is not None and inner is not node:
        _backing_paths(inner, found, depth + 1)


def _dask_sources(array: Any, found: set[Path]) -> None:
    graph = array.__dask_graph__()
    layers = getattr(graph, "layers", None)
    if layers is None:
        values = graph.values()
    else:
        from dask.highlevelgraph import MaterializedLayer

        # the arrays dask reads from sit in materialized layers; blockwise layers only compute
        values = (v for layer in layers.values() if isinstance(layer, MaterializedLayer) for v in layer.values())
    for value in values:
        if type(value).__module__.startswith("dask."):
            continue
        _backing_paths(value, found)


def sources_of(obj: Any) -> set[Path]:
    """Local zarr stores and files a (dask-backed) xarray object still reads lazily.

    Found in the dask graph (stores and files opened through xarray, rioxarray or
    ``dask.array.from_zarr``), so an object derived lazily from a store
    (``open_embedding(p).isel(...) * 2``) still names it. A loaded object (``obj.load()``) reads
    nothing; remote sources (``s3://``, ``https://``) are not listed.

    Examples
    --------
    >>> import tempfile, numpy as np, xarray as xr
    >>> path = Path(tempfile.mkdtemp()) / "a.zarr"
    >>> _ = xr.Dataset({"a": ("x", np.arange(4.0))}).to_zarr(path, consolidated=False)
    >>> sources_of(xr.open_zarr(path, consolidated=False)["a"] * 2) == {path.resolve() / "a"}
    True
    >>> sources_of(xr.open_zarr(path, consolidated=False).load())
    set()
    """
    found: set[Path] = set()
    for item in (obj if isinstance(obj, (list, tuple)) else [obj]):
        if isinstance(item, xr.Dataset):
            variables = list(item.variables.values())
        elif isinstance(item, xr.DataArray):
            variables = [item.variable, *(c.variable for c in item.coords.values())]
        else:
            continue
        for variable in variables:
            if variable.chunks is not None:
                _dask_sources(variable.data, found)
    return found


# ---------------------------------------------------------------------- safe writing
def is_zarr_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a zarr store (v2 or v3 metadata at its root).

    Examples
    --------
    >>> import tempfile
    >>> is_zarr_store(tempfile.mkdtemp())
    False
    """
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _listing(path: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, reads: Iterable[Path] = (),
                      what: str = "data being written") -> Path:
    """Check that ``path`` can be written before any work starts; return it as a ``Path``.

    The rules (README, "Embeddings"): never write into or over what the data being written is
    still read from (``reads``, e.g. :func:`sources_of`), even with ``overwrite=True``; an existing
    ``path`` other than an empty directory is replaced only with ``overwrite=True``, and only if it
    is a file or a zarr store (another directory is never deleted, whatever ``overwrite``); the
    nearest existing parent must be a writable directory (missing parents are created when writing).

    Raises
    ------
    ValueError
        ``path`` is (inside, or a parent of) a source of the data.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    IsADirectoryError
        ``path`` is a directory that is not a zarr store.
    NotADirectoryError, PermissionError
        The parent is a file, or not writable.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> check_output_path(folder / "new.zarr").name
    'new.zarr'
    >>> (folder / "notes.txt").write_text("mine")
    4
    >>> check_output_path(folder / "notes.txt")
    Traceback (most recent call last):
    ...
    FileExistsError: ...notes.txt exists and was not written by this run: pass overwrite=True to replace it, or choose another path
    """
    given = Path(path).expanduser()
    target = given.resolve()
    for source in reads:
        if _overlaps(target, Path(source)):
            raise ValueError(
                f"{given} is where the {what} is still read from ({source}): writing there would destroy its "
                "own input. Write to another path, or load the data into memory first (obj.load()) and pass "
                "overwrite=True")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):   # an empty folder holds nothing
        if target.is_dir() and not is_zarr_store(target):
            raise IsADirectoryError(
                f"{given} is a directory that is not a zarr store (it holds {_listing(target)}); terrafm replaces "
                "files and zarr stores (with overwrite=True), never other directories: choose another path")
        if not overwrite:
            raise FileExistsError(f"{given} exists and was not written by this run: pass overwrite=True to "
                                  "replace it, or choose another path")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {given}: {parent} is a file, not a directory; choose a path in a "
                                 "directory")
    try:
        Path(tempfile.mkdtemp(prefix=".terrafm-write-check-", dir=parent)).rmdir()
    except OSError as exc:
        raise PermissionError(f"cannot write {given}: {parent} is not writable ({exc.strerror}); choose a "
                              "writable path") from None
    return target


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unused name next to ``path`` (same file system, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_with(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing what is there; the old one is removed only afterwards."""
    if not target.exists():
        os.replace(new, target)
    elif target.is_file() and new.is_file():
        os.replace(new, target)            # atomic
    else:
        old = temporary_sibling(target, "old")
        os.replace(target, old)
        os.replace(new, target)
        _remove(old)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False, reads: Iterable[Path] = (),
                  what: str = "data being written") -> Iterator[Path]:
    """Write through a temporary sibling of ``path``, renamed onto it when the block succeeds.

    Checks ``path`` first (:func:`check_output_path`). A failure leaves ``path`` as it was and
    removes the temporary sibling.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "result.txt"
    >>> with atomic_output(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    target = check_output_path(path, overwrite=overwrite, reads=reads, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        replace_with(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


# ---------------------------------------------------------------------- STAC Item inside a store
ZARR_MEDIA_TYPE = "application/vnd+zarr"
STAC_EXTENSIONS = ("https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                   "https://stac-extensions.github.io/datacube/v2.2.0/schema.json",
                   "https://stac-extensions.github.io/mlm/v1.4.0/schema.json")


STAC_ITEM_NAME = "stac-item.json"


def stac_item_path(store_path: str | os.PathLike) -> Path:
    """Where :func:`write_stac_item` puts a store's STAC Item: ``<store>/stac-item.json``.

    Inside the store, so the store stays one path: it moves, copies, is replaced
    (``overwrite=True``) and deleted with its Item, and a write leaves nothing beside ``out=``.
    zarr ignores the file.

    Examples
    --------
    >>> stac_item_path("/data/aoi.zarr").as_posix()
    '/data/aoi.zarr/stac-item.json'
    """
    return Path(store_path) / STAC_ITEM_NAME


def _iso(value: Any) -> str:
    import pandas as pd

    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stac_item_dict(store: Path) -> dict:
    import odc.geo.xr  # noqa: F401  (registers .odc)

    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteStoreWarning)
        emb = open_embedding(store)
    gbox = emb.odc.geobox
    if gbox is None or gbox.crs is None:
        raise ValueError(f"{store} has no CRS or regular grid, so its footprint is unknown; it cannot be catalogued")
    footprint = gbox.geographic_extent
    lon_lat_bbox = [float(v) for v in footprint.boundingbox]
    attrs = emb.attrs
    run = _stored_run_attrs(store)
    props: dict[str, Any] = {}
    if "time" in emb.dims:
        times = sorted(emb["time"].values)
        props.update(datetime=None, start_datetime=_iso(times[0]), end_datetime=_iso(times[-1]))
    else:   # no acquisition time recorded: when the store was created (its root metadata, written once)
        root = next(f for f in (store / "zarr.json", store / ".zgroup", store / ".zattrs") if f.is_file())
        props["datetime"] = _iso(np.datetime64(int(root.stat().st_mtime * 1e9), "ns"))
    epsg = gbox.crs.epsg
    props["proj:code"] = f"EPSG:{epsg}" if epsg else None
    if not epsg:
        props["proj:wkt2"] = gbox.crs.to_wkt()
    props["proj:transform"] = [float(v) for v in tuple(gbox.affine)[:6]]
    props["proj:shape"] = [int(v) for v in gbox.shape]
    props["proj:bbox"] = [float(v) for v in gbox.extent.boundingbox]
    y_res, x_res = float(gbox.resolution.y), float(gbox.resolution.x)
    left, bottom, right, top = props["proj:bbox"]
    dims = {"x": {"type": "spatial", "axis": "x", "extent": [left, right], "step": x_res,
                  "reference_system": props["proj:code"] or props["proj:wkt2"]},
            "y": {"type": "spatial", "axis": "y", "extent": [bottom, top], "step": y_res,
                  "reference_system": props["proj:code"] or props["proj:wkt2"]},
            "embedding": {"type": "embedding", "extent": [0, int(emb.sizes["embedding"]) - 1], "step": 1,
                          "description": "components of one TerraFM vector (one 'band' per component)"}}
    if "time" in emb.dims:
        dims["time"] = {"type": "temporal", "extent": [props["start_datetime"], props["end_datetime"]],
                        "values": [_iso(t) for t in emb["time"].values]}
    props["cube:dimensions"] = dims
    props["cube:variables"] = {
        EMBEDDING_VAR: {"type": "data", "dimensions": list(emb.dims), "data_type": str(emb.dtype), "nodata": "nan",
                        "description": "TerraFM embedding vectors"},
        **{str(c): {"type": "auxiliary", "dimensions": list(emb[c].dims), "data_type": "bool",
                    "description": "position holds a vector computed from valid pixels"}
           for c in emb.coords if _is_validity(str(c))}}
    model = attrs.get("model") or run.get("model")
    props.update({
        "mlm:name": model, "mlm:architecture": "Vision Transformer", "mlm:framework": "pytorch",
        "mlm:tasks": ["embedding"], "mlm:accelerator": None,
        "terrafm:weights": run.get("weights") or (f"file-sha256:{attrs['checkpoint_sha256']}"
                                                  if attrs.get("checkpoint_sha256") else None),
        "terrafm:fusion": attrs.get("fusion") or run.get("fusion"),
        "terrafm:level": attrs.get("level") or run.get("level"),
        "terrafm:chip_size": attrs.get("chip_size"), "terrafm:overlap": attrs.get("overlap"),
        "terrafm:modalities": attrs.get("modalities"), "terrafm:version": attrs.get("terrafm_version"),
        "terrafm:input_items": attrs.get("input_items") or [],
        "terrafm:input": run.get("input"),
    })
    return {
        "type": "Feature", "stac_version": "1.1.0", "stac_extensions": list(STAC_EXTENSIONS),
        "id": store.name.removesuffix(".zarr"),
        "geometry": footprint.json, "bbox": lon_lat_bbox, "properties": props, "links": [],
        "assets": {"data": {"href": "./", "type": ZARR_MEDIA_TYPE, "roles": ["data"],   # the folder holding the Item
                            "title": f"TerraFM embeddings ({model})"}},
    }


def _stored_run_attrs(store: Path) -> dict:
    import zarr

    run = zarr.open_group(str(store), mode="r").attrs.get("terrafm_run")
    try:
        return json.loads(run) if isinstance(run, str) else {}
    except ValueError:
        return {}


def write_stac_item(store_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a STAC Item describing an embedding store into it (:func:`stac_item_path`).

    The Item (STAC 1.1) has the store's footprint in lon/lat (``geometry``, ``bbox``), its dates
    (``start_datetime``/``end_datetime`` of a series; otherwise the time the store was written), the
    projection extension (``proj:code``, ``proj:transform``, ``proj:shape``, ``proj:bbox``), the
    datacube extension for its dims (the ``embedding`` dim stands for bands), ml-model fields
    (``mlm:name``) with ``terrafm:weights`` (weights hash), ``terrafm:fusion``, ``terrafm:level`` and
    ``terrafm:input_items``, and a ``data`` asset pointing at the store (``application/vnd+zarr``).
    ``terrafm.embed(out=...)`` calls it when a store is complete. An earlier terrafm Item there (also
    one copied with the store) is replaced; another file only with ``overwrite=True``. Written atomically.

    Raises
    ------
    ValueError
        The store is unfinished (rerun ``terrafm.embed`` to complete it first) or has no CRS.

    Examples
    --------
    >>> import pystac                                                       # doctest: +SKIP
    >>> item = pystac.Item.from_file(write_stac_item("aoi.zarr"))           # doctest: +SKIP
    >>> item.properties["proj:code"]                                        # doctest: +SKIP
    'EPSG:32618'
    """
    store = Path(store_path).expanduser().resolve()
    if not is_zarr_store(store):
        raise ValueError(f"{store_path} is not a zarr store; write one with terrafm.embed(..., out=...)")
    try:
        item = _stac_item_dict(store)
    except IncompleteStoreWarning as warning:
        raise ValueError(f"cannot catalogue {store_path}: {warning}") from None
    target = stac_item_path(store)
    ours = False
    if target.is_file():
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(target.read_text())
            ours = old.get("type") == "Feature" and old.get("assets", {}).get("data", {}).get("type") == ZARR_MEDIA_TYPE
    with atomic_output(target, overwrite=overwrite or ours, what="STAC Item") as tmp:
        tmp.write_text(json.dumps(item, indent=1))
    logger.info("wrote %s", target)
    return target
