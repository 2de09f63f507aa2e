"""Thin ``.emb`` accessor on embedding DataArrays (registered on import of terrafm.analysis.accessor).

Examples
--------
>>> import terrafm.analysis.accessor  # doctest: +SKIP
>>> emb.emb.rgb(); emb.emb.similar((13.4, 52.5)); emb.emb.cluster(8)  # doctest: +SKIP
"""

from __future__ import annotations

import xarray as xr

from .change import change as _change
from .classify import fit_classifier as _fit_classifier
from .cluster import cluster as _cluster
from .export import to_geoparquet as _to_geoparquet
from .rgb import to_rgb as _to_rgb
from .similarity import similarity as _similarity


class EmbeddingAnalysisMixin:
    """Methods delegating to :mod:`terrafm.analysis`; needs ``self._obj`` (the DataArray)."""

    _obj: xr.DataArray

    def rgb(self, **kwargs):
        """:func:`terrafm.analysis.to_rgb`."""
        return _to_rgb(self._obj, **kwargs)

    def similar(self, query, **kwargs):
        """:func:`terrafm.analysis.similarity`."""
        return _similarity(self._obj, query, **kwargs)

    def change(self, other=None, **kwargs):
        """:func:`terrafm.analysis.change` against ``other`` (or consecutive dates)."""
        return _change(self._obj, other, **kwargs)

    def cluster(self, k: int = 8, **kwargs):
        """:func:`terrafm.analysis.cluster`."""
        return _cluster(self._obj, k, **kwargs)

    def fit_classifier(self, labels, **kwargs):
        """:func:`terrafm.analysis.fit_classifier`."""
        return _fit_classifier(self._obj, labels, **kwargs)

    def to_geoparquet(self, path=None, **kwargs):
        """:func:`terrafm.analysis.to_geoparquet`."""
        return _to_geoparquet(self._obj, path, **kwargs)


@xr.register_dataarray_accessor("emb")
class EmbeddingAnalysisAccessor(EmbeddingAnalysisMixin):
    """``da.emb.<method>``: analysis on a terrafm embedding DataArray."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj
