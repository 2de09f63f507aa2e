"""The ``da.emb`` accessor: the analysis methods of ``da.terrafm`` under a short name.

Importing this module registers ``da.emb`` (``import terrafm`` alone registers only
``ds.terrafm`` / ``da.terrafm``). The methods are those of
:class:`terrafm.accessor.EmbeddingAnalysisMixin`, which lives in :mod:`terrafm.accessor` so that
registering ``da.terrafm`` does not import this package.

Examples
--------
>>> import terrafm.analysis.accessor, xarray as xr
>>> hasattr(xr.DataArray, "emb")
True
>>> emb.emb.rgb(); emb.emb.similar((13.4, 52.5)); emb.emb.cluster(8)  # doctest: +SKIP
"""

from __future__ import annotations

import xarray as xr

from ..accessor import EmbeddingAnalysisMixin

__all__ = ["EmbeddingAnalysisAccessor", "EmbeddingAnalysisMixin"]


@xr.register_dataarray_accessor("emb")
class EmbeddingAnalysisAccessor(EmbeddingAnalysisMixin):
    """``da.emb.<method>``: analysis on a terrafm embedding DataArray."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj
