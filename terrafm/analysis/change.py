"""Change detection: cosine distance between dates, automatic threshold, per-polygon summary."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import xarray as xr

from ._grid import EMBEDDING_DIM, check_embedding, check_same_grid, l2_normalize, valid_mask, with_georef

logger = logging.getLogger(__name__)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximises between-class variance) of finite ``values``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2 or values.min() == values.max():
        raise ValueError("need at least two distinct finite distances to pick an Otsu threshold; use percentile=")
    hist, edges = np.histogram(values, bins=bins)
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


def cosine_distance(emb_a: xr.DataArray, emb_b: xr.DataArray) -> xr.DataArray:
    """Per-position ``1 - cos(a, b)`` in [0, 2]; NaN where either date is invalid; ``spatial_ref`` kept."""
    check_embedding(emb_a, "emb_a")
    check_embedding(emb_b, "emb_b")
    check_same_grid(emb_a, emb_b)
    a = np.asarray(emb_a.transpose(..., "y", "x", EMBEDDING_DIM).values, dtype=np.float64)
    b = np.asarray(emb_b.transpose(..., "y", "x", EMBEDDING_DIM).values, dtype=np.float64)
    both = np.asarray(valid_mask(emb_a.transpose(..., "y", "x", EMBEDDING_DIM)).values) & np.asarray(
        valid_mask(emb_b.transpose(..., "y", "x", EMBEDDING_DIM)).values
    )
    dist = 1.0 - (l2_normalize(np.nan_to_num(a)) * l2_normalize(np.nan_to_num(b))).sum(-1)
    dist = np.where(both, dist, np.nan).astype(np.float32)
    template = valid_mask(emb_a.transpose(..., "y", "x", EMBEDDING_DIM))
    coords = {k: v for k, v in template.coords.items() if set(v.dims) <= set(template.dims)}
    out = xr.DataArray(dist, dims=template.dims, coords=coords, name="cosine_distance")
    return with_georef(out, emb_a)


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
        ``attrs["threshold"]``; ``spatial_ref`` kept. With ``polygons``, returns
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
    values = distance.values[np.isfinite(distance.values)]
    if values.size == 0:
        raise ValueError("no position is valid on both dates; pick clearer dates or fill gaps with a composite")
    if percentile is not None:
        thr = float(np.percentile(values, percentile))
    elif threshold == "otsu" or threshold is None:
        if float(values.max() - values.min()) < 1e-6:
            logger.info("distances are all equal (no change); threshold set to their maximum")
            thr = float(values.max())
        else:
            thr = otsu_threshold(values)
    else:
        thr = float(threshold)
    changed = xr.where(np.isfinite(distance), (distance > thr).astype(np.float32), np.nan).astype(np.float32)
    ds = xr.Dataset({"distance": distance, "changed": with_georef(changed, distance)})
    ds = ds.rio.write_crs(distance.rio.crs)
    ds.attrs["threshold"] = thr
    ds.attrs["threshold_method"] = "percentile" if percentile is not None else (
        "otsu" if threshold in ("otsu", None) else "fixed")
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
