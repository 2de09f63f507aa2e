"""terrafm.reading on its own: signing retries, the aligned fast path and eager fusing, each against
an independent reference (bare rasterio, odc-loader's own reader, odc-stac's own load, numpy)."""

from __future__ import annotations

import datetime as dt
import pickle
import uuid

import numpy as np
import pytest
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.transform import from_origin

from terrafm import reading
from terrafm.reading import GDAL_HTTP_OPTIONS, TerraFMReadError, group_items, make_driver, read_eager

EPSG = 32618


class RecordingSigner:
    """``sign(href, refresh)`` that records its calls; ``changes`` says whether it edits the href.

    Each signer's URLs are new to GDAL (a nonce), so its cache of earlier reads cannot answer them.
    """

    def __init__(self, changes: bool):
        self.changes, self.calls, self.nonce = changes, [], uuid.uuid4().hex

    def __call__(self, href: str, refresh: bool) -> str:
        self.calls.append((href, refresh))
        return f"{href}?sig={self.nonce}-{sum(r for _, r in self.calls)}" if self.changes else href


def _item(item_id, href, geobox, when, key="B04"):
    import pystac
    import shapely.geometry

    footprint = geobox.extent.to_crs("EPSG:4326").geom
    return pystac.Item(item_id, shapely.geometry.mapping(footprint), list(footprint.bounds), when, {},
                       assets={key: pystac.Asset(href)}, collection="toy")


def _write(path, data, transform, nodata=0):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype=data.dtype, crs=f"EPSG:{EPSG}", transform=transform, nodata=nodata) as dst:
        dst.write(data, 1)
    return str(path)


def _lon(geobox):
    return geobox.extent.centroid.to_crs("EPSG:4326").points[0][0]


def _scene_geobox(sentinel_scene, size=64):
    left, _, _, top = sentinel_scene.bounds
    x0, y0 = left + 10 * 100, top - 10 * 200
    return GeoBox.from_bbox((x0, y0 - 10 * size, x0 + 10 * size, y0), f"EPSG:{sentinel_scene.epsg}", resolution=10)


def _direct(sentinel_scene, path, geobox):
    from rasterio.windows import from_bounds

    with rasterio.open(sentinel_scene.root / path) as src:
        return src.read(1, window=from_bounds(*geobox.boundingbox, transform=src.transform))


def _server_requests(storage_server, fragment):
    return [r for r in storage_server.requests if fragment in r[1]]


# ------------------------------------------------------------------------------------------------
# signing: a second attempt only when re-signing gives another URL
# ------------------------------------------------------------------------------------------------
def test_href_the_signer_leaves_alone_is_read_once(sentinel_scene, storage_server, cog_server_url):
    """An asset that needs no signing (the signer returns its href) fails once: no refresh, no re-read.

    Reference for "one attempt": the requests a bare ``rasterio.open`` of a twin missing file makes.
    """
    missing, twin = f"missing/{uuid.uuid4().hex}/B04.tif", f"missing/{uuid.uuid4().hex}/B04.tif"
    with rasterio.Env(**GDAL_HTTP_OPTIONS), pytest.raises(rasterio.errors.RasterioIOError):
        rasterio.open(f"{cog_server_url}/{twin}")
    one_attempt = len(_server_requests(storage_server, twin))
    assert one_attempt >= 1

    gb = _scene_geobox(sentinel_scene)
    href = f"{cog_server_url}/{missing}"
    signer = RecordingSigner(changes=False)
    with pytest.raises(TerraFMReadError, match=f"could not read {href} .*removed"):
        read_eager([[_item("a", href, gb, dt.datetime(2021, 6, 5, 15))]], {"B04": ("uint16", 0)}, gb,
                   driver=make_driver(signer, GDAL_HTTP_OPTIONS))
    assert signer.calls == [(href, False)]
    assert len(_server_requests(storage_server, missing)) == one_attempt


def test_href_the_signer_changes_gets_one_fresh_signature(sentinel_scene, storage_server, cog_server_url):
    """A signed href whose read fails (403: what an expired SAS token gives) is re-signed with
    ``refresh=True`` once and read again; a second failure is a clear error, not a third attempt."""
    path = sentinel_scene.manifest["s2"][0]["assets"]["B04"]["path"]
    href = f"{cog_server_url}/{path}"
    gb = _scene_geobox(sentinel_scene)
    item = _item("a", href, gb, dt.datetime(2021, 6, 5, 15))
    n_before = len(storage_server.requests)
    storage_server.fail_next(path, (403,))
    signer = RecordingSigner(changes=True)
    try:
        arrays = read_eager([[item]], {"B04": ("uint16", 0)}, gb, driver=make_driver(signer, GDAL_HTTP_OPTIONS))
    finally:
        storage_server.clear_faults()
    assert signer.calls == [(href, False), (href, True)]
    statuses = [r[3] for r in storage_server.requests[n_before:] if r[1].endswith(path)]
    assert statuses[0] == 403 and set(statuses[1:]) == {200}
    np.testing.assert_array_equal(arrays["B04"][0], _direct(sentinel_scene, path, gb))

    storage_server.fail_next(path, (403, 403, 403))
    signer = RecordingSigner(changes=True)
    try:
        with pytest.raises(TerraFMReadError, match=f"could not read {href} "):
            read_eager([[item]], {"B04": ("uint16", 0)}, gb, driver=make_driver(signer, GDAL_HTTP_OPTIONS))
    finally:
        storage_server.clear_faults()
    assert signer.calls == [(href, False), (href, True)]


