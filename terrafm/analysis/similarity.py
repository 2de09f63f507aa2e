"""Similarity search: which positions look like a query location, polygon or vector.

Works on in-memory and dask-backed (``terrafm.open_embedding``) embeddings alike: a point query
reads one chunk, a polygon its window, the score map is computed chunk by chunk and
:func:`top_k` merges per-chunk rankings, so memory is bounded by the chunk size.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import xarray as xr

from ._checks import require_int
from ._grid import EMBEDDING_DIM, check_embedding, is_lazy, l2_normalize, map_valid_blocks, valid_mask


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
    if isinstance(getattr(query, "geom_type", None), str) and query.geom_type == "Point":  # not a GeoSeries
        query = (float(query.x), float(query.y))
    geometry = _as_geometry(query, emb)
    if geometry is not None:
        return _polygon_mean(emb, geometry)
    if isinstance(query, tuple) and len(query) == 2 and np.isscalar(query[0]) and depth != 2:
        row, col = _lonlat_to_index(emb, float(query[0]), float(query[1]))
        cell = emb.isel(y=row, x=col)  # reads one chunk of a dask-backed emb
        vec = np.asarray(cell.values, dtype=np.float32)
        if not np.isfinite(vec).all() or ("valid" in cell.coords and not bool(cell["valid"].values)):
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
    """(y, x) bool: the cells of the whole grid whose centre ``geometry`` covers (used by the label app)."""
    rows, cols, inside = _geometry_window(emb, geometry)
    covered = np.zeros((emb.sizes["y"], emb.sizes["x"]), bool)
    covered[rows, cols] = inside
    return covered


def _geometry_window(emb: xr.DataArray, geometry) -> tuple[slice, slice, np.ndarray]:
    """``(rows, cols, inside)``: the grid window around ``geometry`` and which of its cells it covers."""
    from affine import Affine
    from rasterio.features import geometry_mask

    if geometry.is_empty:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), bool)
    transform = emb.rio.transform(recalc=True)
    left, bottom, right, top = geometry.bounds
    corners = [~transform @ (x, y) for x in (left, right) for y in (bottom, top)]
    cols = [c for c, _ in corners]
    rows = [r for _, r in corners]
    r0, r1 = max(int(np.floor(min(rows))), 0), min(int(np.ceil(max(rows))), emb.sizes["y"])
    c0, c1 = max(int(np.floor(min(cols))), 0), min(int(np.ceil(max(cols))), emb.sizes["x"])
    if r1 <= r0 or c1 <= c0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), bool)
    inside = geometry_mask([geometry], out_shape=(r1 - r0, c1 - c0), transform=transform @ Affine.translation(c0, r0),
                           invert=True, all_touched=False)
    return slice(r0, r1), slice(c0, c1), inside


def _polygon_mean(emb: xr.DataArray, geometry) -> np.ndarray:
    """Mean vector (1, D) of the valid positions inside ``geometry``, reading only its window."""
    rows, cols, inside = _geometry_window(emb, geometry)
    if inside.any():
        window = emb.isel(y=rows, x=cols).transpose("y", "x", EMBEDDING_DIM)
        inside = inside & np.asarray(valid_mask(window).values)
    if not inside.any():
        raise ValueError(
            "the query polygon covers no valid embedding position; check its CRS (GeoDataFrame CRS or "
            "EPSG:4326 for bare shapely) and that it overlaps the area"
        )
    data = np.asarray(window.values)
    return data[inside].mean(axis=0, keepdims=True).astype(np.float32)


def _scores(vectors: np.ndarray, queries: np.ndarray, metric: str, reduce: str) -> np.ndarray:
    """float32 (n,) similarity of (n, D) ``vectors`` to (m, D) ``queries`` combined over the queries."""
    if metric == "cosine":
        scores = l2_normalize(vectors.astype(np.float64)) @ l2_normalize(queries.astype(np.float64)).T
    else:
        d2 = (vectors.astype(np.float64) ** 2).sum(1)[:, None] - 2 * vectors @ queries.T.astype(np.float64) + (
            queries.astype(np.float64) ** 2
        ).sum(1)[None]
        scores = -np.sqrt(np.maximum(d2, 0))
    combined = scores.max(1) if reduce == "max" else scores.mean(1)
    return combined.astype(np.float32)


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
        :func:`top_k` for the best locations as a GeoDataFrame. For a dask-backed ``emb`` the
        query is read now (a point: one chunk; a polygon: its window) and the map is lazy,
        computed chunk by chunk.

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
    return map_valid_blocks(emb, lambda vectors: _scores(vectors, queries, metric, reduce), "similarity",
                            attrs={"metric": metric})


def top_k(score: xr.DataArray, k: int = 10, largest: bool = True):
    """The ``k`` best positions of a (y, x) score map as a GeoDataFrame of points (map CRS).

    ``k`` is a positive integer; when the map has fewer finite cells than ``k``, all of them
    are returned, ranked (NaN cells are never ranked). A map without a finite cell is an error.
    Equal scores rank by position: the earlier cell in row-major (y, x) order first. A lazy
    (dask) map is ranked in one streaming pass: each chunk's ``k`` best, then the best ``k`` of
    those; exact, and the same rows as the in-memory ranking.

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
    if is_lazy(score):
        rows, cols, best, finite = _streamed_top_k(score.transpose("y", "x").data, k, largest)
    else:
        values = np.asarray(score.transpose("y", "x").values, dtype=np.float64)
        finite = int(np.isfinite(values).sum())
        rows = cols = best = None
    if finite == 0:
        raise ValueError("score has no finite value (all NaN) to rank; check the embedding's valid cells and the "
                         "query of similarity()")
    k = min(k, finite)
    if rows is None:
        flat = np.where(np.isfinite(values), values if largest else -values, -np.inf).ravel()
        order = np.argsort(-flat, kind="stable")[:k]
        rows, cols = np.unravel_index(order, values.shape)
        best = values[rows, cols]
    xs, ys = score["x"].values[cols], score["y"].values[rows]
    return gpd.GeoDataFrame(
        {"rank": np.arange(1, k + 1), "row": rows, "col": cols, score.name or "score": best},
        geometry=gpd.points_from_xy(xs, ys),
        crs=score.rio.crs,
    )


