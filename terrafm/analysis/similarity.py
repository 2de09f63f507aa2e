"""Similarity search: which positions look like a query location, polygon or vector."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import xarray as xr

from ._checks import require_int
from ._grid import EMBEDDING_DIM, check_embedding, flatten_valid, l2_normalize, unflatten, valid_mask


def _single_date(emb: xr.DataArray) -> xr.DataArray:
    if "time" in emb.dims:
        if emb.sizes["time"] != 1:
            raise ValueError(
                f"emb has {emb.sizes['time']} dates; pick one with emb.isel(time=i) before a similarity search"
            )
        emb = emb.isel(time=0)
    return emb


def _lonlat_to_index(emb: xr.DataArray, lon: float, lat: float) -> tuple[int, int]:
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", emb.rio.crs, always_xy=True).transform(lon, lat)
    res_x, res_y = emb.rio.resolution()
    xs, ys = emb["x"].values, emb["y"].values
    col = int(np.argmin(np.abs(xs - x)))
    row = int(np.argmin(np.abs(ys - y)))
    if abs(xs[col] - x) > abs(res_x) / 2 + 1e-6 or abs(ys[row] - y) > abs(res_y) / 2 + 1e-6:
        left, bottom, right, top = emb.rio.bounds()
        raise ValueError(
            f"query ({lon}, {lat}) falls outside the embedding area (bounds {left:.0f}, {bottom:.0f}, "
            f"{right:.0f}, {top:.0f} in {emb.rio.crs}); pick a point inside it or embed a larger bbox"
        )
    return row, col


def query_vectors(emb: xr.DataArray, query: Any) -> np.ndarray:
    """Resolve a query to an (m, D) array of vectors.

    ``query`` may be a (lon, lat) tuple, a shapely Polygon/MultiPolygon in EPSG:4326 or a
    GeoDataFrame/GeoSeries (mean vector of the valid positions inside), a 1-D vector, or a list /
    2-D array of vectors.
    """
    emb = _single_date(check_embedding(emb))
    depth = emb.sizes[EMBEDDING_DIM]
    if getattr(query, "geom_type", None) == "Point":
        query = (float(query.x), float(query.y))
    geometry = _as_geometry(query, emb)
    if geometry is not None:
        mask_inside = _positions_in_geometry(emb, geometry)
        inside = mask_inside & np.asarray(valid_mask(emb).values)
        if not inside.any():
            raise ValueError(
                "the query polygon covers no valid embedding position; check its CRS (GeoDataFrame CRS or "
                "EPSG:4326 for bare shapely) and that it overlaps the area"
            )
        data = np.asarray(emb.transpose("y", "x", EMBEDDING_DIM).values)
        return data[inside].mean(axis=0, keepdims=True).astype(np.float32)
    if isinstance(query, tuple) and len(query) == 2 and np.isscalar(query[0]) and depth != 2:
        row, col = _lonlat_to_index(emb, float(query[0]), float(query[1]))
        vec = np.asarray(emb.transpose("y", "x", EMBEDDING_DIM).values[row, col], dtype=np.float32)
        if not np.isfinite(vec).all() or ("valid" in emb.coords and not bool(emb["valid"].values[row, col])):
            raise ValueError(f"query ({query[0]}, {query[1]}) hits an invalid (cloud/nodata) position; move it")
        return vec[None]
    if query is None or isinstance(query, (str, bytes)) or isinstance(query, dict):
        raise TypeError(
            f"query {query!r} is not a location or a vector; pass a (lon, lat) tuple of numbers, a shapely "
            "polygon (EPSG:4326) or GeoDataFrame, one vector of length "
            f"{depth} or a list of them")
    try:
        vectors = np.asarray(query.values if isinstance(query, xr.DataArray) else query, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"query of type {type(query).__name__} cannot be read as vectors ({exc}); pass a (lon, lat) tuple, a "
            f"polygon, one vector of length {depth} or a list of them") from None
    vectors = np.atleast_2d(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != depth:
        raise ValueError(
            f"query vectors have shape {vectors.shape} but the embedding has {depth} dims; pass (lon, lat), "
            f"a polygon, one vector of length {depth} or a list of them"
        )
    return vectors


def _as_geometry(query: Any, emb: xr.DataArray):
    try:
        import geopandas as gpd
        from shapely.geometry.base import BaseGeometry
    except ImportError:  # pragma: no cover
        return None
    if isinstance(query, (gpd.GeoDataFrame, gpd.GeoSeries)):
        frame = query if query.crs is not None else query.set_crs("EPSG:4326")
        return frame.to_crs(emb.rio.crs).union_all()
    if isinstance(query, BaseGeometry):
        if query.geom_type == "Point":
            return None
        return gpd.GeoSeries([query], crs="EPSG:4326").to_crs(emb.rio.crs).iloc[0]
    return None


def _positions_in_geometry(emb: xr.DataArray, geometry) -> np.ndarray:
    from rasterio.features import geometry_mask

    transform = emb.rio.transform(recalc=True)
    return geometry_mask([geometry], out_shape=(emb.sizes["y"], emb.sizes["x"]), transform=transform,
                         invert=True, all_touched=False)


def similarity(
    emb: xr.DataArray,
    query: Any,
    metric: Literal["cosine", "euclidean"] = "cosine",
    reduce: Literal["max", "mean"] = "max",
) -> xr.DataArray:
    """Similarity of every position to a query; the best locations come from :func:`top_k`.

    Parameters
    ----------
    emb : xr.DataArray
        Single-date embeddings (y, x, embedding) with a CRS.
    query : (lon, lat) | shapely Polygon (EPSG:4326) | GeoDataFrame | vector | list of vectors
        What to look for. A polygon uses the mean vector of the valid positions inside it.
    metric : {"cosine", "euclidean"}
        Cosine similarity in [-1, 1], or negative Euclidean distance (higher = more similar).
    reduce : {"max", "mean"}
        How to combine several query vectors per position.

    Returns
    -------
    xr.DataArray
        (y, x) similarity map named "similarity", NaN where invalid, ``spatial_ref`` kept. Use
        :func:`top_k` for the best locations as a GeoDataFrame.

    Examples
    --------
    >>> sim = similarity(emb, (13.40, 52.52))                        # doctest: +SKIP
    >>> best = top_k(sim, k=20)  # GeoDataFrame of points, column "similarity"  # doctest: +SKIP
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce={reduce!r}: several query vectors combine per position by 'max' or 'mean'")
    emb = _single_date(check_embedding(emb))
    queries = query_vectors(emb, query)
    vectors, mask = flatten_valid(emb)
    if metric == "cosine":
        scores = l2_normalize(vectors.astype(np.float64)) @ l2_normalize(queries.astype(np.float64)).T
    elif metric == "euclidean":
        d2 = (vectors.astype(np.float64) ** 2).sum(1)[:, None] - 2 * vectors @ queries.T.astype(np.float64) + (
            queries.astype(np.float64) ** 2
        ).sum(1)[None]
        scores = -np.sqrt(np.maximum(d2, 0))
    combined = scores.max(1) if reduce == "max" else scores.mean(1)
    return unflatten(combined.astype(np.float32), mask, "similarity", attrs={"metric": metric})


