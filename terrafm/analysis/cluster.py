"""Unsupervised clustering of embeddings into a georeferenced class map.

Also what the fitted models (:func:`cluster`, :func:`fit_classifier`, the writers) share beyond
``_grid``: the ``valid`` coord read on its own, and vectors gathered at chosen positions.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._checks import require_int
from ._grid import EMBEDDING_DIM, check_embedding, is_lazy, l2_normalize, map_valid_blocks, sample_valid_vectors


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


def cluster(emb: xr.DataArray, k: int = 8, seed: int = 0, batch_size: int = 4096,
            normalize: bool = True, sample: int | None = 100_000) -> xr.DataArray:
    """MiniBatchKMeans clusters of the valid vectors, fitted on a sample, assigned chunk by chunk.

    The model is fitted on up to ``sample`` valid vectors drawn with ``seed`` (all of them when
    there are fewer; ``_grid.sample_valid_vectors``), then every valid position gets its nearest
    centre. A dask-backed ``emb`` (:func:`terrafm.open_embedding`) is read once for the valid mask
    and the sample, and gives a lazy map computed per chunk, so memory is bounded by the sample and
    the chunks, not the area; it equals the in-memory result for the same data (the sample depends
    on the valid positions and ``seed`` only, never on the chunking).

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
    vectors, n_valid = sample_valid_vectors(emb, sample, seed)
    if n_valid < k:
        raise ValueError(f"only {n_valid} valid positions for k={k} clusters; lower k or use a larger area")
    if normalize:
        vectors = l2_normalize(vectors)
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3).fit(vectors)
    inertia, n_fit = float(model.inertia_), len(vectors)
    del vectors

    def assign(block: np.ndarray) -> np.ndarray:
        return model.predict(l2_normalize(block) if normalize else block).astype(np.float32)

    return map_valid_blocks(emb, assign, "cluster", attrs={"k": k, "inertia": inertia, "n_fit": n_fit})
