"""terrafm.stac / terrafm.prepare against the real local stack (pgstac API, COG server, SAS tokens)."""

import datetime as dt
import time

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import from_bounds

import terrafm
from terrafm import prepare, sensors
from terrafm.stac import TerraFMReadError, TerraFMSearchError, load, save, search


@pytest.fixture(scope="module")
def items(stac_api_url, sentinel_scene):
    return search(sentinel_scene.aoi_bbox, f"{sentinel_scene.start}/{sentinel_scene.end}",
                  ("sentinel-2-l2a", "sentinel-1-rtc"), url=stac_api_url)


@pytest.fixture(scope="module")
def loaded(items, sentinel_scene):
    return load(items, sentinel_scene.aoi_bbox, keep_scl=True).compute()


def _direct(scene, entry_path, geobox, factor=1):
    """Direct rasterio read of the same window from the file on disk, upsampled by repetition."""
    with rasterio.open(scene.root / entry_path) as src:
        win = from_bounds(*geobox.boundingbox, transform=src.transform).round_offsets().round_lengths()
        data = src.read(1, window=win)
    if factor > 1:
        data = np.repeat(np.repeat(data, factor, 0), factor, 1)
    return data


def test_grid_crs_bands_and_pixels_equal_direct_reads(loaded, sentinel_scene):
    ds = loaded
    gb = ds.odc.geobox
    assert ds.rio.crs.to_epsg() == 32618 and gb.crs.epsg == 32618
    assert gb.resolution.x == 10 and gb.resolution.y == -10
    assert gb.transform.c % 10 == 0 and gb.transform.f % 10 == 0
    assert min(gb.shape) >= 224
    l2a = sensors.MODALITIES["s2_l2a"]
    assert [v for v in ds.data_vars if v.startswith("s2_l2a_B")] == list(l2a.variables)
    assert not any(v in ds for v in sensors.S2_BANDS + sensors.S1_BANDS)
    assert ds.s2_l2a_B02.attrs["modality"] == "s2_l2a" and ds.s1_vv.attrs["modality"] == "s1"
    assert ds.attrs["terrafm_modalities"] == ["s2_l2a", "s1"]
    s2 = sentinel_scene.manifest["s2"][1]["assets"]
    np.testing.assert_array_equal(ds.s2_l2a_B02.isel(time=1).values, _direct(sentinel_scene, s2["B02"]["path"], gb))
    # 20 m band, 20 m grid offset by whole 10 m pixels: nearest = 2x2 repetition of an aligned window
    with rasterio.open(sentinel_scene.root / s2["B11"]["path"]) as src:
        r0, c0 = src.index(gb.transform.c + 1, gb.transform.f - 1)
        h, w = gb.shape
        big = np.repeat(np.repeat(src.read(1), 2, 0), 2, 1)
        x_off = int(round((gb.transform.c - src.transform.c) / 10))
        y_off = int(round((src.transform.f - gb.transform.f) / 10))
    np.testing.assert_array_equal(ds.s2_l2a_B11.isel(time=1).values, big[y_off:y_off + h, x_off:x_off + w])
    s1 = sentinel_scene.manifest["s1"][0]["assets"]
    np.testing.assert_array_equal(ds.s1_vv.isel(time=0).values, _direct(sentinel_scene, s1["vv"]["path"], gb))


def test_mask_semantics(loaded):
    scl = loaded.s2_l2a_SCL.values
    raw = np.stack([loaded[v].values for v in sensors.MODALITIES["s2_l2a"].variables], axis=1)
    # SCL classes from the reference: no data, saturated, shadow, medium/high cloud, cirrus; and no band at DN 0
    expected = ~np.isin(scl, (0, 1, 3, 8, 9, 10)) & (raw != 0).all(axis=1)
    np.testing.assert_array_equal(loaded.mask_s2_l2a.values, expected)
    assert 0.1 < loaded.mask_s2_l2a.isel(time=3).mean() < 0.9  # cloudy date partly masked
    vv = loaded.s1_vv.values
    np.testing.assert_array_equal(loaded.mask_s1.values, np.isfinite(vv) & (vv != -32768))


