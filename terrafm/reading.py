"""Pixel reads behind :func:`terrafm.stac.load`: GDAL settings, a rasterio driver that signs at read
time and re-signs on expiry, an aligned fast path, and the eager loader that reads into numpy.

The lazy path hands :func:`make_driver`'s driver to odc-stac, which plans the dask graph. The eager
path (``load(..., chunks=False)``, one chip or block at a time) reads through the same driver with
odc-stac's grouping and fusing rules (:func:`group_items`, :func:`read_eager`) but skips building
odc's intermediate Dataset, which for a single chip cost as much time as the pixel reads.

Examples
--------
>>> from odc.geo.geobox import GeoBox
>>> gb = GeoBox.from_bbox((500000, 4190000, 502240, 4192240), "EPSG:32618", resolution=10)
>>> driver = make_driver(sign=None, gdal_options=GDAL_HTTP_OPTIONS)
>>> arrays = read_eager([], {"B04": ("uint16", 0)}, gb, driver=driver)
>>> arrays["B04"].shape, arrays["B04"].dtype
((0, 224, 224), dtype('uint16'))
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GDAL_HTTP_OPTIONS", "TerraFMReadError", "make_driver", "nominal_datetime", "solar_date", "footprint",
           "group_items", "group_times", "read_eager", "pc_sign"]

GDAL_HTTP_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    "GDAL_HTTP_TIMEOUT": "60",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.jp2",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
}
"""GDAL settings for pixel reads: retries with back-off on 429/5xx and timeouts, no directory probes."""


class TerraFMReadError(RuntimeError):
    """A pixel read failed after retries (asset gone, access denied, corrupt)."""


# ------------------------------------------------------------------------------------------------
# signing
# ------------------------------------------------------------------------------------------------
def unsigned(href: str) -> str:
    """``href`` without a Planetary Computer SAS token (for messages and re-signing).

    Examples
    --------
    >>> unsigned("https://x.blob.core.windows.net/c/a.tif?st=1&sig=abc")
    'https://x.blob.core.windows.net/c/a.tif'
    """
    parts = urlsplit(href)
    if parts.netloc.endswith(".blob.core.windows.net"):
        return urlunsplit(parts._replace(query=""))
    return href


def pc_sign(href: str, refresh: bool = False) -> str:
    """Sign ``href`` with a Planetary Computer SAS token; ``refresh`` drops cached tokens first.

    Examples
    --------
    >>> pc_sign("https://x.blob.core.windows.net/c/a.tif")           # doctest: +SKIP
    'https://x.blob.core.windows.net/c/a.tif?st=...&sig=...'
    """
    import planetary_computer
    from planetary_computer.sas import TOKEN_CACHE

    base = unsigned(href)
    if refresh:
        TOKEN_CACHE.clear()
    return planetary_computer.sign_url(base)


# ------------------------------------------------------------------------------------------------
# reading one band onto a GeoBox
# ------------------------------------------------------------------------------------------------
def _repeat_window(pix: np.ndarray, k: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Rows ``y:y+h``, columns ``x:x+w`` of ``pix`` with every pixel repeated ``k`` x ``k``.

    One gather per axis, straight into the output shape (no full-size repeated intermediate).
    """
    rows = np.arange(y, y + h) // k
    cols = np.arange(x, x + w) // k
    return np.take(np.take(pix, rows, axis=0), cols, axis=1)


