"""Embedding analysis: colour maps, similarity, change, clustering, classification, export.

Every function takes the embedding DataArray of :func:`terrafm.embed` (dims (time?, y, x,
embedding), ``valid`` coord, CRS) and returns georeferenced xarray / GeoPandas objects.
scikit-learn and umap are imported only inside the functions that use them.
"""

from __future__ import annotations

from .change import change, cosine_distance, otsu_threshold, summarize_change
from .classify import Classifier, fit_classifier
from .cluster import cluster
from .export import to_cog, to_geoparquet, to_zarr
from .index import VectorIndex
from .labels import labels_to_grid
from .rgb import RGBReducer, fit_rgb, to_rgb
from .series import baseline_distance, first_persistent_change, step_distance, trajectory
from .similarity import similarity, top_k

__all__ = [
    "Classifier", "RGBReducer", "VectorIndex", "baseline_distance", "change", "cluster", "cosine_distance", "fit_classifier", "fit_rgb", "first_persistent_change",
    "labels_to_grid", "otsu_threshold", "similarity", "step_distance", "summarize_change", "to_cog", "to_geoparquet",
    "to_rgb", "to_zarr", "top_k", "trajectory",
]
