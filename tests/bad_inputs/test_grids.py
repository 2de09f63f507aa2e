"""Class 4 of issue 15: grids, checked before any compute.

TerraFM reads square 10 m pixels on a projected grid. ``terrafm.embed`` (through
``terrafm.validate.check_grid``) refuses a geographic CRS, a zero step, non-square pixels and a
ground pixel size more than 5 % off 10 m (measured on the ground: CRS units and the projection's
scale factor), warns between 1 % and 5 %, and flips rows stored south-up (or columns east to
west) exactly. ``change()`` requires grids equal to 1 % of a cell in CRS units.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embed"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

from analysis_helpers import make_embedding  # noqa: E402
from embed_helpers import make_dataset  # noqa: E402

from terrafm.analysis import change, cosine_distance  # noqa: E402
from terrafm.validate import InputWarning  # noqa: E402
from bad_input_helpers import SEE, run  # noqa: E402



def on_grid(crs="EPSG:32618", x0=500000.0, y0=4100000.0, xres=10.0, yres=10.0, height=64, width=64, times=1):
    """make_dataset's values on another grid: pixel centres from (x0, y0) stepping xres, -yres."""
    ds = make_dataset(height, width, times=times).drop_vars("spatial_ref")
    ds = ds.assign_coords(x=x0 + xres * (np.arange(width) + 0.5), y=y0 - yres * (np.arange(height) + 0.5))
    ds["x"].attrs, ds["y"].attrs = {}, {}
    return ds.rio.write_crs(crs)


@pytest.fixture(scope="module")
def embedded_on_grid(model):
    """``run(on_grid(**kw), model)``, computed once per keyword set: the reference several tests
    compare with (read only)."""
    return functools.cache(lambda **kw: run(on_grid(**kw), model))


def utm_epsg(lon, lat):
    """The UTM zone by its definition (6 degree zones from 180 W), independent of odc-geo."""
    zone = int((lon + 180) // 6) + 1
    return f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"


def mercator_y(lat):
    return 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


REFUSED = [
    pytest.param(lambda: on_grid(xres=20, yres=20), r"the pixels are 20 m; TerraFM was trained on 10 m pixels.*"
                 r"ds\.odc\.reproject\('EPSG:32618', resolution=10\)", id="pixel-20m"),
    pytest.param(lambda: on_grid(xres=5, yres=5), r"the pixels are 5 m; .*resolution=10", id="pixel-5m"),
    pytest.param(lambda: on_grid(xres=10, yres=20), r"the pixels are 10 x 20 m \(x by y\).*not square", id="non-square-10x20"),
    pytest.param(lambda: on_grid(xres=20, yres=10), r"the pixels are 20 x 10 m \(x by y\).*not square", id="non-square-20x10"),
    pytest.param(lambda: on_grid("EPSG:4326", 10.0, 50.0, 1e-4, 1e-4),
                 r"geographic CRS \(EPSG:4326, pixels in degrees\).*ds\.odc\.reproject\('%s', resolution=10\)"
                 % utm_epsg(10.0, 50.0), id="geographic-north"),
    pytest.param(lambda: on_grid("EPSG:4326", -58.4, -34.6, 1e-4, 1e-4),
                 r"geographic CRS .*'%s'" % utm_epsg(-58.4, -34.6), id="geographic-south"),
    pytest.param(lambda: on_grid("EPSG:3857", 1113194.9, mercator_y(50.0)),
                 r"the pixels are 6\.4\d* m on the ground \(10 metre of EPSG:3857, scale factor 1\.5\d.*"
                 r"reproject\('%s'" % utm_epsg(10.0, 50.0), id="web-mercator-10-units-at-50N"),
    pytest.param(lambda: on_grid("EPSG:2263", 980000.0, 200000.0, 10.0, 10.0),
                 r"the pixels are 3\.05 m on the ground \(10 US survey foot of EPSG:2263", id="feet-10-units"),
    pytest.param(lambda: on_grid().assign_coords(y=np.repeat(4100000.0 - 10 * np.arange(32), 2)),
                 r"'y' coordinate repeats a value \(a step, i\.e\. a resolution, of 0\).*drop_duplicates",
                 id="resolution-zero"),
]


@pytest.mark.parametrize("make, message", REFUSED)
def test_bad_grids_are_refused_before_any_compute(make, message, counted):
    model, calls = counted
    with pytest.raises(ValueError, match=message) as info:
        run(make(), model)
    assert SEE in str(info.value)
    assert calls == []


@pytest.mark.parametrize("resolution", [0, -10], ids=["stac-resolution-0", "stac-resolution-negative"])
def test_load_refuses_a_resolution_that_is_not_positive(resolution):
    from terrafm import stac

    with pytest.raises(ValueError, match=rf"resolution={resolution} m must be > 0, e.g. 10"):
        stac.load([object()], (11.5, 48.1, 11.6, 48.2), resolution=resolution)


def test_a_pixel_slightly_off_10m_warns_and_embeds(model):
    with pytest.warns(InputWarning, match=r"the pixels are 10\.3 m, \+3\.0% off TerraFM's 10 m: embedding anyway"):
        emb = run(on_grid(xres=10.3, yres=10.3), model)
    np.testing.assert_allclose(np.diff(emb.x.values), 16 * 10.3)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: on_grid(xres=10.05, yres=10.05), id="utm-10.05m"),
    pytest.param(lambda: on_grid("EPSG:2263", 980000.0, 200000.0, 10 / 0.3048006096, 10 / 0.3048006096),
                 id="feet-32.8-units"),
])
def test_grids_of_10m_on_the_ground_embed_like_utm(make, model, embedded_on_grid, recwarn):
    emb, reference = run(make(), model), embedded_on_grid()
    assert not [w for w in recwarn if issubclass(w.category, InputWarning)]
    np.testing.assert_array_equal(emb.values, reference.values)          # same pixels, same vectors


