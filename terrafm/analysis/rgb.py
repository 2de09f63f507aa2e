"""Colour embeddings: reduce D-dimensional vectors to 3 bands (PCA or UMAP) with a robust stretch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr

from ._checks import require_int
from ._grid import EMBEDDING_DIM, check_embedding, map_valid_blocks, sample_valid_vectors

logger = logging.getLogger(__name__)

RGB_BANDS = ["r", "g", "b"]


@dataclass
class RGBReducer:
    """A fitted 3-component reducer plus the per-band stretch, reusable across dates.

    ``transform(emb)`` colours another embedding (same model) in exactly the same colour space.
    """

    method: str
    model: Any
    low: np.ndarray
    high: np.ndarray
    chunk_size: int = 65536
    n_fit: int = 0
    info: dict = field(default_factory=dict)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Raw 3-component projection of (n, D) vectors, chunk by chunk."""
        if vectors.shape[1] != self.model.n_features_in_:
            raise ValueError(
                f"reducer was fitted on {self.model.n_features_in_}-dim embeddings but got {vectors.shape[1]}; "
                "use the same model for both dates or fit a new reducer"
            )
        from tqdm.auto import tqdm

        out = np.empty((len(vectors), 3), dtype=np.float32)
        starts = range(0, len(vectors), self.chunk_size)
        for start in tqdm(starts, desc=f"{self.method} transform", disable=len(starts) < 4):
            chunk = vectors[start : start + self.chunk_size]
            out[start : start + len(chunk)] = self.model.transform(chunk)
        return out

    def stretch(self, projected: np.ndarray) -> np.ndarray:
        """Map each band linearly so [low, high] -> [0, 1], clipped."""
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return np.clip((projected - self.low) / span, 0.0, 1.0).astype(np.float32)

    def transform(self, emb: xr.DataArray) -> xr.DataArray:
        """Colour ``emb`` with this reducer; returns (…, y, x, band) float32 in [0, 1], NaN where invalid.

        A dask-backed ``emb`` (``terrafm.open_embedding``) gives a lazy result coloured chunk by
        chunk when computed or written (``to_cog``, ``.rio.to_raster``), in bounded memory.
        """
        check_embedding(emb)
        if emb.sizes[EMBEDDING_DIM] != self.model.n_features_in_:
            raise ValueError(
                f"reducer was fitted on {self.model.n_features_in_}-dim embeddings but emb has "
                f"{emb.sizes[EMBEDDING_DIM]}; use the same model for both dates or fit a new reducer"
            )
        return map_valid_blocks(emb, lambda vectors: self.stretch(self.project(vectors)), "rgb",
                                band=("band", RGB_BANDS), attrs={"reducer": self.method})


