"""STAC search, signing and loading onto one 10 m grid (odc-stac), with validity masks.

Planetary Computer is the default catalog (assets signed at read time, re-signed when a token
expires, so long loads survive); Earth Search and any STAC API work by name or URL. Catalogs are
:data:`terrafm.catalogs.CATALOGS`; which collection carries which modality under which asset keys
belongs to each modality in :mod:`terrafm.sensors`; items remember their catalog, so ``load``
needs none.

Examples
--------
>>> import terrafm                                                         # doctest: +SKIP
>>> ds = terrafm.open_sentinel((11.50, 48.10, 11.56, 48.14), "2023-06-01", "2023-08-31")  # doctest: +SKIP
>>> ds.s2_l2a_B04.dims, ds.rio.crs.to_epsg(), ds.attrs["terrafm_modalities"]  # doctest: +SKIP
(('time', 'y', 'x'), 32632, ['s2_l2a', 's1'])
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr

from . import catalogs, reading, sensors
from .reading import GDAL_HTTP_OPTIONS, TerraFMReadError

logger = logging.getLogger(__name__)

__all__ = ["search", "load", "open_sentinel", "save", "TerraFMReadError", "TerraFMSearchError", "GDAL_HTTP_OPTIONS", "aoi_geometry"]

_API_RETRY = dict(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))


class TerraFMSearchError(RuntimeError):
    """The STAC API kept failing (5xx/429, or refused the request) after retries with back-off."""


# ------------------------------------------------------------------------------------------------
# AOI handling
# ------------------------------------------------------------------------------------------------
def aoi_geometry(aoi: Any):
    """Return a shapely geometry in lon/lat from a bbox, shapely geometry, GeoJSON or GeoDataFrame.

    Raises ``ValueError`` for a bbox with a value that is not finite, a latitude outside
    [-90, 90] (then it is (lat, lon) order), a longitude outside [-180, 180], min > max or no
    area (west == east or south == north). Swaps that stay inside [-90, 90] are caught where data tells them apart:
    :func:`search` retries an empty search with the coordinates swapped, :func:`load` checks the
    AOI against the item footprints, and both name the fix.

    Examples
    --------
    >>> aoi_geometry((11.5, 48.1, 11.6, 48.2)).bounds
    (11.5, 48.1, 11.6, 48.2)
    """
    import shapely.geometry

    if hasattr(aoi, "to_crs") and hasattr(aoi, "geometry"):  # GeoDataFrame / GeoSeries
        if getattr(aoi, "crs", None) is None:
            raise ValueError("the AOI GeoDataFrame has no CRS; set its real one, e.g. aoi.set_crs('EPSG:4326') for "
                             "lon/lat or aoi.set_crs('EPSG:32632') for UTM metres")
        aoi = aoi.to_crs(4326).union_all() if hasattr(aoi, "union_all") else aoi.to_crs(4326).unary_union
    if isinstance(aoi, Mapping):
        aoi = shapely.geometry.shape(aoi.get("geometry", aoi))
    if isinstance(aoi, (tuple, list, np.ndarray)):
        if len(aoi) != 4:
            raise ValueError(f"a bbox needs 4 numbers (west, south, east, north); got {list(aoi)}")
        try:
            west, south, east, north = map(float, aoi)
        except (TypeError, ValueError):
            raise ValueError(f"a bbox needs 4 numbers (west, south, east, north); got {list(aoi)}") from None
        if not np.isfinite([west, south, east, north]).all():
            raise ValueError(f"bbox {tuple(aoi)} has a value that is not finite; pass 4 finite numbers "
                             "(west, south, east, north) in degrees")
        if abs(south) > 90 or abs(north) > 90:
            raise ValueError(
                f"bbox {tuple(aoi)} has a latitude outside [-90, 90]: it looks like (lat, lon) order. "
                "Pass (west, south, east, north) = (lon_min, lat_min, lon_max, lat_max)."
            )
        if abs(west) > 180 or abs(east) > 180:
            raise ValueError(
                f"bbox {tuple(aoi)} has a longitude outside [-180, 180]: pass (west, south, east, north) in "
                "degrees of lon/lat (a bbox in a projected CRS: convert it, e.g. with pyproj's "
                "Transformer.transform_bounds, or pass a GeoDataFrame with its CRS)"
            )
        if west > east or south > north:
            raise ValueError(
                f"bbox {tuple(aoi)} has min > max; pass (west, south, east, north) with west < east "
                "and south < north (lat/lon swapped?)"
            )
        if west == east or south == north:
            raise ValueError(
                f"bbox {tuple(aoi)} has no area ({'west == east' if west == east else 'south == north'}); a bbox "
                "needs west < east and south < north. For a point, buffer it, e.g. "
                "(lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01)"
            )
        return shapely.geometry.box(west, south, east, north)
    if hasattr(aoi, "geom_type"):
        minx, miny, maxx, maxy = aoi.bounds
        if not np.isfinite([minx, miny, maxx, maxy]).all():
            raise ValueError("AOI geometry is empty or has coordinates that are not finite; pass a geometry in lon/lat")
        if abs(miny) > 90 or abs(maxy) > 90:
            raise ValueError("AOI geometry has latitudes outside [-90, 90]: coordinates must be (lon, lat).")
        if abs(minx) > 180 or abs(maxx) > 180:
            raise ValueError("AOI geometry has longitudes outside [-180, 180]: coordinates must be (lon, lat) in "
                             "degrees; reproject a projected geometry to EPSG:4326 first (or pass a GeoDataFrame "
                             "with its CRS)")
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


# ------------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------------
def _catalog(catalog: str | None, url: str | None) -> tuple[catalogs.Catalog | None, str]:
    """The named catalog (or the known one whose endpoint ``url`` is) and the endpoint to query."""
    if catalog is not None and catalog.startswith(("http://", "https://")):
        catalog, url = None, catalog
    if catalog is None:
        if url is None:
            raise ValueError(f"pass catalog= (one of {list(catalogs.CATALOGS)}) or url='https://.../stac'")
        known = next((c for c in catalogs.CATALOGS.values() if c.url.rstrip("/") == url.rstrip("/")), None)
        return known, url
    entry = catalogs.get_catalog(catalog)
    return entry, url or entry.url


def _search_terms(collection: str, catalog: catalogs.Catalog | None, base_terms: dict,
                  max_cloud: float | None) -> dict:
    """Query terms for one collection: the cloud limit applies to modalities that state cloud cover."""
    terms = dict(base_terms)
    if max_cloud is None:
        return terms
    known = catalogs.conventions(collection)
    entries = [e for name, e, _ in known if catalog is not None and name == catalog.name] or [e for _, e, _ in known]
    clouds = {getattr(e, "cloud_cover", None) for e in entries} - {None}
    if clouds:
        terms[clouds.pop()] = {"lt": float(max_cloud)}
    elif not entries:
        logger.info("collection %r is in no convention table: max_cloud not applied to it", collection)
    return terms


_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_DATE_FIX = "write dates as YYYY-MM-DD (e.g. 2024-06-01), YYYY-MM, YYYY or an RFC 3339 time (2024-06-01T10:30:00Z)"


def _date_bounds(part: Any) -> tuple[str, _dt.datetime | None, _dt.datetime | None]:
    """One end of a STAC datetime range: its text for the API and its first and last instant (UTC).

    A partial date covers its whole period (``2024-06`` is June), as STAC APIs read it; ``..``,
    ``""`` and None are an open end.
    """
    utc = _dt.timezone.utc
    if part is None or (isinstance(part, str) and part.strip() in ("", "..")):
        return "..", None, None
    if isinstance(part, np.datetime64):
        part = np.datetime_as_string(part, unit="us")
    if isinstance(part, _dt.datetime):
        instant = part.astimezone(utc) if part.tzinfo else part.replace(tzinfo=utc)
        return instant.replace(tzinfo=None).isoformat() + "Z", instant, instant
    if isinstance(part, _dt.date):
        first = _dt.datetime(part.year, part.month, part.day, tzinfo=utc)
        return part.isoformat(), first, first + _dt.timedelta(days=1, microseconds=-1)
    if not isinstance(part, str):
        raise TypeError(f"{part!r} ({type(part).__name__}) is not a date; {_DATE_FIX}")
    text = part.strip()
    match = _DATE.match(text)
    try:
        if match is None:
            instant = _dt.datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
            if not re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}", text):
                raise ValueError("not an ISO date")
            return _date_bounds(instant)
        year, month, day = (int(g) if g else None for g in match.groups())
        first = _dt.datetime(year, month or 1, day or 1, tzinfo=utc)
    except ValueError as exc:
        reason = "" if "isoformat" in str(exc) or "ISO" in str(exc) else f": {exc}"
        raise ValueError(f"{part!r} is not a date{reason}; {_DATE_FIX}") from None
    if day is not None:
        after = first + _dt.timedelta(days=1)
    elif month is not None:
        after = first.replace(year=year + month // 12, month=month % 12 + 1)
    else:
        after = first.replace(year=year + 1)
    return text, first, after - _dt.timedelta(microseconds=1)


def _stac_datetime(value: Any) -> str:
    """A checked STAC datetime range: every part a date, an open end (``..``) or a time, start <= end.

    Accepts ``"start/end"``, a (start, end) pair of strings, dates, datetimes (naive = UTC),
    pandas Timestamps or numpy datetime64, or one of these alone. Returns the range as sent to
    the API (datetimes in RFC 3339 with ``Z``).

    Examples
    --------
    >>> _stac_datetime(("2024-06-01", _dt.date(2024, 6, 30)))
    '2024-06-01/2024-06-30'
    >>> _stac_datetime("2024-06-30/2024-06-01")
    Traceback (most recent call last):
    ...
    ValueError: the date range 2024-06-30/2024-06-01 starts after it ends: 2024-06-30 > 2024-06-01; swap the start and end dates
    """
    if isinstance(value, str):
        parts, shown = value.split("/"), value
    elif isinstance(value, (_dt.date, np.datetime64)) or value is None:
        parts, shown = [value], str(value)
    else:
        parts = list(value)
        shown = "/".join(str(p) for p in parts)
    if len(parts) > 2 or not parts:
        raise ValueError(f"{shown!r} has {len(parts)} parts; a date range is 'start/end' or a (start, end) pair, "
                         f"e.g. '2024-06-01/2024-06-30'; {_DATE_FIX}")
    bounds = [_date_bounds(p) for p in parts]
    texts = [b[0] for b in bounds]
    if all(t == ".." for t in texts):
        raise ValueError(f"the date range {'/'.join(texts)!r} is open at both ends; give a start or an end, "
                         "e.g. '2024-06-01/..'")
    if len(bounds) == 2 and bounds[0][1] is not None and bounds[1][2] is not None and bounds[0][1] > bounds[1][2]:
        raise ValueError(f"the date range {'/'.join(texts)} starts after it ends: {texts[0]} > {texts[1]}; swap the "
                         "start and end dates")
    return "/".join(texts)


_QUERY_OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "startsWith", "endsWith", "contains", "in")


def _query_terms(terms: dict) -> dict:
    """STAC query-extension terms, each ``{"property": {"op": value}}``; a bare value is refused
    (it is almost always a misspelt argument such as ``max_clouds=20``)."""
    import difflib
    import inspect

    arguments = [p for p in inspect.signature(search).parameters if p not in ("aoi", "query")]
    for name, condition in terms.items():
        if isinstance(condition, Mapping) and condition and set(condition) <= set(_QUERY_OPERATORS):
            continue
        close = difflib.get_close_matches(name, arguments, n=1)
        raise ValueError(
            f"{name}={condition!r} is neither an argument of search"
            + (f" (did you mean {close[0]}=?)" if close else "")
            + " nor a STAC query term: a query term maps an item property to operators, e.g. "
            "query={'sat:orbit_state': {'eq': 'ascending'}, 'eo:cloud_cover': {'lt': 20}}; operators: "
            f"{list(_QUERY_OPERATORS)}")
    return terms


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

    Every item returned records where it came from (properties ``terrafm:catalog`` when the
    catalog is a known one, and ``terrafm:api``), so :func:`load` reads items of any catalog, and
    of several at once, with no catalog argument.

    Parameters
    ----------
    aoi : bbox, shapely geometry, GeoJSON mapping or GeoDataFrame
        Area of interest in lon/lat (a bbox is (west, south, east, north)).
    datetime : str or (start, end)
        STAC datetime range, e.g. ``"2023-06-01/2023-08-31"``; each end a date (``YYYY-MM-DD``,
        ``YYYY-MM`` or ``YYYY``, covering its whole period), an RFC 3339 time, a
        ``datetime``/``date``/pandas Timestamp (naive = UTC) or ``..`` (open). A date that does
        not exist, a start after the end and other mistakes raise ``ValueError`` before any
        request, as do a bbox outside lon/lat range and impossible ``max_cloud``/``limit``.
    collections : str or sequence of str
        Collection ids (see each modality's ``collections`` in :mod:`terrafm.sensors`); ids no
        table knows are searched too and read from their items' own metadata by :func:`load`.
        A single string is one collection.
    catalog : str or None
        A registered catalog (``"planetary-computer"``, ``"earth-search"``: see
        :data:`terrafm.catalogs.CATALOGS`), a URL, or ``None`` with ``url``.
    url : str, optional
        Endpoint: overrides the named catalog's (a mirror), or stands alone for any STAC API.
    max_cloud : float, optional
        Keep items of optical modalities with cloud cover below this percentage.
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
    list of pystac.Item, sorted by time. An empty result raises ``ValueError``; when the AOI read
    as (lat, lon) would find items, the error says the coordinates look swapped and gives the
    corrected bbox.

    Examples
    --------
    >>> items = search((11.50, 48.10, 11.56, 48.14), "2023-06-01/2023-06-30",  # doctest: +SKIP
    ...                max_cloud=20)                                        # doctest: +SKIP
    >>> items[0].properties["terrafm:catalog"]                                # doctest: +SKIP
    'planetary-computer'
    """
    import pystac_client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    origin, endpoint = _catalog(catalog, url)
    geom = aoi_geometry(aoi)
    datetime = _stac_datetime(datetime)
    if isinstance(collections, str):
        collections = [collections]
    collections = list(collections)
    if not collections:
        raise ValueError("collections is empty; pass collection ids, e.g. ('sentinel-2-l2a', 'sentinel-1-rtc')")
    if max_cloud is not None and not (isinstance(max_cloud, (int, float)) and 0 <= max_cloud <= 100):
        raise ValueError(f"max_cloud={max_cloud!r}: cloud cover is a percentage in [0, 100], e.g. max_cloud=30 "
                         "(or None for no limit)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: the maximum number of items per collection is a positive integer, or "
                         "None for all")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r}: seconds per API request must be > 0, e.g. 60")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries={max_retries!r} must be an integer >= 0, e.g. 5")
    retry = Retry(**dict(_API_RETRY, total=max_retries), allowed_methods=None, raise_on_status=False)

    def api_failed(err: APIError) -> TerraFMSearchError:
        status = getattr(err, "status_code", None)
        return TerraFMSearchError(
            f"the STAC API at {endpoint} answered {status or 'an error'}: {str(err)[:300]} (after up to "
            f"{max_retries} retries with back-off). If it is overloaded (429/5xx), try again later or "
            "raise max_retries; otherwise check url=/catalog= and the search terms.")

    base_terms = _query_terms(dict(query.pop("query", None) or {}, **query))
    try:
        client = pystac_client.Client.open(endpoint, stac_io=StacApiIO(max_retries=retry, timeout=timeout))
    except APIError as err:
        raise api_failed(err) from err

    def run(geometry, max_items):
        found = []
        for collection in collections:
            terms = _search_terms(collection, origin, base_terms, max_cloud)
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
    for item in items:
        catalogs.stamp_origin(item, origin, endpoint)
    return sorted(items, key=lambda i: i.datetime or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc))


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _check_overlap(geom, items) -> None:
    """Refuse an AOI outside every item footprint, naming a lat/lon swap when that explains it."""
    import shapely.ops

    footprints = [f for f in map(reading.footprint, items) if f is not None]
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
    from odc.geo.crs import CRS
    from odc.geo.geobox import GeoBox
    from odc.geo.geom import Geometry

    if aoi is None:
        bounds = np.array([i.bbox for i in items])
        geom = aoi_geometry((bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()))
    else:
        geom = aoi_geometry(aoi)
    if crs == "utm":
        west, south, east, north = geom.bounds
        zones = {CRS.utm(x, y) for x in (west, east) for y in (south, north)}
        if len(zones) > 1:
            epsgs = sorted(z.epsg for z in zones)
            raise ValueError(
                f"the AOI spans UTM zones {epsgs}: load one zone at a time (split the AOI) or pass "
                f"crs=<epsg> to put everything on one grid, e.g. crs={epsgs[0]}"
            )
        crs = zones.pop()
    if aoi is not None:
        _check_overlap(geom, items)
    geobox = GeoBox.from_geopolygon(Geometry(geom, "EPSG:4326").to_crs(crs), resolution=resolution)
    if min(geobox.shape) < 1:
        raise ValueError(f"the AOI {tuple(round(v, 6) for v in geom.bounds)} is smaller than one {resolution} m "
                         "pixel: enlarge it (buffer the geometry)")
    return geobox


