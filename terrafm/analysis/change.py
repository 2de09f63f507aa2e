"""Change detection: cosine distance between dates, automatic threshold, per-polygon summary.

Dask-backed embeddings (``terrafm.open_embedding``) stay lazy: the distance is computed chunk by
chunk and the Otsu threshold comes from a streamed histogram (one pass for the range, one for
the counts), equal bit for bit to the in-memory threshold.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import xarray as xr

from ._grid import EMBEDDING_DIM, check_embedding, check_same_grid, is_lazy, lazy_parts, with_georef

logger = logging.getLogger(__name__)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximises between-class variance) of finite ``values``.

    Examples
    --------
    >>> round(otsu_threshold(np.array([0.1, 0.12, 0.11, 0.9, 0.92])), 4)   # midway between the two groups
    0.51
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2 or values.min() == values.max():
        raise ValueError("need at least two distinct finite distances to pick an Otsu threshold; use percentile=")
    hist, edges = np.histogram(values, bins=bins)
    return otsu_from_histogram(hist, edges)


def otsu_from_histogram(hist: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold from bin counts ``hist`` and their ``edges`` (len(hist) + 1).

    The one Otsu rule: :func:`otsu_threshold` (values in memory) and :func:`change` on dask-backed
    embeddings (a histogram summed over chunks) both end here, so they pick the same threshold.

    Examples
    --------
    >>> otsu_from_histogram(np.array([5, 0, 0, 5]), np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    2.0
    """
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = between[:-1]
    # empty bins between two modes give a plateau of equal scores: cut in its middle
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    lo, hi = edges[best[0] + 1], edges[best[-1] + 1]
    return float((lo + hi) / 2)


