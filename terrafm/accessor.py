"""``ds.terrafm`` / ``da.terrafm`` accessors, registered on ``import terrafm`` (thin wrappers).

Examples
--------
>>> import terrafm, xarray as xr
>>> hasattr(xr.Dataset, "terrafm")
True
"""

from __future__ import annotations

import xarray as xr

from .analysis.accessor import EmbeddingAnalysisMixin


class _TerrafmAccessor:
    def __init__(self, obj) -> None:
        self._obj = obj

    def embed(self, **kwargs) -> xr.DataArray:
        """:func:`terrafm.embed` on this object.

        Examples
        --------
        >>> emb = ds.terrafm.embed(model="terrafm_tiny", weights="random")  # doctest: +SKIP
        """
        from .embed import embed

        return embed(self._obj, **kwargs)


@xr.register_dataset_accessor("terrafm")
class DatasetTerrafmAccessor(_TerrafmAccessor):
    """``ds.terrafm.embed(...)`` ≡ ``terrafm.embed(ds, ...)``."""


@xr.register_dataarray_accessor("terrafm")
class DataArrayTerrafmAccessor(_TerrafmAccessor, EmbeddingAnalysisMixin):
    """``da.terrafm.embed(...)`` ≡ ``terrafm.embed(da, ...)``; on an embedding DataArray also
    ``rgb``, ``similar``, ``change``, ``cluster``, ``fit_classifier``, ``to_geoparquet``
    (thin wrappers over :mod:`terrafm.analysis`)."""
