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
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr

from . import reading, sensors
from .reading import GDAL_HTTP_OPTIONS, TerraFMReadError

logger = logging.getLogger(__name__)

__all__ = ["search", "load", "open_sentinel", "save", "TerraFMReadError", "TerraFMSearchError", "GDAL_HTTP_OPTIONS", "aoi_geometry"]

CHIP_SIZE = 224
"""Side of one model chip in pixels; an AOI must be at least this large."""

_API_RETRY = dict(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))


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
    from odc.geo.geobox import GeoBox
    from odc.geo.geom import Geometry

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
        Dask chunks, default ``{"time": 1, "x": 1024, "y": 1024}``. ``False`` reads eagerly into
        numpy in the calling thread, with the same result (fast path for one chip or block at a
        time: no dask graph, no intermediate odc-stac Dataset).
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
        time axis, ``s1_time_gap`` recorded); ``None`` keeps the union of dates, where a modality's
        missing dates hold its nodata (NaN for S1) and its mask is False.
    groupby : str
        Time steps as odc-stac groups them: ``"solar_day"`` merges same-day granules, ``"time"``,
        ``"id"`` (one step per item) or the name of an item property.
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
    import rioxarray  # noqa: F401  (registers ds.rio, part of the Dataset contract)

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
    reader = _Reader(geobox, chunks, groupby, resampling,
                     reading.make_driver(reading.pc_sign if sign else None, {**GDAL_HTTP_OPTIONS, **(gdal_options or {})}))

    parts: list[_Part] = []
    for modality in ("s2_l2a", "s2_l1c"):
        if modality in by_modality:
            parts.append(_s2_part(reader, modality, spec_of[modality], by_modality[modality], s2_offset, keep_scl))
    if "s1" in by_modality:
        parts.append(_s1_part(reader, spec_of["s1"], by_modality["s1"]))
    variables: dict[str, Any] = {}
    coords: dict[str, Any] = {}
    if parts:
        variables, coords = _on_one_time_axis(parts, pair_window)
    if "worldcover" in by_modality:
        spec = spec_of["worldcover"]
        key = spec.assets["worldcover"]
        _, _, arrays = reader.read(by_modality["worldcover"], spec, {key: ("uint8", spec.nodata)})
        variables["worldcover"] = (("y", "x"), arrays[key].max(axis=0).astype("uint8"),
                                   {"description": "ESA WorldCover classes (0 = no data)"})
    from odc.geo.xr import xr_coords

    grid = xr_coords(geobox)  # y, x and the CRS coordinate, last
    crs_name = list(grid)[-1]
    coords = {**grid, **coords}
    out = xr.Dataset({name: xr.Variable(dims, data, attrs, encoding={"grid_mapping": crs_name} if "y" in dims else None)
                      for name, (dims, data, attrs) in variables.items()}, coords=coords)
    out.attrs["terrafm_modalities"] = [m for m in sensors.MODALITY_KEYS if m in {p.modality for p in parts}]
    out.attrs["s2_offset_handling"] = s2_offset or "raw"
    return out


# ------------------------------------------------------------------------------------------------
# load, per modality: pixels as arrays (numpy or dask) on their own time steps, then one time axis
# ------------------------------------------------------------------------------------------------
class _Reader:
    """Reads one collection's assets onto the load's GeoBox: eagerly (numpy) or through odc-stac (dask)."""

    def __init__(self, geobox, chunks, groupby: str, resampling: str, driver):
        self.geobox, self.groupby, self.resampling, self.driver = geobox, groupby, resampling, driver
        self.eager = chunks is False
        self.chunks = None if self.eager else dict(chunks or {"time": 1, "x": 1024, "y": 1024})
        self.lon = geobox.extent.centroid.to_crs("EPSG:4326").points[0][0]

    def read(self, items, spec: sensors.CollectionSpec, bands: dict[str, tuple[str, float]]):
        """``(groups, times, {asset key: (time, y, x) array})``: one time step per group of items."""
        _check_assets(items, spec, list(bands))
        groups = reading.group_items(items, self.groupby, self.lon)
        if self.eager:
            return (groups, reading.group_times(groups),
                    reading.read_eager(groups, bands, self.geobox, driver=self.driver, resampling=self.resampling))
        import odc.stac

        cfg = {spec.collection: {"assets": {k: {"data_type": dtype, "nodata": nodata} for k, (dtype, nodata) in bands.items()}}}
        ds = odc.stac.load(items, bands=list(bands), geobox=self.geobox, chunks=self.chunks, groupby=self.groupby,
                           resampling=self.resampling, driver=self.driver, stac_cfg=cfg, fail_on_error=True)
        if ds.sizes["time"] != len(groups):
            raise RuntimeError(f"odc-stac made {ds.sizes['time']} time steps of {spec.collection} where terrafm's "
                               f"grouping makes {len(groups)}: report this with the odc-stac version")
        return groups, ds.time.values.astype("datetime64[ns]"), {k: ds[k].data for k in bands}


@dataclass
class _Part:
    """One modality's variables on its own time steps: name -> (array (time, y, x), attrs, fill)."""

    modality: str
    times: np.ndarray
    variables: dict[str, tuple[Any, dict, Any]]
    s2_offset: np.ndarray | None = None


def _lookup(table: np.ndarray, codes):
    """``table[codes]`` for a numpy or dask array of small non-negative integer codes."""
    if isinstance(codes, np.ndarray):
        return table[codes]
    return codes.map_blocks(table.__getitem__, dtype=table.dtype)


