"""add_embedding_layer / render_overlay: georeferencing, resampling, colours, legends, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from pyproj import Transformer
from viz_helpers import decode_png, make_embedding, pixel_lonlat, two_region_embedding

import terrafm
from terrafm.viz import add_embedding_layer, get_layer, new_map, render_overlay
from terrafm.viz.render import palette


@pytest.fixture(scope="module")
def emb():
    return two_region_embedding()


@pytest.fixture(scope="module")
def viz_map():
    return new_map(toolbar=False)


def _map2d(emb, values, name="score"):
    template = emb.isel(embedding=0, drop=True).drop_vars("valid")
    return template.copy(data=np.asarray(values, dtype=np.float32)).rename(name)


def test_one_cell_lands_where_it_is_on_the_ground(emb):
    """A single labelled 160 m cell: every opaque overlay pixel, placed the way Leaflet places it
    (linear in Web Mercator between the bounds), falls inside that cell's UTM square."""
    row, col = 5, 13
    values = np.full((emb.sizes["y"], emb.sizes["x"]), np.nan)
    values[row, col] = 1
    overlay = render_overlay(_map2d(emb, values, "class"), kind="categorical")
    opaque_r, opaque_c = np.nonzero(overlay.rgba[..., 3] > 0)
    assert len(opaque_r) > 0
    lon, lat = pixel_lonlat(overlay.bounds, overlay.rgba.shape[:2], opaque_r, opaque_c)
    x, y = Transformer.from_crs("EPSG:4326", emb.rio.crs, always_xy=True).transform(lon, lat)
    x0 = 404_000.0 + 160 * col
    y0 = 5_342_400.0 - 160 * row
    # pixel centres inside the cell, allowing one overlay pixel for the resampling edge
    h, w = overlay.rgba.shape[:2]
    (south, west), (north, east) = overlay.bounds
    tol = 2 * 160 * max(emb.sizes["x"] / w, emb.sizes["y"] / h) + 1.0
    assert np.all((x > x0 - tol) & (x < x0 + 160 + tol)), (x.min() - x0, x.max() - x0)
    assert np.all((y < y0 + tol) & (y > y0 - 160 - tol)), (y.min() - y0, y.max() - y0)
    # and it covers the cell's area: opaque pixel count ~ cell area / pixel area
    centre = pixel_lonlat(overlay.bounds, (h, w), [h // 2], [w // 2])
    cx, cy = Transformer.from_crs("EPSG:4326", emb.rio.crs, always_xy=True).transform(*centre)
    right = pixel_lonlat(overlay.bounds, (h, w), [h // 2], [w // 2 + 1])
    rx, ry = Transformer.from_crs("EPSG:4326", emb.rio.crs, always_xy=True).transform(*right)
    pixel_size = np.hypot(rx[0] - cx[0], ry[0] - cy[0])
    assert len(opaque_r) == pytest.approx(160 * 160 / pixel_size**2, rel=0.25)


def test_bounds_are_the_footprint_in_lonlat(emb):
    overlay = render_overlay(terrafm.to_rgb(emb))
    left, bottom, right, top = emb.rio.bounds()
    west, south, east, north = Transformer.from_crs(emb.rio.crs, "EPSG:4326", always_xy=True).transform_bounds(
        left, bottom, right, top, densify_pts=50)
    (s, w), (n, e) = overlay.bounds
    # the Mercator warp may add at most a couple of output pixels around the rotated UTM square
    px_lon = (e - w) / overlay.rgba.shape[1]
    px_lat = (n - s) / overlay.rgba.shape[0]
    assert w == pytest.approx(west, abs=3 * px_lon) and e == pytest.approx(east, abs=3 * px_lon)
    assert s == pytest.approx(south, abs=3 * px_lat) and n == pytest.approx(north, abs=3 * px_lat)


def test_rgb_pixels_carry_the_rgb_values(emb):
    rgb = terrafm.to_rgb(emb)
    overlay = render_overlay(rgb)
    h, w = overlay.rgba.shape[:2]
    # pick the overlay pixel at the centre of cell (8, 3) and compare with that cell's RGB
    lon, lat = Transformer.from_crs(emb.rio.crs, "EPSG:4326", always_xy=True).transform(
        float(emb.x[3]), float(emb.y[8]))
    (south, west), (north, east) = overlay.bounds
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    mx, my = to_merc.transform(lon, lat)
    left, bottom = to_merc.transform(west, south)
    right, top = to_merc.transform(east, north)
    col = int((mx - left) / (right - left) * w)
    r = int((top - my) / (top - bottom) * h)
    expected = np.round(rgb.isel(y=8, x=3).values * 255)
    np.testing.assert_array_equal(overlay.rgba[r, col, :3], expected)
    assert overlay.rgba[r, col, 3] == 255


def test_small_grids_are_upsampled_with_sharp_cells(emb):
    labels = _map2d(emb, (np.arange(emb.sizes["x"])[None, :] // 5).repeat(emb.sizes["y"], 0), "class")
    overlay = render_overlay(labels, kind="categorical")
    assert max(overlay.rgba.shape[:2]) >= 512
    colours = {tuple(c) for c in overlay.rgba[overlay.rgba[..., 3] > 0][:, :3]}
    expected = {tuple(int(round(v * 255)) for v in __import__("matplotlib").colors.to_rgb(c)) for c in palette(4)}
    assert colours == expected  # nearest: no blended colours at cell edges


def test_large_areas_are_downsampled_not_a_giant_png():
    """3000 x 4000 cells (480 x 640 km): the overlay keeps <= 1024 px a side and averages values."""
    ny, nx = 3000, 4000
    values = np.zeros((ny, nx), np.float32)
    values[:, nx // 2 :] = 1.0
    template = make_embedding(np.zeros((ny, nx, 1), np.float32)).isel(embedding=0, drop=True).drop_vars("valid")
    big = template.copy(data=values).rename("score")
    overlay = render_overlay(big, kind="continuous", cmap="gray", vmin=0, vmax=1)
    assert max(overlay.rgba.shape[:2]) == 1024
    assert len(overlay.png()) < 2_000_000
    row = overlay.rgba[overlay.rgba.shape[0] // 2]
    opaque = row[row[:, 3] == 255, 0].astype(int)
    # left half black, right half white, one blended column at most in between
    assert opaque[: len(opaque) // 3].max() == 0 and opaque[-len(opaque) // 3 :].min() == 255
    assert ((opaque > 0) & (opaque < 255)).sum() <= 2


def test_layer_on_map_with_opacity_legend_and_in_place_update(emb, viz_map):
    sim = terrafm.similarity(emb, emb.isel(y=0, x=0).values)
    layer = add_embedding_layer(viz_map, sim, "similarity", cmap="magma", vmin=-1, vmax=1, opacity=0.4)
    assert layer.image in viz_map.layers and layer.image.opacity == 0.4
    assert [tuple(corner) for corner in layer.image.bounds] == list(layer.overlay.bounds)
    pixels = decode_png(layer.image.url)
    np.testing.assert_array_equal(pixels, layer.overlay.rgba)
    html = layer.legend.widget.value
    assert "terrafm-colorbar" in html and ">-1<" in html and ">1<" in html
    assert layer.legend in viz_map.controls
    # same name again: same ImageOverlay object, new picture, no duplicate layers or legends
    sim2 = terrafm.similarity(emb, emb.isel(y=0, x=-1).values)
    n_layers, n_controls = len(viz_map.layers), len(viz_map.controls)
    layer2 = add_embedding_layer(viz_map, sim2, "similarity", cmap="magma", vmin=-1, vmax=1, opacity=0.9)
    assert layer2.image is layer.image and layer2.image.url != layer.overlay.data_url()
    assert (len(viz_map.layers), len(viz_map.controls)) == (n_layers, n_controls)
    assert get_layer(viz_map, "similarity").image.opacity == 0.9


def test_class_map_and_change_dataset_get_legends(emb, viz_map):
    clf = terrafm.fit_classifier(emb, _labels(emb), column="class", k=3)     # 4 labels: k may not exceed them
    pred = clf.predict(emb)
    layer = add_embedding_layer(viz_map, pred, "classes")
    assert layer.overlay.kind == "categorical"
    assert [name for name, _ in layer.overlay.legend["entries"]] == ["field", "water"]
    assert "field" in layer.legend.widget.value
    emb2 = xr.concat([emb, emb], "time")
    emb2 = emb2.assign_coords(time=np.array(["2021-06-01", "2021-07-01"], dtype="datetime64[ns]"))
    shifted = emb2.values.copy()
    shifted[1, :4] = shifted[1, :4][..., ::-1]
    emb2 = emb2.copy(data=shifted).rio.write_crs(emb.rio.crs)
    ds = terrafm.change(emb2.isel(time=0), emb2.isel(time=1), threshold=0.5)
    layer = add_embedding_layer(viz_map, ds, "changed")
    assert layer.overlay.kind == "mask"
    opaque_fraction = (layer.overlay.rgba[..., 3] > 0).mean()
    assert 0.15 < opaque_fraction < 0.35  # top 4 of 16 rows changed (plus the Mercator margin)


def _labels(emb):
    import geopandas as gpd
    from shapely.geometry import Point

    xs, ys = emb["x"].values, emb["y"].values
    pts = [Point(xs[1], ys[2]), Point(xs[3], ys[9]), Point(xs[-2], ys[4]), Point(xs[-4], ys[12])]
    return gpd.GeoDataFrame({"class": ["water", "water", "field", "field"]}, geometry=pts, crs=emb.rio.crs)


def test_bad_input_is_explained(emb, viz_map):
    no_crs = emb.drop_vars("spatial_ref")
    with pytest.raises(ValueError, match="no CRS.*write_crs"):
        add_embedding_layer(viz_map, no_crs, "x")
    dn = emb.isel(embedding=slice(0, 3)).rename(embedding="band") * 5000
    with pytest.raises(ValueError, match="does not look like an RGB"):
        add_embedding_layer(viz_map, dn, "x", kind="rgb")
    two_band = emb.isel(embedding=slice(0, 2)).rename(embedding="band")
    with pytest.raises(ValueError, match="3 bands"):
        add_embedding_layer(viz_map, two_band, "x", kind="rgb")
    with pytest.raises(ValueError, match="opacity"):
        add_embedding_layer(viz_map, terrafm.to_rgb(emb), "x", opacity=3)
    assert get_layer(viz_map, "x") is None
