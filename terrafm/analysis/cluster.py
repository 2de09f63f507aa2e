"""Unsupervised clustering of embeddings into a georeferenced class map.

Also the per-position machinery the fitted models share (:func:`cluster` and
:meth:`~terrafm.analysis.Classifier.predict`): gather vectors at chosen positions, and apply a
fitted model to every valid position block by block, lazily for dask-backed embeddings.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import xarray as xr

from ._checks import require_int
from ._grid import EMBEDDING_DIM, check_embedding, l2_normalize, with_georef


def is_lazy(da: xr.DataArray) -> bool:
    """True when ``da`` is dask-backed (e.g. :func:`terrafm.open_embedding`): work goes chunk by chunk."""
    return da.chunks is not None


def _grid_dims(emb: xr.DataArray) -> tuple[xr.DataArray, tuple[str, ...]]:
    emb_t = emb.transpose(..., "y", "x", EMBEDDING_DIM)
    return emb_t, tuple(emb_t.dims[:-1])


def valid_flags(emb: xr.DataArray) -> np.ndarray | None:
    """The ``valid`` coord as a numpy bool array on the (time?, y, x) grid, or None without one.

    Reads only the coord (a small array in a store), never the vectors; non-finite vectors are
    dropped where the vectors themselves are read.
    """
    if "valid" not in emb.coords:
        return None
    emb_t, dims = _grid_dims(emb)
    valid = emb_t.coords["valid"]
    template = xr.DataArray(np.empty(emb_t.shape[:-1], dtype=bool), dims=dims)
    return np.asarray(valid.astype(bool).broadcast_like(template).transpose(*dims).values)


def require_some_valid(emb: xr.DataArray, name: str = "emb") -> None:
    """Raise before any work if ``emb`` has no valid position (the ``valid`` coord; all-NaN when in memory)."""
    flags = valid_flags(emb)
    none_valid = flags is not None and not flags.any()
    if not none_valid and not is_lazy(emb):
        data = np.asarray(emb.transpose(..., EMBEDDING_DIM).values)
        none_valid = not np.isfinite(data).all(-1).any()
    if none_valid:
        raise ValueError(
            f"{name} has no valid positions (all NaN / valid=False); choose a less cloudy date or a larger area"
        )


def gather_vectors(emb: xr.DataArray, index: tuple[np.ndarray, ...]) -> np.ndarray:
    """(n, D) vectors at grid positions ``index`` (one integer array per (time?, y, x) dim).

    A vectorised point read: for a dask-backed ``emb`` only the chunks holding the points are read.

    Examples
    --------
    >>> import xarray as xr
    >>> emb = xr.DataArray(np.arange(12.0).reshape(2, 2, 3), dims=("y", "x", "embedding"))
    >>> gather_vectors(emb, (np.array([1]), np.array([0])))
    array([[6., 7., 8.]])
    """
    emb_t, dims = _grid_dims(emb)
    depth = emb_t.sizes[EMBEDDING_DIM]
    if len(index[0]) == 0:
        return np.empty((0, depth), dtype=emb_t.dtype)
    points = {dim: xr.DataArray(np.asarray(i), dims="points") for dim, i in zip(dims, index)}
    picked = emb_t.drop_vars(list(emb_t.coords), errors="ignore").isel(points)
    return np.asarray(picked.transpose("points", EMBEDDING_DIM).values)


def sample_valid_vectors(emb: xr.DataArray, sample: int | None, seed: int) -> np.ndarray:
    """Float32 vectors of up to ``sample`` valid positions (all of them when fewer), in grid C order.

    The positions are drawn with ``seed`` among those the ``valid`` coord marks (all positions
    without one), then non-finite vectors are dropped. The draw depends on the grid only, never on
    chunking, so a dask-backed store and the same array in memory give the same sample.
    """
    emb_t, dims = _grid_dims(emb)
    shape = emb_t.shape[:-1]
    flags = valid_flags(emb_t)
    positions = np.flatnonzero(flags) if flags is not None else np.arange(int(np.prod(shape)))
    if sample is not None and len(positions) > sample:
        positions = np.sort(np.random.default_rng(seed).choice(positions, sample, replace=False))
    vectors = gather_vectors(emb_t, np.unravel_index(positions, shape))
    return vectors[np.isfinite(vectors).all(1)].astype(np.float32, copy=False)


def map_valid_vectors(emb: xr.DataArray, fn: Callable[[np.ndarray], np.ndarray], name: str,
                      band: tuple[str, list] | None = None, attrs: dict | None = None) -> xr.DataArray:
    """``fn`` applied to the valid vectors of every chunk: a (time?, y, x[, band]) float32 map, NaN elsewhere.

    ``fn`` takes (n, D) float32 vectors and returns (n,) values, or (n, len(band labels)) with
    ``band=(dim, labels)``. Valid means the ``valid`` coord (when present) and all-finite. A
    dask-backed ``emb`` gives a lazy result (``dask.array.map_blocks``, one task per chunk;
    ``embedding`` in one chunk); an in-memory one is one block. Each position's value depends on
    its own vector only, so both agree whatever the chunking. CRS and transform are kept.

    Examples
    --------
    >>> import rioxarray  # noqa: F401
    >>> emb = xr.DataArray(np.ones((2, 2, 3)), dims=("y", "x", "embedding"),
    ...                    coords={"y": [160.0, 0.0], "x": [0.0, 160.0]}).rio.write_crs("EPSG:32633")
    >>> map_valid_vectors(emb, lambda v: v.sum(1), "total").values
    array([[3., 3.],
           [3., 3.]], dtype=float32)
    """
    emb_t, dims = _grid_dims(emb)
    n_out = None if band is None else len(band[1])

    def block(vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
        ok = valid[..., 0] & np.isfinite(vectors).all(-1)
        out = np.full(vectors.shape[:-1] + (() if n_out is None else (n_out,)), np.nan, dtype=np.float32)
        if ok.any():
            out[ok] = fn(vectors[ok].astype(np.float32, copy=False))
        return out

    flags = valid_flags(emb_t)
    if is_lazy(emb_t):
        import dask.array as dsa

        data = emb_t.data.rechunk({emb_t.ndim - 1: -1})
        if "valid" in emb_t.coords:
            template = xr.DataArray(np.empty(emb_t.shape[:-1], dtype=bool), dims=dims)
            valid = emb_t.coords["valid"].astype(bool).broadcast_like(template).transpose(*dims).data
            valid = dsa.asarray(valid).rechunk(data.chunks[:-1])
        else:
            valid = dsa.ones(data.shape[:-1], dtype=bool, chunks=data.chunks[:-1])
        valid = valid[..., None]
        if n_out is None:
            values = dsa.map_blocks(block, data, valid, drop_axis=data.ndim - 1, dtype=np.float32,
                                    meta=np.empty((0,) * (data.ndim - 1), np.float32))
        else:
            values = dsa.map_blocks(block, data, valid, chunks=data.chunks[:-1] + ((n_out,),), dtype=np.float32,
                                    meta=np.empty((0,) * data.ndim, np.float32))
    else:
        data = np.asarray(emb_t.values)
        valid = np.ones(data.shape[:-1], dtype=bool) if flags is None else flags
        values = block(data, valid[..., None])
    keep = {k: v for k, v in emb_t.coords.items() if set(v.dims) <= set(dims) and k != "valid"}
    out_dims = list(dims)
    if band is not None:
        out_dims.append(band[0])
        keep[band[0]] = list(band[1])
    result = xr.DataArray(values, dims=out_dims, coords=keep, name=name, attrs=dict(attrs or {}))
    return with_georef(result, emb_t)


def cluster(emb: xr.DataArray, k: int = 8, seed: int = 0, batch_size: int = 4096,
            normalize: bool = True, sample: int | None = 100_000) -> xr.DataArray:
    """MiniBatchKMeans clusters of the valid vectors, fitted on a sample, assigned chunk by chunk.

    The model is fitted on up to ``sample`` valid vectors drawn with ``seed`` (all of them when
    there are fewer), then every valid position gets its nearest centre. A dask-backed ``emb``
    (:func:`terrafm.open_embedding`) gives a lazy map computed per chunk, so memory is bounded by
    the sample and the chunks, not the area; it equals the in-memory result for the same data (the
    sample depends on the grid and ``seed`` only, never on the chunking).

    Parameters
    ----------
    emb : xr.DataArray
        Embeddings (time?, y, x, embedding) with a CRS; in memory or dask-backed. All dates are
        clustered together (one set of centres).
    k : int
        Number of clusters (an integer >= 2, at most the number of valid vectors fitted).
    seed : int
        Seed of the sample and of the k-means initialisation (deterministic by default).
    batch_size : int
        Vectors per MiniBatchKMeans step.
    normalize : bool
        L2-normalise vectors first (k-means on the unit sphere ≈ cosine clustering).
    sample : int or None
        Most vectors the centres are fitted on (None: all valid vectors, read into memory).

    Returns
    -------
    xr.DataArray
        (time?, y, x) float32 cluster ids 0..k-1, NaN where invalid, ``spatial_ref`` kept; lazy for
        a lazy ``emb``. ``attrs``: ``k``, ``inertia`` (of the fitted vectors), ``n_fit``.

    Examples
    --------
    >>> labels = cluster(emb, k=6)                             # doctest: +SKIP
    >>> labels.plot(cmap="tab10")                              # doctest: +SKIP
    >>> to_cog(cluster(open_embedding("big.zarr"), k=12), "clusters.tif")   # streamed  # doctest: +SKIP
    """
    from sklearn.cluster import MiniBatchKMeans

    k = require_int("k", k, minimum=2, fix="the number of clusters, e.g. k=8")
    batch_size = require_int("batch_size", batch_size, fix="vectors per MiniBatchKMeans step, e.g. 4096")
    seed = require_int("seed", seed, minimum=0, fix="e.g. seed=0")
    if sample is not None:
        sample = require_int("sample", sample, minimum=k, fix="the vectors k-means is fitted on, e.g. sample=100_000 "
                             "(at least k), or None for all")
    check_embedding(emb)
    require_some_valid(emb)
    vectors = sample_valid_vectors(emb, sample, seed)
    if len(vectors) < k:
        raise ValueError(f"only {len(vectors)} valid positions for k={k} clusters; lower k or use a larger area")
    if normalize:
        vectors = l2_normalize(vectors)
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3).fit(vectors)
    inertia, n_fit = float(model.inertia_), len(vectors)
    del vectors

    def assign(block: np.ndarray) -> np.ndarray:
        return model.predict(l2_normalize(block) if normalize else block)

    return map_valid_vectors(emb, assign, "cluster", attrs={"k": k, "inertia": inertia, "n_fit": n_fit})