def _block_top_k(block: np.ndarray, row0: int, col0: int, n_cols: int, k: int, largest: bool):
    """``(values, flat positions, finite count)`` of a block's ``k`` best finite cells (same order as top_k)."""
    values = np.asarray(block, dtype=np.float64)
    finite = np.isfinite(values)
    rows, cols = np.nonzero(finite)
    flat = (rows + row0) * n_cols + (cols + col0)
    picked = values[rows, cols]
    order = np.lexsort((flat, -picked if largest else picked))[:k]
    return picked[order], flat[order], int(finite.sum())


def _streamed_top_k(data, k: int, largest: bool):
    """Exact top-k of a dask (y, x) array: each chunk's k best (ranked like the in-memory argsort: by score,
    ties by row-major position), then the best k of those; one pass, memory ~ chunk + k per chunk."""
    import dask

    row_starts = np.cumsum((0,) + data.chunks[0][:-1])
    col_starts = np.cumsum((0,) + data.chunks[1][:-1])
    blocks = data.to_delayed()
    parts = [dask.delayed(_block_top_k)(blocks[i, j], int(row_starts[i]), int(col_starts[j]), data.shape[1], k,
                                        largest)
             for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]
    parts = dask.compute(*parts)
    values = np.concatenate([p[0] for p in parts])
    flat = np.concatenate([p[1] for p in parts])
    finite = sum(p[2] for p in parts)
    order = np.lexsort((flat, -values if largest else values))[:k]
    rows, cols = np.unravel_index(flat[order], data.shape)
    return rows, cols, values[order], finite
