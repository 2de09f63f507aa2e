"""``ds.terrafm`` / ``da.terrafm`` accessors, registered on ``import terrafm`` (thin wrappers).

This module imports xarray and nothing heavier: each method imports the module that does the work
(:mod:`terrafm.embed`, :mod:`terrafm.analysis`, and through them torch, rioxarray, dask, scikit-learn)
when it is called, so registering the accessors keeps ``import terrafm`` cheap.

Examples
--------
>>> import terrafm, xarray as xr
>>> hasattr(xr.Dataset, "terrafm"), hasattr(xr.DataArray, "terrafm")
(True, True)
>>> sorted(m for m in dir(xr.DataArray([0.0]).terrafm) if not m.startswith("_"))
['change', 'cluster', 'embed', 'fit_classifier', 'rgb', 'similar', 'to_geoparquet']
"""

from __future__ import annotations

import xarray as xr


class EmbeddingAnalysisMixin:
    """Thin wrappers over :mod:`terrafm.analysis`; needs ``self._obj`` (the embedding DataArray).

    Examples
    --------
    >>> emb.terrafm.rgb(method="pca"); emb.terrafm.similar((13.4, 52.5))  # doctest: +SKIP
    """

    _obj: xr.DataArray

    def rgb(self, **kwargs):
        """:func:`terrafm.analysis.to_rgb` of this embedding.

        Examples
        --------
        >>> rgb = emb.terrafm.rgb(method="pca", seed=0)  # doctest: +SKIP
        """
        from .analysis import to_rgb

        return to_rgb(self._obj, **kwargs)

    def similar(self, query, **kwargs):
        """:func:`terrafm.analysis.similarity` of every position to ``query``.

        Examples
        --------
        >>> sim = emb.terrafm.similar((13.40, 52.52))  # doctest: +SKIP
        """
        from .analysis import similarity

        return similarity(self._obj, query, **kwargs)

    def change(self, other=None, **kwargs):
        """:func:`terrafm.analysis.change` against ``other`` (or between consecutive dates).

        Examples
        --------
        >>> ds = emb_2020.terrafm.change(emb_2024)  # doctest: +SKIP
        """
        from .analysis import change

        return change(self._obj, other, **kwargs)

    def cluster(self, k: int = 8, **kwargs):
        """:func:`terrafm.analysis.cluster` into ``k`` clusters.

        Examples
        --------
        >>> ids = emb.terrafm.cluster(8, seed=0)  # doctest: +SKIP
        """
        from .analysis import cluster

        return cluster(self._obj, k, **kwargs)

    def fit_classifier(self, labels, **kwargs):
        """:func:`terrafm.analysis.fit_classifier` from points/polygons or a label raster.

        Examples
        --------
        >>> clf = emb.terrafm.fit_classifier(worldcover_da)  # doctest: +SKIP
        """
        from .analysis import fit_classifier

        return fit_classifier(self._obj, labels, **kwargs)

    def to_geoparquet(self, path=None, **kwargs):
        """:func:`terrafm.analysis.to_geoparquet` of the valid vectors.

        Examples
        --------
        >>> emb.terrafm.to_geoparquet("vectors.parquet")  # doctest: +SKIP
        """
        from .analysis import to_geoparquet

        return to_geoparquet(self._obj, path, **kwargs)


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