def _canonical(item, resolved: catalogs.ResolvedItem):
    """``item`` with its assets keyed by band name (and the quality layer's name), so items of
    several catalogs of one modality read as one collection: a copy only where the keys differ."""
    keys = dict(resolved.assets)
    quality = getattr(resolved.modality, "quality", None)
    if resolved.mask is not None and quality is not None:
        keys[quality.name] = resolved.mask
    if all(name == key for name, key in keys.items()):
        return item
    out = item.clone()
    out.assets = {}
    for name, key in keys.items():
        out.add_asset(name, item.assets[key].clone())   # add_asset: the asset sees the item's proj:* fields
    return out


def _signing(resolved_items) -> Any:
    """``sign(href, refresh)`` for the read driver: each href signed by its own item's signer,
    hrefs of items that need none returned unchanged; None if no item needs signing."""
    signers = {}
    for item, resolved in resolved_items:
        if resolved.sign is not None:
            for asset in item.assets.values():
                signers[reading.unsigned(asset.href)] = resolved.sign
    if not signers:
        return None

    def sign(href: str, refresh: bool = False) -> str:
        signer = signers.get(reading.unsigned(href))
        return href if signer is None else signer(href, refresh)

    return sign


def _with_origin(item, catalog: str | None):
    if catalog is None or item.properties.get(catalogs.ORIGIN_PROPERTY):
        return item
    out = item.clone()
    catalogs.stamp_origin(out, catalogs.get_catalog(catalog), catalogs.get_catalog(catalog).url)
    return out