def aligned_read(src, cfg, dst_geobox, selection):
    """Read the source window behind ``dst_geobox`` when the grids align, else return ``None``.

    Aligned means: same CRS, no rotation, source pixel = k x destination pixel (k a positive
    integer) and the destination origin an integer number of destination pixels from the
    source's. Then nearest resampling is an exact k x k repetition of a plain windowed read, which
    skips odc's reprojection set-up and GDAL's warper (the common case of 10/20/60 m Sentinel-2
    bands on a 10 m UTM grid). Other cases (bilinear upsampling, another CRS) go through odc.

    Returns ``((row_slice, col_slice), pixels)`` in destination pixels, as odc readers do.

    Examples
    --------
    >>> aligned_read(src, cfg, geobox, None)                          # doctest: +SKIP
    ((slice(0, 224), slice(0, 224)), array(...))
    """
    import rasterio
    from odc.loader._reader import (nodata_mask, resolve_band_query, resolve_dst_dtype, resolve_dst_nodata,
                                    resolve_src_nodata, same_nodata)
    from rasterio.windows import Window

    if selection is not None or dst_geobox.crs is None:
        return None
    dt_ = dst_geobox.transform
    with rasterio.open(src.uri, "r", sharing=False) as rdr:
        st = rdr.transform
        if st.b or st.d or dt_.b or dt_.d or rdr.crs is None:
            return None
        k = st.a / dt_.a
        if abs(k - round(k)) > 1e-9 or round(k) < 1 or abs(st.e / dt_.e - k) > 1e-9:
            return None
        k = int(round(k))
        if k > 1 and not cfg.nearest:
            return None
        off_x, off_y = (dt_.c - st.c) / dt_.a, (dt_.f - st.f) / dt_.e
        if abs(off_x - round(off_x)) > 1e-6 or abs(off_y - round(off_y)) > 1e-6:
            return None
        if dst_geobox.crs != rdr.crs:
            return None
        bidx = resolve_band_query(src, rdr.count, selection=None)
        if not isinstance(bidx, int):
            return None
        off_x, off_y = int(round(off_x)), int(round(off_y))
        h, w = dst_geobox.shape.yx
        i0, i1 = max(0, -off_y), min(h, rdr.height * k - off_y)
        j0, j1 = max(0, -off_x), min(w, rdr.width * k - off_x)
        dtype = resolve_dst_dtype(rdr.dtypes[bidx - 1], cfg)
        if i0 >= i1 or j0 >= j1:
            return (slice(0, 0), slice(0, 0)), np.empty((0, 0), dtype=dtype)
        r0, r1 = (off_y + i0) // k, (off_y + i1 - 1) // k + 1
        c0, c1 = (off_x + j0) // k, (off_x + j1 - 1) // k + 1
        pix = rdr.read(bidx, window=Window(c0, r0, c1 - c0, r1 - r0))
        src_nodata = resolve_src_nodata(rdr.nodatavals[bidx - 1], cfg)
    if k > 1:
        pix = _repeat_window(pix, k, off_y + i0 - r0 * k, off_x + j0 - c0 * k, i1 - i0, j1 - j0)
    out = pix.astype(dtype, copy=False)
    dst_nodata = resolve_dst_nodata(out.dtype, cfg, src_nodata)
    if dst_nodata is not None and not same_nodata(src_nodata, dst_nodata):
        np.copyto(out, dst_nodata, where=nodata_mask(pix, src_nodata))
    return (slice(i0, i1), slice(j0, j1)), out


def make_driver(sign: Callable[[str, bool], str] | None, gdal_options: Mapping[str, str]):
    """An odc-loader reader driver: GDAL options, signing at read time, aligned fast path, clear errors.

    Parameters
    ----------
    sign : callable or None
        ``sign(href, refresh)`` returns a readable URL (e.g. :func:`pc_sign`). A failed read is
        retried once with ``refresh=True``, because GDAL reports an expired token only as a failed
        read.
    gdal_options : mapping
        GDAL configuration for every read (:data:`GDAL_HTTP_OPTIONS` and the caller's).

    Examples
    --------
    >>> driver = make_driver(sign=None, gdal_options=GDAL_HTTP_OPTIONS)
    >>> driver.capture_env()["GDAL_HTTP_MAX_RETRY"]
    '5'
    """
    from odc.loader._rio import RioDriver, RioReader, rio_read

    class _Reader(RioReader):
        def read(self, cfg, dst_geobox, *, dst=None, selection=None):
            src = self._src
            attempts = 2 if sign else 1
            for attempt in range(attempts):
                if sign:
                    src = self._src.patch(uri=sign(self._src.uri, attempt > 0))
                try:
                    if dst is None:
                        fast = aligned_read(src, cfg, dst_geobox, selection)
                        if fast is not None:
                            return fast
                    return rio_read(src, cfg, dst_geobox, dst=dst, selection=selection)
                except Exception as err:  # rasterio raises several IO error types
                    text = str(err)
                    if sign and attempt + 1 < attempts:  # GDAL hides the 403 behind "Read failed"
                        logger.info("read of %s failed (%s), re-signing with a fresh token", unsigned(src.uri), text)
                        continue
                    raise TerraFMReadError(
                        f"could not read {unsigned(src.uri)} after GDAL's retries: {text}. The asset may "
                        "have been removed or its link expired: search again and reload; nothing was written."
                    ) from err

    class _Driver(RioDriver):
        def capture_env(self):
            env = super().capture_env()
            env.update(gdal_options)
            return env

        def open(self, src, ctx):
            return _Reader(src, ctx)

    return _Driver()