def test_presigned_sas_href_is_resigned_when_its_token_expires(sentinel_scene, pc_environment):
    """Items signed in place by the user carry the cached token, so ``pc_sign`` returns them
    unchanged; when that token expires mid-load the read still gets a fresh one."""
    import pystac
    from support import stac_items

    storage_server = pc_environment
    item = pystac.Item.from_dict(stac_items.pc_s2_items(sentinel_scene, include_baseline4=False)[0])
    href = reading.pc_sign(item.assets["B04"].href)
    item.assets["B04"].href = href
    assert reading.pc_sign(href) == href and reading.unsigned(href) != href
    gb = _scene_geobox(sentinel_scene)
    before = storage_server.tokens_issued
    storage_server.expire_tokens()
    try:
        arrays = read_eager([[item]], {"B04": ("uint16", 0)}, gb,
                            driver=make_driver(reading.pc_sign, GDAL_HTTP_OPTIONS))
    finally:
        storage_server.clear_faults()
    assert storage_server.tokens_issued == before + 1
    path = sentinel_scene.manifest["s2"][0]["assets"]["B04"]["path"]
    np.testing.assert_array_equal(arrays["B04"][0], _direct(sentinel_scene, path, gb))


def test_driver_pickles_for_dask_workers():
    driver = pickle.loads(pickle.dumps(make_driver(reading.pc_sign, {**GDAL_HTTP_OPTIONS, "GDAL_HTTP_TIMEOUT": "7"})))
    assert driver.capture_env()["GDAL_HTTP_TIMEOUT"] == "7"
    assert driver._sign is reading.pc_sign


# ------------------------------------------------------------------------------------------------
# the aligned fast path: a hand-worked 20 m file on a 10 m grid
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta_nodata, dtype, load_nodata, fill", [
    (0, None, None, 0),                 # nodata 0 in and out: zeros stay, the fill is 0
    (None, "float32", None, np.nan),    # no declared nodata, float output: the file's 0 becomes NaN
    (0, None, 65535, 65535),            # another output nodata: the file's 0 becomes 65535
])
def test_aligned_read_equals_hand_worked_repetition_and_odc_reader(tmp_path, meta_nodata, dtype, load_nodata, fill):
    """A 5 x 6 file of 20 m pixels (two at the file's nodata 0) read onto a 10 m grid that starts
    one 10 m pixel west of the file and three 10 m pixels (1.5 source pixels) below its top: each
    source pixel becomes 2 x 2, cut at an odd row; what the file does not cover is the caller's
    fill. odc-loader's own RioReader gives the same pixels, dtype and nodata conversion."""
    from odc.loader import RasterBandMetadata, RasterSource, RioReader, resolve_load_cfg

    src_pix = np.arange(1, 31, dtype="uint16").reshape(5, 6)
    src_pix[1, 2] = src_pix[3, 4] = 0
    path = _write(tmp_path / "b20.tif", src_pix, from_origin(500000, 4200000, 20, 20))
    gb = GeoBox(shape=(8, 10), affine=from_origin(500000 - 10, 4200000 - 30, 10, 10), crs=f"EPSG:{EPSG}")

    out_dtype = np.dtype(dtype or "uint16")
    expected = np.full((8, 10), fill, dtype=out_dtype)
    for i in range(8):                      # destination row i, column j <- source pixel, by hand
        for j in range(10):
            r, c = (i + 3) // 2, (j - 1) // 2
            if j >= 1 and 0 <= r < 5 and c < 6:
                expected[i, j] = fill if src_pix[r, c] == 0 else src_pix[r, c]
    assert np.array_equal(expected[0, 5:7], [fill, fill], equal_nan=True) and expected[0, 4] == 8

    meta = RasterBandMetadata(data_type="uint16", nodata=meta_nodata)
    cfg = resolve_load_cfg({"b": meta}, "nearest", dtype=dtype, nodata=load_nodata)["b"]
    src = RasterSource(uri=path, band=1, meta=meta)
    driver = make_driver(None, GDAL_HTTP_OPTIONS)
    state = driver.new_load(gb)
    into = np.full((8, 10), 7, dtype=out_dtype)      # 7: a value neither the file nor the fill has
    with driver.restore_env(driver.capture_env(), state) as ctx:
        fast = reading.aligned_read(src, cfg, gb, None)
        roi_into, view = reading.aligned_read(src, cfg, gb, None, dst=into)
        odc_roi, odc_pix = RioReader(src, ctx).read(cfg, gb)
        shifted = GeoBox(shape=(8, 10), affine=from_origin(500000 - 5, 4200000 - 30, 10, 10), crs=f"EPSG:{EPSG}")
        assert reading.aligned_read(src, cfg, shifted, None) is None      # half a pixel off: odc's warper
    driver.finalise_load(state)
    assert fast is not None
    for roi, pix in (fast, (odc_roi, odc_pix)):
        got = np.full((8, 10), fill, dtype=out_dtype)
        got[roi] = pix
        assert pix.dtype == out_dtype
        np.testing.assert_array_equal(got, expected)
    # straight into a destination: the window written in place, everything else untouched
    assert roi_into == fast[0] and np.shares_memory(view, into)
    np.testing.assert_array_equal(into[roi_into], expected[roi_into])
    outside = np.ones((8, 10), dtype=bool)
    outside[roi_into] = False
    assert (into[outside] == 7).all() and outside.sum() == 10 + 7      # row 7, column 0 of rows 0..6


