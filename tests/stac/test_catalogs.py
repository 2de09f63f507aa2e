"""Items of any catalog, and of several at once, load with no catalog argument (terrafm.catalogs).

The local pgstac API serves Planetary-Computer-shaped S2 L2A / S1 RTC items (assets on blob hosts
that demand SAS tokens) and an Earth-Search-shaped S2 L1C item (asset keys ``blue``, ``nir08``...,
public hrefs) side by side, like two real catalogs behind one URL.
"""

import copy

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.windows import from_bounds

from support import stac_items
from terrafm import catalogs, sensors
from terrafm.stac import load, search


def _direct(scene, path, geobox):
    with rasterio.open(scene.root / path) as src:
        win = from_bounds(*geobox.boundingbox, transform=src.transform).round_offsets().round_lengths()
        return src.read(1, window=win)


@pytest.fixture(scope="module")
def mixed_items(stac_api_url, sentinel_scene):
    """S1 (Planetary Computer convention) and L1C (Earth Search convention) from one search by URL."""
    return search(sentinel_scene.aoi_bbox, "2021-06-08/2021-06-17", ("sentinel-2-l1c", "sentinel-1-rtc"),
                  catalog=stac_api_url)


def test_search_by_url_then_load_mixed_conventions_with_no_catalog(mixed_items, sentinel_scene):
    assert {i.collection_id for i in mixed_items} == {"sentinel-2-l1c", "sentinel-1-rtc"}
    assert all(catalogs.API_PROPERTY in i.properties for i in mixed_items)
    assert not any(catalogs.ORIGIN_PROPERTY in i.properties for i in mixed_items)   # a bare URL: no name
    # signing is decided per item: the blob-hosted S1 items need SAS tokens, the public L1C item none
    how = {i.collection_id: catalogs.resolve(i) for i in mixed_items}
    assert how["sentinel-1-rtc"].sign is not None and how["sentinel-2-l1c"].sign is None
    assert how["sentinel-2-l1c"].assets["B8A"] == "nir08" and how["sentinel-1-rtc"].assets["vv"] == "vv"

    ds = load(mixed_items, sentinel_scene.aoi_bbox, pair_window=None, chunks=False)
    assert ds.attrs["terrafm_modalities"] == ["s2_l1c", "s1"]
    gb = ds.odc.geobox
    l1c_day = np.datetime64(sentinel_scene.l1c_date.date())
    t_l1c = int(np.flatnonzero(ds.time.values.astype("datetime64[D]") == l1c_day)[0])
    path = sentinel_scene.manifest["l1c"]["assets"]["B08"]["path"]
    np.testing.assert_array_equal(ds.s2_l1c_B08.values[t_l1c], _direct(sentinel_scene, path, gb))
    s1_entry = next(e for e in sentinel_scene.manifest["s1"] if e["datetime"].startswith("2021-06-15"))
    t_s1 = int(np.flatnonzero(ds.time.values.astype("datetime64[D]") == np.datetime64("2021-06-15"))[0])
    np.testing.assert_array_equal(ds.s1_vv.values[t_s1], _direct(sentinel_scene, s1_entry["assets"]["vv"]["path"], gb))


def test_origin_survives_serialisation_and_items_from_files_need_no_catalog(stac_api_url, sentinel_scene):
    found = search(sentinel_scene.aoi_bbox, "2021-06-01/2021-06-07", ("sentinel-2-l2a",),
                   catalog="planetary-computer", url=stac_api_url)
    assert {i.properties[catalogs.ORIGIN_PROPERTY] for i in found} == {"planetary-computer"}
    reloaded = [pystac.Item.from_dict(i.to_dict()) for i in found]
    assert catalogs.resolve(reloaded[0]).catalog.name == "planetary-computer"
    a = load(found, sentinel_scene.aoi_bbox, chunks=False)
    b = load(reloaded, sentinel_scene.aoi_bbox, chunks=False)
    np.testing.assert_array_equal(a.s2_l2a_B04.values, b.s2_l2a_B04.values)


