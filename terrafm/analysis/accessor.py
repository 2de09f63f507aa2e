"""Thin ``.emb`` accessor on embedding DataArrays (registered on import of terrafm.analysis.accessor).

Examples
--------
>>> import terrafm.analysis.accessor  # doctest: +SKIP
>>> emb.emb.rgb(); emb.emb.similar((13.4, 52.5)); emb.emb.cluster(8)  # doctest: +SKIP
"""

from __future__ import annotations

import xarray as xr

from . import change as _change
from . import classify as _classify
from . import cluster as _cluster
from . import export as _export
from . import rgb as _rgb
from . import similarity as _similarity


class EmbeddingAnalysisMixin:
    """Methods delegating to :mod:`terrafm.analysis`; needs ``self._obj`` (the DataArray)."""

    _obj: xr.DataArray

    def rgb(self, **kwargs):
        """:func:`terrafm.analysis.to_rgb`."""
        return _rgb.to_rgb(self._obj, **kwargs)

    def similar(self, query, **kwargs):
        """:func:`terrafm.analysis.similarity`."""
        return _similarity.similarity(self._obj, query, **kwargs)

    def change(self, other=None, **kwargs):
        """:func:`terrafm.analysis.change` against ``other`` (or consecutive dates)."""
        return _change.change(self._obj, other, **kwargs)

    def cluster(self, k: int = 8, **kwargs):
        """:func:`terrafm.analysis.cluster`."""
        return _cluster.cluster(self._obj, k, **kwargs)

    def fit_classifier(self, labels, **kwargs):
        """:func:`terrafm.analysis.fit_classifier`."""
        return _classify.fit_classifier(self._obj, labels, **kwargs)

    def to_geoparquet(self, path=None, **kwargs):
        """:func:`terrafm.analysis.to_geoparquet`."""
        return _export.to_geoparquet(self._obj, path, **kwargs)


@xr.register_dataarray_accessor("emb")
class EmbeddingAnalysisAccessor(EmbeddingAnalysisMixin):
    """``da.emb.<method>``: analysis on a terrafm embedding DataArray."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj
