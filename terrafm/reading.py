"""Pixel reads behind :func:`terrafm.stac.load`: GDAL settings, a rasterio driver that signs at read
time and re-signs on expiry, an aligned fast path, and the eager loader that reads into numpy.

The lazy path hands :func:`make_driver`'s driver to ``odc.stac.load``, which plans the dask graph.
The eager path (``load(..., chunks=False)``, one chip or block at a time) reads through the same
driver with odc-stac's documented grouping and fusing rules (:func:`group_items`,
:func:`read_eager`) but skips building odc's intermediate Dataset.

Only public odc-loader API is used: the names in ``odc.loader.__all__`` (``RioDriver``,
``RioReader``, ``RasterSource``, ``RasterBandMetadata``, ``resolve_load_cfg``,
``resolve_src_nodata``, ``resolve_dst_nodata``, ``resolve_dst_dtype``) and the ``ReaderDriver``
protocol that ``odc.stac.load(driver=...)`` documents. The driver wraps a ``RioDriver`` and each
read wraps a ``RioReader`` (no subclassing); the aligned path's two nodata helpers are a few
lines each here, with odc-loader's semantics (its own are private). odc-loader is a declared dependency (``>=0.6.4,<0.7``:
``RioDriver``/``RioReader`` became public in 0.6.0, odc-stac 0.5 needs 0.6.4), because this
module imports it directly.

Two odc-stac rules are written out here because odc-stac has no public function for them:

* grouping (:func:`group_items`): terrafm needs the items of each time step (e.g. the S2
  processing baseline per step), which ``odc.stac.load`` does not return. The rule is the one
  ``odc.stac.load``'s ``groupby`` documents (solar day, time, id or a property; items sorted by
  time then id inside a step); ``stac.load`` checks that odc-stac made as many steps.
* fusing in :func:`read_eager` (first valid pixel wins, odc-loader's default fuser). The public
  alternative, ``odc.stac.load(..., chunks=None)``, gives the same pixels but builds an xarray
  Dataset per call (about a third of its time on a chip): 16 chips of 224 px S2 (13 assets) +
  S1 (2) loaded at 2.1 chips/s through it against 3.1 through :func:`read_eager`, same driver,
  interleaved rounds on the same (busy) machine; the per-call set-up is what
  ``benchmarks/bench_load.py`` guards (>= 0.85 of bare rasterio).

The guard for both is ``tests/stac/test_load.py::test_eager_load_equals_lazy_load`` (eager == odc-stac's
lazy load for paired, union, reprojected and harmonized loads) and
``test_aligned_fast_read_equals_odc_reprojection``; re-run them before widening the odc-stac or
odc-loader version ranges in ``pyproject.toml``.

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
import functools
import itertools
import logging
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GDAL_HTTP_OPTIONS", "TerraFMReadError", "make_driver", "nominal_datetime", "solar_date", "footprint",
           "group_items", "group_times", "read_eager", "pc_sign", "unsigned"]

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
def _repeat_window(pix: np.ndarray, k: int, y: int, x: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``y:y+h``, columns ``x:x+w`` of ``pix`` with every pixel repeated ``k`` x ``k``,
    written into ``out`` (a new array if ``None``; any strides, e.g. a window of a larger array).

    Columns are repeated once (``np.repeat``); each source row is then broadcast to its ``k``
    output rows, straight into ``out``: about half the time of two gathers or two repeats.

    Examples
    --------
    >>> _repeat_window(np.array([[1, 2], [3, 4]]), 2, 1, 1, 3, 2)
    array([[1, 2],
           [3, 4],
           [3, 4]])
    """
    wide = np.repeat(pix, k, axis=1)[:, x:x + w]
    if out is None:
        out = np.empty((h, w), dtype=pix.dtype)
    i, r = 0, y // k
    head = min(h, (k - y % k) % k)  # output rows of a source row entered part-way
    if head:
        out[:head] = wide[r]
        i, r = head, r + 1
    n_full = (h - i) // k
    if n_full:
        # splitting the row axis is always a view, so this writes into out
        out[i:i + n_full * k].reshape(n_full, k, w)[...] = wide[r:r + n_full, None, :]
        i, r = i + n_full * k, r + n_full
    if i < h:
        out[i:] = wide[r]
    return out


