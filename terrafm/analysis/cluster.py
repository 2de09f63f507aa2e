"""Unsupervised clustering of embeddings into a georeferenced class map."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._checks import require_int
from ._grid import flatten_valid, l2_normalize, unflatten


def cluster(emb: xr.DataArray, k: int = 8, seed: int = 0, batch_size: int = 4096,
            normalize: bool = True) -> xr.DataArray:
    """MiniBatchKMeans clusters of the valid vectors.

    Parameters
    ----------
    emb : xr.DataArray
        Embeddings (time?, y, x, embedding) with a CRS.
    k : int
        Number of clusters (an integer >= 2, at most the number of valid positions).
    seed : int
        Seed of the k-means initialisation (deterministic by default).
    batch_size : int
        Vectors per MiniBatchKMeans step.
    normalize : bool
        L2-normalise vectors first (k-means on the unit sphere ≈ cosine clustering).

    Returns
    -------
    xr.DataArray
        (time?, y, x) float32 cluster ids 0..k-1, NaN where invalid, ``spatial_ref`` kept;
        ``attrs["inertia"]``.

    Examples
    --------
    >>> labels = cluster(emb, k=6)          # doctest: +SKIP
    >>> labels.plot(cmap="tab10")           # doctest: +SKIP
    """
    from sklearn.cluster import MiniBatchKMeans

    k = require_int("k", k, minimum=2, fix="the number of clusters, e.g. k=8")
    batch_size = require_int("batch_size", batch_size, fix="vectors per MiniBatchKMeans step, e.g. 4096")
    seed = require_int("seed", seed, minimum=0, fix="e.g. seed=0")
    vectors, mask = flatten_valid(emb)
    if len(vectors) < k:
        raise ValueError(f"only {len(vectors)} valid positions for k={k} clusters; lower k or use a larger area")
    if normalize:
        vectors = l2_normalize(vectors)
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3)
    ids = model.fit_predict(vectors)
    return unflatten(ids.astype(np.float32), mask, "cluster", attrs={"k": k, "inertia": float(model.inertia_)})
