"""The embedding stores behind a :class:`~terrafm.analysis.index.VectorIndex`: what they hold, read block by block.

A store is read in *units*: one zarr chunk of the embedding array (one ``terrafm.embed`` block) at one
date. A unit is indexed once it is complete (``blocks_done`` of an embed store, always for a store
written whole by ``analysis.to_zarr``); a store *grows* when units complete or dates are added, and
*changed* when its run, grid, or the values of a unit already indexed differ. The record of a store
(:func:`describe_store`) is what the index's manifest keeps to tell the two apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import xarray as xr

from ..store import IncompleteStoreWarning, is_zarr_store, open_embedding
from ._grid import EMBEDDING_DIM

NO_TIME = "none"
"""Time key of the units of a store without a time dimension."""


def open_store(path: str | os.PathLike) -> xr.DataArray:
    """The lazy embedding of the store at ``path`` (zarr chunks as dask chunks), or a clear error."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such embedding store; write one with terrafm.embed(..., out='{given}') "
                                "or terrafm.analysis.to_zarr(emb, path)")
    if not is_zarr_store(given):
        raise ValueError(f"{given} is not a zarr store, so not an embedding store; pass the paths written by "
                         "terrafm.embed(..., out=...) or terrafm.analysis.to_zarr(emb, path)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStoreWarning)   # only complete blocks are indexed
        emb = open_embedding(given, chunks={})
    if not {"y", "x", EMBEDDING_DIM} <= set(emb.dims) or set(emb.dims) - {"time", "y", "x", EMBEDDING_DIM}:
        raise ValueError(f"{given} holds an array of dims {emb.dims}, not an embedding ([time,] y, x, embedding); "
                         "pass a store written by terrafm.embed(..., out=...)")
    if emb.rio.crs is None:
        raise ValueError(f"{given} has no CRS (spatial_ref); the index places every result on the map: write the "
                         "store with terrafm.embed(out=...) or to_zarr(emb) of an embedding with a CRS")
    return emb.transpose(*(("time",) if "time" in emb.dims else ()), "y", "x", EMBEDDING_DIM)


def _run_attrs(path: Path) -> dict | None:
    """The store's ``terrafm_run`` fingerprint without its dates (dates may be added: the store grew)."""
    import zarr

    run = zarr.open_group(str(path), mode="r").attrs.get("terrafm_run")
    if not isinstance(run, str):
        return None
    run = json.loads(run)
    run.pop("time", None)
    return run


def _blocks_done(path: Path) -> np.ndarray | None:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return np.asarray(group["blocks_done"][...]) if "blocks_done" in group else None


def time_keys(emb: xr.DataArray) -> list[str]:
    """One string per date (``numpy.datetime64`` ISO text), or ``[NO_TIME]``."""
    if "time" not in emb.dims:
        return [NO_TIME]
    return [str(np.datetime64(t, "ns")) for t in emb["time"].values]


@dataclass(frozen=True)
class Unit:
    """One chunk of a store at one date: ``time`` key, chunk indices, and its slices on the grid."""

    time: str
    t: int | None
    cy: int
    cx: int
    rows: slice
    cols: slice

    @property
    def key(self) -> str:
        return f"{self.time}/{self.cy}/{self.cx}"


def _chunk_slices(chunks: tuple[int, ...]) -> list[slice]:
    edges = np.concatenate([[0], np.cumsum(chunks)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def complete_units(path: Path, emb: xr.DataArray) -> list[Unit]:
    """The units of the store whose values are final, in (time, chunk row, chunk col) order."""
    if emb.chunks is None:
        raise ValueError(f"{path}: the store could not be opened lazily; is it a zarr store?")
    dims = list(emb.dims)
    ys = _chunk_slices(emb.chunks[dims.index("y")])
    xs = _chunk_slices(emb.chunks[dims.index("x")])
    done = _blocks_done(path)
    keys = time_keys(emb)
    if done is not None:
        done = done.reshape((len(keys), len(ys), len(xs))) if done.size == len(keys) * len(ys) * len(xs) else None
    units = []
    for t, key in enumerate(keys):
        for cy, rows in enumerate(ys):
            for cx, cols in enumerate(xs):
                if done is None or done[t, cy, cx]:
                    units.append(Unit(key, None if key == NO_TIME else t, cy, cx, rows, cols))
    return units


def count_valid(emb: xr.DataArray, units: list[Unit]) -> int:
    """Positions flagged valid in ``units`` (read from the small ``valid`` array only)."""
    if "valid" not in emb.coords:
        return sum((u.rows.stop - u.rows.start) * (u.cols.stop - u.cols.start) for u in units)
    valid = emb.coords["valid"]
    total = 0
    for unit in units:
        window = valid.isel(y=unit.rows, x=unit.cols, **({"time": unit.t} if unit.t is not None else {}))
        total += int(np.asarray(window.values).sum())
    return total


@dataclass
class UnitData:
    """The valid vectors of one unit (float32, as stored) with their grid positions and a digest."""

    unit: Unit
    vectors: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    digest: str


def read_unit(emb: xr.DataArray, unit: Unit) -> UnitData:
    """Read one unit: valid = the ``valid`` coordinate AND every value finite."""
    sel = {"y": unit.rows, "x": unit.cols, **({"time": unit.t} if unit.t is not None else {})}
    window = emb.isel(sel)
    values = np.asarray(window.values, dtype=np.float32)
    valid = np.isfinite(values).all(-1)
    if "valid" in window.coords:
        valid &= np.asarray(window.coords["valid"].values, dtype=bool)
    digest = hashlib.sha1(np.ascontiguousarray(values).tobytes())
    digest.update(np.ascontiguousarray(valid).tobytes())
    rows, cols = np.nonzero(valid)
    return UnitData(unit, values[rows, cols], rows + unit.rows.start, cols + unit.cols.start, digest.hexdigest())


def iter_units(emb: xr.DataArray, units: list[Unit]) -> Iterator[UnitData]:
    for unit in units:
        yield read_unit(emb, unit)


def describe_store(path: Path, emb: xr.DataArray) -> dict:
    """What must not change in a store for its indexed positions to stay right (the manifest's record)."""
    return {
        "path": str(path),
        "crs": emb.rio.crs.to_string(),
        "transform": [float(v) for v in tuple(emb.rio.transform(recalc=True))[:6]],
        "shape": [int(emb.sizes["y"]), int(emb.sizes["x"])],
        "dim": int(emb.sizes[EMBEDDING_DIM]),
        "chunks": [list(map(int, emb.chunks[list(emb.dims).index(d)])) for d in ("y", "x")],
        "has_time": "time" in emb.dims,
        "run": _run_attrs(path),
        "units": {},          # unit key -> [digest, number of vectors]; filled as units are indexed
    }


def changes(record: dict, current: dict) -> list[str]:
    """How ``current`` (:func:`describe_store` now) differs from the recorded store, in words."""
    names = {"crs": "CRS", "transform": "grid (transform)", "shape": "grid size", "dim": "embedding size",
             "chunks": "block layout", "has_time": "time dimension", "run": "embed run (model, weights, input)"}
    found = []
    for key, what in names.items():
        if record.get(key) != current.get(key):
            found.append(f"its {what} differs (indexed: {_short(record.get(key))}, now: {_short(current.get(key))})")
    return found


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
