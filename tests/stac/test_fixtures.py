"""The shared test stack itself: real STAC API, real signing, Range reads of real pixels.

The imports are inside the tests: tests/bad_inputs/test_setup.py starts pytest on this file several
times only to see it stop before any test runs, and collecting it then costs no library import."""


def test_pgstac_api_serves_the_scene_items(stac_api_url, sentinel_scene):
    import pystac_client

    client = pystac_client.Client.open(stac_api_url)
    assert {c.id for c in client.get_collections()} == {
        "sentinel-2-l2a", "sentinel-1-rtc", "esa-worldcover", "sentinel-2-l1c"}
    items = list(client.search(collections=["sentinel-2-l2a"], bbox=sentinel_scene.aoi_bbox,
                               datetime=f"{sentinel_scene.start}/{sentinel_scene.end}").items())
    assert sorted(i.datetime.replace(tzinfo=None) for i in items) == list(sentinel_scene.s2_dates)
    cloudy = list(client.search(collections=["sentinel-2-l2a"], bbox=sentinel_scene.aoi_bbox,
                                datetime=f"{sentinel_scene.start}/{sentinel_scene.end}",
                                query={"eo:cloud_cover": {"lt": 20}}).items())
    assert 0 < len(cloudy) < len(items)
    assert all(i.properties["eo:cloud_cover"] < 20 for i in cloudy)


def test_blob_reads_need_a_local_sas_token(stac_api_url, sentinel_scene, storage_server):
    import numpy as np
    import planetary_computer
    import pystac_client
    import rasterio
    from rasterio.windows import Window

    client = pystac_client.Client.open(stac_api_url)
    item = next(client.search(collections=["sentinel-2-l2a"], bbox=sentinel_scene.aoi_bbox,
                              datetime="2021-06-05").items())
    href = item.assets["B02"].href
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        try:
            rasterio.open(href).close()
            raise AssertionError("unsigned blob read should be refused")
        except rasterio.RasterioIOError as err:
            assert "403" in str(err)
        signed = planetary_computer.sign(href)
        assert "sig=" in signed
        local = sentinel_scene.root / sentinel_scene.manifest["s2"][0]["assets"]["B02"]["path"]
        with rasterio.open(signed) as remote, rasterio.open(local) as disk:
            window = Window(100, 200, 37, 23)
            np.testing.assert_array_equal(remote.read(1, window=window), disk.read(1, window=window))
            assert remote.crs.to_epsg() == 32618
    log = storage_server.requests
    assert any(r[2].startswith("bytes=") and r[3] == 200 for r in log if "B02" in r[1])
