"""SimilarityExplorer and LabelTool with a VectorIndex over two embedding stores (two areas, two
dates): a click on store A's map finds positions of store B; checked against a float64 numpy
cosine over both stores. Without an index the apps behave as before; a mismatched index is refused."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from viz_helpers import ORIGIN, RES, cell_lonlat, click, make_embedding

from terrafm.analysis import VectorIndex, to_zarr
from terrafm.viz import LabelTool, SimilarityExplorer

DEPTH = 8
JUNE, SEPTEMBER = np.datetime64("2021-06-01", "ns"), np.datetime64("2021-09-01", "ns")


def _prototypes(ny, nx, seed, split):
    """Columns < split ~ e0, the rest ~ e1, plus noise (so no two cosines tie)."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(DEPTH, dtype=np.float32)[:2]
    values = np.where((np.arange(nx) < split)[None, :, None], a, b) + 0.2 * rng.normal(size=(ny, nx, DEPTH))
    return values.astype(np.float32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Store A (June, 10 x 12 cells, a NaN cell) and store B (September, 8 x 9 cells, 3.2 km east),
    with one index over both."""
    folder = tmp_path_factory.mktemp("stores")
    a_values = _prototypes(10, 12, seed=1, split=6)
    a_values[0, 0] = np.nan
    b_values = _prototypes(8, 9, seed=2, split=3)
    emb_a = make_embedding(a_values[None], times=np.array([JUNE]))
    emb_b = make_embedding(b_values[None], origin=(ORIGIN[0] + 20 * RES, ORIGIN[1]), times=np.array([SEPTEMBER]))
    path_a, path_b = to_zarr(emb_a, folder / "june.zarr"), to_zarr(emb_b, folder / "september.zarr")
    index = VectorIndex.build([path_a, path_b], progress=False)
    return {"a": emb_a, "b": emb_b, "path_a": path_a, "path_b": path_b, "index": index}


def _name(index, path) -> str:
    """How the index's results name the store at ``path`` (its entry in ``index.stores``)."""
    [name] = [s for s in index.stores if Path(s).resolve() == Path(path).resolve()]
    return str(name)


def _all_vectors(stores):
    """(store name, row, col, time, lon, lat, float64 vector) of every valid cell of both stores."""
    rows = []
    index = stores["index"]
    for emb, path in ((stores["a"], stores["path_a"]), (stores["b"], stores["path_b"])):
        values = emb.isel(time=0).values.astype(np.float64)
        for r in range(values.shape[0]):
            for c in range(values.shape[1]):
                if np.isfinite(values[r, c]).all():
                    rows.append((_name(index, path), r, c, emb["time"].values[0], *cell_lonlat(emb, r, c),
                                 values[r, c]))
    return rows


def _cosine(vectors, query):
    return vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))


# ----- SimilarityExplorer -------------------------------------------------------------------------

