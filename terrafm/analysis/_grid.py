"""Shared helpers: validate embedding DataArrays, flatten valid vectors, put results back on the grid.

Every helper takes numpy-backed and dask-backed (``terrafm.open_embedding``) DataArrays alike:
:func:`valid_mask` stays lazy, :func:`sample_valid_vectors` reads only the sampled vectors (plus
one streaming pass for the mask) and :func:`map_valid_blocks` applies a per-vector function chunk
by chunk, so memory is bounded by the chunk size, not by the area.
"""

from __future__ import annotations

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

EMBEDDING_DIM = "embedding"


def check_embedding(emb: xr.DataArray, name: str = "emb") -> xr.DataArray:
    """Raise a clear error unless ``emb`` follows the embeddings contract (y, x, embedding + CRS)."""
    if not isinstance(emb, xr.DataArray):
        raise TypeError(
            f"{name} must be an xarray.DataArray from terrafm.embed(), got {type(emb).__name__}; "
            "wrap numpy arrays with xr.DataArray(..., dims=('y', 'x', 'embedding')) and set a CRS"
        )
    missing = {"y", "x", EMBEDDING_DIM} - set(emb.dims)
    if missing:
        raise ValueError(
            f"{name} has dims {emb.dims} but needs 'y', 'x' and 'embedding' (missing {sorted(missing)}); "
            "pass the output of terrafm.embed() or rename your dims"
        )
    extra = set(emb.dims) - {"time", "y", "x", EMBEDDING_DIM}
    if extra:
        raise ValueError(f"{name} has unexpected dims {sorted(extra)}; select them away with .isel()/.sel() first")
    if emb.rio.crs is None:
        raise ValueError(
            f"{name} has no CRS; set one with emb.rio.write_crs('EPSG:32633') (terrafm.embed() sets it)"
        )
    return emb


def is_lazy(obj: xr.DataArray | xr.Dataset) -> bool:
    """True when ``obj``'s values are a dask array (e.g. from :func:`terrafm.open_embedding`).

    Examples
    --------
    >>> da = xr.DataArray(np.zeros((2, 2, 3)), dims=("y", "x", "embedding"))
    >>> is_lazy(da), is_lazy(da.chunk())
    (False, True)
    """
    if isinstance(obj, xr.Dataset):
        return any(is_lazy(v) for v in obj.data_vars.values())
    return obj.chunks is not None


def valid_mask(emb: xr.DataArray) -> xr.DataArray:
    """Boolean DataArray (dims of ``emb`` without ``embedding``): the ``valid`` coord AND all-finite.

    Lazy (dask-backed) when ``emb`` is: nothing is read until it is computed.

    Examples
    --------
    >>> emb = xr.DataArray([[[1.0, 2.0], [np.nan, 0.0]]], dims=("y", "x", "embedding"))
    >>> valid_mask(emb).values.tolist()
    [[True, False]]
    """
    finite = np.isfinite(emb).all(EMBEDDING_DIM)
    if "valid" in emb.coords:
        finite = finite & emb.coords["valid"].astype(bool)
    return finite.drop_vars([c for c in finite.coords if c == "valid"], errors="ignore")


def flatten_valid(emb: xr.DataArray, name: str = "emb") -> tuple[np.ndarray, xr.DataArray]:
    """Return ``(vectors (n, D) float32, mask)`` for the valid positions of ``emb`` in C order."""
    check_embedding(emb, name)
    emb_t = emb.transpose(..., "y", "x", EMBEDDING_DIM)
    mask = valid_mask(emb_t)
    mask_np = np.asarray(mask.values, dtype=bool)
    if not mask_np.any():
        raise ValueError(
            f"{name} has no valid positions (all NaN / valid=False); choose a less cloudy date or a larger area"
        )
    data = np.asarray(emb_t.values)
    flat = data.reshape(-1, data.shape[-1])
    if mask_np.all():  # no copy of a possibly multi-GB array
        return flat.astype(np.float32, copy=False), mask
    vectors = flat[mask_np.reshape(-1)].astype(np.float32, copy=False)
    return vectors, mask