def test_pairing_gaps(loaded, sentinel_scene):
    gaps = pd.to_timedelta(loaded.s1_time_gap.values)
    s1 = np.array(sentinel_scene.s1_dates, dtype="datetime64[ns]")
    for t2, gap in zip(loaded.time.values.astype("datetime64[ns]"), gaps):
        d = s1 - t2
        j = np.argmin(np.abs(d))
        if abs(d[j]) <= np.timedelta64(3, "D"):
            assert gap == pd.Timedelta(d[j])
        else:
            assert pd.isna(gap)
    assert pd.isna(gaps).sum() == 2
    unpaired = np.flatnonzero(pd.isna(gaps))
    assert not loaded.mask_s1.isel(time=unpaired).any()


def test_monthly_composite_matches_numpy(loaded):
    comp = prepare.composite(loaded, "month")
    assert [str(t)[:7] for t in comp.time.values] == ["2021-06", "2021-07"]
    months = pd.DatetimeIndex(loaded.time.values).month
    for k, month in enumerate((6, 7)):
        idx = np.flatnonzero(months == month)
        vals = loaded.s2_l2a_B04.values[idx].astype("float64")
        mask = loaded.mask_s2_l2a.values[idx]
        expected = np.nanmedian(np.where(mask, vals, np.nan), axis=0)
        np.testing.assert_allclose(comp.s2_l2a_B04.values[k], expected, rtol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(comp.count_s2_l2a.values[k], mask.sum(0))
    np.testing.assert_array_equal(comp.mask_s2_l2a.values, comp.count_s2_l2a.values > 0)
    season = prepare.composite(loaded, "season")
    assert season.sizes["time"] == 1 and str(season.time.values[0])[:10] == "2021-06-01"


def test_normalize_contract(loaded):
    x = prepare.normalize(loaded)
    assert x.s2_l2a.dims == ("time", "band_s2_l2a", "y", "x") and x.s2_l2a.dtype == np.float32
    assert list(x.band_s2_l2a.values) == list(sensors.S2_BANDS)
    assert not np.isnan(x.s2_l2a.values).any() and not np.isnan(x.s1.values).any()
    raw = np.stack([loaded[v].values for v in sensors.MODALITIES["s2_l2a"].variables], axis=1).astype("float64")
    ref = sensors.normalize(raw, "s2_l2a", channel_axis=1)
    # valid = the SCL classes and no band at nodata (DN 0): the scene has a few pixels where SCL is
    # valid but a band is 0, and load's mask already holds both (one rule in the registry)
    scl_ok = ~np.isin(loaded.s2_l2a_SCL.values, (0, 1, 3, 8, 9, 10))
    expected_valid = scl_ok & (raw != 0).all(axis=1)
    assert (expected_valid != scl_ok).any()
    np.testing.assert_array_equal(x.mask_s2_l2a.values, expected_valid)
    np.testing.assert_array_equal(loaded.mask_s2_l2a.values, expected_valid)
    valid = expected_valid[:, None].repeat(12, 1)
    np.testing.assert_allclose(x.s2_l2a.values[valid], ref[valid], rtol=1e-5)
    assert np.all(x.s2_l2a.values[~valid] == 0.5)
    vv = loaded.s1_vv.values.astype("float64")
    m1 = loaded.mask_s1.values
    np.testing.assert_allclose(x.s1.values[:, 0][m1], ((10 * np.log10(vv[m1]) - (-12.7572 - 2 * 5.8491)) / (4 * 5.8491)), atol=2e-6)
    assert x.rio.crs.to_epsg() == 32618


def test_mixed_baselines_error_and_harmonize(stac_api_url, sentinel_scene):
    found = search(sentinel_scene.aoi_bbox, "2021-07-10/2022-03-01", ("sentinel-2-l2a",), url=stac_api_url)
    with pytest.raises(ValueError, match="mix processing baselines.*s2_offset='harmonize'"):
        load(found, sentinel_scene.aoi_bbox)
    raw = load(found, sentinel_scene.aoi_bbox, s2_offset="raw")
    harm = load(found, sentinel_scene.aoi_bbox, s2_offset="harmonize")
    assert list(raw.s2_l2a_offset.values) == [0, 1000] and list(harm.s2_l2a_offset.values) == [0, 0]
    r, h = raw.s2_l2a_B04.isel(time=1).values.astype(int), harm.s2_l2a_B04.isel(time=1).values.astype(int)
    # the one rule: nodata stays 0, every valid DN becomes max(DN - 1000, 1) and stays valid
    np.testing.assert_array_equal(h, np.where(r == 0, 0, np.maximum(r - 1000, 1)))
    np.testing.assert_array_equal(harm.mask_s2_l2a.values, raw.mask_s2_l2a.values)
    n_raw = prepare.normalize(raw, s2_offset="harmonize").s2_l2a.isel(time=1).values
    n_h = prepare.normalize(harm).s2_l2a.isel(time=1).values
    np.testing.assert_allclose(n_raw, n_h, atol=1e-6)


def test_bad_inputs_name_the_fix(stac_api_url, sentinel_scene, items):
    aoi = sentinel_scene.aoi_bbox
    with pytest.raises(ValueError, match="Widen the dates"):
        search(aoi, "2019-01-01/2019-02-01", url=stac_api_url)
    with pytest.raises(ValueError, match="UTM zones.*crs="):
        load(items, (-78.2, 37.6, -77.8, 37.7))
    with pytest.raises(ValueError, match=r"\(lat, lon\) order"):
        search((37.65, -120.0, 37.70, -119.9), "2021-06-01/2021-07-31", url=stac_api_url)
    small = load(items, (aoi[0], aoi[1], aoi[0] + 0.01, aoi[1] + 0.01), chunks=False)
    assert small.sizes["y"] < 224                     # a small AOI loads; only embed needs a chip
    broken = [i for i in items if i.collection_id == "sentinel-2-l2a"][0].clone()
    del broken.assets["B8A"]
    with pytest.raises(ValueError, match=r"declared as from catalog 'planetary-computer'.*lacks .*\['B8A'\]"):
        load([broken], aoi)


def test_earth_search_l1c_by_catalog(stac_api_url, sentinel_scene):
    found = search(sentinel_scene.aoi_bbox, "2021-06-01/2021-07-31", ("sentinel-2-l1c",),
                   catalog="earth-search", url=stac_api_url)
    ds = load(found, sentinel_scene.aoi_bbox)
    assert ds.attrs["terrafm_modalities"] == ["s2_l1c"] and ds.s2_l1c_B08.attrs["modality"] == "s2_l1c"
    path = sentinel_scene.manifest["l1c"]["assets"]["B08"]["path"]
    np.testing.assert_array_equal(ds.s2_l1c_B08.isel(time=0).values, _direct(sentinel_scene, path, ds.odc.geobox))


def test_retry_on_503_and_429(items, sentinel_scene, storage_server):
    path = sentinel_scene.manifest["s2"][0]["assets"]["B03"]["path"]
    n_before = len(storage_server.requests)
    storage_server.fail_next(path, (503, 429, 503))
    ds = load([i for i in items if i.collection_id == "sentinel-2-l2a"][:1], sentinel_scene.aoi_bbox)
    np.testing.assert_array_equal(ds.s2_l2a_B03.isel(time=0).values, _direct(sentinel_scene, path, ds.odc.geobox))
    statuses = [r[3] for r in storage_server.requests[n_before:] if r[1].endswith(path)]
    assert statuses[:3] == [503, 429, 503] and 200 in statuses[3:]


def test_expired_token_is_resigned(stac_api_url, sentinel_scene, storage_server):
    found = search(sentinel_scene.aoi_bbox, "2021-06-01/2021-06-20", ("sentinel-2-l2a",), url=stac_api_url)
    ds = load(found, sentinel_scene.aoi_bbox)  # lazy: nothing read yet
    before = storage_server.tokens_issued
    storage_server.expire_tokens()           # every token signed so far is now invalid
    storage_server.expire_tokens(after_reads=20)  # and the next ones die mid-load
    try:
        out = ds.s2_l2a_B04.values
    finally:
        storage_server.clear_faults()
    assert storage_server.tokens_issued > before
    assert any(r[3] == 403 for r in storage_server.requests)
    path = sentinel_scene.manifest["s2"][0]["assets"]["B04"]["path"]
    np.testing.assert_array_equal(out[0], _direct(sentinel_scene, path, ds.odc.geobox))
    storage_server.clear_faults()


def test_disappearing_cog_clear_error_nothing_written(items, sentinel_scene, storage_server, tmp_path):
    item = [i for i in items if i.collection_id == "sentinel-2-l2a"][0].clone()
    path = sentinel_scene.manifest["s2"][0]["assets"]["B05"]["path"]
    gone = "faulty/" + path.replace("/", "_")
    storage_server.copy_tree(path, gone)
    href = item.assets["B05"].href.split("?")[0]
    item.assets["B05"].href = href.replace(path, gone)
    storage_server.remove_after(gone, 1)
    ds = load([item], sentinel_scene.aoi_bbox)
    target = tmp_path / "out.zarr"
    with pytest.raises(TerraFMReadError, match="could not read .*B05.*removed"):
        save(ds, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_open_sentinel_with_worldcover(stac_api_url, sentinel_scene):
    ds = terrafm.open_sentinel(sentinel_scene.aoi_bbox, sentinel_scene.start, sentinel_scene.end,
                               collections=("sentinel-2-l2a", "esa-worldcover"), url=stac_api_url)
    wc = ds.worldcover.values
    assert wc.dtype == np.uint8 and ds.worldcover.dims == ("y", "x")
    assert set(np.unique(wc)) <= {0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100}
    assert (wc > 0).mean() > 0.99


def test_aligned_fast_read_equals_odc_reprojection(sentinel_scene, cog_server_url):
    """terrafm's direct read of aligned 10/20/60 m bands == odc-stac's own nearest reprojection.

    The chip hangs over the scene's top-left corner by an odd number of 10 m pixels, so 20 and
    60 m pixels are cut at odd offsets and part of the chip is outside every file (fill value).
    """
    import odc.stac
    import pystac
    from odc.geo.geobox import GeoBox
    from support import stac_items

    items = [pystac.Item.from_dict(d) for d in stac_items.pc_s2_items(
        sentinel_scene, include_baseline4=False, href_base=cog_server_url)][:1]
    left, _, _, top = sentinel_scene.bounds
    x0, y0 = left - 10 * 37, top + 10 * 13
    gb = GeoBox.from_bbox((x0, y0 - 2240, x0 + 2240, y0), f"EPSG:{sentinel_scene.epsg}", resolution=10)
    ours = load(items, geobox=gb, catalog=None, chunks=False, keep_scl=True)
    bands = list(sensors.S2_BANDS) + ["SCL"]
    cfg = {"sentinel-2-l2a": {"assets": {b: {"data_type": "uint8" if b == "SCL" else "uint16", "nodata": 0}
                                         for b in bands}}}
    ref = odc.stac.load(items, bands=bands, geobox=gb, resampling="nearest", stac_cfg=cfg)
    for b in bands:
        np.testing.assert_array_equal(ours[f"s2_l2a_{b}"].values, ref[b].values, err_msg=b)
    assert (ours.s2_l2a_B01.values[0, :13] == 0).all() and (ours.s2_l2a_B01.values[0, 13:, 37:] > 0).all()
    # the 60 m band really is 6 x 6 blocks cut at an odd offset: one block spans rows 13..18
    b01 = ours.s2_l2a_B01.values[0, 13:, 37:]
    assert (b01[:6, :6] == b01[0, 0]).all() and b01[0, 0] != b01[6, 6]


def _swap(b):
    return (b[1], b[0], b[3], b[2])


def test_latlon_swap_inside_valid_ranges_is_named(stac_api_url, sentinel_scene, items):
    aoi = sentinel_scene.aoi_bbox                      # about (-77.7, 37.7): both readings are valid lon/lat
    swapped = _swap(aoi)
    assert all(abs(v) <= 90 for v in swapped)
    fixed = str(tuple(round(v, 6) for v in aoi))
    with pytest.raises(ValueError, match=r"looks like \(lat, lon\) order") as err:
        search(swapped, f"{sentinel_scene.start}/{sentinel_scene.end}", url=stac_api_url)
    assert fixed in str(err.value)
    polygon = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[
        [swapped[0], swapped[1]], [swapped[2], swapped[1]], [swapped[2], swapped[3]], [swapped[0], swapped[3]],
        [swapped[0], swapped[1]]]]}}
    with pytest.raises(ValueError, match=r"looks like \(lat, lon\) order"):
        search(polygon, f"{sentinel_scene.start}/{sentinel_scene.end}", ("sentinel-1-rtc",), url=stac_api_url)
    with pytest.raises(ValueError, match=r"outside every item's footprint.*\(lat, lon\) order") as err:
        load(items, swapped)
    assert fixed in str(err.value)
    # no false positive: a real place with no data here (Munich) is an ordinary empty search
    with pytest.raises(ValueError, match="Widen the dates") as err:
        search((11.5, 48.1, 11.6, 48.2), f"{sentinel_scene.start}/{sentinel_scene.end}", url=stac_api_url)
    assert "lat, lon" not in str(err.value)
    with pytest.raises(ValueError, match="outside every item's footprint") as err:
        load(items, (11.5, 48.1, 11.6, 48.2))
    assert "lat, lon" not in str(err.value)


