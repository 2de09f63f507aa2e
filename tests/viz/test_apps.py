"""The apps driven like a user does: map clicks through the leaflet event path, widget value
changes, brushes; assertions on what the layers, markers and scatter then hold."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import xarray as xr
from viz_helpers import cell_lonlat, click, decode_png, make_embedding, two_region_embedding

from terrafm.viz import ChangeExplorer, LabelTool, SimilarityExplorer, UmapLink, get_layer

OUTSIDE = (0.0, 0.0)  # Gulf of Guinea, far from the test grid near Linz


def _is_error(app, *words):
    text = app.message.value
    return "terrafm-error" in text and all(w in text for w in words)


@pytest.fixture(scope="module")
def emb():
    return two_region_embedding(ny=16, nx=20, depth=8)


@pytest.fixture(scope="module")
def series():
    """Three dates: date 1 = date 0 with the top-right 6x6 block swapped to prototype A (change);
    date 2 valid only on the left half while date 0 is made invalid there (no overlap with 0)."""
    base = two_region_embedding(ny=16, nx=20, depth=8).values
    later = base.copy()
    later[:6, 14:] = base[:6, :6]
    t0 = base.copy()
    t2 = base.copy()
    t2[:, 10:] = np.nan
    series = np.stack([t0, later, t2])
    emb = make_embedding(series)
    return emb


# ----- SimilarityExplorer -------------------------------------------------------------------------

def test_similarity_click_updates_layer_and_markers(emb):
    app = SimilarityExplorer(emb, k=7)
    row, col = 4, 3
    click(app, *cell_lonlat(emb, row, col))
    assert app.error is None
    # independent float64 cosine
    data = emb.values.astype(np.float64)
    query = data[row, col]
    expected = (data @ query) / (np.linalg.norm(data, axis=-1) * np.linalg.norm(query))
    np.testing.assert_allclose(app.similarity.values, expected, rtol=1e-5, atol=1e-6)
    # top-k: the 7 highest cosines, all in the left half (prototype A), in EPSG:4326
    best = np.argsort(-expected.ravel())[:7]
    assert sorted(zip(app.matches["row"], app.matches["col"])) == sorted(zip(*np.unravel_index(best, expected.shape)))
    assert (app.matches["col"] < 10).all() and app.matches.crs.to_epsg() == 4326
    assert len(app.markers.layers) == 7 + 1  # matches + the query marker
    layer = get_layer(app.map, "similarity")
    assert layer.image in app.map.layers
    np.testing.assert_array_equal(decode_png(layer.image.url), layer.overlay.rgba)
    assert layer.overlay.legend["vmin"] == -1 and layer.overlay.legend["vmax"] == 1
    # the k slider re-marks without a new click
    app.k_slider.value = 3
    assert len(app.matches) == 3 and len(app.markers.layers) == 4


def test_similarity_bad_clicks_show_a_message(emb):
    values = emb.values.copy()
    values[0, 0] = np.nan
    holey = make_embedding(values)
    app = SimilarityExplorer(holey)
    click(app, *OUTSIDE)
    assert _is_error(app, "outside the data") and app.similarity is None
    click(app, *cell_lonlat(holey, 0, 0))
    assert _is_error(app, "no valid embedding") and app.similarity is None
    click(app, *cell_lonlat(holey, 5, 5))
    assert app.error is None and app.similarity is not None


def test_apps_refuse_an_array_without_crs_visibly(emb, series):
    for cls, data in ((SimilarityExplorer, emb), (LabelTool, emb), (UmapLink, emb), (ChangeExplorer, series)):
        app = cls(data.drop_vars("spatial_ref"))
        assert _is_error(app, "no CRS", "write_crs"), cls.__name__
        assert app.message in app.widget.children


def test_background_rgb_is_shown_and_a_non_rgb_background_is_refused_visibly(emb):
    import terrafm

    rgb = terrafm.to_rgb(emb)
    dn = emb.isel(embedding=slice(0, 3)).rename(embedding="band") * 5000  # reflectance DN, not RGB
    four_band = emb.isel(embedding=slice(0, 5)).rename(embedding="band")
    for cls in (SimilarityExplorer, LabelTool, UmapLink):
        fast = {"method": "pca"} if cls is UmapLink else {}  # the background path is the same; skip UMAP's JIT
        app = cls(emb, background=rgb, **fast)
        assert app.error is None, (cls.__name__, app.message.value)
        layer = get_layer(app.map, "background")
        assert layer is not None and get_layer(app.map, "embedding (PCA)") is None
        assert layer.image in app.map.layers
        bad = cls(emb, background=dn)
        assert _is_error(bad, "background", "does not look like an RGB", "to_rgb"), cls.__name__
        assert bad.message in bad.widget.children and get_layer(bad.map, "background") is None
        assert _is_error(cls(emb, background=four_band), "background", "3 bands")
    # with a background the similarity click still works on top of it
    app = SimilarityExplorer(emb, background=rgb)
    click(app, *cell_lonlat(emb, 3, 4))
    assert app.error is None and app.query_cell == (3, 4)


# ----- ChangeExplorer ----------------------------------------------------------------------------

def test_change_explorer_finds_the_swapped_block(series):
    app = ChangeExplorer(series, date_a=0, date_b=1)
    assert app.error is None, app.message.value
    changed = app.result["changed"].values
    truth = np.zeros((16, 20), bool)
    truth[:6, 14:] = True
    np.testing.assert_array_equal(changed == 1, truth)
    counts, _ = app.histogram
    assert counts.sum() == 16 * 20
    layer = get_layer(app.map, "changed")
    assert layer.overlay.kind == "mask"
    # the opaque share of the overlay tracks the changed share of the grid (36 of 320 cells)
    assert (layer.overlay.rgba[..., 3] > 0).mean() == pytest.approx(36 / 320, abs=0.03)
    assert get_layer(app.map, "change distance").overlay.legend["type"] == "colorbar"
    # the slider spans just past the largest distance; moving it to the end re-thresholds to "nothing changed"
    largest = float(np.nanmax(app.result["distance"].values))
    assert largest < app.threshold_slider.max <= min(2.0, largest * 1.06)
    app.threshold_slider.value = app.threshold_slider.max
    assert app.threshold == app.threshold_slider.max and np.nansum(app.result["changed"].values) == 0
    assert (get_layer(app.map, "changed").overlay.rgba[..., 3] == 0).all()
    assert list(app.hist_threshold.x) == [app.threshold] * 2
    app.threshold_slider.value = 0.5 * largest  # halfway: the swapped block (distance ~1) is above it
    np.testing.assert_array_equal(app.result["changed"].values == 1, truth)
    app.otsu_button.click()
    np.testing.assert_array_equal(app.result["changed"].values == 1, truth)


def test_change_explorer_bad_pairs_show_a_message(series):
    app = ChangeExplorer(series, date_a=0, date_b=1)
    before = app.result
    app.date_b_picker.value = 0  # same date as "before"
    assert _is_error(app, "pick two different dates") and app.result is before
    # date 2 is valid only on the left half; make date 0 valid only on the right half
    values = series.values.copy()
    values[0, :, :10] = np.nan
    disjoint = make_embedding(values, times=series["time"].values)
    app2 = ChangeExplorer(disjoint, date_a=0, date_b=1)
    app2.set_dates(0, 2)
    assert _is_error(app2, "no valid position in common") and app2.pair == (0, 1)
    single = ChangeExplorer(series.isel(time=0))
    assert _is_error(single, "at least two dates")


def test_change_explorer_click_reports_the_distance(series):
    app = ChangeExplorer(series, date_a=0, date_b=1)
    distance = app.result["distance"].values
    # inside the swapped block: changed; a float64 re-computation of 1 - cos gives the number shown
    a = series.isel(time=0).values[2, 16].astype(np.float64)
    b = series.isel(time=1).values[2, 16].astype(np.float64)
    expected = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert distance[2, 16] == pytest.approx(expected, abs=1e-5)
    click(app, *cell_lonlat(series, 2, 16))
    assert app.error is None and app.clicked == (2, 16)
    assert f"distance {expected:.3f}, changed" in app.message.value
    click(app, *cell_lonlat(series, 10, 3))
    assert "unchanged" in app.message.value and app.clicked == (10, 3)
    click(app, *OUTSIDE)
    assert _is_error(app, "outside the data")
    # date 2 has no data on the right half: a click there is not valid on both dates
    app.set_dates(1, 2)
    click(app, *cell_lonlat(series, 5, 15))
    assert _is_error(app, "not valid on both dates")


# ----- LabelTool ---------------------------------------------------------------------------------

def test_label_tool_retrains_and_exports(emb, tmp_path):
    tool = LabelTool(emb, classes=["forest", "water"])
    click(tool, *cell_lonlat(emb, 3, 2))
    assert tool.classifier is None and "two classes" in tool.message.value
    assert get_layer(tool.map, "classes") is None
    tool.class_picker.value = "water"
    click(tool, *cell_lonlat(emb, 12, 17))
    assert tool.error is None, tool.message.value
    classes = tool.prediction["class"].values
    expected = np.where(np.arange(20) < 10, 0, 1)[None, :].repeat(16, 0)  # forest left, water right
    np.testing.assert_array_equal(classes, expected)
    layer = get_layer(tool.map, "classes")
    assert [name for name, _ in layer.overlay.legend["entries"]] == ["forest", "water"]
    colours = {tuple(c) for c in layer.overlay.rgba[layer.overlay.rgba[..., 3] > 0][:, :3]}
    assert len(colours) == 2
    # a third class via a drawn polygon (GeoJSON, as the DrawControl sends it) over the top-left corner
    tool.add_class("meadow")
    (w, n), (e, s) = cell_lonlat(emb, 0, 0), cell_lonlat(emb, 2, 2)
    tool._on_draw(None, "created", {"geometry": {"type": "Polygon", "coordinates": [
        [[w, s], [e, s], [e, n], [w, n], [w, s]]]}})
    assert tool.error is None, tool.message.value
    assert (tool.prediction["class"].values[:3, :3] == 2).all()
    path = tool.export(tmp_path / "labels.parquet")
    back = gpd.read_parquet(path)
    assert list(back["class"]) == ["forest", "water", "meadow"] and back.crs.to_epsg() == 4326
    assert back.geometry.iloc[0].equals(tool.labels.geometry.iloc[0])
    tool.undo()
    assert len(tool.labels) == 2 and (tool.prediction["class"].values[:3, :3] == 0).all()


def test_label_tool_bad_input_shows_a_message(emb, tmp_path):
    tool = LabelTool(emb, classes=["a", "b"])
    tool.export(tmp_path / "none.parquet")
    assert _is_error(tool, "no labels yet")
    click(tool, *OUTSIDE)
    assert _is_error(tool, "outside the data") and len(tool.labels) == 0
    tool.add_polygon({"type": "Polygon", "coordinates": [[[0, 0], [0.001, 0], [0.001, 0.001], [0, 0]]]})
    assert _is_error(tool, "covers no grid cell")
    tool.select_class("c")
    assert _is_error(tool, "unknown class")


# ----- UmapLink ----------------------------------------------------------------------------------

def test_umap_brush_highlights_map_and_map_click_highlights_scatter(emb):
    link = UmapLink(emb, method="umap", sample=10_000, n_neighbors=10)
    assert link.error is None, link.message.value
    n = 16 * 20
    assert link.coords.shape == (n, 2)
    # UMAP separates the two prototypes: a straight cut between the cluster means splits them
    left = link.cols < 10
    a, b = link.coords[left].mean(0), link.coords[~left].mean(0)
    side = (link.coords - (a + b) / 2) @ (a - b) > 0
    assert (side == left).all()
    # brushing = the scatter's `selected` changes (what bqplot's BrushSelector does)
    chosen = np.flatnonzero(left)[:25]
    link.scatter.selected = [int(i) for i in chosen]
    mask = get_layer(link.map, "selection")
    assert mask is not None and link.error is None
    expected = np.zeros((16, 20), np.float32)
    expected[link.rows[chosen], link.cols[chosen]] = 1
    np.testing.assert_array_equal(link.selection_mask().values, expected)
    # a map click on cell (9, 15) selects exactly that cell's point in the scatter
    click(link, *cell_lonlat(emb, 9, 15))
    index = int(np.flatnonzero((link.rows == 9) & (link.cols == 15))[0])
    assert list(link.scatter.selected) == [index]
    assert list(link.ring.x) == [link.coords[index, 0]]
    # an empty brush is a message, and the highlight disappears
    link.scatter.selected = []
    assert _is_error(link, "selection is empty") and get_layer(link.map, "selection") is None
    click(link, *OUTSIDE)
    assert _is_error(link, "outside the data")


def test_umap_box_selection_matches_coordinates(emb):
    link = UmapLink(emb, method="pca", sample=100, seed=1)
    assert link.coords.shape == (100, 2)
    x0, x1 = np.percentile(link.coords[:, 0], [10, 60])
    y0, y1 = np.percentile(link.coords[:, 1], [0, 100])
    link.select_box((x1, x0), (y0, y1))
    inside = np.flatnonzero((link.coords[:, 0] >= x0) & (link.coords[:, 0] <= x1))
    np.testing.assert_array_equal(link.selected, inside)
    assert int(link.selection_mask().values.sum()) == len(inside)
    # a cell that is not in the 100-point sample
    missing = next((r, c) for r in range(16) for c in range(20)
                   if not ((link.rows == r) & (link.cols == c)).any())
    click(link, *cell_lonlat(emb, *missing))
    assert _is_error(link, "no point in the scatter")
