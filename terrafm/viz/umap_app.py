"""A 2-D UMAP scatter of the embeddings linked to the map, both ways."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ._app import MapApp, guarded
from .layers import add_embedding_layer, remove_embedding_layer

logger = logging.getLogger(__name__)


class UmapLink(MapApp):
    """bqplot scatter of 2-D UMAP coordinates, linked to the map.

    Brushing (lasso or rectangle) points in the scatter highlights those positions on the map
    (``selection`` layer); clicking the map highlights the clicked position's point in the
    scatter (``scatter.selected`` and a ring mark). Points are coloured like the PCA map.

    Parameters
    ----------
    emb : xr.DataArray
        Single-date embeddings (or pick ``date``).
    method : {"umap", "pca"}
        2-D projection: UMAP (umap-learn, cosine metric) or PCA (fast preview).
    sample : int
        At most this many valid positions are projected and plotted (random, fixed ``seed``).
    background : xr.DataArray, optional
        RGB picture (y, x, band) shown under the layers instead of the PCA colours.

    Attributes
    ----------
    coords : (n, 2) array
        Scatter coordinates of the plotted positions.
    rows, cols : (n,) arrays
        Grid cell of each plotted point.
    selected : (m,) array
        Indices (into ``coords``) currently selected.

    Examples
    --------
    >>> link = UmapLink(emb, sample=5000)                         # doctest: +SKIP
    >>> link.select_points([0, 1, 2])   # what a brush does        # doctest: +SKIP
    >>> link.click(13.4, 52.5)          # what a map click does    # doctest: +SKIP
    """

    def __init__(self, emb: Any, method: str = "umap", sample: int = 5000, seed: int = 0, date: int = 0,
                 n_neighbors: int = 15, map: Any = None, **kwargs: Any) -> None:
        if method not in ("umap", "pca"):
            raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
        self.method, self.sample, self.seed, self.date_index = method, int(sample), int(seed), int(date)
        self.n_neighbors = int(n_neighbors)
        self.coords = np.zeros((0, 2))
        self.rows = self.cols = np.zeros(0, dtype=int)
        self.selected = np.zeros(0, dtype=int)
        self.point_colours: list[str] = []
        super().__init__(emb, map=map, **kwargs)

    def _setup(self) -> None:
        from matplotlib.colors import to_hex

        from ..analysis import to_rgb
        from ..analysis._grid import valid_mask

        emb = self.current().transpose("y", "x", "embedding")
        valid = np.asarray(valid_mask(emb).values)
        rows, cols = np.nonzero(valid)
        if len(rows) < 5:
            raise ValueError(f"only {len(rows)} valid positions; a scatter needs at least 5 (pick a clearer date)")
        if len(rows) > self.sample:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(rows), self.sample, replace=False))
            rows, cols = rows[keep], cols[keep]
        vectors = np.asarray(emb.values[rows, cols], dtype=np.float32)
        self.rows, self.cols = rows, cols
        self.coords = self._project(vectors)
        rgb = to_rgb(emb)
        self._add_background(rgb)
        colours = np.nan_to_num(rgb.transpose("y", "x", "band").values[rows, cols])
        self.point_colours = [to_hex(c) for c in np.clip(colours, 0, 1)]
        self.show_info(f"{len(rows)} positions; brush the scatter or click the map.")

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        if self.method == "pca":
            from sklearn.decomposition import PCA

            return PCA(n_components=2, random_state=self.seed).fit_transform(vectors)
        import umap

        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=self.seed,
                            n_neighbors=min(self.n_neighbors, len(vectors) - 1))
        return np.asarray(reducer.fit_transform(vectors), dtype=np.float64)

    def _controls(self) -> list:
        import bqplot
        import ipywidgets

        x_scale, y_scale = bqplot.LinearScale(), bqplot.LinearScale()
        self.scatter = bqplot.Scatter(
            x=self.coords[:, 0], y=self.coords[:, 1], scales={"x": x_scale, "y": y_scale},
            colors=self.point_colours or ["#4477aa"], default_size=16, stroke="#222222", stroke_width=0.3,
            selected_style={"opacity": 1.0, "stroke": "#ff00aa", "stroke-width": 2},
            unselected_style={"opacity": 0.25})
        self.ring = bqplot.Scatter(x=[], y=[], scales={"x": x_scale, "y": y_scale}, colors=["#ff00aa"], fill=False,
                                   stroke="#ff00aa", stroke_width=3, default_size=220, marker="circle")
        self.brush = bqplot.interacts.BrushSelector(x_scale=x_scale, y_scale=y_scale, marks=[self.scatter],
                                                   color="#ff00aa")
        self.scatter.observe(self._on_scatter_selected, names="selected")
        self.figure = bqplot.Figure(marks=[self.scatter, self.ring], interaction=self.brush,
                                    axes=[bqplot.Axis(scale=x_scale, label=f"{self.method} 1"),
                                          bqplot.Axis(scale=y_scale, orientation="vertical",
                                                      label=f"{self.method} 2")],
                                    layout=ipywidgets.Layout(width="440px", height="440px"),
                                    fig_margin={"top": 10, "bottom": 40, "left": 40, "right": 10})
        self._syncing = False
        return []

    def _build_widget(self, controls: list):
        import ipywidgets

        return ipywidgets.VBox([ipywidgets.HBox([self.map, self.figure]), self.message])

    def _on_scatter_selected(self, change: dict) -> None:
        if self._syncing:
            return
        self.select_points(change["new"] if change["new"] is not None else [])

    @guarded
    def select_points(self, indices: Sequence[int]) -> None:
        """What a brush does: highlight the positions of scatter points ``indices`` on the map."""
        indices = np.unique(np.asarray(list(indices), dtype=int))
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.coords)):
            raise ValueError(f"point indices must lie in 0..{len(self.coords) - 1}")
        self.selected = indices
        self._set_scatter_selection(indices)
        if indices.size == 0:
            remove_embedding_layer(self.map, "selection")
            raise ValueError("the selection is empty; brush over some points in the scatter")
        add_embedding_layer(self.map, self.selection_mask(), "selection", kind="mask", colour="#ff00aa",
                            opacity=0.9, classes=[f"selected ({indices.size})"])
        self.show_info(f"{indices.size} positions selected.")

    @guarded
    def select_box(self, x_range: Sequence[float], y_range: Sequence[float]) -> None:
        """Select the points whose scatter coordinates fall in a rectangle (a rectangle brush)."""
        (x0, x1), (y0, y1) = sorted(x_range), sorted(y_range)
        inside = ((self.coords[:, 0] >= x0) & (self.coords[:, 0] <= x1)
                  & (self.coords[:, 1] >= y0) & (self.coords[:, 1] <= y1))
        self.select_points(np.flatnonzero(inside))

    def selection_mask(self):
        """(y, x) 1.0 where a selected point sits, 0.0 elsewhere (georeferenced)."""
        emb = self.current()
        template = emb.isel(embedding=0, drop=True)
        values = np.zeros((emb.sizes["y"], emb.sizes["x"]), dtype=np.float32)
        values[self.rows[self.selected], self.cols[self.selected]] = 1.0
        template = template.transpose("y", "x")
        return template.copy(data=values).rename("selection").drop_vars("valid", errors="ignore")

    @guarded
    def click(self, lon: float, lat: float) -> None:
        """What a map click does: highlight the clicked position's point in the scatter."""
        row, col = self.cell_of(self.current(), lon, lat)
        hit = np.flatnonzero((self.rows == row) & (self.cols == col))
        if hit.size == 0:
            raise ValueError(
                f"({lon:.5f}, {lat:.5f}) has no point in the scatter (invalid cell, or not in the "
                f"{self.sample}-point sample); click another cell"
            )
        index = int(hit[0])
        self.selected = np.array([index])
        self._set_scatter_selection(self.selected)
        self.ring.x, self.ring.y = [self.coords[index, 0]], [self.coords[index, 1]]
        add_embedding_layer(self.map, self.selection_mask(), "selection", kind="mask", colour="#ff00aa",
                            opacity=0.9, classes=["clicked"])
        self.show_info(f"cell (row {row}, col {col}) is point {index} at "
                       f"({self.coords[index, 0]:.2f}, {self.coords[index, 1]:.2f}).")

    def _set_scatter_selection(self, indices: np.ndarray) -> None:
        if not hasattr(self, "scatter"):
            return
        self._syncing = True
        try:
            self.scatter.selected = [int(i) for i in indices] if len(indices) else None
        finally:
            self._syncing = False
