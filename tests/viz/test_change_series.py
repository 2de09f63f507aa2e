"""ChangeExplorer over a series: time slider over every date, first-persistent-change layer, and the
distance-over-time plot of a clicked position with its change date marked (checked against a numpy
recomputation of the distance to the baseline). Also on the real test scene's known change
(tests/support/scene.py), embedded as notebook 03 does offline."""

from __future__ import annotations

import numpy as np
import pytest

from viz_helpers import cell_lonlat, click, make_embedding, two_region_embedding

from terrafm.viz import ChangeExplorer, get_layer

K = 2  # first date of the change


@pytest.fixture(scope="module")
def series():
    """Five dates; from date K the top-right 6x6 block takes the left half's prototype (a lasting change);
    date 3 is cloudy on the bottom-left quarter."""
    base = two_region_embedding(ny=16, nx=20, depth=8).values
    rng = np.random.default_rng(1)
    dates = []
    for t in range(5):
        values = base + 0.02 * rng.normal(size=base.shape).astype(np.float32)
        if t >= K:
            values[:6, 14:] = base[:6, :6]
        if t == 3:
            values[8:, :10] = np.nan
        dates.append(values)
    return make_embedding(np.stack(dates))


def _baseline_distance(values: np.ndarray, row: int, col: int) -> np.ndarray:
    vectors = values[:, row, col].astype(np.float64)
    reference = vectors[0] / np.linalg.norm(vectors[0])
    return np.array([1 - v @ reference / np.linalg.norm(v) if np.isfinite(v).all() else np.nan for v in vectors])


def test_series_mode_has_a_slider_over_every_date_and_the_change_layer(series):
    app = ChangeExplorer(series)
    assert app.error is None, app.message.value
    assert [label for label, _ in app.time_slider.options] == app.dates and len(app.dates) == 5
    assert app.step == 4 and app.time_slider.value == 4
    first = app.series["first_change_index"].values
    truth = np.full((16, 20), -1)
    truth[:6, 14:] = K
    np.testing.assert_array_equal(first, truth)
    assert get_layer(app.map, "first persistent change") is not None
    app.time_slider.value = 1                       # what dragging the slider does
    assert app.step == 1
    from terrafm.viz.render import render_overlay

    def drawn(step):  # the overlay of date ``step``'s distance to the baseline, as the app draws it
        distance = app.series["distance"].isel(time=step)
        top = float(np.nanpercentile(distance.values, 99))
        return render_overlay(distance, kind="continuous", cmap="magma", vmin=0.0, vmax=top).rgba

    shown = get_layer(app.map, "distance to baseline").overlay.rgba
    np.testing.assert_array_equal(shown, drawn(1))
    assert not np.array_equal(shown, drawn(4))


def test_click_draws_the_trajectory_with_the_change_date(series):
    app = ChangeExplorer(series)
    click(app, *cell_lonlat(series, 2, 16))              # inside the changed block
    assert app.error is None, app.message.value
    expected = _baseline_distance(series.values, 2, 16)
    np.testing.assert_allclose(app.trajectory["baseline_distance"].values, expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(app.trajectory_line.y, dtype=float), expected, atol=1e-6)
    assert app.change_date == series["time"].values[K]
    assert app.trajectory_change.visible
    assert np.asarray(app.trajectory_change.x).astype("datetime64[D]")[0] == series["time"].values[K].astype(
        "datetime64[D]")
    assert "First persistent change: " + str(series["time"].values[K])[:10] in app.message.value

    click(app, *cell_lonlat(series, 12, 3))              # unchanged, cloudy on date 3
    assert app.error is None, app.message.value
    assert np.isnat(app.change_date) and not app.trajectory_change.visible
    assert np.isnan(app.trajectory["baseline_distance"].values[3])
    assert "No persistent change" in app.message.value


def test_two_dates_keep_the_pair_explorer_only(series):
    app = ChangeExplorer(series.isel(time=[0, 4]))
    assert app.error is None and app.series is None and not hasattr(app, "time_slider")
    app.set_step(0)
    assert "at least three dates" in app.error