# ------------------------------------------------------------------------------------------------
# eager loading: odc-stac's grouping and fusing, straight into numpy
# ------------------------------------------------------------------------------------------------
def nominal_datetime(item) -> _dt.datetime:
    """The item's time as odc-stac takes it (``datetime``, else ``start_datetime``, else
    ``end_datetime``), in UTC without a time zone.

    Examples
    --------
    >>> import pystac
    >>> period = {"start_datetime": "2023-06-01T10:00:00Z", "end_datetime": "2023-06-30T00:00:00Z"}
    >>> nominal_datetime(pystac.Item("a", None, None, None, period))
    datetime.datetime(2023, 6, 1, 10, 0)
    """
    import pystac.utils

    if item.datetime is not None:
        return item.datetime.replace(tzinfo=None)
    for key in ("start_datetime", "end_datetime"):
        if item.properties.get(key):
            return pystac.utils.str_to_datetime(item.properties[key]).replace(tzinfo=None)
    raise ValueError(f"item {item.id} has no datetime, start_datetime or end_datetime")


def solar_date(utc: _dt.datetime, lon: float) -> _dt.date:
    """Local solar date as odc-stac computes it: UTC time shifted by whole hours of ``lon`` / 15.

    Examples
    --------
    >>> solar_date(_dt.datetime(2021, 6, 5, 23, 30), lon=171.0), solar_date(_dt.datetime(2021, 6, 5, 23, 30), lon=14.9)
    (datetime.date(2021, 6, 6), datetime.date(2021, 6, 5))
    """
    return (utc + _dt.timedelta(hours=int(lon / 15))).date()


def footprint(item):
    """The item's footprint in EPSG:4326 (its geometry, else its bbox) as shapely, or ``None``.

    Examples
    --------
    >>> import pystac
    >>> import datetime as dt
    >>> footprint(pystac.Item("a", None, [0.0, 1.0, 2.0, 3.0], dt.datetime(2023, 6, 1), {})).bounds
    (0.0, 1.0, 2.0, 3.0)
    """
    import shapely.geometry

    if item.geometry:
        return shapely.geometry.shape(item.geometry)
    if item.bbox:
        return shapely.geometry.box(*item.bbox)
    return None


def group_items(items: Sequence, groupby: str, lon: float) -> list[list]:
    """Group items into time steps exactly as odc-stac does.

    ``"solar_day"``: UTC date shifted by whole hours of ``lon`` / 15 (``lon``: the output grid's
    centre); ``"time"``: same timestamp; ``"id"``: one step per item; any other string: the
    value of that item property. Steps are sorted by key, items inside a step by time then id,
    and the first item's time labels the step.

    Examples
    --------
    >>> import pystac, datetime as dt
    >>> mk = lambda i, h: pystac.Item(i, None, None, dt.datetime(2023, 6, 1, h), {})
    >>> [[i.id for i in g] for g in group_items([mk("b", 23), mk("a", 10)], "solar_day", lon=30.0)]
    [['a'], ['b']]
    >>> [[i.id for i in g] for g in group_items([mk("b", 23), mk("a", 10)], "solar_day", lon=-30.0)]
    [['a', 'b']]
    """
    nominal = [nominal_datetime(i) for i in items]
    if groupby == "solar_day":
        keys = [solar_date(t, lon) for t in nominal]
    elif groupby == "time":
        keys = nominal
    elif groupby == "id":
        keys = list(range(len(items)))
    else:
        keys = [i.properties.get(groupby) for i in items]
    order = sorted(range(len(items)), key=lambda k: (keys[k], nominal[k], items[k].id))
    return [[items[k] for k in group] for _, group in itertools.groupby(order, key=lambda k: keys[k])]


