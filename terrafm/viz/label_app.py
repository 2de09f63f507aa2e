"""Label by clicking: points (or drawn polygons) get classes, a classifier retrains, the class map follows.
With a vector index, suggestions come from every store and accepted ones train the classifier too."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._app import MapApp, check_index, guarded, hit_label
from .layers import add_embedding_layer
from .render import palette

logger = logging.getLogger(__name__)


class LabelTool(MapApp):
    """Few-shot mapping: click points or draw polygons, assign classes, watch the class map update.

    After every new label the classifier (:func:`terrafm.analysis.fit_classifier`) retrains as
    soon as two classes have examples on valid positions, and the ``classes`` layer is redrawn.

    With ``index`` (a :class:`terrafm.analysis.VectorIndex`) labelling reaches every store of the
    index: :meth:`suggest` searches all of them (every date) for positions like the active class's
    labels (``positive``) and unlike the other classes' labels (``negative``), skipping positions
    already labelled; :meth:`accept` labels suggestions with the active class. Such a label keeps
    its ``store``, ``time``, ``row`` and ``col`` and its vector is read from that store. While every
    label lies on ``emb`` the classifier is :func:`~terrafm.analysis.fit_classifier` as without an
    index (with its blocked-CV accuracy); once labels come from other stores it is the same kNN
    vote over the vectors of every label (no CV: the labels are not all on one grid), and the
    class map is still predicted on ``emb``. Clicks and polygons always label ``emb``.

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
    index : terrafm.analysis.VectorIndex, optional
        Suggest and take labels from every store of this index (same embedding dimension as
        ``emb``, else a ValueError here; needs ``method="knn"``).

    Attributes
    ----------
    labels : GeoDataFrame
        ``class`` and geometry (EPSG:4326) of every label so far; with ``index`` also ``store``,
        ``time``, ``row``, ``col`` (``store`` None for labels on ``emb``).
    suggestions : GeoDataFrame or None
        With ``index``: the last :meth:`suggest` hits (``store``, ``time``, ``lon``, ``lat``,
        ``score``, ...), best first.
    classifier : terrafm.analysis.Classifier or None
    prediction : xr.Dataset or None
        ``class`` (index into :attr:`classes`), ``probability``.

    Examples
    --------
    >>> tool = LabelTool(emb, classes=["water", "forest", "urban"])   # doctest: +SKIP
    >>> tool.select_class("water"); tool.click(13.41, 52.51)          # doctest: +SKIP
    >>> tool.export("labels.parquet")                                  # doctest: +SKIP
    >>> tool = LabelTool(emb, classes=["water", "forest"], index=index)  # doctest: +SKIP
    >>> tool.click(13.41, 52.51); tool.suggest(k=10); tool.accept()   # doctest: +SKIP
    """

    def __init__(self, emb: Any, classes: Sequence[str] = ("class 1", "class 2"), method: str = "knn",
                 k: int = 5, date: int = 0, map: Any = None, index: Any = None, **kwargs: Any) -> None:
        import geopandas as gpd

        self.classes = [str(c) for c in classes]
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be distinct, non-empty names, got {list(classes)}")
        if index is not None and method != "knn":
            raise ValueError(f"labels from an index's stores are vectors off emb's grid, which the kNN vote "
                             f"takes and method={method!r} does not: pass method='knn' with index=")
        self.index = check_index(index, emb)
        self.active_class = self.classes[0]
        self.method, self.k, self.date_index = method, int(k), int(date)
        columns = {"class": []} if index is None else {"class": [], "store": [], "time": [], "row": [], "col": []}
        self.labels = gpd.GeoDataFrame(columns, geometry=[], crs="EPSG:4326")
        self.classifier = None
        self.prediction = None
        self.suggestions = None
        self.markers = None
        self.suggestion_markers = None
        self._stores: dict = {}
        super().__init__(emb, map=map, **kwargs)

    def _setup(self) -> None:
        import ipyleaflet

        self._add_background()
        self.markers = ipyleaflet.LayerGroup(name="labels")
        self.map.add_layer(self.markers)
        if self.index is not None:
            self.suggestion_markers = ipyleaflet.LayerGroup(name="suggestions")
            self.map.add_layer(self.suggestion_markers)
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
        buttons = [self.new_class, add, undo, self.export_path, export]
        if self.index is not None:
            suggest = ipywidgets.Button(description="suggest (all stores)")
            suggest.on_click(lambda _: self.suggest())
            accept = ipywidgets.Button(description="accept suggestions")
            accept.on_click(lambda _: self.accept())
            buttons += [suggest, accept]
        return [self.class_picker, ipywidgets.HBox(buttons)]

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
    def suggest(self, k: int | None = None) -> Any:
        """With ``index``: the ``k`` (default ``2 * self.k``) positions of every store most like the
        active class's labels and unlike the other classes' labels, not labelled yet; drawn as
        hollow markers and kept in :attr:`suggestions` (returned too)."""
        if self.index is None:
            raise ValueError("suggestions search a vector index: create the tool with index=VectorIndex.build(stores)")
        k = 2 * self.k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors, targets = self._label_vectors()
        active = self.classes.index(self.active_class)
        positive = vectors[targets == active]
        if len(positive) == 0:
            raise ValueError(f"no label of class {self.active_class!r} yet: label an example of it first, "
                             "then ask for similar places")
        negative = vectors[targets != active]
        # over-fetch by the labels, whose own positions come back and are skipped
        n_taken = int(len(targets))
        hits = self.index.search(positive=positive, negative=negative if len(negative) else None, k=k + n_taken)
        keep = ~self._already_labelled(hits)
        self.suggestions = hits[keep].head(k).reset_index(drop=True)
        self._draw_suggestions()
        self.show_info(f"{len(self.suggestions)} places like {self.active_class!r} from "
                       f"{self.suggestions['store'].nunique()} store(s) suggested; accept them with accept().")
        return self.suggestions

    @guarded
    def accept(self, which: Any = None) -> None:
        """Label suggestions with the active class: all of them, or the positions ``which`` (a list
        of row numbers of :attr:`suggestions`); then retrain."""
        import geopandas as gpd
        import pandas as pd

        if self.suggestions is None or len(self.suggestions) == 0:
            raise ValueError("there are no suggestions to accept; call suggest() first")
        chosen = self.suggestions if which is None else self.suggestions.iloc[list(which)]
        rows = gpd.GeoDataFrame({"class": [self.active_class] * len(chosen), "store": list(chosen["store"]),
                                 "time": list(chosen["time"]), "row": list(chosen["row"]),
                                 "col": list(chosen["col"])},
                                geometry=gpd.points_from_xy(chosen["lon"], chosen["lat"]), crs="EPSG:4326")
        self.labels = gpd.GeoDataFrame(pd.concat([self.labels, rows], ignore_index=True), crs="EPSG:4326")
        self.suggestions = None
        self._draw_suggestions()
        self._after_labels_changed()

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
        columns = {"class": [name]}
        if self.index is not None:  # a label on emb: its vector is read from emb, not from a store
            columns.update(store=[None], time=[None], row=[None], col=[None])
        row = gpd.GeoDataFrame(columns, geometry=[geometry], crs="EPSG:4326")
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
        if self.index is not None and self.labels["store"].notna().any():
            classifier = self._vector_classifier()
        else:
            labels = self.labels[["class", "geometry"]].to_crs(emb.rio.crs)
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
        if self.index is not None and self.labels["store"].notna().any():
            extra = f", trained on {len(classifier.train_vectors)} vectors from the map and the index stores"
        self.show_info(f"{len(self.labels)} labels, {len(classifier.classes)} classes; class map updated{extra}.")

    def _vector_classifier(self):
        """The kNN classifier of fit_classifier, on the vectors of every label (map and stores)."""
        from ..analysis import Classifier

        vectors, targets = self._label_vectors()
        present = np.unique(targets)
        if len(present) < 2:
            raise ValueError(f"the labels on valid positions have a single class ({self.classes[present[0]]!r}); "
                             "add examples of another class")
        # classifier indices -> the present classes, like fit_classifier's
        lookup = {int(c): i for i, c in enumerate(present)}
        return Classifier("knn", [self.classes[c] for c in present], vectors,
                          np.array([lookup[int(t)] for t in targets]), k=min(self.k, len(vectors)),
                          report={"n_train": int(len(vectors))})

    def _label_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, class index into :attr:`classes`) of every labelled valid position: the cells of
        ``emb`` under points/polygons, and the store cells of labels taken from the index."""
        import geopandas as gpd

        from ..analysis.similarity import _positions_in_geometry

        emb = self.current().transpose("y", "x", "embedding")
        data = None
        vectors, targets = [], []
        stores = self.labels["store"] if "store" in self.labels else [None] * len(self.labels)
        for i, (name, geometry, store) in enumerate(zip(self.labels["class"], self.labels.geometry, stores)):
            target = self.classes.index(name)
            if isinstance(store, str):  # taken from the index: the path of its store
                label = self.labels.iloc[i]
                vector = self._store_vector(store, label["time"], int(label["row"]), int(label["col"]))
                if np.isfinite(vector).all():
                    vectors.append(vector[None])
                    targets.append(target)
                continue
            if data is None:
                data = np.asarray(emb.values, dtype=np.float32)
                valid = np.isfinite(data).all(-1)
                if "valid" in emb.coords:
                    valid &= np.asarray(emb["valid"].values, bool)
            if geometry.geom_type == "Point":
                row, col = self.cell_of(emb, geometry.x, geometry.y)
                inside = np.zeros(valid.shape, bool)
                inside[row, col] = True
            else:
                local = gpd.GeoSeries([geometry], crs="EPSG:4326").to_crs(emb.rio.crs).iloc[0]
                inside = _positions_in_geometry(emb, local)
            cells = inside & valid
            vectors.append(data[cells])
            targets += [target] * int(cells.sum())
        depth = emb.sizes["embedding"]
        return (np.concatenate(vectors) if vectors else np.zeros((0, depth), np.float32)), np.asarray(targets, int)

    def _store_vector(self, store: str, time: Any, row: int, col: int) -> np.ndarray:
        from ..store import open_embedding

        if store not in self._stores:
            self._stores[store] = open_embedding(store)  # a hit's store is the path of its zarr store
        data = self._stores[store]
        if "time" in data.dims:
            data = data.sel(time=np.datetime64(time, "ns"))
        return np.asarray(data.isel(y=row, x=col).transpose("embedding").values, dtype=np.float32)

    def _already_labelled(self, hits: Any) -> np.ndarray:
        """Which hits are labelled already: a store label's (store, date, cell), or a place on ``emb``'s
        labelled cells at ``emb``'s date."""
        from pyproj import Transformer

        from ..analysis.similarity import _positions_in_geometry
        import geopandas as gpd

        taken = set()
        on_map = np.zeros(0, bool)
        emb = self.current()
        if len(self.labels):
            from_store = self.labels["store"].notna()
            for _, label in self.labels[from_store].iterrows():
                taken.add((label["store"], _time_key(label["time"]), int(label["row"]), int(label["col"])))
            on_map = np.zeros((emb.sizes["y"], emb.sizes["x"]), bool)
            for geometry in self.labels.geometry[~from_store]:
                if geometry.geom_type == "Point":
                    on_map[self.cell_of(emb, geometry.x, geometry.y)] = True
                else:
                    local = gpd.GeoSeries([geometry], crs="EPSG:4326").to_crs(emb.rio.crs).iloc[0]
                    on_map |= _positions_in_geometry(emb, local)
        date = _time_key(emb["time"].values) if "time" in emb.coords else None
        x, y = Transformer.from_crs("EPSG:4326", emb.rio.crs, always_xy=True).transform(
            np.asarray(hits["lon"], float), np.asarray(hits["lat"], float))
        cols, rows = ~emb.rio.transform(recalc=True) * (np.asarray(x), np.asarray(y))
        rows, cols = np.floor(rows).astype(int), np.floor(cols).astype(int)
        done = np.zeros(len(hits), bool)
        for i, (store, time, row, col) in enumerate(zip(hits["store"], hits["time"], hits["row"], hits["col"])):
            if (store, _time_key(time), int(row), int(col)) in taken:
                done[i] = True
            elif on_map.any() and 0 <= rows[i] < on_map.shape[0] and 0 <= cols[i] < on_map.shape[1]:
                same_date = date is None or _time_key(time) is None or _time_key(time) == date
                done[i] = same_date and bool(on_map[rows[i], cols[i]])
        return done

    def _draw_suggestions(self) -> None:
        import ipyleaflet
        import ipywidgets

        if self.suggestion_markers is None:
            return
        self.suggestion_markers.clear_layers()
        if self.suggestions is None:
            return
        colour = dict(zip(self.classes, palette(len(self.classes))))[self.active_class]
        for _, hit in self.suggestions.iterrows():
            label = hit_label(hit)
            self.suggestion_markers.add_layer(ipyleaflet.CircleMarker(
                location=(float(hit["lat"]), float(hit["lon"])), radius=7, color=colour, weight=3,
                fill_opacity=0.0, name=label, popup=ipywidgets.HTML(value=html.escape(label))))

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


def _time_key(time: Any) -> Any:
    """A label's or hit's date as a comparable key (None when the store has no time axis)."""
    import pandas as pd

    return None if time is None or pd.isna(time) else pd.Timestamp(time)


def _is_valid(emb: Any, row: int, col: int) -> bool:
    ok = bool(np.isfinite(emb.isel(y=row, x=col).values).all())
    if "valid" in emb.coords:
        ok = ok and bool(emb["valid"].values[row, col])
    return ok