# ---------------------------------------------------------------------- the test scene's known change
@pytest.fixture(scope="module")
def scene_series(stac_api_url, sentinel_scene):
    """Notebook 03's offline series, embedded here: the 2021 S2 dates of the test scene at least half
    clear over the offline BBOX (notebooks/offline.py: a 2.5 km square, a quarter of ``aoi_bbox``, in
    the middle of the scene), untrained terrafm_tiny (160 m cells)."""
    import terrafm

    west, south, east, north = sentinel_scene.aoi_bbox
    cx, cy, hx, hy = (west + east) / 2, (south + north) / 2, (east - west) / 4, (north - south) / 4
    bbox = (cx - hx, cy - hy, cx + hx, cy + hy)
    items = terrafm.stac.search(bbox, "2021-06-04/2021-07-16", collections=("sentinel-2-l2a",), url=stac_api_url,
                                max_cloud=60)
    ds = terrafm.stac.load(items, bbox)
    clear = ds.mask_s2_l2a.mean(("y", "x")).compute()
    ds = ds.sel(time=clear.time[clear > 0.5])
    return terrafm.embed(ds, model="terrafm_tiny", weights="random", modalities=["s2_l2a"], device="cpu",
                         progress=False)


def _cells(emb, bounds):
    """(y, x) masks of the cells wholly inside ``bounds`` (scene CRS) and of those touching it."""
    x, y = emb["x"].values, emb["y"].values
    hx, hy = abs(x[1] - x[0]) / 2, abs(y[1] - y[0]) / 2
    left, bottom, right, top = bounds
    inside = (y[:, None] - hy >= bottom) & (y[:, None] + hy <= top) & (x[None] - hx >= left) & (x[None] + hx <= right)
    touching = (y[:, None] + hy > bottom) & (y[:, None] - hy < top) & (x[None] + hx > left) & (x[None] - hx < right)
    return inside, touching


def test_the_scene_change_is_found_on_its_date_and_only_there(scene_series, sentinel_scene):
    from pyproj import Transformer

    scene, emb = sentinel_scene, scene_series
    days = [str(t)[:10] for t in emb["time"].values]
    assert days == ["2021-06-05", "2021-06-15", "2021-07-15"]  # 06-25 and 07-05 are less than half clear
    k = days.index(str(scene.change_date.date()))
    assert k == scene.change_step
    app = ChangeExplorer(emb, baseline=1, min_steps=2)
    assert app.error is None, app.message.value
    first = app.series["first_change_index"].values
    inside, touching = _cells(emb, scene.change_bounds)
    assert inside.sum() >= 12
    assert (first[inside] == k).all(), first
    assert np.isin(first[touching], (-1, k)).all(), first
    unchanged = float((first[~touching] == -1).mean())
    assert unchanged >= 0.9, (unchanged, first)

    # a click in the middle of the block: the change date, and the trajectory recomputed in numpy
    left, bottom, right, top = scene.change_bounds
    lon, lat = Transformer.from_crs(scene.epsg, 4326, always_xy=True).transform((left + right) / 2,
                                                                               (bottom + top) / 2)
    click(app, lon, lat)
    assert app.error is None, app.message.value
    row, col = app.clicked
    assert inside[row, col]
    expected = _baseline_distance(emb.values, row, col)
    np.testing.assert_allclose(app.trajectory["baseline_distance"].values, expected, atol=1e-6)
    threshold = float(app.series.attrs["threshold"])
    assert (expected[:k] <= threshold).all() and (expected[k:] > threshold).all(), (expected, threshold)
    assert app.change_date == np.datetime64(scene.change_date, "ns") and app.trajectory_change.visible
    assert f"First persistent change: {scene.change_date.date()}." in app.message.value

    # a click 1 km west of the block (same rows): unchanged
    click(app, *Transformer.from_crs(scene.epsg, 4326, always_xy=True).transform(left - 1000, (bottom + top) / 2))
    assert app.error is None, app.message.value
    assert np.isnat(app.change_date) and not app.trajectory_change.visible
    assert "No persistent change" in app.message.value