def _s2_part(reader: _Reader, modality: str, spec: sensors.CollectionSpec, items: list,
             s2_offset: str | None, keep_scl: bool) -> _Part:
    baselines = sorted({_baseline(i) or "00.00" for i in items})
    if len({b >= sensors.S2_OFFSET_BASELINE for b in baselines}) > 1 and s2_offset is None:
        raise ValueError(
            f"{modality} items mix processing baselines {baselines}: those from "
            f"{sensors.S2_OFFSET_BASELINE} on carry a +{sensors.S2_BASELINE_OFFSET} DN offset. Choose "
            "s2_offset='harmonize' (subtract it) or s2_offset='raw' (keep stored DN), or restrict the "
            f"dates to one side of {sensors.S2_OFFSET_START}."
        )
    bands = {spec.assets[b]: (spec.dtype, spec.nodata) for b in sensors.S2_BANDS}
    if spec.mask_asset:
        bands[spec.mask_asset] = ("uint8", 0)
    groups, times, arrays = reader.read(items, spec, bands)
    # the offset still present in each step's DN: a step is offset when any of its granules is
    offset = np.array([sensors.S2_BASELINE_OFFSET
                       if max(_baseline(i) or "00.00" for i in group) >= sensors.S2_OFFSET_BASELINE else 0
                       for group in groups], dtype="int32")
    scl = arrays.get(spec.mask_asset) if spec.mask_asset else None
    if scl is not None:
        invalid = np.zeros(256, dtype=bool)
        invalid[list(sensors.SCL_INVALID_CLASSES)] = True
        valid = _lookup(~invalid, scl)
    else:
        valid = arrays[spec.assets["B02"]] != spec.nodata
    attrs = {"modality": modality, "units": "DN", "nodata": spec.nodata}
    variables = {}
    for band in sensors.S2_BANDS:
        data = arrays[spec.assets[band]]
        if s2_offset == "harmonize" and offset.any():
            off = offset[:, None, None].astype(data.dtype)
            data = ((data > off) * (data - off)).astype(data.dtype)  # clipped at 0, no unsigned wrap-around
        variables[band] = (data, attrs, spec.nodata)
    if s2_offset == "harmonize":
        offset = np.zeros_like(offset)
    if keep_scl and scl is not None:
        variables["SCL"] = (scl, {"description": "Sentinel-2 scene classification", "nodata": 0}, 0)
    variables[f"mask_{modality}"] = (valid, {"description": f"{modality} pixel valid (scene classification)"}, False)
    return _Part(modality, times, variables, offset)


def _s1_part(reader: _Reader, spec: sensors.CollectionSpec, items: list) -> _Part:
    bands = {spec.assets[b]: (spec.dtype, spec.nodata) for b in sensors.S1_BANDS}
    _, times, arrays = reader.read(items, spec, bands)
    vv, vh = arrays[spec.assets["vv"]], arrays[spec.assets["vh"]]
    valid = (vv != spec.nodata) & (vh != spec.nodata) & np.isfinite(vv) & np.isfinite(vh)
    attrs = {"modality": "s1", "units": "linear power", "nodata": spec.nodata}
    variables = {"vv": (vv, attrs, np.nan), "vh": (vh, attrs, np.nan),
                 "mask_s1": (valid, {"description": "s1 pixel valid (not nodata)"}, False)}
    return _Part("s1", times, variables)


def _exact_index(axis: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Position of each ``axis`` time in ``times`` (-1 where absent); ``times`` sorted."""
    if not len(times):
        return np.full(len(axis), -1)
    pos = np.minimum(np.searchsorted(times, axis), len(times) - 1)
    return np.where(times[pos] == axis, pos, -1)


def _on_one_time_axis(parts: list[_Part], pair_window) -> tuple[dict, dict]:
    """All parts on one time axis: S1 paired to the S2 dates, or else the union of every date.

    Dates a part lacks hold its fill (nodata, NaN for S1, mask False), so dtypes never change.
    """
    from . import prepare

    s2 = [p for p in parts if p.modality in ("s2_l2a", "s2_l1c")]
    s1 = next((p for p in parts if p.modality == "s1"), None)
    pairing = bool(s2) and s1 is not None and pair_window is not None
    axis = np.unique(np.concatenate([p.times for p in (s2 if pairing else parts)]))
    variables: dict[str, tuple] = {}
    coords: dict[str, Any] = {"time": axis}
    offset = np.zeros(len(axis), dtype="int32")
    has_offset = np.zeros(len(axis), dtype=bool)
    gap_variable = None
    for part in parts:
        if pairing and part is s1:
            index, gaps = prepare.nearest_index(axis, part.times, pair_window)
            gap_variable = (("time",), gaps, prepare.time_gap_attrs(pair_window))
            logger.info("paired %d of %d S2 dates with S1 within %s", int((index >= 0).sum()), len(axis), pair_window)
        else:
            index = _exact_index(axis, part.times)
        for name, (data, attrs, fill) in part.variables.items():
            variables[name] = (("time", "y", "x"), prepare.take_time_steps(data, index, fill), attrs)
        if part.s2_offset is not None:  # a date of both S2 levels keeps the first level's offset
            first = (index >= 0) & ~has_offset
            offset[first] = part.s2_offset[index[first]]
            has_offset |= first
    if gap_variable is not None:
        variables["s1_time_gap"] = gap_variable
    if s2:
        coords["s2_offset"] = ("time", offset)
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