def top_k(score: xr.DataArray, k: int = 10, largest: bool = True):
    """The ``k`` best positions of a (y, x) score map as a GeoDataFrame of points (map CRS).

    ``k`` is a positive integer; when the map has fewer finite cells than ``k``, all of them
    are returned, ranked (NaN cells are never ranked). A map without a finite cell is an error.

    Examples
    --------
    >>> top_k(similarity(emb, vec), k=5).to_crs(4326)   # doctest: +SKIP
    """
    import geopandas as gpd

    k = require_int("k", k, fix="the number of best positions to return, e.g. k=10")
    if not isinstance(score, xr.DataArray):
        raise TypeError(f"score must be a (y, x) xr.DataArray such as the output of similarity(), got "
                        f"{type(score).__name__}")
    if set(score.dims) != {"y", "x"}:
        raise ValueError(f"top_k ranks a (y, x) score map, but score has dims {score.dims}; pass the output of "
                         "similarity(emb, query) (select one date with .isel(time=i))")
    values = np.asarray(score.transpose("y", "x").values, dtype=np.float64)
    finite = int(np.isfinite(values).sum())
    if finite == 0:
        raise ValueError("score has no finite value (all NaN) to rank; check the embedding's valid cells and the "
                         "query of similarity()")
    flat = np.where(np.isfinite(values), values if largest else -values, -np.inf).ravel()
    k = min(k, finite)
    order = np.argsort(-flat, kind="stable")[:k]
    rows, cols = np.unravel_index(order, values.shape)
    xs, ys = score["x"].values[cols], score["y"].values[rows]
    return gpd.GeoDataFrame(
        {"rank": np.arange(1, k + 1), "row": rows, "col": cols, score.name or "score": values[rows, cols]},
        geometry=gpd.points_from_xy(xs, ys),
        crs=score.rio.crs,
    )