def sample_rows(n: int, sample: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``sample`` of ``n`` rows without replacement (all rows when ``sample`` is None or >= n).

    The one sampling rule of the analysis functions: the same ``(n, sample, seed)`` always picks
    the same rows, whether the vectors come from memory or from a store.

    Examples
    --------
    >>> sample_rows(5, None, 0).tolist()
    [0, 1, 2, 3, 4]
    >>> len(sample_rows(1000, 10, 0)), bool((sample_rows(1000, 10, 0) == sample_rows(1000, 10, 0)).all())
    (10, True)
    """
    if sample is None or sample >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False))


def lazy_parts(emb: xr.DataArray):
    """``(data, valid)`` dask arrays of ``emb`` (dims (..., y, x, embedding)), embedding in one chunk and
    ``valid`` (or None) chunked like the positions of ``data``; for kernels that run chunk by chunk.

    Examples
    --------
    >>> emb = xr.DataArray(np.zeros((4, 4, 3)), dims=("y", "x", "embedding")).chunk({"y": 2, "embedding": 1})
    >>> data, valid = lazy_parts(emb.assign_coords(valid=(("y", "x"), np.ones((4, 4), bool))))
    >>> data.chunks, valid.chunks
    (((2, 2), (4,), (3,)), ((2, 2), (4,)))
    """
    import dask.array as dask_array

    data = emb.data
    if not isinstance(data, dask_array.Array):
        data = dask_array.from_array(data)
    data = data.rechunk({data.ndim - 1: -1})
    valid = None
    if "valid" in emb.coords:
        valid = emb.coords["valid"]
        missing = {d: emb.sizes[d] for d in emb.dims[:-1] if d not in valid.dims}  # e.g. one mask for all dates
        valid = valid.expand_dims(missing).transpose(*emb.dims[:-1]).data
        valid = dask_array.asarray(valid).rechunk(data.chunks[:-1])
    return data, valid


def _lead_index(data) -> str:
    """blockwise index letters of the position dims ((t,) y, x) of a (..., embedding) array."""
    return "tyx"[3 - (data.ndim - 1):]


def _block_mask(block: np.ndarray, valid_block: np.ndarray | None = None) -> np.ndarray:
    mask = np.isfinite(block).all(-1)
    if valid_block is not None:
        mask &= np.asarray(valid_block, dtype=bool)
    return mask


def sample_valid_vectors(emb: xr.DataArray, n: int | None, seed: int = 0,
                         name: str = "emb") -> tuple[np.ndarray, int]:
    """``(vectors (m, D) float32, n_valid)``: a deterministic sample of ``n`` valid vectors of ``emb``.

    The rows are :func:`sample_rows` ``(n_valid, n, seed)`` of the valid positions in C order
    ((time,) y, x), so numpy-backed and dask-backed inputs give the same sample. A dask-backed
    ``emb`` is read in one streaming pass for the valid mask, then only the chunks holding sampled
    vectors are read; ``n=None`` reads every valid vector into memory.

    Examples
    --------
    >>> emb = xr.DataArray(np.arange(24.0).reshape(2, 4, 3), dims=("y", "x", "embedding"))
    >>> vectors, n_valid = sample_valid_vectors(emb.rio.write_crs("EPSG:32633").chunk({"x": 2}), 2, seed=0)
    >>> vectors.shape, n_valid
    ((2, 3), 8)
    """
    check_embedding(emb, name)
    emb_t = emb.transpose(..., "y", "x", EMBEDDING_DIM)
    if not is_lazy(emb_t):
        vectors, _ = flatten_valid(emb_t, name)
        return vectors[sample_rows(len(vectors), n, seed)], len(vectors)
    import dask.array as dask_array

    data, valid = lazy_parts(emb_t)
    lead = _lead_index(data)
    args = [data, lead + "e"] + ([] if valid is None else [valid, lead])
    mask = dask_array.blockwise(_block_mask, lead, *args, dtype=bool, concatenate=True).compute()
    positions = np.flatnonzero(mask)
    if not len(positions):
        raise ValueError(
            f"{name} has no valid positions (all NaN / valid=False); choose a less cloudy date or a larger area"
        )
    chosen = np.unravel_index(positions[sample_rows(len(positions), n, seed)], mask.shape)
    vectors = np.asarray(data.vindex[chosen].compute(), dtype=np.float32)
    return vectors, len(positions)


def map_valid_blocks(
    emb: xr.DataArray,
    func,
    name: str,
    *,
    band: tuple[str, list] | None = None,
    dtype=np.float32,
    fill: float = np.nan,
    attrs: dict | None = None,
) -> xr.DataArray:
    """Apply ``func((n, D) float32 valid vectors) -> (n,) or (n, k)`` to ``emb`` and grid the result.

    numpy-backed ``emb``: one call on all valid vectors (:func:`flatten_valid` / :func:`unflatten`).
    dask-backed ``emb``: one call per chunk, the result a lazy DataArray chunked like ``emb``'s
    positions; memory is bounded by the chunk size. Dims (time?, y, x[, band]), ``fill`` where
    invalid, CRS and transform kept. ``func`` must treat rows independently.

    Examples
    --------
    >>> emb = xr.DataArray(np.ones((2, 2, 3), "float32"), dims=("y", "x", "embedding")).rio.write_crs(32633)
    >>> map_valid_blocks(emb.chunk({"y": 1}), lambda v: v.sum(1), "total").compute().values.tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    emb_t = emb.transpose(..., "y", "x", EMBEDDING_DIM)
    if not is_lazy(emb_t):
        vectors, mask = flatten_valid(emb_t)
        return unflatten(func(vectors), mask, name, fill=fill, band=band, attrs=attrs)
    import dask.array as dask_array

    data, valid = lazy_parts(emb_t)
    lead = _lead_index(data)
    extra = (len(band[1]),) if band is not None else ()

    def kernel(block, valid_block=None):
        mask = _block_mask(block, valid_block)
        out = np.full(mask.shape + extra, fill, dtype=dtype)
        if mask.any():
            out[mask] = func(block[mask].astype(np.float32, copy=False))
        return out

    args = [data, lead + "e"] + ([] if valid is None else [valid, lead])
    result = dask_array.blockwise(kernel, lead + ("b" if band else ""), *args, dtype=dtype, concatenate=True,
                                  new_axes={"b": extra[0]} if band else None)
    dims = list(emb_t.dims[:-1])
    coords = {k: v for k, v in emb_t.coords.items() if set(v.dims) <= set(dims) and k != "valid"}
    if band is not None:
        dims.append(band[0])
        coords[band[0]] = list(band[1])
    out = xr.DataArray(result, dims=dims, coords=coords, name=name, attrs=dict(attrs or {}))
    return with_georef(out, emb_t)


def unflatten(
    values: np.ndarray,
    mask: xr.DataArray,
    name: str,
    fill: float = np.nan,
    band: tuple[str, list] | None = None,
    attrs: dict | None = None,
) -> xr.DataArray:
    """Scatter per-valid-position ``values`` back onto ``mask``'s grid, keeping ``spatial_ref``.

    ``values`` has shape (n,) or (n, k); for (n, k) ``band=(dim_name, labels)`` names the last dim.
    """
    mask_np = np.asarray(mask.values, dtype=bool)
    values = np.asarray(values)
    dtype = np.result_type(values.dtype, np.float32) if np.isnan(fill) else values.dtype
    extra_shape = values.shape[1:]
    out = np.full(mask_np.shape + extra_shape, fill, dtype=dtype)
    out[mask_np] = values
    dims = list(mask.dims)
    coords = {k: v for k, v in mask.coords.items() if set(v.dims) <= set(dims)}
    if extra_shape:
        if band is None:
            raise ValueError("band=(dim, labels) is required for 2-D values")
        dims.append(band[0])
        coords[band[0]] = list(band[1])
    result = xr.DataArray(out, dims=dims, coords=coords, name=name, attrs=dict(attrs or {}))
    return with_georef(result, mask)


def with_georef(result: xr.DataArray, template: xr.DataArray | xr.Dataset) -> xr.DataArray:
    """Copy CRS and transform from ``template`` (rioxarray conventions) onto ``result``."""
    crs = template.rio.crs
    if crs is not None:
        result = result.rio.write_crs(crs)
        try:
            result = result.rio.write_transform(template.rio.transform(recalc=True))
        except Exception:  # non-regular grids have no transform to write
            pass
    return result


GRID_TOLERANCE = 0.01
"""Two grids are the same when every x/y coordinate agrees to this fraction of a cell (in CRS
units: 1.6 m on the 160 m patch grid), not to ``np.allclose``'s relative tolerance, which lets
UTM northings differ by 50-90 m."""


def _cell_size(da: xr.DataArray) -> float:
    """Smallest |step| of the x/y coordinates (from the transform for a single cell)."""
    steps = [np.abs(np.diff(np.asarray(da[d].values, dtype=np.float64))) for d in ("x", "y") if da.sizes[d] > 1]
    steps = [s[s > 0].min() for s in steps if (s > 0).any()]
    if steps:
        return float(min(steps))
    try:
        res = da.rio.resolution()
        return float(min(abs(res[0]), abs(res[1])))
    except Exception:  # one cell without a transform: compare to float rounding only
        return 0.0


def check_same_grid(a: xr.DataArray, b: xr.DataArray, names: tuple[str, str] = ("emb_a", "emb_b")) -> None:
    """Raise unless ``a`` and ``b`` share CRS, shape, coordinates and embedding size.

    Coordinates must agree to :data:`GRID_TOLERANCE` of a cell, an absolute tolerance in CRS
    units; the error gives the offset found.

    Examples
    --------
    >>> import rioxarray  # noqa: F401
    >>> def grid(y0):
    ...     return xr.DataArray(np.zeros((2, 2, 3)), dims=("y", "x", "embedding"),
    ...                         coords={"y": [y0, y0 - 160.0], "x": [80.0, 240.0]}).rio.write_crs("EPSG:32633")
    >>> check_same_grid(grid(5_342_320.0), grid(5_342_320.5))     # half a metre: the same grid
    >>> check_same_grid(grid(5_342_320.0), grid(5_342_370.0))
    Traceback (most recent call last):
    ...
    ValueError: emb_a (2x2) and emb_b (2x2) are on different grids: y coordinates differ by up to 50 CRS units (the tolerance is 1.6, 1% of a 160 cell); load both dates with the same bbox/resolution or use b.rio.reproject_match(a) (see README, 'Validation rules')
    """
    if a.rio.crs != b.rio.crs:
        raise ValueError(
            f"{names[0]} is in {a.rio.crs} but {names[1]} is in {b.rio.crs}; embed both dates on the same "
            "grid (same crs/resolution/bbox in terrafm.stac.load) or reproject one with .rio.reproject_match()"
        )
    shape = f"{names[0]} ({a.sizes['y']}x{a.sizes['x']}) and {names[1]} ({b.sizes['y']}x{b.sizes['x']})"
    fix = "load both dates with the same bbox/resolution or use b.rio.reproject_match(a) (see README, 'Validation rules')"
    if a.sizes["y"] != b.sizes["y"] or a.sizes["x"] != b.sizes["x"]:
        raise ValueError(f"{shape} are on different grids; {fix}")
    cell = _cell_size(a)
    tolerance = GRID_TOLERANCE * cell
    for dim in ("y", "x"):
        offset = np.abs(np.asarray(a[dim].values, np.float64) - np.asarray(b[dim].values, np.float64))
        worst = float(offset.max()) if offset.size else 0.0
        if not worst <= max(tolerance, 1e-9 * float(np.abs(np.asarray(a[dim].values)).max(initial=0.0))):
            raise ValueError(
                f"{shape} are on different grids: {dim} coordinates differ by up to {worst:.3g} CRS units (the "
                f"tolerance is {tolerance:.2g}, {GRID_TOLERANCE:.0%} of a {cell:g} cell); {fix}"
            )
    if a.sizes[EMBEDDING_DIM] != b.sizes[EMBEDDING_DIM]:
        raise ValueError(
            f"{names[0]} has {a.sizes[EMBEDDING_DIM]} embedding dims but {names[1]} has "
            f"{b.sizes[EMBEDDING_DIM]}; embed both with the same model"
        )


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