def test_click_on_store_a_finds_positions_of_both_stores(stores):
    emb_a, emb_b, index = stores["a"], stores["b"], stores["index"]
    name_a, name_b = _name(index, stores["path_a"]), _name(index, stores["path_b"])
    app = SimilarityExplorer(emb_a, k=12, index=index)
    assert app.error is None, app.message.value
    row, col = 4, 2
    click(app, *cell_lonlat(emb_a, row, col))
    assert app.error is None, app.message.value
    # independent reference: float64 cosine of the clicked vector to every valid cell of A and B
    cells = _all_vectors(stores)
    query = emb_a.isel(time=0).values[row, col].astype(np.float64)
    expected = _cosine(np.stack([c[-1] for c in cells]), query)
    order = np.argsort(-expected)[:12]
    hits = app.results
    assert list(zip(hits["store"], hits["row"], hits["col"])) == [cells[i][:3] for i in order]
    np.testing.assert_allclose(hits["score"], expected[order], rtol=1e-5, atol=1e-6)
    assert set(hits["store"]) == {name_a, name_b}
    for _, hit in hits.iterrows():  # each hit's date and place are those of its store's cell
        emb = emb_a if hit["store"] == name_a else emb_b
        assert pd.Timestamp(hit["time"]) == pd.Timestamp(emb["time"].values[0])
        assert (hit["lon"], hit["lat"]) == pytest.approx(cell_lonlat(emb, hit["row"], hit["col"]), abs=1e-7)
        assert (hit.geometry.x, hit.geometry.y) == pytest.approx((hit["lon"], hit["lat"]), abs=1e-9)
    # markers: the hits (popups with store, date, score) + the query
    markers = app.markers.layers
    assert len(markers) == 12 + 1 and markers[-1].name == "query"
    first = hits.iloc[0]
    assert (first["store"], first["row"], first["col"]) == (name_a, row, col)  # the clicked cell itself
    assert markers[0].name == f"june.zarr, 2021-06-01, score {expected[order[0]]:.3f}"
    b_first = hits[hits["store"] == name_b].index[0]
    assert markers[b_first].name.startswith("september.zarr, 2021-09-01, score ")
    assert markers[b_first].popup.value == markers[b_first].name
    assert markers[b_first].location == pytest.approx((hits["lat"][b_first], hits["lon"][b_first]))
    assert "2 stores" in app.message.value
    # the map's layer and matches are still those of emb (store A) alone
    a_values = emb_a.isel(time=0).values.astype(np.float64)
    flat = _cosine(np.nan_to_num(a_values.reshape(-1, DEPTH)), query).reshape(a_values.shape[:2])
    flat[0, 0] = np.nan
    np.testing.assert_allclose(app.similarity.values, flat, rtol=1e-5, atol=1e-6)
    assert len(app.matches) == 12
    # the k slider searches again
    app.k_slider.value = 3
    assert list(zip(app.results["store"], app.results["row"], app.results["col"])) == [cells[i][:3] for i in order[:3]]
    assert len(app.markers.layers) == 3 + 1