def _block_range(block: np.ndarray) -> tuple[float, float, int]:
    values = np.asarray(block, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return np.inf, -np.inf, 0
    return float(values.min()), float(values.max()), int(values.size)


def _block_histogram(block: np.ndarray, bins: int, low: float, high: float) -> np.ndarray:
    values = np.asarray(block, dtype=np.float64)
    return np.histogram(values[np.isfinite(values)], bins=bins, range=(low, high))[0]


def _streamed_otsu(distance, bins: int = 256) -> tuple[float, float, float, int]:
    """``(threshold or nan, min, max, count)`` of the finite values of a dask array, in two streaming passes.

    The histogram has the edges ``np.histogram`` picks for all values at once (``range`` = their
    min and max), and each value falls in the same bin, so the counts and the threshold equal
    :func:`otsu_threshold` of the values in memory.
    """
    import dask

    blocks = list(distance.to_delayed().ravel())
    ranges = dask.compute(*[dask.delayed(_block_range)(b) for b in blocks])
    low = min(r[0] for r in ranges)
    high = max(r[1] for r in ranges)
    count = sum(r[2] for r in ranges)
    if count < 2 or low == high:
        return float("nan"), low, high, count
    hists = dask.compute(*[dask.delayed(_block_histogram)(b, bins, low, high) for b in blocks])
    edges = np.histogram_bin_edges(np.empty(0), bins=bins, range=(low, high))
    return otsu_from_histogram(np.sum(hists, axis=0), edges), low, high, count


def _distance_block(a: np.ndarray, b: np.ndarray, valid_a=None, valid_b=None) -> np.ndarray:
    """float32 ``1 - cos(a, b)`` over the last axis; NaN where either vector is non-finite or not valid."""
    both = np.isfinite(a).all(-1) & np.isfinite(b).all(-1)
    if valid_a is not None:
        both &= np.asarray(valid_a, dtype=bool)
    if valid_b is not None:
        both &= np.asarray(valid_b, dtype=bool)
    a = np.nan_to_num(np.array(a, dtype=np.float64), copy=False)  # one float64 copy per input, no more
    b = np.nan_to_num(np.array(b, dtype=np.float64), copy=False)
    norms = np.sqrt(np.einsum("...d,...d->...", a, a)) * np.sqrt(np.einsum("...d,...d->...", b, b))
    cosine = np.einsum("...d,...d->...", a, b) / np.where(norms > 0, norms, 1.0)  # a zero vector: cosine 0
    return np.where(both, 1.0 - cosine, np.nan).astype(np.float32)


def cosine_distance(emb_a: xr.DataArray, emb_b: xr.DataArray) -> xr.DataArray:
    """Per-position ``1 - cos(a, b)`` in [0, 2]; NaN where either date is invalid; ``spatial_ref`` kept.

    Lazy (computed chunk by chunk) when either input is dask-backed (``terrafm.open_embedding``).

    Examples
    --------
    >>> import rioxarray  # noqa: F401
    >>> a = xr.DataArray([[[1.0, 0.0], [1.0, 1.0]]], dims=("y", "x", "embedding")).rio.write_crs(32633)
    >>> b = xr.DataArray([[[0.0, 2.0], [3.0, 3.0]]], dims=("y", "x", "embedding")).rio.write_crs(32633)
    >>> cosine_distance(a, b.chunk()).values.round(6).tolist()   # orthogonal, then the same direction
    [[1.0, 0.0]]
    """
    check_embedding(emb_a, "emb_a")
    check_embedding(emb_b, "emb_b")
    check_same_grid(emb_a, emb_b)
    emb_a = emb_a.transpose(..., "y", "x", EMBEDDING_DIM)
    emb_b = emb_b.transpose(..., "y", "x", EMBEDDING_DIM)
    template = emb_a if emb_a.ndim >= emb_b.ndim else emb_b
    if is_lazy(emb_a) or is_lazy(emb_b):
        dist = _lazy_distance(emb_a, emb_b)
    else:
        valid = [e.coords["valid"].values if "valid" in e.coords else None for e in (emb_a, emb_b)]
        dist = _distance_block(emb_a.values, emb_b.values, *valid)
    dims = template.dims[:-1]
    coords = {k: v for k, v in template.coords.items() if set(v.dims) <= set(dims) and k != "valid"}
    out = xr.DataArray(dist, dims=dims, coords=coords, name="cosine_distance")
    return with_georef(out, template)


def _lazy_distance(emb_a: xr.DataArray, emb_b: xr.DataArray):
    """dask (…, y, x) distance, chunked like the lazier / longer input (the other is rechunked to it)."""
    import dask.array as dask_array

    (data_a, valid_a), (data_b, valid_b) = lazy_parts(emb_a), lazy_parts(emb_b)
    if data_a.ndim != data_b.ndim:
        reference = data_a if data_a.ndim > data_b.ndim else data_b
    else:
        reference = data_a if is_lazy(emb_a) else data_b
    lead = "tyx"[3 - (reference.ndim - 1):]

    def aligned(array, positions: bool):
        if array is None:
            return None
        ndim = array.ndim
        chunks = reference.chunks[:-1] if positions else reference.chunks
        return array.rechunk(chunks[len(chunks) - ndim:])

    arrays = [(aligned(data_a, False), "e"), (aligned(data_b, False), "e"),
              (aligned(valid_a, True), ""), (aligned(valid_b, True), "")]
    present = [array is not None for array, _ in arrays]
    args = []
    for array, tail in arrays:
        if array is not None:
            args += [array, lead[len(lead) - (array.ndim - len(tail)):] + tail]

    def kernel(a, b, *valid):
        valid = iter(valid)
        return _distance_block(a, b, next(valid) if present[2] else None, next(valid) if present[3] else None)

    return dask_array.blockwise(kernel, lead, *args, dtype=np.float32, concatenate=True)


def change(
    emb_a: xr.DataArray,
    emb_b: xr.DataArray | None = None,
    threshold: float | Literal["otsu"] | None = "otsu",
    percentile: float | None = None,
    polygons=None,
) -> xr.Dataset | tuple:
    """Detect change between two dates, or between consecutive dates of one time series.

    Parameters
    ----------
    emb_a, emb_b : xr.DataArray
        Embeddings on the same grid. If ``emb_b`` is None, ``emb_a`` must have a ``time`` dim and
        consecutive dates are compared (result dim ``time`` = the later date of each pair).
    threshold : float or "otsu"
        Distance above which a position counts as changed; "otsu" picks it from the histogram.
    percentile : float, optional
        If given, the threshold is this percentile of the valid distances (overrides ``threshold``).
    polygons : GeoDataFrame, optional
        Zones to summarise (reprojected to the embedding CRS): mean distance and changed fraction.

    Returns
    -------
    xr.Dataset
        ``distance`` (float32, NaN invalid), ``changed`` (float32 1/0, NaN invalid) and
        ``attrs["threshold"]``; ``spatial_ref`` kept. Lazy for dask-backed embeddings: the
        threshold is computed now (Otsu: two streaming passes over the distance, equal to the
        in-memory threshold; ``percentile=``: the distance map, 1/D of the embedding, is read
        into memory), the maps chunk by chunk when computed or written. With ``polygons``, returns
        ``(ds, summary)`` where summary is :func:`summarize_change` of the polygons.

    Examples
    --------
    >>> ds = change(emb.isel(time=0), emb.isel(time=1))           # doctest: +SKIP
    >>> ds.changed.plot()                                          # doctest: +SKIP
    >>> summarize_change(ds, fields_gdf)                           # doctest: +SKIP
    """
    if emb_b is None:
        check_embedding(emb_a, "emb_a")
        if "time" not in emb_a.dims or emb_a.sizes["time"] < 2:
            raise ValueError("pass two embeddings, or one with a 'time' dim of at least 2 dates")
        dists = [
            cosine_distance(emb_a.isel(time=i), emb_a.isel(time=i + 1)).expand_dims(time=[emb_a["time"].values[i + 1]])
            for i in range(emb_a.sizes["time"] - 1)
        ]
        distance = xr.concat(dists, dim="time")
        distance = with_georef(distance, emb_a)
    else:
        distance = cosine_distance(emb_a, emb_b)
    otsu = percentile is None and (threshold == "otsu" or threshold is None)
    if is_lazy(distance) and percentile is None:
        if otsu:
            thr, low, high, count = _streamed_otsu(distance.data)
        else:
            low, high, count = np.nan, np.nan, int(np.isfinite(distance).sum())
        values = None
    else:
        values = distance.values[np.isfinite(distance.values)]
        count = values.size
        low, high = (values.min(), values.max()) if count else (np.nan, np.nan)
    if count == 0:
        raise ValueError("no position is valid on both dates; pick clearer dates or fill gaps with a composite")
    if percentile is not None:
        thr = float(np.percentile(values, percentile))
    elif otsu:
        if float(np.float32(high) - np.float32(low)) < 1e-6:
            logger.info("distances are all equal (no change); threshold set to their maximum")
            thr = float(high)
        elif values is not None:
            thr = otsu_threshold(values)
    else:
        thr = float(threshold)
    changed = xr.where(np.isfinite(distance), (distance > thr).astype(np.float32), np.nan).astype(np.float32)
    ds = xr.Dataset({"distance": distance, "changed": with_georef(changed, distance)})
    ds = ds.rio.write_crs(distance.rio.crs)
    ds.attrs["threshold"] = thr
    ds.attrs["threshold_method"] = "percentile" if percentile is not None else (
        "otsu" if threshold in ("otsu", None) else "fixed")
    if is_lazy(changed):
        logger.info("change threshold %.4f (%s)", thr, ds.attrs["threshold_method"])
    else:
        logger.info("change threshold %.4f (%s); %.1f%% changed", thr, ds.attrs["threshold_method"],
                    100 * float(np.nanmean(changed.values)))
    if polygons is not None:
        return ds, summarize_change(ds, polygons)
    return ds


def summarize_change(ds: xr.Dataset, polygons):
    """Per-polygon mean distance, changed fraction and valid count (GeoDataFrame, polygons' CRS kept).

    Examples
    --------
    >>> summarize_change(change(a, b), fields)[["mean_distance", "changed_fraction"]]  # doctest: +SKIP
    """
    from rasterio.features import geometry_mask

    if polygons.crs is None:
        raise ValueError("polygons have no CRS; set it with gdf.set_crs('EPSG:4326') (or their real CRS)")
    local = polygons.to_crs(ds.rio.crs)
    transform = ds.rio.transform(recalc=True)
    dist = ds["distance"].transpose(..., "y", "x").values
    chg = ds["changed"].transpose(..., "y", "x").values
    mean_d, frac, count = [], [], []
    for geom in local.geometry:
        inside = geometry_mask([geom], out_shape=dist.shape[-2:], transform=transform, invert=True)
        d, c = dist[..., inside], chg[..., inside]
        n = int(np.isfinite(d).sum())
        count.append(n)
        mean_d.append(float(np.nanmean(d)) if n else np.nan)
        frac.append(float(np.nanmean(c)) if n else np.nan)
    out = polygons.copy()
    out["mean_distance"], out["changed_fraction"], out["n_valid"] = mean_d, frac, count
    return out