def _nodata_mask(pix: np.ndarray, nodata: float | None) -> np.ndarray:
    """Where ``pix`` is nodata, by odc-loader's rule: NaN is always nodata in a float band.

    Examples
    --------
    >>> _nodata_mask(np.array([0, 3], dtype="uint16"), 0), _nodata_mask(np.array([np.nan, 0.0, 2.0]), 0.0)
    (array([ True, False]), array([ True,  True, False]))
    """
    if pix.dtype.kind == "f":
        if nodata is None or np.isnan(nodata):
            return np.isnan(pix)
        return np.isnan(pix) | (pix == nodata)
    if nodata is None:
        return np.zeros(pix.shape, dtype=bool)
    return pix == nodata


def _same_nodata(a: float | None, b: float | None) -> bool:
    """``a`` and ``b`` mark the same pixels as nodata (NaN equals NaN, None only None).

    Examples
    --------
    >>> _same_nodata(float("nan"), float("nan")), _same_nodata(0, None), _same_nodata(0, 0.0)
    (True, False, True)
    """
    if a is None or b is None:
        return a is None and b is None
    if np.isnan(a) or np.isnan(b):
        return bool(np.isnan(a) and np.isnan(b))
    return a == b


@functools.lru_cache(maxsize=64)
def _same_crs(dst_crs: str, src_wkt: str) -> bool:
    """odc-geo's CRS equality, memoised: a file's WKT is cheap, comparing two CRSs is not.

    Examples
    --------
    >>> import pyproj
    >>> _same_crs("EPSG:32618", pyproj.CRS.from_epsg(32618).to_wkt()), _same_crs("EPSG:32618", pyproj.CRS.from_epsg(32617).to_wkt())
    (True, False)
    """
    from odc.geo import CRS

    return CRS(dst_crs) == CRS(src_wkt)


def aligned_read(src, cfg, dst_geobox, selection, dst: np.ndarray | None = None):
    """Read the source window behind ``dst_geobox`` when the grids align, else return ``None``.

    Aligned means: same CRS, no rotation, source pixel = k x destination pixel (k a positive
    integer) and the destination origin an integer number of destination pixels from the
    source's. Then nearest resampling is an exact k x k repetition of a plain windowed read, which
    skips odc's reprojection set-up and GDAL's warper (the common case of 10/20/60 m Sentinel-2
    bands on a 10 m UTM grid). Other cases (bilinear upsampling, another CRS, band selections)
    return ``None`` and go through odc-loader's :class:`odc.loader.RioReader`.

    ``src`` is an :class:`odc.loader.RasterSource`, ``cfg`` an :class:`odc.loader.RasterLoadParams`.
    Returns ``((row_slice, col_slice), pixels)`` in destination pixels, as odc readers do, with
    odc-loader's output dtype and nodata rules (:func:`odc.loader.resolve_dst_dtype`, ...). Given
    ``dst`` (an array of the grid's shape), the pixels are written into ``dst[roi]`` and that view
    is returned, as odc-loader's ``RioReader`` does: no intermediate copy.

    Examples
    --------
    >>> aligned_read(src, cfg, geobox, None)                          # doctest: +SKIP
    ((slice(0, 224), slice(0, 224)), array(...))
    """
    import rasterio
    from odc.loader import resolve_dst_dtype, resolve_dst_nodata, resolve_src_nodata
    from rasterio.windows import Window

    if selection is not None or dst_geobox.crs is None or not isinstance(src.band, int) or src.band < 1:
        return None
    if dst is not None and dst.shape != tuple(dst_geobox.shape.yx):
        return None
    if src.geobox is not None and src.geobox.crs != dst_geobox.crs:  # known from STAC metadata: skip the open
        return None
    dt_ = dst_geobox.transform
    with rasterio.open(src.uri, "r", sharing=False) as rdr:
        st = rdr.transform
        if st.b or st.d or dt_.b or dt_.d or rdr.crs is None or src.band > rdr.count:
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
        if not _same_crs(str(dst_geobox.crs), rdr.crs.to_wkt()):
            return None
        off_x, off_y = int(round(off_x)), int(round(off_y))
        h, w = dst_geobox.shape.yx
        i0, i1 = max(0, -off_y), min(h, rdr.height * k - off_y)
        j0, j1 = max(0, -off_x), min(w, rdr.width * k - off_x)
        dtype = resolve_dst_dtype(rdr.dtypes[src.band - 1], cfg)
        if i0 >= i1 or j0 >= j1:
            return (slice(0, 0), slice(0, 0)), np.empty((0, 0), dtype=dtype if dst is None else dst.dtype)
        r0, r1 = (off_y + i0) // k, (off_y + i1 - 1) // k + 1
        c0, c1 = (off_x + j0) // k, (off_x + j1 - 1) // k + 1
        window = Window(c0, r0, c1 - c0, r1 - r0)
        src_nodata = resolve_src_nodata(rdr.nodatavals[src.band - 1], cfg)
        roi = (slice(i0, i1), slice(j0, j1))
        if dst is not None:
            out = dst[roi]
            if k == 1:
                rdr.read(src.band, window=window, out=out)   # GDAL converts to out's dtype
            else:
                pix = rdr.read(src.band, window=window)
                _repeat_window(pix, k, off_y + i0 - r0 * k, off_x + j0 - c0 * k, i1 - i0, j1 - j0, out=out)
            source_values = out
        else:
            pix = rdr.read(src.band, window=window)
    if dst is None:
        if k > 1:
            pix = _repeat_window(pix, k, off_y + i0 - r0 * k, off_x + j0 - c0 * k, i1 - i0, j1 - j0)
        out = pix.astype(dtype, copy=False)
        source_values = pix
    dst_nodata = resolve_dst_nodata(out.dtype, cfg, src_nodata)
    if dst_nodata is not None and not _same_nodata(src_nodata, dst_nodata):
        np.copyto(out, dst_nodata, where=_nodata_mask(source_values, src_nodata))
    return roi, out