def test_max_cloud_filters_through_the_api(stac_api_url, sentinel_scene):
    period = f"{sentinel_scene.start}/{sentinel_scene.end}"
    found = search(sentinel_scene.aoi_bbox, period, url=stac_api_url, max_cloud=20)
    s2 = [i for i in found if i.collection_id == "sentinel-2-l2a"]
    expected = sorted(e["datetime"][:19] for e in sentinel_scene.manifest["s2"]
                      if e["cloud_cover"] < 20 and e["baseline"] < "04.00")
    assert 0 < len(expected) < len(sentinel_scene.s2_dates)
    assert sorted(i.datetime.strftime("%Y-%m-%dT%H:%M:%S") for i in s2) == expected
    assert all(i.properties["eo:cloud_cover"] < 20 for i in s2)
    # the limit is not applied to Sentinel-1 (no cloud cover)
    assert len([i for i in found if i.collection_id == "sentinel-1-rtc"]) == len(sentinel_scene.s1_dates)
    with pytest.raises(ValueError, match=r"cloud cover < 0%.*raise max_cloud"):
        search(sentinel_scene.aoi_bbox, period, ("sentinel-2-l2a",), url=stac_api_url, max_cloud=0)


def test_geodataframe_shapely_and_geojson_aois_equal_the_bbox(stac_api_url, sentinel_scene):
    import geopandas as gpd
    import shapely.geometry

    aoi = sentinel_scene.aoi_bbox
    period = "2021-06-01/2021-06-16"                   # two S2 and two S1 dates keep it quick
    box = shapely.geometry.box(*aoi)
    gdf = gpd.GeoDataFrame({"name": ["aoi"]}, geometry=[box], crs=4326)
    forms = {"shapely": box, "geojson": box.__geo_interface__,
             "feature": {"type": "Feature", "properties": {}, "geometry": box.__geo_interface__},
             "gdf": gdf, "gdf_3857": gdf.to_crs(3857)}
    ref_items = search(aoi, period, url=stac_api_url)
    ref = load(ref_items, aoi, chunks=False)
    for name, form in forms.items():
        got = search(form, period, url=stac_api_url)
        assert [i.id for i in got] == [i.id for i in ref_items], name
        ds = load(got, form, chunks=False)
        assert ds.odc.geobox == ref.odc.geobox, name
    np.testing.assert_array_equal(ds.s2_l2a_B04.values, ref.s2_l2a_B04.values)
    assert gdf.crs.to_epsg() == 4326 and forms["gdf_3857"].crs.to_epsg() == 3857  # inputs untouched