def test_l2a_and_l1c_together_keep_their_own_pixels_and_masks(stac_api_url, sentinel_scene):
    found = search(sentinel_scene.aoi_bbox, "2021-06-08/2021-06-17", ("sentinel-2-l2a", "sentinel-2-l1c"),
                   catalog=stac_api_url)
    ds = load(found, sentinel_scene.aoi_bbox, chunks=False, keep_scl=True)
    assert ds.attrs["terrafm_modalities"] == ["s2_l2a", "s2_l1c"]
    days = list(ds.time.values.astype("datetime64[D]"))
    t_l1c, t_l2a = days.index(np.datetime64("2021-06-10")), days.index(np.datetime64("2021-06-15"))
    gb = ds.odc.geobox
    l1c = sentinel_scene.manifest["l1c"]["assets"]["B04"]["path"]
    l2a = next(e for e in sentinel_scene.manifest["s2"] if e["datetime"].startswith("2021-06-15"))["assets"]["B04"]["path"]
    np.testing.assert_array_equal(ds.s2_l1c_B04.values[t_l1c], _direct(sentinel_scene, l1c, gb))
    np.testing.assert_array_equal(ds.s2_l2a_B04.values[t_l2a], _direct(sentinel_scene, l2a, gb))
    # each level's dates only: L1C nothing on the L2A date, L2A nothing on the L1C date
    assert not ds.mask_s2_l1c.values[t_l2a].any() and (ds.s2_l1c_B04.values[t_l2a] == 0).all()
    assert not ds.mask_s2_l2a.values[t_l1c].any()
    # L2A's mask holds its SCL classes, L1C's only its nodata rule (no SCL)
    scl = ds.s2_l2a_SCL.values[t_l2a]
    assert not ds.mask_s2_l2a.values[t_l2a][np.isin(scl, (8, 9, 10))].any()
    assert "s2_l1c_SCL" not in ds and ds.mask_s2_l1c.values[t_l1c].mean() > 0.99


def _l1c_item_dict(sentinel_scene, storage_url) -> dict:
    return copy.deepcopy(stac_items.earth_search_l1c_items(sentinel_scene, storage_url)[0])


def test_unknown_collection_is_read_from_its_own_metadata(sentinel_scene, cog_server_url):
    d = _l1c_item_dict(sentinel_scene, cog_server_url)
    d["collection"] = "my-sentinel2-mirror"
    # asset keys that say nothing: only eo:bands names identify the bands
    d["assets"] = {f"band_{i}": a for i, a in enumerate(d["assets"].values())}
    item = pystac.Item.from_dict(d)
    how = catalogs.resolve(item)
    assert how.modality.key == "s2_l1c" and how.source == "item metadata"     # s2:product_type S2MSI1C
    assert how.scale == pytest.approx(1e-4)                                   # from raster:bands
    ds = load([item], sentinel_scene.aoi_bbox, chunks=False)
    path = sentinel_scene.manifest["l1c"]["assets"]["B8A"]["path"]
    with rasterio.open(sentinel_scene.root / path) as src:
        assert src.res[0] == 20
    ref = load([pystac.Item.from_dict(_l1c_item_dict(sentinel_scene, cog_server_url))], sentinel_scene.aoi_bbox,
               chunks=False, catalog="earth-search")
    np.testing.assert_array_equal(ds.s2_l1c_B8A.values, ref.s2_l1c_B8A.values)


def test_unreadable_and_ambiguous_items_name_what_was_found(sentinel_scene, cog_server_url):
    d = _l1c_item_dict(sentinel_scene, cog_server_url)
    d["collection"] = "mystery"
    del d["properties"]["s2:product_type"]
    with pytest.raises(catalogs.ConventionError, match=r"fit \['s2_l2a', 's2_l1c'\] equally.*s2:product_type"):
        catalogs.resolve(pystac.Item.from_dict(d))
    d["assets"] = {"foo": {"href": "http://127.0.0.1/foo.tif"}, "bar": {"href": "http://127.0.0.1/bar.tif"}}
    with pytest.raises(catalogs.ConventionError, match=r"no registered modality.*\['bar', 'foo'\].*earth-search/sentinel-2-l1c"):
        load([pystac.Item.from_dict(d)])


def test_asset_keys_contradicting_the_declared_catalog(sentinel_scene, cog_server_url):
    d = _l1c_item_dict(sentinel_scene, cog_server_url)
    d["collection"] = "sentinel-2-l2a"
    d["properties"][catalogs.ORIGIN_PROPERTY] = "planetary-computer"       # but Earth Search asset keys
    with pytest.raises(catalogs.ConventionError, match=r"declared as from catalog 'planetary-computer'.*"
                                                       r"\['earth-search/sentinel-2-l2a'\] convention"):
        load([pystac.Item.from_dict(d)])
    d["properties"][catalogs.ORIGIN_PROPERTY] = "no-such-catalog"
    with pytest.raises(ValueError, match="unknown catalog 'no-such-catalog'"):
        catalogs.resolve(pystac.Item.from_dict(d))


def test_registries_refuse_duplicates():
    with pytest.raises(ValueError, match="'s1' is registered twice"):
        sensors.register_modality(sensors.MODALITIES["s1"])
    clone = sensors.Modality("radar", ("vv", "vh"), (0.0, 0.0), (1.0, 1.0), "float32", -32768.0, "linear power",
                             "a second S1", collections={"planetary-computer": sensors.Collection(
                                 "sentinel-1-rtc", {"vv": "vv", "vh": "vh"})})
    with pytest.raises(ValueError, match="'sentinel-1-rtc' of catalog 'planetary-computer' already carries 's1'"):
        sensors.register_modality(clone)
    assert "radar" not in sensors.MODALITIES
    with pytest.raises(ValueError, match="registered twice"):
        catalogs.register_catalog(catalogs.Catalog("earth-search", "https://elsewhere"))