def fit_rgb(
    emb: xr.DataArray,
    method: Literal["pca", "umap"] = "pca",
    sample: int | None = 100_000,
    seed: int = 0,
    percentiles: tuple[float, float] = (2.0, 98.0),
    chunk_size: int = 65536,
    **reducer_kwargs: Any,
) -> RGBReducer:
    """Fit a 3-component reducer on (a random sample of) the valid vectors of ``emb``.

    Parameters
    ----------
    emb : xr.DataArray
        Embeddings from :func:`terrafm.embed`, dims (time?, y, x, embedding).
    method : {"pca", "umap"}
        PCA (scikit-learn, randomized SVD for large samples) or UMAP (umap-learn).
    sample : int or None
        Number of valid vectors to fit on (None: all). UMAP cost grows super-linearly, so keep it
        ~1e4–1e5; the remaining vectors are transformed chunk by chunk. The rows are
        :func:`~terrafm.analysis._grid.sample_rows` of the valid positions in ((time,) y, x) order,
        so an in-memory and a dask-backed copy of the same embedding get the same sample; from a
        dask-backed ``emb`` only the sampled vectors are read (plus one streaming pass for the
        valid mask), and ``sample=None`` reads every valid vector into memory.
    seed : int
        Random seed for the sample and the reducer.
    percentiles : (float, float)
        Robust stretch: these percentiles of the fitted sample map to 0 and 1 per band
        (0 <= low < high <= 100).
    chunk_size : int
        Vectors transformed per step.
    **reducer_kwargs
        Options of the reducer (``sklearn.decomposition.PCA`` or ``umap.UMAP``); an option it
        does not take is an error listing the ones it does.

    Returns
    -------
    RGBReducer

    Examples
    --------
    >>> reducer = fit_rgb(emb_2020, method="pca")          # doctest: +SKIP
    >>> rgb_2020, rgb_2024 = reducer.transform(emb_2020), reducer.transform(emb_2024)  # doctest: +SKIP
    """
    if method not in ("pca", "umap"):
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
    if sample is not None:
        require_int("sample", sample, minimum=4, fix="fit on at least 4 vectors, or sample=None for all of them")
    require_int("seed", seed, minimum=0, fix="e.g. seed=0")
    require_int("chunk_size", chunk_size, fix="vectors transformed per step, e.g. 65536")
    low, high = _check_percentiles(percentiles)
    _check_reducer_options(method, reducer_kwargs)
    fit_vectors, n_valid = sample_valid_vectors(emb, sample, seed)
    if n_valid < 4:
        raise ValueError(f"only {n_valid} valid positions; need at least 4 to fit a colour reducer")
    if method == "pca":
        from sklearn.decomposition import PCA

        solver = "randomized" if len(fit_vectors) > 50_000 and fit_vectors.shape[1] > 50 else "full"
        model = PCA(n_components=3, svd_solver=solver, random_state=seed, **reducer_kwargs)
        model.fit(fit_vectors)
        # sign convention so colours are stable across runs: largest |loading| positive
        flip = np.sign(model.components_[np.arange(3), np.abs(model.components_).argmax(1)])
        model.components_ *= flip[:, None]
    else:
        import umap

        kwargs = {"n_components": 3, "random_state": seed, "metric": "cosine", "n_neighbors": 15}
        kwargs.update(reducer_kwargs)
        model = umap.UMAP(**kwargs)
        model.fit(fit_vectors)
        model.n_features_in_ = fit_vectors.shape[1]
    logger.info("fitted %s on %d of %d valid vectors", method, len(fit_vectors), n_valid)
    reducer = RGBReducer(method, model, np.zeros(3), np.ones(3), chunk_size=chunk_size, n_fit=len(fit_vectors))
    if method == "umap":
        projected = np.asarray(model.embedding_, dtype=np.float32)
    else:
        projected = reducer.project(fit_vectors)
    reducer.low = np.percentile(projected, low, axis=0)
    reducer.high = np.percentile(projected, high, axis=0)
    return reducer


def _check_percentiles(percentiles) -> tuple[float, float]:
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles={percentiles!r}: the stretch needs (low, high) with 0 <= low < high <= 100, "
                         "e.g. (2, 98)")
    return low, high


def _check_reducer_options(method: str, options: dict) -> None:
    """Refuse options the reducer does not take (before fitting), and a component count other than 3."""
    if "n_components" in options:
        raise ValueError(f"n_components={options['n_components']!r}: an RGB image has always 3 components; drop it")
    if not options:
        return
    import inspect

    if method == "pca":
        from sklearn.decomposition import PCA as reducer_class
    else:
        import umap

        reducer_class = umap.UMAP
    known = set(inspect.signature(reducer_class.__init__).parameters) - {"self", "n_components"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{unknown} {'is' if len(unknown) == 1 else 'are'} not an option of {method} "
                         f"({reducer_class.__name__}); its options: {sorted(known)}")


def to_rgb(
    emb: xr.DataArray,
    method: Literal["pca", "umap"] = "pca",
    sample: int | None = 100_000,
    seed: int = 0,
    reducer: RGBReducer | None = None,
    return_reducer: bool = False,
    **kwargs: Any,
) -> xr.DataArray | tuple[xr.DataArray, RGBReducer]:
    """False-colour image of embeddings: 3 reduced components, robustly stretched to [0, 1].

    Parameters
    ----------
    emb : xr.DataArray
        Embeddings, dims (time?, y, x, embedding) with a CRS.
    method, sample, seed, **kwargs
        Passed to :func:`fit_rgb` when ``reducer`` is None.
    reducer : RGBReducer, optional
        A reducer fitted before (e.g. on another date) so both images share one colour space.
    return_reducer : bool
        Also return the fitted reducer.

    Returns
    -------
    xr.DataArray
        dims (time?, y, x, band) with band = r, g, b; NaN where invalid; ``spatial_ref`` kept.
        Lazy for a dask-backed ``emb`` (``terrafm.open_embedding``): fitted on the sample now,
        coloured chunk by chunk when computed or written, so memory is bounded by the chunk size.

    Examples
    --------
    >>> rgb, r = to_rgb(emb_2020, method="umap", sample=20_000, return_reducer=True)  # doctest: +SKIP
    >>> rgb_2024 = to_rgb(emb_2024, reducer=r)                                       # doctest: +SKIP
    >>> rgb.rio.to_raster("rgb.tif")                                                 # doctest: +SKIP
    """
    if reducer is None:
        reducer = fit_rgb(emb, method=method, sample=sample, seed=seed, **kwargs)
    rgb = reducer.transform(emb)
    return (rgb, reducer) if return_reducer else rgb