def test_without_index_nothing_changes_and_set_index_repeats_the_query(stores):
    emb_a, index = stores["a"], stores["index"]
    app = SimilarityExplorer(emb_a, k=5)
    click(app, *cell_lonlat(emb_a, 6, 9))
    assert app.error is None and app.results is None and app.index is None
    values = emb_a.isel(time=0).values.astype(np.float64)
    expected = _cosine(np.nan_to_num(values.reshape(-1, DEPTH)), values[6, 9])
    expected[0] = -np.inf  # the NaN cell
    best = np.argsort(-expected)[:5]
    assert list(zip(app.matches["row"], app.matches["col"])) == list(zip(*np.unravel_index(best, values.shape[:2])))
    assert [m.name for m in app.markers.layers[:-1]] == [f"similarity {s:.3f}" for s in app.matches["similarity"]]
    # attach the index: the same query now runs across both stores; detach: back to emb alone
    app.set_index(index)
    assert app.error is None and len(app.results) == 5 and app.results["score"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    app.set_index(None)
    assert app.results is None and app.markers.layers[0].name.startswith("similarity ")


def test_a_mismatched_index_is_refused_at_construction(stores, tmp_path):
    emb_a, index = stores["a"], stores["index"]
    narrow = make_embedding(np.random.default_rng(3).normal(size=(1, 4, 5, 4)).astype(np.float32),
                            times=np.array([JUNE]))
    narrow_index = VectorIndex.build([to_zarr(narrow, tmp_path / "narrow.zarr")], progress=False)
    for cls in (SimilarityExplorer, LabelTool):
        with pytest.raises(ValueError, match="index holds 4-dim vectors but emb has 8-dim"):
            cls(emb_a, index=narrow_index)
        with pytest.raises(TypeError, match="VectorIndex"):
            cls(emb_a, index=emb_a)
    with pytest.raises(ValueError, match="metric='cosine'"):
        SimilarityExplorer(emb_a, metric="euclidean", index=index)
    with pytest.raises(ValueError, match="method='knn'"):
        LabelTool(emb_a, method="linear", index=index)
    # a 4-dim emb with that index works (the check is the dimension, not the index)
    assert SimilarityExplorer(narrow, index=narrow_index).error is None


# ----- LabelTool ---------------------------------------------------------------------------------

def test_label_tool_suggests_from_every_store_and_learns_from_them(stores, tmp_path):
    import geopandas as gpd

    emb_a, emb_b, index = stores["a"], stores["b"], stores["index"]
    name_b = _name(index, stores["path_b"])
    tool = LabelTool(emb_a, classes=["left", "right"], index=index, k=3)
    click(tool, *cell_lonlat(emb_a, 2, 1))
    tool.class_picker.value = "right"
    click(tool, *cell_lonlat(emb_a, 7, 9))
    assert tool.error is None and tool.classifier is not None  # two map labels: fit_classifier as without index
    assert tool.labels["store"].isna().all()
    tool.class_picker.value = "left"
    suggestions = tool.suggest(k=6)
    assert tool.error is None, tool.message.value
    # reference: query = mean of the unit positives - mean of the unit negatives, cosine to every valid
    # cell of both stores, minus the two labelled cells of A (June)
    a_values = emb_a.isel(time=0).values.astype(np.float64)
    query = a_values[2, 1] / np.linalg.norm(a_values[2, 1]) - a_values[7, 9] / np.linalg.norm(a_values[7, 9])
    cells = [c for c in _all_vectors(stores) if c[:3] not in {(_name(index, stores["path_a"]), 2, 1),
                                                              (_name(index, stores["path_a"]), 7, 9)}]
    expected = _cosine(np.stack([c[-1] for c in cells]), query)
    order = np.argsort(-expected)[:6]
    assert list(zip(suggestions["store"], suggestions["row"], suggestions["col"])) == [cells[i][:3] for i in order]
    np.testing.assert_allclose(suggestions["score"], expected[order], rtol=1e-5, atol=1e-6)
    assert name_b in set(suggestions["store"])
    assert len(tool.suggestion_markers.layers) == 6
    # accepting labels them "left" with their origin; the classifier now votes among vectors of both stores
    tool.accept()
    assert tool.error is None, tool.message.value
    taken = tool.labels[tool.labels["store"].notna()]
    assert len(tool.labels) == 8 and list(taken["class"]) == ["left"] * 6
    b_rows = taken[taken["store"] == name_b]
    assert len(b_rows) > 0
    b_values = emb_b.isel(time=0).values
    for _, label in b_rows.iterrows():
        assert pd.Timestamp(label["time"]) == pd.Timestamp(SEPTEMBER)
        vector = b_values[int(label["row"]), int(label["col"])]
        assert (tool.classifier.train_vectors == vector).all(1).any()  # read from store B, bit for bit
    assert len(tool.classifier.train_vectors) == 8 and "the index stores" in tool.message.value
    classes = tool.prediction["class"].values
    valid = np.isfinite(a_values).all(-1)
    truth = np.where(np.arange(12) < 6, 0, 1)[None, :].repeat(10, 0)
    np.testing.assert_array_equal(classes[valid], truth[valid])
    assert np.isnan(classes[0, 0])
    # suggesting again skips what is labelled now; export keeps the origin of each label
    again = tool.suggest(k=4)
    accepted = set(zip(taken["store"], taken["row"], taken["col"]))
    assert not accepted & set(zip(again["store"], again["row"], again["col"]))
    back = gpd.read_parquet(tool.export(tmp_path / "labels.parquet"))
    assert list(back["store"].iloc[2:]) == list(taken["store"]) and back["store"].iloc[:2].isna().all()
    tool.undo()
    assert len(tool.labels) == 7 and tool.error is None


def test_label_tool_without_index_has_no_suggestions(stores):
    tool = LabelTool(stores["a"], classes=["left", "right"])
    assert list(tool.labels.columns) == ["class", "geometry"]
    tool.suggest()
    assert "terrafm-error" in tool.message.value and "index=" in tool.message.value
    indexed = LabelTool(stores["a"], classes=["left", "right"], index=stores["index"])
    indexed.suggest()
    assert "no label of class 'left'" in html.unescape(indexed.message.value)
    indexed.accept()
    assert "suggest() first" in indexed.message.value
