"""Analysis methods on embedding DataArrays: the ``EmbeddingAnalysisMixin`` and an ``.emb`` accessor.

The mixin only imports :mod:`terrafm.analysis` when a method is called, so it can be mixed into
the ``da.terrafm`` accessor without slowing ``import terrafm``. Importing this module registers
``da.emb`` as well.

Examples
--------
>>> import terrafm.analysis.accessor  # doctest: +SKIP
>>> emb.emb.rgb(); emb.emb.similar((13.4, 52.5)); emb.emb.cluster(8)  # doctest: +SKIP
"""

from __future__ import annotations

import xarray as xr


class EmbeddingAnalysisMixin:
    """Thin wrappers over :mod:`terrafm.analysis`; needs ``self._obj`` (the embedding DataArray)."""

    _obj: xr.DataArray

    def rgb(self, **kwargs):
        """:func:`terrafm.analysis.to_rgb` of this embedding."""
        from .rgb import to_rgb

        return to_rgb(self._obj, **kwargs)

    def similar(self, query, **kwargs):
        """:func:`terrafm.analysis.similarity` of every position to ``query``."""
        from .similarity import similarity

        return similarity(self._obj, query, **kwargs)

    def change(self, other=None, **kwargs):
        """:func:`terrafm.analysis.change` against ``other`` (or between consecutive dates)."""
        from .change import change

        return change(self._obj, other, **kwargs)

    def cluster(self, k: int = 8, **kwargs):
        """:func:`terrafm.analysis.cluster` into ``k`` clusters."""
        from .cluster import cluster

        return cluster(self._obj, k, **kwargs)

    def fit_classifier(self, labels, **kwargs):
        """:func:`terrafm.analysis.fit_classifier` from points/polygons or a label raster."""
        from .classify import fit_classifier

        return fit_classifier(self._obj, labels, **kwargs)

    def to_geoparquet(self, path=None, **kwargs):
        """:func:`terrafm.analysis.to_geoparquet` of the valid vectors."""
        from .export import to_geoparquet

        return to_geoparquet(self._obj, path, **kwargs)


@xr.register_dataarray_accessor("emb")
class EmbeddingAnalysisAccessor(EmbeddingAnalysisMixin):
    """``da.emb.<method>``: analysis on a terrafm embedding DataArray."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj
