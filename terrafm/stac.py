"""STAC search, signing and loading onto one 10 m grid (odc-stac), with validity masks.

Planetary Computer is the default catalog (items signed with planetary-computer, re-signed at read
time so long loads survive token expiry); Earth Search and any STAC API work by URL. Which
collection carries which modality, under which asset keys, is the table
:data:`terrafm.sensors.CATALOGS`.

Examples
--------
>>> import terrafm                                                         # doctest: +SKIP
>>> ds = terrafm.open_sentinel((11.50, 48.10, 11.56, 48.14), "2023-06-01", "2023-08-31")  # doctest: +SKIP
>>> ds.B04.dims, ds.rio.crs.to_epsg(), ds.attrs["terrafm_modalities"]  # doctest: +SKIP
(('time', 'y', 'x'), 32632, ['s2_l2a', 's1'])
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import threading
import uuid
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import xarray as xr

from . import sensors

logger = logging.getLogger(__name__)

__all__ = ["search", "load", "open_sentinel", "save", "TerraFMReadError", "TerraFMSearchError", "GDAL_HTTP_OPTIONS", "aoi_geometry"]

CHIP_SIZE = 224
"""Side of one model chip in pixels; an AOI must be at least this large."""

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

_API_RETRY = dict(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))


class TerraFMReadError(RuntimeError):
    """A pixel read failed after retries (asset gone, access denied, corrupt)."""


class TerraFMSearchError(RuntimeError):
    """The STAC API kept failing (5xx/429, or refused the request) after retries with back-off."""


# ------------------------------------------------------------------------------------------------
# AOI handling
# ------------------------------------------------------------------------------------------------
def aoi_geometry(aoi: Any):
    """Return a shapely geometry in lon/lat from a bbox, shapely geometry, GeoJSON or GeoDataFrame.

    Raises ``ValueError`` for a bbox with a latitude outside [-90, 90] (then it is (lat, lon)
    order) or min > max. Swaps that stay inside [-90, 90] are caught where data tells them apart:
    :func:`search` retries an empty search with the coordinates swapped, :func:`load` checks the
    AOI against the item footprints, and both name the fix.

    Examples
    --------
    >>> aoi_geometry((11.5, 48.1, 11.6, 48.2)).bounds
    (11.5, 48.1, 11.6, 48.2)
    """
    import shapely.geometry

    if hasattr(aoi, "to_crs") and hasattr(aoi, "geometry"):  # GeoDataFrame / GeoSeries
        aoi = aoi.to_crs(4326).union_all() if hasattr(aoi, "union_all") else aoi.to_crs(4326).unary_union
    if isinstance(aoi, Mapping):
        aoi = shapely.geometry.shape(aoi.get("geometry", aoi))
    if isinstance(aoi, (tuple, list, np.ndarray)):
        if len(aoi) != 4:
            raise ValueError(f"a bbox needs 4 numbers (west, south, east, north); got {list(aoi)}")
        west, south, east, north = map(float, aoi)
        if abs(south) > 90 or abs(north) > 90:
            raise ValueError(
                f"bbox {tuple(aoi)} has a latitude outside [-90, 90]: it looks like (lat, lon) order. "
                "Pass (west, south, east, north) = (lon_min, lat_min, lon_max, lat_max)."
            )
        if west > east or south > north:
            raise ValueError(
                f"bbox {tuple(aoi)} has min > max; pass (west, south, east, north) with west < east "
                "and south < north (lat/lon swapped?)"
            )
        return shapely.geometry.box(west, south, east, north)
    if hasattr(aoi, "geom_type"):
        minx, miny, maxx, maxy = aoi.bounds
        if abs(miny) > 90 or abs(maxy) > 90:
            raise ValueError("AOI geometry has latitudes outside [-90, 90]: coordinates must be (lon, lat).")
        return aoi
    raise TypeError(f"unsupported AOI type {type(aoi).__name__}: pass a bbox, shapely geometry, GeoJSON or GeoDataFrame")


def _swap_lonlat(geom):
    """The geometry with x and y exchanged, or ``None`` when that cannot be a (lon, lat) geometry."""
    import shapely

    swapped = shapely.transform(geom, lambda xy: xy[:, ::-1])
    _, miny, _, maxy = swapped.bounds
    return swapped if -90 <= miny <= maxy <= 90 else None


def _swap_error(given, swapped, what: str, otherwise: str = "") -> ValueError:
    west, south, east, north = (round(v, 6) for v in swapped.bounds)
    return ValueError(
        f"the AOI {tuple(round(v, 6) for v in given.bounds)} {what}, but the same coordinates read the "
        f"other way round (bounds {(west, south, east, north)}) do: the AOI looks like (lat, lon) order. "
        f"Pass (west, south, east, north) = (lon_min, lat_min, lon_max, lat_max), e.g. "
        f"{(west, south, east, north)}, or swap the geometry's coordinates to (lon, lat)." + otherwise
    )


def _utm_epsg(lon: float, lat: float) -> int:
    zone = int((lon + 180) // 6) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


# ------------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------------
def _catalog(catalog: str | None, url: str | None) -> tuple[str | None, str, str | None]:
    if catalog is not None and catalog.startswith(("http://", "https://")):
        catalog, url = None, catalog
    if catalog is None:
        if url is None:
            raise ValueError("pass catalog='planetary-computer' / 'earth-search' or url='https://.../stac'")
        return None, url, None
    if catalog not in sensors.CATALOGS:
        raise ValueError(f"unknown catalog {catalog!r}; use one of {list(sensors.CATALOGS)} or url=...")
    entry = sensors.CATALOGS[catalog]
    return catalog, url or entry["url"], entry["sign"]


def _spec_for(catalog: str | None, collection: str) -> sensors.CollectionSpec:
    if catalog is not None:
        try:
            return sensors.collection_spec(catalog, collection)
        except KeyError as err:
            raise ValueError(str(err.args[0])) from None
    for entry in sensors.CATALOGS.values():
        if collection in entry["collections"]:
            return entry["collections"][collection]
    known = sorted({c for e in sensors.CATALOGS.values() for c in e["collections"]})
    raise ValueError(f"collection {collection!r} maps to no TerraFM modality; use one of {known}")


def search(
    aoi: Any,
    datetime: str | Sequence[str],
    collections: Sequence[str] = ("sentinel-2-l2a", "sentinel-1-rtc"),
    catalog: str | None = "planetary-computer",
    *,
    url: str | None = None,
    max_cloud: float | None = None,
    limit: int | None = None,
    timeout: float = 60.0,
    max_retries: int = 5,
    **query: Any,
) -> list:
    """Search a STAC API for the items covering ``aoi`` during ``datetime``.

    Parameters
    ----------
    aoi : bbox, shapely geometry, GeoJSON mapping or GeoDataFrame
        Area of interest in lon/lat (a bbox is (west, south, east, north)).
    datetime : str or (start, end)
        STAC datetime range, e.g. ``"2023-06-01/2023-08-31"``.
    collections : sequence of str
        Collection ids of ``catalog`` (see :data:`terrafm.sensors.CATALOGS`).
    catalog : str or None
        ``"planetary-computer"`` (items signed), ``"earth-search"``, or a URL / ``None`` with ``url``.
    url : str, optional
        Endpoint overriding the catalog's (e.g. a mirror or a local pgstac).
    max_cloud : float, optional
        Keep Sentinel-2 items with ``eo:cloud_cover`` below this percentage.
    limit : int, optional
        Maximum number of items per collection.
    timeout : float
        Seconds per API request.
    max_retries : int
        Retries of a request answered 429/5xx or timed out, with exponential back-off (and the
        server's ``Retry-After``); then :class:`TerraFMSearchError`.
    **query
        STAC ``query`` extension terms, e.g. ``{"sat:orbit_state": {"eq": "ascending"}}``.

    Returns
    -------
    list of pystac.Item, sorted by time. Retries 429/5xx with back-off (pystac-client ``max_retries``).
    An empty result raises ``ValueError``; when the AOI read as (lat, lon) would find items, the
    error says the coordinates look swapped and gives the corrected bbox.

    Examples
    --------
    >>> items = search((11.50, 48.10, 11.56, 48.14), "2023-06-01/2023-06-30",  # doctest: +SKIP
    ...                max_cloud=20)                                        # doctest: +SKIP
    """
    import pystac_client
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    catalog, endpoint, sign = _catalog(catalog, url)
    specs = {c: _spec_for(catalog, c) for c in collections}
    geom = aoi_geometry(aoi)
    if not isinstance(datetime, str):
        datetime = "/".join(str(d) for d in datetime)
    from pystac_client.exceptions import APIError

    retry = Retry(**dict(_API_RETRY, total=max_retries), allowed_methods=None, raise_on_status=False)
    modifier = None
    if sign == "planetary-computer":
        import planetary_computer

        modifier = planetary_computer.sign_inplace

    def api_failed(err: APIError) -> TerraFMSearchError:
        status = getattr(err, "status_code", None)
        return TerraFMSearchError(
            f"the STAC API at {endpoint} answered {status or 'an error'}: {str(err)[:300]} (after up to "
            f"{max_retries} retries with back-off). If it is overloaded (429/5xx), try again later or "
            "raise max_retries; otherwise check url=/catalog= and the search terms.")

    try:
        client = pystac_client.Client.open(endpoint, modifier=modifier,
                                           stac_io=StacApiIO(max_retries=retry, timeout=timeout))
    except APIError as err:
        raise api_failed(err) from err
    base_terms = dict(query.pop("query", None) or {}, **query)

    def run(geometry, max_items):
        found = []
        for collection, spec in specs.items():
            terms = dict(base_terms)
            if max_cloud is not None and spec.modality.startswith("s2"):
                terms["eo:cloud_cover"] = {"lt": float(max_cloud)}
            hits = list(client.search(collections=[collection], intersects=geometry.__geo_interface__,
                                      datetime=datetime, query=terms or None, max_items=max_items).items())
            logger.info("%s: %d items", collection, len(hits))
            found.extend(hits)
        return found

    try:
        items = run(geom, limit)
    except APIError as err:
        raise api_failed(err) from err
    if not items:
        # An AOI given as (lat, lon) usually lands where nothing was acquired (or in the sea);
        # if the swapped reading finds data, say so. Both readings finding data is not flagged.
        swapped = _swap_lonlat(geom)
        if swapped is not None and not swapped.equals(geom) and run(swapped, 1):
            raise _swap_error(geom, swapped, f"finds no items in {list(collections)} between {datetime}",
                              " If the AOI is right as given, widen the dates or raise max_cloud.")
        raise ValueError(
            f"no items in {list(collections)} for this AOI between {datetime}"
            + (f" with cloud cover < {max_cloud}%" if max_cloud is not None else "")
            + ". Widen the dates, raise max_cloud, or check the AOI is (west, south, east, north) in lon/lat."
        )
    return sorted(items, key=lambda i: i.datetime or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc))


# ------------------------------------------------------------------------------------------------
# reading: a rasterio driver that signs at read time and re-signs on expiry
# ------------------------------------------------------------------------------------------------
def _unsigned(href: str) -> str:
    parts = urlsplit(href)
    if parts.netloc.endswith(".blob.core.windows.net"):
        return urlunsplit(parts._replace(query=""))
    return href


def _pc_sign(href: str, refresh: bool = False) -> str:
    import planetary_computer
    from planetary_computer.sas import TOKEN_CACHE

    base = _unsigned(href)
    if refresh:
        TOKEN_CACHE.clear()
    return planetary_computer.sign_url(base)


def _integer_zoom_read(src, cfg, dst_geobox, selection):
    """Read the source window behind ``dst_geobox`` when the grids align, else return ``None``.

    Aligned means: same CRS, no rotation, source pixel = k x destination pixel (k a positive
    integer) and the destination origin an integer number of destination pixels from the
    source's. Then nearest resampling is an exact k x k repetition of a plain windowed read, which
    skips odc's reprojection set-up and GDAL's warper (the common case of 10/20/60 m Sentinel-2
    bands on a 10 m UTM grid). Other cases (bilinear upsampling, another CRS) go through odc.
    """
    import rasterio
    from odc.loader._reader import (nodata_mask, resolve_band_query, resolve_dst_dtype, resolve_dst_nodata,
                                    resolve_src_nodata, same_nodata)

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
        from rasterio.windows import Window

        pix = rdr.read(bidx, window=Window(c0, r0, c1 - c0, r1 - r0))
        src_nodata = resolve_src_nodata(rdr.nodatavals[bidx - 1], cfg)
    if k > 1:
        pix = np.repeat(np.repeat(pix, k, axis=0), k, axis=1)
        y, x = off_y + i0 - r0 * k, off_x + j0 - c0 * k
        pix = pix[y:y + i1 - i0, x:x + j1 - j0]
    out = pix.astype(dtype, copy=False)
    dst_nodata = resolve_dst_nodata(out.dtype, cfg, src_nodata)
    if dst_nodata is not None and not same_nodata(src_nodata, dst_nodata):
        np.copyto(out, dst_nodata, where=nodata_mask(pix, src_nodata))
    return (slice(i0, i1), slice(j0, j1)), out


_EAGER = threading.local()
"""Set by :func:`load` while an eager (``chunks=False``) load runs in the calling thread."""


@contextmanager
def _eager_env(driver):
    """Enter the driver's GDAL environment once for a whole eager load, not once per band read."""
    import rasterio

    env = driver.capture_env()
    with rasterio.Env(**{k: v for k, v in env.items() if not k.startswith("_")}):
        _EAGER.env = env
        try:
            yield env
        finally:
            _EAGER.env = None


def _make_driver(sign: str | None, gdal_options: Mapping[str, str]):
    from odc.loader._rio import RioDriver, RioReader

    class _Reader(RioReader):
        def read(self, cfg, dst_geobox, *, dst=None, selection=None):
            src = self._src
            attempts = 2 if sign else 1
            for attempt in range(attempts):
                if sign:
                    src = self._src.patch(uri=_pc_sign(self._src.uri, refresh=attempt > 0))
                try:
                    from odc.loader._rio import rio_read

                    if dst is None:
                        fast = _integer_zoom_read(src, cfg, dst_geobox, selection)
                        if fast is not None:
                            return fast
                    return rio_read(src, cfg, dst_geobox, dst=dst, selection=selection)
                except Exception as err:  # rasterio raises several IO error types
                    text = str(err)
                    if sign and attempt + 1 < attempts:  # GDAL hides the 403 behind "Read failed"
                        logger.info("read of %s failed (%s), re-signing with a fresh token", _unsigned(src.uri), text)
                        continue
                    raise TerraFMReadError(
                        f"could not read {_unsigned(src.uri)} after GDAL's retries: {text}. The asset may "
                        "have been removed or its link expired: search again and reload; nothing was written."
                    ) from err

    class _Driver(RioDriver):
        def capture_env(self):
            env = super().capture_env()
            env.update(gdal_options)
            return env

        @contextmanager
        def restore_env(self, env, load_state):
            if getattr(_EAGER, "env", None) == env and not env.get("_aws"):  # eager: thread already in ``env``
                from odc.loader._rio import LocalContext

                yield load_state.local_ctx(LocalContext)
            else:
                with super().restore_env(env, load_state) as ctx:
                    yield ctx

        def open(self, src, ctx):
            return _Reader(src, ctx)

    return _Driver()


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _baseline(item) -> str | None:
    return item.properties.get("s2:processing_baseline")


def _check_assets(items, spec: sensors.CollectionSpec, keys: list[str]) -> None:
    for item in items:
        missing = [k for k in keys if k not in item.assets]
        if missing:
            raise ValueError(
                f"item {item.id} of {spec.collection} lacks asset keys {missing} (has {sorted(item.assets)}). "
                "Check the catalog (Earth Search uses 'blue', 'nir08'...; Planetary Computer 'B02', 'B8A'...): "
                "pass catalog= matching where the items came from, or drop such items."
            )


def _check_overlap(geom, items) -> None:
    """Refuse an AOI outside every item footprint, naming a lat/lon swap when that explains it."""
    import shapely.geometry
    import shapely.ops

    footprints = [shapely.geometry.shape(i.geometry) if i.geometry else shapely.geometry.box(*i.bbox)
                  for i in items if i.geometry or i.bbox]
    if not footprints:
        return
    union = shapely.ops.unary_union(footprints)
    if union.intersects(geom):
        return
    swapped = _swap_lonlat(geom)
    if swapped is not None and union.intersects(swapped):
        raise _swap_error(geom, swapped, "lies outside every item's footprint")
    raise ValueError(
        f"the AOI {tuple(round(v, 6) for v in geom.bounds)} lies outside every item's footprint "
        f"(items cover {tuple(round(v, 6) for v in union.bounds)}): search with this AOI, or pass the AOI "
        "the items were searched with"
    )


def _geobox(items, aoi, resolution: float, crs: str | int):
    from odc.geo.geobox import GeoBox
    from odc.geo.geom import Geometry, box

    if aoi is None:
        bounds = np.array([i.bbox for i in items])
        geom = aoi_geometry((bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()))
    else:
        geom = aoi_geometry(aoi)
    west, south, east, north = geom.bounds
    if crs == "utm":
        zones = {_utm_epsg(west, south), _utm_epsg(east, north), _utm_epsg(west, north), _utm_epsg(east, south)}
        if len(zones) > 1:
            raise ValueError(
                f"the AOI spans UTM zones {sorted(zones)}: load one zone at a time (split the AOI) or pass "
                f"crs=<epsg> to put everything on one grid, e.g. crs={min(zones)}"
            )
        crs = zones.pop()
    if aoi is not None:
        _check_overlap(geom, items)
    g = Geometry(geom, "EPSG:4326").to_crs(crs)
    geobox = GeoBox.from_geopolygon(g, resolution=resolution)
    if min(geobox.shape) < CHIP_SIZE:
        need = CHIP_SIZE * resolution
        raise ValueError(
            f"the AOI is {geobox.shape[1]} x {geobox.shape[0]} px at {resolution} m, smaller than one "
            f"{CHIP_SIZE} px chip: enlarge it to at least {need:.0f} m x {need:.0f} m (buffer the geometry)"
        )
    return geobox


def load(
    items: Iterable,
    aoi: Any = None,
    resolution: float = 10,
    crs: str | int = "utm",
    chunks: Mapping[str, int] | None | bool = None,
    modalities: Sequence[str] | None = None,
    *,
    catalog: str | None = "planetary-computer",
    s2_offset: str | None = None,
    pair_window: str | _dt.timedelta | None = "3D",
    groupby: str = "solar_day",
    resampling: str = "nearest",
    keep_scl: bool = False,
    gdal_options: Mapping[str, str] | None = None,
    geobox: Any = None,
) -> xr.Dataset:
    """Load STAC items onto one GeoBox as a lazy, model-ready-by-contract ``xr.Dataset``.

    Parameters
    ----------
    items : iterable of pystac.Item
        From :func:`search` (any mix of S2 L2A / S2 L1C / S1 RTC / WorldCover collections).
    aoi : optional
        Area to load (default: union of item footprints).
    resolution : float, default 10
        Pixel size in metres; 20/60 m S2 bands are resampled (``resampling``) to it.
    crs : "utm" or EPSG code
        ``"utm"`` picks the AOI's zone and refuses AOIs spanning zones.
    chunks : dict, optional
        Dask chunks, default ``{"time": 1, "x": 1024, "y": 1024}``; ``False`` loads eagerly into
        numpy in the calling thread (fast path for single chips).
    modalities : sequence of str, optional
        Subset of modalities to load (``"s2_l2a"``, ``"s2_l1c"``, ``"s1"``, ``"worldcover"``).
    catalog : str or None
        Catalog the items came from (asset keys, signing).
    s2_offset : None, "raw" or "harmonize"
        Baseline 04.00+ carries +1000 DN. ``None``: keep raw DN but refuse items of mixed baselines;
        ``"raw"``: keep raw DN; ``"harmonize"``: subtract the offset (clipped at 0) so all dates match
        pre-04.00 DN. The offset still present is kept as coordinate ``s2_offset`` (time).
    pair_window : str or timedelta or None
        With S2 and S1: pair each S2 date with the nearest S1 date within this window (S1 on the S2
        time axis, ``s1_time_gap`` recorded); ``None`` keeps the union of dates.
    groupby : str
        odc-stac grouping, ``"solar_day"`` merges same-day granules.
    keep_scl : bool
        Keep the S2 scene classification as variable ``SCL``.
    geobox : odc.geo.geobox.GeoBox, optional
        Exact output grid (overrides ``aoi``/``resolution``/``crs``), e.g. one chip of a tiling.

    Returns
    -------
    xr.Dataset following the terrafm STAC contract (``B01``..``B12``, ``vv``, ``vh``, ``mask_<key>``,
    optional ``worldcover`` and ``SCL``, ``spatial_ref``, attrs ``terrafm_modalities``).

    Examples
    --------
    >>> ds = load(search(aoi, "2023-06-01/2023-06-30"), aoi)                 # doctest: +SKIP
    >>> ds.mask_s2_l2a.dtype  # doctest: +SKIP
    dtype('bool')
    """
    import odc.stac
    import rioxarray  # noqa: F401  (registers ds.rio, part of the Dataset contract)

    from . import prepare

    items = list(items)
    if not items:
        raise ValueError("no items to load: widen the search dates or cloud limit")
    catalog, _, sign = _catalog(catalog, "unused") if catalog else (None, None, None)
    if s2_offset not in (None, "raw", "harmonize"):
        raise ValueError(f"s2_offset must be None, 'raw' or 'harmonize', got {s2_offset!r}")
    by_modality: dict[str, list] = defaultdict(list)
    spec_of: dict[str, sensors.CollectionSpec] = {}
    for item in items:
        spec = _spec_for(catalog, item.collection_id)
        by_modality[spec.modality].append(item)
        spec_of[spec.modality] = spec
    if modalities is not None:
        by_modality = {m: v for m, v in by_modality.items() if m in modalities}
        if not by_modality:
            raise ValueError(f"none of the items carry modalities {list(modalities)}")
    if geobox is None:
        geobox = _geobox(items, aoi, resolution, crs)
    chunks = None if chunks is False else dict(chunks or {"time": 1, "x": 1024, "y": 1024})
    options = {**GDAL_HTTP_OPTIONS, **(gdal_options or {})}
    driver = _make_driver(sign, options)

    def _load(mod_items, spec, keys, rename, **kw):
        _check_assets(mod_items, spec, keys)
        cfg = {spec.collection: {"assets": {k: {"data_type": spec.dtype, "nodata": spec.nodata} for k in keys}}}
        if spec.mask_asset:
            cfg[spec.collection]["assets"][spec.mask_asset] = {"data_type": "uint8", "nodata": 0}
        with _eager_env(driver) if chunks is None else nullcontext():
            ds = odc.stac.load(mod_items, bands=keys, geobox=geobox, chunks=chunks, groupby=groupby,
                               resampling=resampling, driver=driver, stac_cfg=cfg, fail_on_error=True,
                               **kw)
        return ds.rename({k: v for k, v in rename.items() if k in ds.data_vars})

    parts: dict[str, xr.Dataset] = {}
    for modality in ("s2_l2a", "s2_l1c"):
        if modality not in by_modality:
            continue
        spec, mod_items = spec_of[modality], by_modality[modality]
        baselines = sorted({_baseline(i) or "00.00" for i in mod_items})
        if len({b >= sensors.S2_OFFSET_BASELINE for b in baselines}) > 1 and s2_offset is None:
            raise ValueError(
                f"{modality} items mix processing baselines {baselines}: those from "
                f"{sensors.S2_OFFSET_BASELINE} on carry a +{sensors.S2_BASELINE_OFFSET} DN offset. Choose "
                "s2_offset='harmonize' (subtract it) or s2_offset='raw' (keep stored DN), or restrict the "
                f"dates to one side of {sensors.S2_OFFSET_START}."
            )
        keys = [spec.assets[b] for b in sensors.S2_BANDS]
        if spec.mask_asset:
            keys.append(spec.mask_asset)
        ds = _load(mod_items, spec, keys, {**{v: k for k, v in spec.assets.items()}, **({spec.mask_asset: "SCL"} if spec.mask_asset else {})})
        # per-date offset still present in the DN
        day_baseline = defaultdict(set)
        for i in mod_items:
            day_baseline[np.datetime64(prepare.solar_day(i), "D")].add(_baseline(i) or "00.00")
        days = ds.time.values.astype("datetime64[D]")
        offset = np.array([sensors.S2_BASELINE_OFFSET if max(day_baseline.get(d, {"00.00"})) >= sensors.S2_OFFSET_BASELINE else 0
                           for d in days], dtype="int32")
        if "SCL" in ds:
            valid = ~ds.SCL.isin(sensors.SCL_INVALID_CLASSES)
        else:
            valid = ds["B02"] != sensors.S2_NODATA
        if s2_offset == "harmonize" and offset.any():
            off = xr.DataArray(offset, dims="time", coords={"time": ds.time})
            for b in sensors.S2_BANDS:
                v = ds[b]
                ds[b] = xr.where(v > off, v - off, 0).astype(v.dtype)
            offset = np.zeros_like(offset)
        ds = ds.assign_coords(s2_offset=("time", offset))
        ds[f"mask_{modality}"] = valid.rename(f"mask_{modality}")
        for b in sensors.S2_BANDS:
            ds[b].attrs.update(modality=modality, units="DN")
        if not keep_scl and "SCL" in ds:
            ds = ds.drop_vars("SCL")
        parts[modality] = ds
    if "s1" in by_modality:
        spec = spec_of["s1"]
        keys = [spec.assets[b] for b in sensors.S1_BANDS]
        ds = _load(by_modality["s1"], spec, keys, {v: k for k, v in spec.assets.items()})
        vv, vh = ds.vv.data, ds.vh.data  # numpy or dask: one expression, no per-operator xarray overhead
        ds["mask_s1"] = (ds.vv.dims, (vv != spec.nodata) & (vh != spec.nodata) & np.isfinite(vv) & np.isfinite(vh))
        for b in sensors.S1_BANDS:
            ds[b].attrs.update(modality="s1", units="linear power")
        parts["s1"] = ds
    worldcover = None
    if "worldcover" in by_modality:
        spec = spec_of["worldcover"]
        with _eager_env(driver) if chunks is None else nullcontext():
            wc = odc.stac.load(by_modality["worldcover"], bands=[spec.assets["worldcover"]], geobox=geobox,
                               chunks=chunks, groupby=groupby, resampling="nearest", driver=driver,
                               fail_on_error=True)
        worldcover = wc[spec.assets["worldcover"]].max("time").astype("uint8").rename("worldcover")
        worldcover.attrs.update(description="ESA WorldCover classes (0 = no data)")

    s2_keys = [m for m in ("s2_l2a", "s2_l1c") if m in parts]
    if s2_keys and "s1" in parts and pair_window is not None:
        s2 = (parts[s2_keys[0]] if len(s2_keys) == 1
              else xr.merge([parts[m] for m in s2_keys], join="outer", compat="override"))
        out = prepare.pair_nearest(s2, parts["s1"], window=pair_window)
    else:
        out = xr.merge(list(parts.values()), join="outer", compat="override") if parts else xr.Dataset()
        for m in parts:
            if f"mask_{m}" in out:
                out[f"mask_{m}"] = out[f"mask_{m}"].fillna(False).astype(bool)
    if worldcover is not None:
        out["worldcover"] = worldcover
    out.attrs["terrafm_modalities"] = [m for m in sensors.MODALITY_KEYS if m in parts]
    out.attrs["s2_offset_handling"] = s2_offset or "raw"
    if "spatial_ref" not in out.coords and parts:
        out = out.assign_coords(spatial_ref=next(iter(parts.values())).spatial_ref)
    return out


def open_sentinel(
    aoi: Any,
    start: str | _dt.date,
    end: str | _dt.date,
    *,
    collections: Sequence[str] = ("sentinel-2-l2a", "sentinel-1-rtc"),
    catalog: str | None = "planetary-computer",
    url: str | None = None,
    max_cloud: float | None = None,
    **load_kwargs: Any,
) -> xr.Dataset:
    """One call from a place and a time to a lazy, georeferenced Dataset (search + sign + load).

    Examples
    --------
    >>> import terrafm                                                       # doctest: +SKIP
    >>> ds = terrafm.open_sentinel((11.50, 48.10, 11.56, 48.14), "2023-06-01", "2023-08-31",  # doctest: +SKIP
    ...                            max_cloud=30)  # doctest: +SKIP
    >>> ds = terrafm.prepare.normalize(ds)  # doctest: +SKIP
    """
    items = search(aoi, f"{start}/{end}", collections, catalog, url=url, max_cloud=max_cloud)
    return load(items, aoi, catalog=catalog if catalog and not str(catalog).startswith("http") else None, **load_kwargs)


def save(ds: xr.Dataset, path: str | os.PathLike, **to_zarr_kwargs: Any) -> Path:
    """Compute ``ds`` into a zarr store atomically: written to a temporary sibling, renamed at the end.

    A failed read (e.g. an asset that disappears) leaves nothing at ``path``.

    Examples
    --------
    >>> save(ds, "aoi.zarr")                                                  # doctest: +SKIP
    """
    import dask
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    # Our own pool, so that after a failed task we can wait for the chunks still being written
    # before removing the temporary store (dask re-raises at once and leaves its workers running).
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        with dask.config.set(pool=pool):
            ds.to_zarr(tmp, mode="w", **to_zarr_kwargs)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True)
    return path