def test_repeat_window_equals_numpy_repeat_into_any_destination():
    """The k x k repetition behind the aligned read, against ``np.repeat`` of the whole array, for
    random factors, offsets (cut mid-block) and sizes, into new arrays and into strided windows of
    a larger array of another dtype (left untouched around the window)."""
    rng = np.random.default_rng(1)
    for _ in range(2000):
        k, n, m = (int(v) for v in rng.integers(1, [7, 9, 9]))
        pix = rng.integers(0, 1000, (n, m)).astype("uint16")
        y, x = int(rng.integers(0, n * k)), int(rng.integers(0, m * k))
        h, w = int(rng.integers(1, n * k - y + 1)), int(rng.integers(1, m * k - x + 1))
        expected = np.repeat(np.repeat(pix, k, 0), k, 1)[y:y + h, x:x + w]
        np.testing.assert_array_equal(reading._repeat_window(pix, k, y, x, h, w), expected)
        host = np.full((h + 3, w + 5), -1.0, dtype="float32")
        reading._repeat_window(pix, k, y, x, h, w, out=host[1:1 + h, 2:2 + w])
        np.testing.assert_array_equal(host[1:1 + h, 2:2 + w], expected)
        host[1:1 + h, 2:2 + w] = -1.0
        assert (host == -1.0).all()


# ------------------------------------------------------------------------------------------------
# eager fusing = odc-stac's
# ------------------------------------------------------------------------------------------------
def test_eager_fusing_equals_odc_stac_and_the_first_valid_pixel_rule(tmp_path):
    """Two granules of one solar day overlap; the earlier one has a hole. The earlier granule wins
    where it is valid (time before id: its id sorts last), the later fills its hole and its edge;
    a third item whose footprint misses the grid is never opened (its file does not exist)."""
    import odc.stac

    rng = np.random.default_rng(0)
    a = rng.integers(1, 1000, (12, 12), dtype="uint16")
    a[2:6, 3:9] = 0
    b = rng.integers(1000, 2000, (12, 12), dtype="uint16")
    a_box = GeoBox(shape=(12, 12), affine=from_origin(500000, 4200000, 10, 10), crs=f"EPSG:{EPSG}")
    b_box = GeoBox(shape=(12, 12), affine=from_origin(500000 + 40, 4200000, 10, 10), crs=f"EPSG:{EPSG}")
    far = GeoBox(shape=(12, 12), affine=from_origin(600000, 4100000, 10, 10), crs=f"EPSG:{EPSG}")
    items = [
        _item("z-early", _write(tmp_path / "a.tif", a, a_box.transform), a_box, dt.datetime(2021, 6, 5, 15, 0, 0)),
        _item("a-late", _write(tmp_path / "b.tif", b, b_box.transform), b_box, dt.datetime(2021, 6, 5, 15, 0, 5)),
        _item("far", str(tmp_path / "absent.tif"), far, dt.datetime(2021, 6, 5, 15, 0, 2)),
    ]
    gb = GeoBox(shape=(12, 16), affine=from_origin(500000, 4200000, 10, 10), crs=f"EPSG:{EPSG}")

    groups = group_items(items, "solar_day", _lon(gb))
    assert [[i.id for i in g] for g in groups] == [["z-early", "far", "a-late"]]
    ours = read_eager(groups, {"B04": ("uint16", 0)}, gb, driver=make_driver(None, GDAL_HTTP_OPTIONS))["B04"]

    expected = np.zeros((12, 16), dtype="uint16")
    expected[:, 4:16] = b
    expected[:, :12] = np.where(a != 0, a, expected[:, :12])
    assert (expected[2:6, 3:4] == 0).all() and (expected[2:6, 4:9] >= 1000).all()   # hole: b where it reaches
    np.testing.assert_array_equal(ours[0], expected)

    ref = odc.stac.load(items, bands=["B04"], geobox=gb, groupby="solar_day", chunks=None, resampling="nearest",
                        stac_cfg={"toy": {"assets": {"B04": {"data_type": "uint16", "nodata": 0}}}})
    np.testing.assert_array_equal(ours, ref.B04.values)