def test_two_granules_of_one_pass_merge_into_one_date(sentinel_scene, storage_server, cog_server_url):
    """Two adjacent granules (west and east halves of the scene, 5 s apart) -> one time step whose
    pixels equal a direct read of the full scene file, across the seam."""
    import pystac
    import rasterio.warp
    from rasterio.windows import Window
    from support import stac_items

    entry = sentinel_scene.manifest["s2"][0]
    full = stac_items.pc_s2_items(sentinel_scene, include_baseline4=False, href_base=cog_server_url)[0]
    split_10m = 510                                   # a multiple of 6: every band splits on a pixel edge
    halves = []
    for k, (c0, c1) in enumerate(((0, split_10m), (split_10m, 1020))):
        item = dict(full, id=f"{full['id']}_granule{k}", assets={}, properties=dict(full["properties"]))
        item["properties"]["datetime"] = (dt.datetime.fromisoformat(entry["datetime"][:19])
                                          + dt.timedelta(seconds=5 * k)).isoformat() + "Z"
        for key, a in entry["assets"].items():
            f = a["res"] // 10
            rel = f"granules/{k}/{key}.tif"
            with rasterio.open(sentinel_scene.root / a["path"]) as src:
                win = Window(c0 // f, 0, (c1 - c0) // f, src.height)
                data = src.read(1, window=win)
                profile = dict(src.profile, width=data.shape[1], transform=src.window_transform(win))
            (storage_server.root / rel).parent.mkdir(parents=True, exist_ok=True)
            with rasterio.open(storage_server.root / rel, "w", **profile) as dst:
                dst.write(data, 1)
            item["assets"][key] = dict(full["assets"][key], href=f"{cog_server_url}/{rel}",
                                       **{"proj:transform": list(profile["transform"])[:6],
                                          "proj:shape": [data.shape[0], data.shape[1]]})
            if key == "B04":
                west, south, east, north = rasterio.warp.transform_bounds(
                    src.crs, "EPSG:4326", *rasterio.transform.array_bounds(*data.shape, profile["transform"]))
        item["bbox"] = [west, south, east, north]
        item["geometry"] = shapely_box(west, south, east, north)
        halves.append(pystac.Item.from_dict(item))
    ds = load(halves, sentinel_scene.aoi_bbox, catalog=None, chunks=False)
    assert ds.sizes["time"] == 1
    gb = ds.odc.geobox
    seam = sentinel_scene.bounds[0] + split_10m * 10
    assert gb.boundingbox.left < seam < gb.boundingbox.right        # the AOI straddles the seam
    for band in ("B04", "B11", "B01"):
        f = entry["assets"][band]["res"] // 10
        with rasterio.open(sentinel_scene.root / entry["assets"][band]["path"]) as src:
            big = np.repeat(np.repeat(src.read(1), f, 0), f, 1)
        x_off = int(round((gb.transform.c - sentinel_scene.bounds[0]) / 10))
        y_off = int(round((sentinel_scene.bounds[3] - gb.transform.f) / 10))
        h, w = gb.shape
        np.testing.assert_array_equal(ds[f"s2_l2a_{band}"].values[0], big[y_off:y_off + h, x_off:x_off + w], err_msg=band)


def shapely_box(west, south, east, north):
    import shapely.geometry

    return shapely.geometry.mapping(shapely.geometry.box(west, south, east, north))


def test_limit_and_query_terms_reach_every_collection(stac_api_url, sentinel_scene):
    period = f"{sentinel_scene.start}/{sentinel_scene.end}"
    few = search(sentinel_scene.aoi_bbox, period, url=stac_api_url, limit=2)
    assert [i.collection_id for i in few].count("sentinel-2-l2a") == 2
    assert [i.collection_id for i in few].count("sentinel-1-rtc") == 2
    ascending = [e["datetime"][:19] for e in sentinel_scene.manifest["s1"]
                 if e["orbit_state"] == "ascending" and e["datetime"] < sentinel_scene.end]
    assert 0 < len(ascending) < len(sentinel_scene.s1_dates)
    # the query extension, as query= and as keyword terms; S2 first so S1 is the second collection
    for kwargs in ({"query": {"sat:orbit_state": {"eq": "ascending"}}},
                   {"sat:orbit_state": {"eq": "ascending"}}):
        found = search(sentinel_scene.aoi_bbox, period, ("sentinel-2-l2a", "sentinel-1-rtc"),
                       url=stac_api_url, **kwargs)
        assert all(i.collection_id == "sentinel-1-rtc" for i in found)  # every S2 item is descending
        assert sorted(i.datetime.strftime("%Y-%m-%dT%H:%M:%S") for i in found) == sorted(ascending)


def test_modalities_resolution_and_crs(items, sentinel_scene):
    ds = load(items, sentinel_scene.aoi_bbox, resolution=20, crs=sentinel_scene.epsg, modalities=["s2_l2a"],
              chunks=False)
    assert ds.attrs["terrafm_modalities"] == ["s2_l2a"] and "s1_vv" not in ds and "mask_s1" not in ds
    gb = ds.odc.geobox
    assert gb.crs.epsg == sentinel_scene.epsg and gb.resolution.x == 20 and min(gb.shape) >= 224
    # on the 20 m grid the 20 m band is the file's own pixels
    path = sentinel_scene.manifest["s2"][0]["assets"]["B11"]["path"]
    np.testing.assert_array_equal(ds.s2_l2a_B11.isel(time=0).values, _direct(sentinel_scene, path, gb))
    s1 = load(items, sentinel_scene.aoi_bbox, modalities=["s1"])
    assert s1.attrs["terrafm_modalities"] == ["s1"] and "s2_l2a_B02" not in s1
    assert s1.sizes["time"] == len(sentinel_scene.s1_dates)
    with pytest.raises(ValueError, match="none of the items carry modalities"):
        load(items, sentinel_scene.aoi_bbox, modalities=["s2_l1c"])


def test_custom_bins_composite_and_pair_window(items, loaded, sentinel_scene):
    edges = ["2021-06-01", "2021-06-20", "2021-08-01"]
    comp = prepare.composite(loaded, edges)
    assert [str(t)[:10] for t in comp.time.values] == ["2021-06-01", "2021-06-20"]
    t = loaded.time.values
    for k in range(2):
        idx = np.flatnonzero((t >= np.datetime64(edges[k])) & (t < np.datetime64(edges[k + 1])))
        vals = np.where(loaded.mask_s1.values[idx], loaded.s1_vv.values[idx].astype("float64"), np.nan)
        with np.errstate(all="ignore"):
            expected = np.nanmedian(vals, axis=0)
        np.testing.assert_allclose(comp.s1_vv.values[k], expected, rtol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(comp.count_s1.values[k], loaded.mask_s1.values[idx].sum(0))
    # a wider pairing window pairs every S2 date; the gaps are the nearest S1 acquisitions
    wide = load(items, sentinel_scene.aoi_bbox, pair_window=dt.timedelta(days=10))
    gaps = pd.to_timedelta(wide.s1_time_gap.values)
    assert not pd.isna(gaps).any() and pd.isna(pd.to_timedelta(loaded.s1_time_gap.values)).sum() == 2
    s1 = np.array(sentinel_scene.s1_dates, dtype="datetime64[ns]")
    for t2, gap in zip(wide.time.values.astype("datetime64[ns]"), gaps):
        assert gap == pd.Timedelta(min(s1 - t2, key=abs))


def test_stac_api_retries_503_and_429(stac_api_url, sentinel_scene, storage_server):
    """The STAC API itself (behind the fault-injecting proxy) answers 503/429 before succeeding."""
    api = storage_server.set_api_target(stac_api_url)
    period = f"{sentinel_scene.start}/{sentinel_scene.end}"
    direct = search(sentinel_scene.aoi_bbox, period, ("sentinel-2-l2a",), url=stac_api_url)
    n_before = len(storage_server.requests)
    storage_server.fail_next("/stac-api/search", (503, 429))   # back-off 0 s, then 1 s
    try:
        found = search(sentinel_scene.aoi_bbox, period, ("sentinel-2-l2a",), url=api)
    finally:
        storage_server.clear_faults()
    assert [i.id for i in found] == [i.id for i in direct]
    statuses = [r[3] for r in storage_server.requests[n_before:] if r[1] == "/stac-api/search"]
    assert statuses[:3] == [503, 429, 200]
    # retries exhausted: a clear error naming the endpoint and what to do
    storage_server.fail_next("/stac-api/search", (503,) * 3)
    try:
        with pytest.raises(TerraFMSearchError, match=r"STAC API at .*/stac-api answered 503.*try again later"):
            search(sentinel_scene.aoi_bbox, period, ("sentinel-2-l2a",), url=api, max_retries=1)
    finally:
        storage_server.clear_faults()


def test_token_near_expiry_is_renewed_before_reading(stac_api_url, sentinel_scene, storage_server):
    """Items are signed at read time, so a token with under a minute left is replaced before use."""
    from planetary_computer.sas import TOKEN_CACHE

    found = search(sentinel_scene.aoi_bbox, "2021-06-01/2021-06-10", ("sentinel-2-l2a",), url=stac_api_url)
    ds = load(found, sentinel_scene.aoi_bbox)
    storage_server.set_token_ttl(62)
    TOKEN_CACHE.clear()
    try:
        first = ds.s2_l2a_B04.values                         # signs with a fresh 62 s token
        issued = storage_server.tokens_issued
        n_before = len(storage_server.requests)
        time.sleep(2.5)                                # now under 60 s left: "near expiry"
        second = ds.s2_l2a_B08.values
        assert storage_server.tokens_issued > issued
        assert all(r[3] != 403 for r in storage_server.requests[n_before:])   # renewed, not failed
    finally:
        storage_server.set_token_ttl(3600)
        TOKEN_CACHE.clear()
    entry = sentinel_scene.manifest["s2"][0]["assets"]
    np.testing.assert_array_equal(first[0], _direct(sentinel_scene, entry["B04"]["path"], ds.odc.geobox))
    np.testing.assert_array_equal(second[0], _direct(sentinel_scene, entry["B08"]["path"], ds.odc.geobox))


@pytest.mark.parametrize("how", ["paired", "union", "reprojected", "harmonized"])
def test_eager_load_equals_lazy_load(stac_api_url, sentinel_scene, how):
    """``chunks=False`` reads straight into numpy; it must give the lazy (odc-stac dask) result exactly."""
    import xarray as xr

    period = f"{sentinel_scene.start}/{sentinel_scene.end}"
    collections = ("sentinel-2-l2a", "sentinel-1-rtc", "esa-worldcover")
    kwargs = {"paired": dict(keep_scl=True), "union": dict(pair_window=None), "reprojected": dict(crs=3857),
              "harmonized": dict(s2_offset="harmonize")}[how]
    if how == "harmonized":  # two processing baselines
        period, collections = "2021-07-10/2022-03-01", ("sentinel-2-l2a",)
    found = search(sentinel_scene.aoi_bbox, period, collections, url=stac_api_url)
    lazy = load(found, sentinel_scene.aoi_bbox, **kwargs)
    assert all(lazy[v].chunks is not None for v in lazy.data_vars if lazy[v].ndim >= 2), "load() must stay lazy"
    eager = load(found, sentinel_scene.aoi_bbox, chunks=False, **kwargs)
    assert isinstance(eager.s2_l2a_B04.data, np.ndarray)
    xr.testing.assert_identical(eager, lazy.compute())
    for name in eager.variables:
        assert eager[name].dtype == lazy[name].dtype, name
    if how == "union":  # S1-only dates: S2 at nodata and masked, S2-only dates: S1 NaN and masked
        s2_dates, s1_dates = set(sentinel_scene.s2_dates), set(sentinel_scene.s1_dates)
        days = [str(t)[:10] for t in eager.time.values]
        only_s1 = [k for k, d in enumerate(days) if d not in {str(s)[:10] for s in s2_dates}]
        only_s2 = [k for k, d in enumerate(days) if d not in {str(s)[:10] for s in s1_dates}]
        assert only_s1 and only_s2
        assert eager.s2_l2a_B04.dtype == np.uint16 and (eager.s2_l2a_B04.values[only_s1] == 0).all()
        assert not eager.mask_s2_l2a.values[only_s1].any() and not eager.mask_s1.values[only_s2].any()
        assert np.isnan(eager.s1_vv.values[only_s2]).all()
    if how == "reprojected":
        assert eager.rio.crs.to_epsg() == 3857
    if how == "harmonized":
        assert list(eager.s2_l2a_offset.values) == [0, 0]


def test_pair_nearest_of_separate_loads_equals_the_joint_load(items, loaded, sentinel_scene):
    """``prepare.pair_nearest`` (Datasets) and ``load`` (arrays) pair S1 to S2 the same way."""
    import xarray as xr

    s2 = load([i for i in items if i.collection_id == "sentinel-2-l2a"], sentinel_scene.aoi_bbox, keep_scl=True)
    s1 = load([i for i in items if i.collection_id == "sentinel-1-rtc"], sentinel_scene.aoi_bbox)
    paired = prepare.pair_nearest(s2, s1, window="3D").compute()
    assert pd.isna(pd.to_timedelta(paired.s1_time_gap.values)).sum() == 2      # two S2 dates without S1
    for name in ("s1_vv", "s1_vh", "mask_s1", "s1_time_gap"):
        xr.testing.assert_identical(paired[name], loaded[name])
    without = ~loaded.mask_s1.values.any(axis=(1, 2))
    assert np.isnan(paired.s1_vv.values[without]).all() and paired.s1_vv.dtype == np.float32