def load(
    items: Iterable,
    aoi: Any = None,
    resolution: float = 10,
    crs: str | int = "utm",
    chunks: Mapping[str, int] | None | bool = None,
    modalities: Sequence[str] | None = None,
    *,
    catalog: str | None = None,
    s2_offset: str | None = None,
    pair_window: str | _dt.timedelta | None = "3D",
    groupby: str = "solar_day",
    resampling: str = "nearest",
    keep_scl: bool = False,
    gdal_options: Mapping[str, str] | None = None,
    geobox: Any = None,
) -> xr.Dataset:
    """Load STAC items onto one GeoBox as a lazy, model-ready-by-contract ``xr.Dataset``.

    Each item is read by its own convention (:func:`terrafm.catalogs.resolve`): items from
    :func:`search` remember their catalog, so items of several catalogs load in one call, each
    signed only if its catalog needs it.

    Parameters
    ----------
    items : iterable of pystac.Item
        From :func:`search` (any mix of registered modalities and layers, of any catalogs).
    aoi : optional
        Area to load (default: union of item footprints).
    resolution : float, default 10
        Pixel size in metres (> 0); coarser bands are resampled (``resampling``) to it.
    crs : "utm" or EPSG code
        ``"utm"`` picks the AOI's zone (odc-geo) and refuses AOIs spanning zones.
    chunks : dict, optional
        Dask chunks, default ``{"time": 1, "x": 1024, "y": 1024}``. ``False`` reads eagerly into
        numpy in the calling thread, with the same result (fast path for one chip or block at a
        time: no dask graph, no intermediate odc-stac Dataset).
    modalities : sequence of str, optional
        Subset of modalities / layers to load (``"s2_l2a"``, ``"s2_l1c"``, ``"s1"``, ``"worldcover"``).
    catalog : str, optional
        Origin of items that do not record one (e.g. items read from files); items from
        :func:`search` need nothing.
    s2_offset : None, "raw" or "harmonize"
        DN offset of modalities with a baseline offset rule (Sentinel-2 baseline 04.00+: +1000).
        ``None``: keep stored DN but refuse items of mixed baselines; ``"raw"``: keep stored DN;
        ``"harmonize"``: valid DN become ``max(DN - 1000, 1)``, nodata stays 0 (the one rule of
        :class:`terrafm.sensors.BaselineOffset`). The offset still present is the coordinate
        ``<key>_offset`` (time).
    pair_window : str or timedelta or None
        Paired modalities (S1) go on the dates of the others, nearest acquisition within this
        window (``<key>_time_gap`` recorded); ``None`` keeps the union of dates, where a modality's
        missing dates hold its missing value (nodata; NaN for float bands) and its mask is False.
    groupby : str
        Time steps as odc-stac groups them: ``"solar_day"`` merges same-day granules, ``"time"``,
        ``"id"`` (one step per item) or the name of an item property.
    keep_scl : bool
        Keep each modality's quality layer as ``<key>_<name>`` (``s2_l2a_SCL``).
    geobox : odc.geo.geobox.GeoBox, optional
        Exact output grid (overrides ``aoi``/``resolution``/``crs``), e.g. one chip of a tiling.

    Returns
    -------
    xr.Dataset following the terrafm Dataset contract: per modality ``<key>_<band>`` (stored
    values), ``mask_<key>`` (pixel validity by :meth:`terrafm.sensors.Modality.pixel_valid`),
    ``<key>_offset`` / ``<key>_time_gap`` where they apply; layers (``worldcover``);
    ``spatial_ref``; attrs ``terrafm_modalities``.

    Examples
    --------
    >>> ds = load(search(aoi, "2023-06-01/2023-06-30"), aoi)                 # doctest: +SKIP
    >>> ds.mask_s2_l2a.dtype  # doctest: +SKIP
    dtype('bool')
    """
    import rioxarray  # noqa: F401  (registers ds.rio, part of the Dataset contract)

    items = [_with_origin(item, catalog) for item in items]
    if not items:
        raise ValueError("no items to load: widen the search dates or cloud limit")
    if s2_offset not in (None, "raw", "harmonize"):
        raise ValueError(f"s2_offset must be None, 'raw' or 'harmonize', got {s2_offset!r}")
    if geobox is None and not float(resolution) > 0:
        raise ValueError(f"resolution={resolution!r} m must be > 0, e.g. 10 (TerraFM's pixel size)")
    known = {*sensors.MODALITIES, *sensors.LAYERS}
    if modalities is not None and set(modalities) - known:
        raise ValueError(f"unknown modalities {sorted(set(modalities) - known)}; registered: {sorted(known)}")
    resolved = [(item, catalogs.resolve(item)) for item in items]
    grouped: dict[str, list] = defaultdict(list)
    for item, how in resolved:
        grouped[how.modality.key].append(_canonical(item, how))
    if modalities is not None:
        grouped = {k: v for k, v in grouped.items() if k in modalities}
        if not grouped:
            raise ValueError(f"none of the items carry modalities {list(modalities)}")
    if geobox is None:
        geobox = _geobox(items, aoi, resolution, crs)
    driver = reading.make_driver(_signing(resolved), {**GDAL_HTTP_OPTIONS, **(gdal_options or {})})
    reader = _Reader(geobox, chunks, groupby, resampling, driver)

    parts = [_modality_part(reader, m, grouped[m.key], s2_offset, keep_scl)
             for m in sensors.MODALITIES.values() if m.key in grouped]
    variables, coords = _on_one_time_axis(parts, pair_window) if parts else ({}, {})
    for layer in sensors.LAYERS.values():
        if layer.key in grouped:
            _, _, arrays = reader.read(grouped[layer.key], {layer.key: (layer.dtype, layer.nodata)})
            variables[layer.variable] = (("y", "x"), arrays[layer.key].max(axis=0).astype(layer.dtype),
                                         {"description": layer.description})
    from odc.geo.xr import xr_coords

    grid = xr_coords(geobox)  # y, x and the CRS coordinate, last
    crs_name = list(grid)[-1]
    coords = {**grid, **coords}
    out = xr.Dataset({name: xr.Variable(dims, data, attrs, encoding={"grid_mapping": crs_name} if "y" in dims else None)
                      for name, (dims, data, attrs) in variables.items()}, coords=coords)
    out.attrs["terrafm_modalities"] = [p.modality.key for p in parts]
    out.attrs["s2_offset_handling"] = s2_offset or "raw"
    # provenance: the items read and the settings that shape the values (terrafm.embed's resume fingerprint)
    import hashlib
    import json

    loaded = sorted((item for group in grouped.values() for item in group), key=lambda i: (i.collection_id or "", i.id))
    out.attrs["terrafm_items"] = [f"{item.collection_id}/{item.id}" for item in loaded]
    read = [[item.collection_id, item.id, sorted((k, reading.unsigned(a.href)) for k, a in item.assets.items())]
            for item in loaded]
    settings = {"groupby": groupby, "resampling": resampling, "pair_window": str(pair_window),
                "s2_offset": s2_offset, "keep_scl": keep_scl}
    out.attrs["terrafm_items_sha256"] = hashlib.sha256(json.dumps([read, settings], default=str).encode()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------
# load, per modality: pixels as arrays (numpy or dask) on their own time steps, then one time axis
# ------------------------------------------------------------------------------------------------
class _Reader:
    """Reads items' assets (keyed by band name) onto the load's GeoBox: eagerly (numpy) or
    through odc-stac (dask)."""

    def __init__(self, geobox, chunks, groupby: str, resampling: str, driver):
        self.geobox, self.groupby, self.resampling, self.driver = geobox, groupby, resampling, driver
        self.eager = chunks is False
        self.chunks = None if self.eager else dict(chunks or {"time": 1, "x": 1024, "y": 1024})
        self.lon = geobox.extent.centroid.to_crs("EPSG:4326").points[0][0]

    def read(self, items, bands: dict[str, tuple[str, float]]):
        """``(groups, times, {band: (time, y, x) array})``: one time step per group of items."""
        groups = reading.group_items(items, self.groupby, self.lon)
        if self.eager:
            return (groups, reading.group_times(groups),
                    reading.read_eager(groups, bands, self.geobox, driver=self.driver, resampling=self.resampling))
        import odc.stac

        cfg = {"*": {"assets": {k: {"data_type": dtype, "nodata": nodata} for k, (dtype, nodata) in bands.items()}}}
        ds = odc.stac.load(items, bands=list(bands), geobox=self.geobox, chunks=self.chunks, groupby=self.groupby,
                           resampling=self.resampling, driver=self.driver, stac_cfg=cfg, fail_on_error=True)
        if ds.sizes["time"] != len(groups):
            raise RuntimeError(f"odc-stac made {ds.sizes['time']} time steps where terrafm's grouping makes "
                               f"{len(groups)}: report this with the odc-stac version")
        return groups, ds.time.values.astype("datetime64[ns]"), {k: ds[k].data for k in bands}


@dataclass
class _Part:
    """One modality's variables on its own time steps: name -> (array (time, y, x), attrs, fill)."""

    modality: sensors.Modality
    times: np.ndarray
    variables: dict[str, tuple[Any, dict, Any]]
    offset: np.ndarray | None = None


def _item_offset(modality: sensors.Modality, item) -> int:
    baseline = modality.offset.baseline_in(item.properties, name=item.id)
    return modality.stored_offset(baseline, reading.nominal_datetime(item))


def _check_offsets(modality: sensors.Modality, items: list, s2_offset: str | None) -> None:
    rule = modality.offset
    if rule is None or s2_offset is not None:
        return
    offsets = {_item_offset(modality, i) for i in items}
    if len(offsets) > 1:
        baselines = sorted({str(i.properties.get(rule.property, "unknown")) for i in items})
        raise ValueError(
            f"{modality.key} items mix processing baselines {baselines}: those from {rule.since} on carry a "
            f"+{rule.dn} DN offset. Choose s2_offset='harmonize' (subtract it) or s2_offset='raw' (keep stored "
            f"DN), or restrict the dates to one side of {rule.start}.")


def _modality_part(reader: _Reader, modality: sensors.Modality, items: list, s2_offset: str | None,
                   keep_quality: bool) -> _Part:
    _check_offsets(modality, items, s2_offset)
    bands = {b: (modality.dtype, modality.nodata) for b in modality.bands}
    quality = modality.quality
    if quality is not None and all(quality.name in i.assets for i in items):
        bands[quality.name] = (quality.dtype, quality.nodata)
    else:
        quality = None
    groups, times, arrays = reader.read(items, bands)
    data = [arrays[b] for b in modality.bands]
    codes = arrays.get(quality.name) if quality is not None else None
    valid = modality.pixel_valid(data, quality=codes)
    offset = None
    if modality.offset is not None:
        # the offset in each step's DN: a step is offset when any of its granules is
        offset = np.array([max(_item_offset(modality, i) for i in group) for group in groups], dtype="int32")
        if s2_offset == "harmonize":
            if offset.any():
                data = [modality.harmonize(d, offset[:, None, None]) for d in data]
            offset = np.zeros_like(offset)
    variables = {}
    for band, array in zip(modality.bands, data):
        attrs = {"modality": modality.key, "band": band, "units": modality.units, "nodata": modality.nodata}
        variables[modality.variable(band)] = (array, attrs, modality.missing_value)
    if keep_quality and quality is not None:
        variables[modality.quality_variable] = (codes, {"description": quality.description, "nodata": quality.nodata},
                                                quality.nodata)
    variables[modality.mask_variable] = (valid, {"description": f"{modality.key} pixel valid"}, False)
    return _Part(modality, times, variables, offset)


def _exact_index(axis: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Position of each ``axis`` time in ``times`` (-1 where absent); ``times`` sorted."""
    if not len(times):
        return np.full(len(axis), -1)
    pos = np.minimum(np.searchsorted(times, axis), len(times) - 1)
    return np.where(times[pos] == axis, pos, -1)


def _on_one_time_axis(parts: list[_Part], pair_window) -> tuple[dict, dict]:
    """All parts on one time axis: paired modalities (S1) on the dates of the others, or else the
    union of every date.

    Dates a part lacks hold its fill (nodata, NaN for float bands, mask False), so dtypes never change.
    """
    from . import prepare

    primary = [p for p in parts if not p.modality.paired]
    pairing = bool(primary) and len(primary) < len(parts) and pair_window is not None
    axis = np.unique(np.concatenate([p.times for p in (primary if pairing else parts)]))
    variables: dict[str, tuple] = {}
    coords: dict[str, Any] = {"time": axis}
    for part in parts:
        if pairing and part.modality.paired:
            index, gaps = prepare.nearest_index(axis, part.times, pair_window)
            variables[part.modality.gap_variable] = (("time",), gaps, prepare.time_gap_attrs(pair_window, part.modality))
            logger.info("paired %d of %d dates with %s within %s", int((index >= 0).sum()), len(axis),
                        part.modality.key, pair_window)
        else:
            index = _exact_index(axis, part.times)
        for name, (data, attrs, fill) in part.variables.items():
            variables[name] = (("time", "y", "x"), prepare.take_time_steps(data, index, fill), attrs)
        if part.offset is not None:
            coords[part.modality.offset_coord] = ("time", np.where(index >= 0, part.offset[np.maximum(index, 0)], 0))
    return variables, coords


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

    Everything that can be checked without the network is checked before the search: the
    dates (as :func:`search`), the AOI, the catalog, the names of ``load_kwargs`` (arguments
    of :func:`load`) and a ``resolution`` that is not a positive number.

    Examples
    --------
    >>> import terrafm                                                       # doctest: +SKIP
    >>> ds = terrafm.open_sentinel((11.50, 48.10, 11.56, 48.14), "2023-06-01", "2023-08-31",  # doctest: +SKIP
    ...                            max_cloud=30)  # doctest: +SKIP
    >>> ds = terrafm.prepare.normalize(ds)  # doctest: +SKIP
    """
    _check_load_arguments(aoi, load_kwargs)
    items = search(aoi, (start, end), collections, catalog, url=url, max_cloud=max_cloud)
    return load(items, aoi, **load_kwargs)


def _check_load_arguments(aoi: Any, load_kwargs: Mapping[str, Any]) -> None:
    """Refuse, before a search, ``load`` arguments that do not exist and an impossible resolution."""
    import inspect

    parameters = inspect.signature(load).parameters
    unknown = sorted(set(load_kwargs) - set(parameters))
    if unknown:
        raise TypeError(f"unknown argument {unknown[0]!r} for terrafm.stac.load (open_sentinel passes its extra "
                        f"arguments to it); its arguments: {[p for p in parameters if p not in ('items', 'aoi')]}")
    for taken in ("items", "aoi"):
        if taken in load_kwargs:
            raise TypeError(f"open_sentinel sets load's {taken!r} itself; drop that argument")
    resolution = load_kwargs.get("resolution", 10)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) or not np.isfinite(resolution) \
            or resolution <= 0:
        raise ValueError(f"resolution={resolution!r}: the pixel size in metres (CRS units) must be a positive "
                         "number; TerraFM's grid is 10")


def save(ds: xr.Dataset, path: str | os.PathLike, overwrite: bool = False, **to_zarr_kwargs: Any) -> Path:
    """Compute ``ds`` into a zarr store atomically: written to a temporary sibling, renamed at the end.

    A failed read (e.g. an asset that disappears) leaves ``path`` as it was. An existing ``path``
    is replaced only with ``overwrite=True``, and only if it is a zarr store, a file or an empty
    directory (any other directory is refused, whatever ``overwrite``); the store ``ds`` is still
    read from is never written over (load it first). Checked before anything is read.

    Examples
    --------
    >>> save(ds, "aoi.zarr")                                                  # doctest: +SKIP
    >>> save(ds.isel(time=slice(0, 3)), "aoi.zarr", overwrite=True)           # doctest: +SKIP
    """
    import dask
    from concurrent.futures import ThreadPoolExecutor

    from .store import atomic_output, sources_of

    path = Path(path)
    with atomic_output(path, overwrite=overwrite, reads=sources_of(ds), what="Dataset being saved") as tmp:
        # Our own pool, so that after a failed task we can wait for the chunks still being written
        # before the temporary store is removed (dask re-raises at once and leaves its workers running).
        pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        try:
            with dask.config.set(pool=pool):
                ds.to_zarr(tmp, mode="w", **to_zarr_kwargs)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
    return path