# ------------------------------------------------------------------ orientation: flipped exactly
@pytest.mark.parametrize("height", [64, 72])
@pytest.mark.parametrize("flip", [("y",), ("x",), ("y", "x")], ids=["south-up", "east-to-west", "both"])
def test_flipped_grids_embed_like_north_up(flip, height, model, embedded_on_grid, caplog):
    north_up = on_grid(height=height, width=80, times=2)
    flipped = north_up.isel({d: slice(None, None, -1) for d in flip})
    expected = embedded_on_grid(height=height, width=80, times=2)
    with caplog.at_level("WARNING", logger="terrafm.validate"):
        emb = run(flipped, model)
    assert ("south-up" in caplog.text) == ("y" in flip) and ("east to west" in caplog.text) == ("x" in flip)
    # the embedding of the flipped Dataset is the north-up one (the input flipped back)
    np.testing.assert_array_equal(emb.values, expected.values)
    np.testing.assert_array_equal(emb.valid.values, expected.valid.values)
    np.testing.assert_array_equal(emb.y.values, expected.y.values)
    assert emb.rio.transform(recalc=True) == expected.rio.transform(recalc=True)


def test_south_up_with_a_cached_geotransform_and_a_store(model, embedded_on_grid, tmp_path):
    north_up = on_grid()
    south_up = north_up.rio.write_transform(north_up.rio.transform()).isel(y=slice(None, None, -1))
    emb = run(south_up, model, out=tmp_path / "s.zarr")
    expected = embedded_on_grid()
    np.testing.assert_array_equal(emb.values, expected.values)
    assert emb.y.values[0] > emb.y.values[-1]


# ------------------------------------------------------------------ change(): grids equal to 1 % of a cell
def _pair(dy=0.0, dx=0.0, origin=(404_000.0, 5_342_400.0), res_b=None):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(8, 8, 16)) + 1.0
    later = values + rng.normal(scale=0.5, size=values.shape)
    a = make_embedding(values, origin=origin)
    b = make_embedding(later, origin=(origin[0] + dx, origin[1] + dy))
    if res_b is not None:
        b = b.assign_coords(x=origin[0] + res_b * (np.arange(8) + 0.5), y=origin[1] - res_b * (np.arange(8) + 0.5))
    return a, b


CHANGE_REFUSED = [
    pytest.param(dict(dy=50.0), r"y coordinates differ by up to 50 CRS units \(the tolerance is 1\.6, 1% of a 160 cell\)",
                 id="change-50m-on-a-utm-northing"),
    pytest.param(dict(dy=80.0, origin=(404_000.0, 9_000_000.0)), r"y coordinates differ by up to 80 CRS units",
                 id="change-80m-southern-northing"),
    pytest.param(dict(dx=80.0), r"x coordinates differ by up to 80 CRS units", id="change-half-cell-easting"),
    pytest.param(dict(dx=2.0), r"x coordinates differ by up to 2 CRS units", id="change-2m"),
    pytest.param(dict(res_b=170.0), r"coordinates differ by up to", id="change-other-resolution-same-shape"),
]


@pytest.mark.parametrize("shift, message", CHANGE_REFUSED)
def test_change_requires_the_same_grid(shift, message):
    a, b = _pair(**shift)
    with pytest.raises(ValueError, match=message + r".*reproject_match\(a\)"):
        change(a, b)
    with pytest.raises(ValueError, match=message):
        cosine_distance(a, b)


def test_change_accepts_a_sub_tolerance_offset_with_the_aligned_result():
    a, b = _pair()
    _, b_shifted = _pair(dy=1.0, dx=-0.5)                 # under 1.6 m: float noise of one grid
    aligned, shifted = change(a, b), change(a, b_shifted)
    av, bv = a.values.astype(np.float64), b.values.astype(np.float64)
    reference = 1 - (av * bv).sum(-1) / np.linalg.norm(av, axis=-1) / np.linalg.norm(bv, axis=-1)
    np.testing.assert_allclose(shifted["distance"].values, reference, atol=1e-6)
    np.testing.assert_array_equal(shifted["distance"].values, aligned["distance"].values)