def group_times(groups: Sequence[Sequence]) -> np.ndarray:
    """Label of each time step from :func:`group_items`: its first item's time, as odc-stac labels it.

    Examples
    --------
    >>> import pystac, datetime as dt
    >>> group_times([[pystac.Item("a", None, None, dt.datetime(2023, 6, 1, 10, 30), {})]])
    array(['2023-06-01T10:30:00.000000000'], dtype='datetime64[ns]')
    """
    return np.array([nominal_datetime(g[0]) for g in groups], dtype="datetime64[ns]")


def read_eager(
    groups: Sequence[Sequence],
    bands: Mapping[str, tuple[str, float]],
    geobox: Any,
    *,
    driver: Any,
    resampling: str = "nearest",
) -> dict[str, np.ndarray]:
    """Read ``bands`` of grouped items onto ``geobox`` into numpy, one time step per group.

    Same semantics as ``odc.stac.load(..., chunks=None)``: in a step, the first item (by time,
    then id) with a valid pixel wins; items whose footprint misses the grid are not read; pixels
    no item covers hold the band's nodata.

    Parameters
    ----------
    groups : sequence of sequences of pystac.Item
        Items of one collection, from :func:`group_items`.
    bands : mapping
        Asset key -> (dtype, nodata).
    geobox : odc.geo.geobox.GeoBox
        Output grid.
    driver
        From :func:`make_driver`.
    resampling : str
        Resampling for bands coarser or finer than the grid.

    Returns
    -------
    dict : asset key -> array (time, y, x).

    Examples
    --------
    >>> arrays = read_eager(group_items(items, "solar_day", lon), {"B04": ("uint16", 0)}, geobox,
    ...                     driver=driver)                                           # doctest: +SKIP
    >>> arrays["B04"].shape[1:] == geobox.shape.yx  # doctest: +SKIP
    True
    """
    from odc.loader import resolve_load_cfg
    from odc.loader.types import RasterBandMetadata, RasterSource

    extent = geobox.extent.to_crs("EPSG:4326").geom
    meta = {key: RasterBandMetadata(data_type=dtype, nodata=nodata) for key, (dtype, nodata) in bands.items()}
    cfg = resolve_load_cfg(meta, resampling, fail_on_error=True)
    arrays = {key: np.full((len(groups),) + tuple(geobox.shape.yx), nodata, dtype=dtype)
              for key, (dtype, nodata) in bands.items()}
    env = driver.capture_env()
    load_state = driver.new_load(geobox)
    with driver.restore_env(env, load_state) as ctx:
        for t, group in enumerate(groups):
            hits = [item for item in group if (shape := footprint(item)) is None or shape.intersects(extent)]
            for key, (_, nodata) in bands.items():
                dst = arrays[key][t]
                for n, item in enumerate(hits):
                    src = RasterSource(uri=item.assets[key].href, band=1, meta=meta[key])
                    roi, pix = driver.open(src, ctx).read(cfg[key], geobox)
                    if n == 0:
                        dst[roi] = pix
                    else:  # later granules only fill what earlier ones left at nodata
                        hole = np.isnan(dst[roi]) if np.isnan(nodata) else dst[roi] == nodata
                        np.copyto(dst[roi], pix, where=hole)
    driver.finalise_load(load_state)
    return arrays
