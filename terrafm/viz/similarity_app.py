"""Click-to-similar: click the map, see how similar every position is and the top-k matches
(in the map's embedding, or in every store of a vector index)."""

from __future__ import annotations

import html
import logging
from typing import Any

import numpy as np

from ._app import MapApp, check_index, guarded, hit_label
from .layers import add_embedding_layer

logger = logging.getLogger(__name__)


class SimilarityExplorer(MapApp):
    """Click a location: a similarity layer and markers on the ``k`` most similar positions.

    Without ``index`` the markers are the ``k`` best positions of ``emb`` itself. With ``index``
    (a :class:`terrafm.analysis.VectorIndex`) the clicked vector of ``emb`` is searched in every
    store and every date of the index: the markers are the ``k`` best hits across them (popup:
    store, date, score) and :attr:`results` holds them; the similarity layer still shows ``emb``.

    Parameters
    ----------
    emb : xr.DataArray
        Embeddings from :func:`terrafm.embed` (a ``time`` dim gets a date picker).
    k : int
        Number of top matches marked.
    metric : {"cosine", "euclidean"}
        Passed to :func:`terrafm.analysis.similarity`.
    map : leafmap map, optional
        Draw on this map instead of a new one.
    background : xr.DataArray, optional
        An RGB picture (y, x, band; floats in [0, 1] or uint8) shown under the layers instead
        of the PCA colours, e.g. true colour.
    index : terrafm.analysis.VectorIndex, optional
        Search every store of this index on a click (same embedding dimension as ``emb``, else
        a ValueError here). Its scores are cosine similarities, so ``metric`` must be "cosine".

    Attributes
    ----------
    similarity : xr.DataArray or None
        The last similarity map (y, x).
    matches : GeoDataFrame or None
        The top-k positions of ``emb`` (EPSG:4326) with their similarity.
    results : GeoDataFrame or None
        With ``index``: the last search's top-k hits across stores (``store``, ``time``, ``row``,
        ``col``, ``lon``, ``lat``, ``score``, points in EPSG:4326), best first.
    query : (lon, lat) or None

    Examples
    --------
    >>> app = SimilarityExplorer(emb, k=10)       # doctest: +SKIP
    >>> app  # click the map  # doctest: +SKIP
    >>> app.click(13.40, 52.52); app.matches  # what a click does  # doctest: +SKIP
    >>> index = terrafm.analysis.VectorIndex.build(["june.zarr", "sept.zarr"])  # doctest: +SKIP
    >>> app = SimilarityExplorer(emb, index=index, k=20)  # a click searches both stores  # doctest: +SKIP
    >>> app.click(13.40, 52.52); app.results[["store", "time", "score"]]  # doctest: +SKIP
    """

    def __init__(self, emb: Any, k: int = 10, metric: str = "cosine", map: Any = None, index: Any = None,
                 **kwargs: Any) -> None:
        self.k = int(k)
        self.metric = metric
        self.index = self._checked_index(index, emb)
        self.similarity = None
        self.matches = None
        self.results = None
        self.query_vector = None
        self.query: tuple[float, float] | None = None
        self.date_index = 0
        self.markers = None
        super().__init__(emb, map=map, **kwargs)

    def _checked_index(self, index: Any, emb: Any) -> Any:
        if index is not None and self.metric != "cosine":
            raise ValueError(f"an index scores by cosine similarity; metric={self.metric!r} applies to emb alone: "
                             "pass metric='cosine' with index=")
        return check_index(index, emb)

    def set_index(self, index: Any) -> None:
        """Search ``index`` (every store) from now on, ``None`` = ``emb`` only; repeats the last query.

        Examples
        --------
        >>> app.set_index(index)   # the open map now searches every store  # doctest: +SKIP
        """
        self.index = self._checked_index(index, self.emb)
        self.results = None
        if self.query is not None:
            self.click(*self.query)

    def _setup(self) -> None:
        import ipyleaflet

        self.markers = ipyleaflet.LayerGroup(name="top matches")
        self.map.add_layer(self.markers)
        self._add_background()
        self.show_info("Click the map to find similar places.")

    def _controls(self) -> list:
        import ipywidgets

        controls = []
        self.k_slider = ipywidgets.IntSlider(value=self.k, min=1, max=100, description="top k")
        self.k_slider.observe(lambda change: self.set_k(change["new"]), names="value")
        controls.append(self.k_slider)
        if "time" in getattr(self.emb, "dims", ()) and self.emb.sizes["time"] > 1:
            dates = [str(t)[:10] for t in self.emb["time"].values]
            self.date_picker = ipywidgets.Dropdown(options=list(zip(dates, range(len(dates)))), description="date")
            self.date_picker.observe(lambda change: self.set_date(change["new"]), names="value")
            controls.append(self.date_picker)
        return [ipywidgets.HBox(controls)]

    @guarded
    def set_date(self, index: int) -> None:
        """Search another date (index into ``emb.time``); repeats the last query."""
        self.date_index = int(index)
        self._add_background()
        if self.query is not None:
            self.click(*self.query)

    @guarded
    def set_k(self, k: int) -> None:
        """Change how many top matches are marked."""
        if int(k) < 1:
            raise ValueError("k must be at least 1")
        self.k = int(k)
        if self.similarity is not None:
            self._update_matches()
            self.show_info(self._summary())

    @guarded
    def click(self, lon: float, lat: float) -> None:
        """What a map click does: similarity to the clicked position, layer and markers updated."""
        from ..analysis import similarity

        emb = self.current()
        row, col = self.cell_of(emb, lon, lat)
        valid = bool(np.isfinite(emb.isel(y=row, x=col).values).all())
        if "valid" in emb.coords:
            valid = valid and bool(emb["valid"].values[row, col])
        if not valid:
            raise ValueError(
                f"the clicked position ({lon:.5f}, {lat:.5f}) has no valid embedding (cloud or no data); "
                "click a coloured cell"
            )
        vector = emb.transpose("y", "x", "embedding").values[row, col]
        self.similarity = similarity(emb, vector, metric=self.metric)
        self.query = (float(lon), float(lat))
        self.query_cell = (row, col)
        self.query_vector = np.asarray(vector, dtype=np.float32)
        vmin, vmax = (-1.0, 1.0) if self.metric == "cosine" else (None, None)
        add_embedding_layer(self.map, self.similarity, "similarity", kind="continuous", cmap="magma",
                            vmin=vmin, vmax=vmax, opacity=0.75)
        self._update_matches()
        self.show_info(self._summary())

    def _summary(self) -> str:
        lon, lat = self.query
        if self.index is None:
            return f"Query ({lon:.5f}, {lat:.5f}); {self.k} most similar positions marked."
        n_stores = self.results["store"].nunique()
        return (f"Query ({lon:.5f}, {lat:.5f}); the {len(self.results)} most similar positions of the index "
                f"marked (from {n_stores} of its {len(self.index.stores)} stores).")

    def _update_matches(self) -> None:
        import ipyleaflet
        import ipywidgets

        from ..analysis import top_k

        matches = top_k(self.similarity, k=self.k).to_crs("EPSG:4326")
        self.matches = matches
        self.markers.clear_layers()
        if self.index is None:
            for point, score in zip(matches.geometry, matches["similarity"]):
                self.markers.add_layer(ipyleaflet.CircleMarker(
                    location=(point.y, point.x), radius=6, color="#00e5ff", fill_color="#00e5ff",
                    fill_opacity=0.6, weight=2, name=f"similarity {score:.3f}"))
        else:
            self.results = self.index.search(self.query_vector, k=self.k)
            for _, hit in self.results.iterrows():
                label = hit_label(hit)
                self.markers.add_layer(ipyleaflet.CircleMarker(
                    location=(float(hit["lat"]), float(hit["lon"])), radius=6, color="#00e5ff",
                    fill_color="#00e5ff", fill_opacity=0.6, weight=2, name=label,
                    popup=ipywidgets.HTML(value=html.escape(label))))
        if self.query is not None:
            self.markers.add_layer(ipyleaflet.CircleMarker(
                location=(self.query[1], self.query[0]), radius=8, color="#ffffff", fill_color="#ff00aa",
                fill_opacity=1.0, weight=3, name="query"))