class _SigningReader:
    """odc-loader reader of one source: signs its href, tries the aligned read, else odc's RioReader."""

    def __init__(self, src, ctx, sign: Callable[[str, bool], str] | None):
        self._src, self._ctx, self._sign = src, ctx, sign

    def read(self, cfg, dst_geobox, *, dst=None, selection=None):
        from odc.loader import RioReader

        href = self._src.uri
        uri = self._sign(href, False) if self._sign else href
        # a second attempt only for an href the signer changed (or one carrying a SAS token):
        # GDAL reports an expired token only as a failed read; an href nobody signs would fail again
        may_resign = self._sign is not None and (uri != href or unsigned(uri) != uri)
        while True:
            src = self._src if uri == href else self._src.patch(uri=uri)
            try:
                fast = aligned_read(src, cfg, dst_geobox, selection, dst=dst)
                if fast is not None:
                    return fast
                roi, pix = RioReader(src, self._ctx).read(cfg, dst_geobox, selection=selection)
                if dst is None:
                    return roi, pix
                dst[roi] = pix  # odc's own dst= path hands numpy views to GDAL's warper: not relied on
                return roi, dst[roi]
            except Exception as err:  # rasterio raises several IO error types
                text = str(err)
                if may_resign:
                    may_resign = False
                    fresh = self._sign(href, True)
                    if fresh != uri:
                        logger.info("read of %s failed (%s), re-signing with a fresh token", unsigned(href), text)
                        uri = fresh
                        continue
                raise TerraFMReadError(
                    f"could not read {unsigned(href)} after GDAL's retries: {text}. The asset may "
                    "have been removed or its link expired: search again and reload; nothing was written."
                ) from err


class _SigningDriver:
    """odc-loader reader driver (the ``odc.loader.ReaderDriver`` protocol) around odc's public RioDriver.

    Adds the GDAL options to the captured environment and opens a :class:`_SigningReader` per
    source. A plain module-level class holding picklable state, so dask can ship it to workers.
    """

    def __init__(self, sign: Callable[[str, bool], str] | None, gdal_options: Mapping[str, str]):
        from odc.loader import RioDriver

        self._rio = RioDriver()
        self._sign = sign
        self._gdal_options = dict(gdal_options)

    def new_load(self, geobox, *, chunks=None):
        return self._rio.new_load(geobox, chunks=chunks)

    def finalise_load(self, load_state):
        return self._rio.finalise_load(load_state)

    def capture_env(self) -> dict[str, Any]:
        return {**self._rio.capture_env(), **self._gdal_options}

    def restore_env(self, env, load_state):
        return self._rio.restore_env(env, load_state)

    def open(self, src, ctx) -> _SigningReader:
        return _SigningReader(src, ctx, self._sign)

    @property
    def md_parser(self):
        return self._rio.md_parser

    @property
    def dask_reader(self):
        return self._rio.dask_reader

    @property
    def aux_reader(self):
        return self._rio.aux_reader


