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

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = ["EMBEDDING_VAR", "open_embedding", "embedding_to_dataset", "serialisable_attrs"]

EMBEDDING_VAR = "embedding_vectors"
"""Name of the embedding array inside a zarr store."""


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


def open_embedding(path: str | os.PathLike, chunks: dict | str | None = "auto") -> xr.DataArray:
    """Open an embedding zarr written by ``terrafm.embed(out=...)`` or ``analysis.to_zarr``.

    Parameters
    ----------
    path : str or PathLike
        The zarr store.
    chunks : dict, "auto" or None
        Passed to ``xarray.open_zarr``: lazy dask arrays by default; ``None`` loads eagerly.

    Returns
    -------
    xarray.DataArray
        Named ``"embedding"``, dims ``([time,] y, x, embedding)``, with the ``valid`` and
        ``valid_<modality>`` coordinates, ``spatial_ref`` and the attrs it was written with.

    Examples
    --------
    >>> emb = open_embedding("aoi.zarr")                                    # doctest: +SKIP
    >>> emb.where(emb.valid).mean(("y", "x"))                               # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such zarr store; write one with terrafm.embed(..., out='{path}')")
    ds = xr.open_zarr(path, consolidated=False, decode_coords="all", chunks=chunks)
    if EMBEDDING_VAR not in ds:
        raise ValueError(f"{path} is not a terrafm embedding store: it has no '{EMBEDDING_VAR}' array "
                         f"(it holds {sorted(ds.data_vars)}); write one with terrafm.embed(..., out=...)")
    emb = ds[EMBEDDING_VAR]
    emb = emb.assign_coords({name: ds[name] for name in ds.data_vars if _is_validity(str(name))})
    if "spatial_ref" in ds.coords:
        emb = emb.assign_coords(spatial_ref=ds["spatial_ref"])
    emb.attrs = _restore_attrs(emb.attrs)
    emb.name = "embedding"
    return emb
