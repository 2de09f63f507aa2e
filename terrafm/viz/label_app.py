"""Label by clicking: points (or drawn polygons) get classes, a classifier retrains, the class map follows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._app import MapApp, guarded
from .layers import add_embedding_layer
from .render import palette

logger = logging.getLogger(__name__)


class LabelTool(MapApp):
    """Few-shot mapping: click points or draw polygons, assign classes, watch the class map update.

    After every new label the classifier (:func:`terrafm.analysis.fit_classifier`) retrains as
    soon as two classes have examples on valid positions, and the ``classes`` layer is redrawn.

    Parameters
    ----------
    emb : xr.DataArray
        Single-date embeddings (or pick ``date``).
    classes : list of str
        Class names offered in the picker (more can be added with :meth:`add_class`).
    method : {"knn", "linear"}
        Classifier (see :func:`terrafm.analysis.fit_classifier`).
    date : int
        Date index when ``emb`` has a ``time`` dim.
    background : xr.DataArray, optional
        RGB picture (y, x, band) shown under the layers instead of the PCA colours.

    Attributes
    ----------
    labels : GeoDataFrame
        ``class`` and geometry (EPSG:4326) of every label so far.
    classifier : terrafm.analysis.Classifier or None
    prediction : xr.Dataset or None
        ``class`` (index into :attr:`classes`), ``probability``.

    Examples
    --------
    >>> tool = LabelTool(emb, classes=["water", "forest", "urban"])   # doctest: +SKIP
    >>> tool.select_class("water"); tool.click(13.41, 52.51)          # doctest: +SKIP
    >>> tool.export("labels.parquet")                                  # doctest: +SKIP
    """

    def __init__(self, emb: Any, classes: Sequence[str] = ("class 1", "class 2"), method: str = "knn",
                 k: int = 5, date: int = 0, map: Any = None, **kwargs: Any) -> None:
        import geopandas as gpd

        self.classes = [str(c) for c in classes]
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be distinct, non-empty names, got {list(classes)}")
        self.active_class = self.classes[0]
        self.method, self.k, self.date_index = method, int(k), int(date)
        self.labels = gpd.GeoDataFrame({"class": []}, geometry=[], crs="EPSG:4326")
        self.classifier = None
        self.prediction = None
        self.markers = None
        super().__init__(emb, map=map, **kwargs)

    def _setup(self) -> None:
        import ipyleaflet

        self._add_background()
        self.markers = ipyleaflet.LayerGroup(name="labels")
        self.map.add_layer(self.markers)
        self.draw = ipyleaflet.DrawControl(polygon={"shapeOptions": {"color": "#ffffff"}}, rectangle={},
                                           polyline={}, circlemarker={}, circle={}, marker={})
        self.draw.on_draw(self._on_draw)
        self.map.add_control(self.draw)
        self.show_info("Pick a class, then click the map (or draw a polygon) to label.")

    def _controls(self) -> list:
        import ipywidgets

        self.class_picker = ipywidgets.ToggleButtons(options=self.classes, value=self.active_class,
                                                     description="class")
        self.class_picker.observe(lambda c: self.select_class(c["new"]), names="value")
        self.new_class = ipywidgets.Text(placeholder="new class name", layout=ipywidgets.Layout(width="160px"))
        add = ipywidgets.Button(description="add class")
        add.on_click(lambda _: self.add_class(self.new_class.value))
        self.export_path = ipywidgets.Text(value="labels.parquet", layout=ipywidgets.Layout(width="200px"))
        export = ipywidgets.Button(description="export GeoParquet")
        export.on_click(lambda _: self.export(self.export_path.value))
        undo = ipywidgets.Button(description="undo")
        undo.on_click(lambda _: self.undo())
        return [self.class_picker, ipywidgets.HBox([self.new_class, add, undo, self.export_path, export])]

    # ----- handlers ----------------------------------------------------------------------
    @guarded
    def select_class(self, name: str) -> None:
        """Make ``name`` the class new labels get."""
        if name not in self.classes:
            raise ValueError(f"unknown class {name!r}; known classes: {self.classes} (add it first)")
        self.active_class = name

    @guarded
    def add_class(self, name: str) -> None:
        """Offer a new class in the picker and make it active."""
        name = (name or "").strip()
        if not name:
            raise ValueError("type a class name first")
        if name in self.classes:
            raise ValueError(f"class {name!r} exists already")
        self.classes.append(name)
        if hasattr(self, "class_picker"):
            self.class_picker.options = list(self.classes)
            self.class_picker.value = name
        self.active_class = name

    @guarded
    def click(self, lon: float, lat: float) -> None:
        """What a map click does: label the clicked cell with the active class and retrain."""
        from shapely.geometry import Point

        emb = self.current()
        row, col = self.cell_of(emb, lon, lat)
        if not _is_valid(emb, row, col):
            raise ValueError(f"({lon:.5f}, {lat:.5f}) has no valid embedding (cloud or no data); label another spot")
        self._add(Point(lon, lat))

    @guarded
    def add_polygon(self, geometry: Any, name: str | None = None) -> None:
        """Label every valid cell inside a polygon (GeoJSON dict or shapely, EPSG:4326)."""
        from shapely.geometry import shape

        polygon = shape(geometry) if isinstance(geometry, dict) else geometry
        if polygon.geom_type not in ("Polygon", "MultiPolygon") or polygon.is_empty:
            raise ValueError(f"expected a polygon, got {polygon.geom_type}; draw a polygon on the map")
        from ..analysis.similarity import _positions_in_geometry
        import geopandas as gpd

        emb = self.current()
        local = gpd.GeoSeries([polygon], crs="EPSG:4326").to_crs(emb.rio.crs).iloc[0]
        inside = _positions_in_geometry(emb, local)
        if not inside.any():
            raise ValueError("the polygon covers no grid cell (too small or outside the data); draw a larger one inside")
        self._add(polygon, name)

    def _on_draw(self, target: Any, action: str, geo_json: dict) -> None:
        if action == "created":
            self.add_polygon(geo_json["geometry"])
            self.draw.clear()

    @guarded
    def undo(self) -> None:
        """Remove the last label and retrain."""
        if len(self.labels) == 0:
            raise ValueError("there are no labels to undo")
        self.labels = self.labels.iloc[:-1].reset_index(drop=True)
        self._after_labels_changed()

    @guarded
    def export(self, path: str | Path) -> Path:
        """Write the labels to GeoParquet (``class``, geometry in EPSG:4326); returns the path."""
        if len(self.labels) == 0:
            raise ValueError("no labels yet; click the map to add some before exporting")
        path = Path(path)
        self.labels.to_parquet(path)
        self.show_info(f"wrote {len(self.labels)} labels to {path}")
        return path

    # ----- internals ---------------------------------------------------------------------
    def _add(self, geometry: Any, name: str | None = None) -> None:
        import geopandas as gpd
        import pandas as pd

        name = name or self.active_class
        if name not in self.classes:
            self.classes.append(name)
        row = gpd.GeoDataFrame({"class": [name]}, geometry=[geometry], crs="EPSG:4326")
        self.labels = gpd.GeoDataFrame(pd.concat([self.labels, row], ignore_index=True), crs="EPSG:4326")
        self._after_labels_changed()

    def _after_labels_changed(self) -> None:
        self._draw_markers()
        counts = self.labels["class"].value_counts()
        if len(counts) < 2:
            self.classifier = None
            self.show_info(f"{len(self.labels)} label(s); add examples of at least two classes to train.")
            return
        self._retrain()

    def _retrain(self) -> None:
        from ..analysis import fit_classifier

        emb = self.current()
        labels = self.labels.to_crs(emb.rio.crs)
        # a few clicks are fewer than k: vote among the labels there are (fit_classifier refuses k > labels)
        classifier = fit_classifier(emb, labels, column="class", method=self.method, k=min(self.k, len(labels)))
        prediction = classifier.predict(emb)
        # classifier indices -> indices in self.classes, so each class keeps its colour
        lookup = np.array([self.classes.index(str(c)) for c in classifier.classes], dtype=np.float32)
        ids = prediction["class"].values
        mapped = np.where(np.isfinite(ids), lookup[np.nan_to_num(ids).astype(int)], np.nan).astype(np.float32)
        prediction["class"] = prediction["class"].copy(data=mapped)
        prediction.attrs["classes"] = list(self.classes)
        self.classifier, self.prediction = classifier, prediction
        add_embedding_layer(self.map, prediction["class"].rename("class"), "classes", kind="categorical",
                            classes=self.classes, cmap=palette(len(self.classes)), opacity=0.6)
        accuracy = classifier.report.get("accuracy")
        extra = f", blocked-CV accuracy {accuracy:.2f}" if accuracy is not None else ""
        self.show_info(f"{len(self.labels)} labels, {len(classifier.classes)} classes; class map updated{extra}.")

    def _draw_markers(self) -> None:
        import ipyleaflet

        colours = dict(zip(self.classes, palette(len(self.classes))))
        self.markers.clear_layers()
        for name, geometry in zip(self.labels["class"], self.labels.geometry):
            colour = colours[name]
            if geometry.geom_type == "Point":
                self.markers.add_layer(ipyleaflet.CircleMarker(location=(geometry.y, geometry.x), radius=6,
                                                               color="#ffffff", weight=2, fill_color=colour,
                                                               fill_opacity=1.0))
            else:
                self.markers.add_layer(ipyleaflet.GeoJSON(
                    data={"type": "Feature", "geometry": geometry.__geo_interface__, "properties": {}},
                    style={"color": colour, "fillOpacity": 0.2, "weight": 2}))


def _is_valid(emb: Any, row: int, col: int) -> bool:
    ok = bool(np.isfinite(emb.isel(y=row, x=col).values).all())
    if "valid" in emb.coords:
        ok = ok and bool(emb["valid"].values[row, col])
    return ok
