import geopandas as gpd
import numpy as np
import pytest
import xarray as xr
from shapely.geometry import box

from analysis_helpers import assert_georef, make_embedding
from terrafm.analysis import change, cosine_distance, otsu_threshold


@pytest.fixture(scope="module")
def two_dates():
    rng = np.random.default_rng(5)
    before = rng.normal(size=(24, 24, 32)) + 3.0  # shared offset: unchanged cells stay very similar
    after = before + rng.normal(scale=0.1, size=before.shape)
    after[4:10, 12:20] = rng.normal(size=(6, 8, 32)) - 3.0  # a new development: 48 cells change
    after[20, 20] = np.nan  # a cloud on the second date
    return make_embedding(before), make_embedding(after)


def test_known_region_is_detected(two_dates):
    a, b = two_dates
    ds = change(a, b)
    truth = np.zeros((24, 24), bool)
    truth[4:10, 12:20] = True
    changed = ds["changed"].values
    assert np.isnan(changed[20, 20]) and np.isnan(ds["distance"].values[20, 20])
    ok = np.isfinite(changed)
    np.testing.assert_array_equal(changed[ok].astype(bool), truth[ok])
    # reference distance in float64
    av, bv = a.values.astype(np.float64), b.values.astype(np.float64)
    ref = 1 - (av * bv).sum(-1) / np.linalg.norm(av, axis=-1) / np.linalg.norm(bv, axis=-1)
    np.testing.assert_allclose(ds["distance"].values, ref, atol=1e-6, equal_nan=True)
    assert 0 < ds.attrs["threshold"] < ref[4:10, 12:20].min()
    assert_georef(ds["changed"], a)
    assert ds.rio.crs == a.rio.crs


def test_percentile_threshold_and_polygon_summary(two_dates):
    a, b = two_dates
    ds = change(a, b, percentile=90)
    dist = ds["distance"].values
    assert ds.attrs["threshold"] == pytest.approx(np.nanpercentile(dist, 90))
    assert np.nanmean(ds["changed"].values) == pytest.approx(0.1, abs=0.01)
    # polygons given in lon/lat: reprojected to the embedding CRS
    x, y = a.x.values, a.y.values
    zones = gpd.GeoDataFrame(
        {"name": ["site", "field"]},
        geometry=[box(x[12] - 80, y[9] - 80, x[19] + 80, y[4] + 80), box(x[0] - 80, y[23] - 80, x[5] + 80, y[18] + 80)],
        crs=a.rio.crs,
    ).to_crs(4326)
    _, summary = change(a, b, polygons=zones)
    assert summary.crs == zones.crs
    site, field = summary.iloc[0], summary.iloc[1]
    assert site.changed_fraction == 1.0 and field.changed_fraction == 0.0
    assert site.n_valid >= 40 and field.n_valid >= 30  # small edge loss from reprojection
    assert site.mean_distance > 0.5 > field.mean_distance


def test_time_series_consecutive(two_dates):
    a, b = two_dates
    series = xr.concat([a, a, b], dim="time").assign_coords(time=np.array(["2020-01-01", "2021-01-01", "2022-01-01"],
                                                                          dtype="datetime64[ns]"))
    series = series.rio.write_crs(a.rio.crs)
    ds = change(series, threshold=0.3)
    assert ds.sizes["time"] == 2
    assert np.nansum(ds["changed"].isel(time=0).values) == 0
    assert np.nansum(ds["changed"].isel(time=1).values) == 48
    assert str(ds.time.values[1])[:4] == "2022"


def test_otsu_on_two_modes():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0.1, 0.02, 500), rng.normal(0.8, 0.05, 100)]
    assert 0.2 < otsu_threshold(values) < 0.65


def test_bad_inputs(two_dates):
    a, b = two_dates
    with pytest.raises(ValueError, match="reproject_match"):
        change(a, b.rio.write_crs("EPSG:32632"))
    with pytest.raises(ValueError, match="different grids"):
        change(a, make_embedding(b.values, origin=(500_000.0, 5_342_400.0)))
    with pytest.raises(ValueError, match="different grids"):
        change(a, b.isel(x=slice(0, 20)))
    with pytest.raises(ValueError, match="same model"):
        change(a, b.isel(embedding=slice(0, 8)))
    nan = make_embedding(np.full(b.shape, np.nan))
    with pytest.raises(ValueError, match="no position is valid"):
        change(a, nan)
    with pytest.raises(ValueError, match="time"):
        change(a)
    assert np.isnan(cosine_distance(a, nan).values).all()