def make_driver(sign: Callable[[str, bool], str] | None, gdal_options: Mapping[str, str]):
    """An odc-loader reader driver: GDAL options, signing at read time, aligned fast path, clear errors.

    Parameters
    ----------
    sign : callable or None
        ``sign(href, refresh)`` returns a readable URL (e.g. :func:`pc_sign`), or ``href`` itself
        for an asset that needs no signing. When the read of an href the signer changed (or of
        one already carrying a SAS token) fails, it is re-signed with ``sign(href, True)`` and read
        once more if that gives another URL, because GDAL reports an expired token only as a
        failed read. An href the signer leaves alone is read once: no refresh, no second attempt.
    gdal_options : mapping
        GDAL configuration for every read (:data:`GDAL_HTTP_OPTIONS` and the caller's).

    Examples
    --------
    >>> driver = make_driver(sign=None, gdal_options=GDAL_HTTP_OPTIONS)
    >>> driver.capture_env()["GDAL_HTTP_MAX_RETRY"]
    '5'
    """
    return _SigningDriver(sign, gdal_options)


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
    from odc.loader import RasterBandMetadata, RasterSource, resolve_load_cfg

    extent = geobox.extent.to_crs("EPSG:4326").geom
    meta = {key: RasterBandMetadata(data_type=dtype, nodata=nodata) for key, (dtype, nodata) in bands.items()}
    cfg = resolve_load_cfg(meta, resampling, fail_on_error=True)
    # every pixel is written once below (the first granule's window, nodata around it), so no
    # np.full pass over the output first
    arrays = {key: np.empty((len(groups),) + tuple(geobox.shape.yx), dtype=dtype) for key, (dtype, _) in bands.items()}
    env = driver.capture_env()
    load_state = driver.new_load(geobox)
    with driver.restore_env(env, load_state) as ctx:
        for t, group in enumerate(groups):
            hits = [item for item in group if (shape := footprint(item)) is None or shape.intersects(extent)]
            for key, (_, nodata) in bands.items():
                dst = arrays[key][t]
                if not hits:
                    dst.fill(nodata)
                for n, item in enumerate(hits):
                    reader = driver.open(RasterSource(uri=item.assets[key].href, band=1, meta=meta[key]), ctx)
                    if n == 0:  # straight into the output
                        roi, pix = reader.read(cfg[key], geobox, dst=dst)
                        if not np.may_share_memory(pix, dst):
                            dst[roi] = pix
                        _fill_outside(dst, roi, nodata)
                    else:  # later granules only fill what earlier ones left at nodata
                        roi, pix = reader.read(cfg[key], geobox)
                        hole = np.isnan(dst[roi]) if np.isnan(nodata) else dst[roi] == nodata
                        np.copyto(dst[roi], pix, where=hole)
    driver.finalise_load(load_state)
    return arrays


def _fill_outside(dst: np.ndarray, roi: tuple[slice, slice], value) -> None:
    """Set every pixel of the 2-D ``dst`` outside the window ``roi`` to ``value``.

    Examples
    --------
    >>> a = np.ones((3, 4), dtype="uint8")
    >>> _fill_outside(a, (slice(1, 2), slice(1, 3)), 0)
    >>> a
    array([[0, 0, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0]], dtype=uint8)
    """
    (r0, r1, _), (c0, c1, _) = roi[0].indices(dst.shape[0]), roi[1].indices(dst.shape[1])
    if r1 <= r0 or c1 <= c0:
        dst.fill(value)
        return
    dst[:r0] = value
    dst[r1:] = value
    dst[r0:r1, :c0] = value
    dst[r0:r1, c1:] = value
