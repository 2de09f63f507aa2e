"""Shared helpers: validate embedding DataArrays, flatten valid vectors, put results back on the grid."""

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


def valid_mask(emb: xr.DataArray) -> xr.DataArray:
    """Boolean DataArray (dims of ``emb`` without ``embedding``): the ``valid`` coord AND all-finite."""
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


def check_same_grid(a: xr.DataArray, b: xr.DataArray, names: tuple[str, str] = ("emb_a", "emb_b")) -> None:
    """Raise unless ``a`` and ``b`` share CRS, shape, coordinates and embedding size."""
    if a.rio.crs != b.rio.crs:
        raise ValueError(
            f"{names[0]} is in {a.rio.crs} but {names[1]} is in {b.rio.crs}; embed both dates on the same "
            "grid (same crs/resolution/bbox in terrafm.stac.load) or reproject one with .rio.reproject_match()"
        )
    if a.sizes["y"] != b.sizes["y"] or a.sizes["x"] != b.sizes["x"] or not (
        np.allclose(a["x"].values, b["x"].values) and np.allclose(a["y"].values, b["y"].values)
    ):
        raise ValueError(
            f"{names[0]} ({a.sizes['y']}x{a.sizes['x']}) and {names[1]} ({b.sizes['y']}x{b.sizes['x']}) are on "
            "different grids; load both dates with the same bbox/resolution or use b.rio.reproject_match(a)"
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
