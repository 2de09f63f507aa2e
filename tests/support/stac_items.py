"""STAC collections and items shaped like Planetary Computer's and Earth Search's, for the test scene.

Shapes follow the real responses in ``shared/data/stac`` (asset keys ``B01``..``B12``/``B8A``/``SCL``,
``vv``/``vh``, ``map``; per-asset ``proj:shape``/``proj:transform``/``proj:bbox``; ``raster:bands``
nodata and data types on S1 and WorldCover; ``eo:cloud_cover``, ``sat:orbit_state``,
``s2:processing_baseline``, ``s2:mgrs_tile``, ``sar:polarizations``). Values describe the locally built
COGs (see :mod:`tests.support.scene`).

Hrefs: Planetary Computer assets point at ``http://{account}.blob.core.windows.net/{container}/...``
exactly like the real (unsigned) ones except for the scheme. The test session routes those hosts to
the local COG server with ``http_proxy`` (and ``no_proxy=127.0.0.1,localhost``), and the server
demands a valid SAS token from the local token endpoint, so signing is exercised for real.
Earth Search items point straight at ``http://127.0.0.1:PORT/...`` (public, unsigned).
"""

from __future__ import annotations

import copy
import datetime as dt

from .scene import CRS_EPSG, SentinelScene

PC_ROOT = "https://planetarycomputer.microsoft.com/api/stac/v1"
S2_ACCOUNT, S1_ACCOUNT, WC_ACCOUNT = "sentinel2l2a01", "sentinel1euwestrtc", "ai4edataeuwest"

_S2_META = {
    "B01": ("coastal", 0.443), "B02": ("blue", 0.49), "B03": ("green", 0.56), "B04": ("red", 0.665),
    "B05": ("rededge", 0.704), "B06": ("rededge", 0.74), "B07": ("rededge", 0.783), "B08": ("nir", 0.842),
    "B8A": ("rededge", 0.865), "B09": ("nir09", 0.945), "B10": ("cirrus", 1.375), "B11": ("swir16", 1.61),
    "B12": ("swir22", 2.19),
}
# Earth Search v1 asset keys for the Sentinel-2 bands
EARTH_SEARCH_KEYS = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16",
    "B12": "swir22",
}
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


def _polygon(west, south, east, north):
    return {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]]}


def _proj_bbox(shape, transform):
    a, _, c, _, e, f = transform
    return [c, f + e * shape[0], c + a * shape[1], f]


def _links(collection: str, item_id: str | None = None):
    links = [{"rel": "collection", "type": "application/json", "href": f"{PC_ROOT}/collections/{collection}"},
             {"rel": "parent", "type": "application/json", "href": f"{PC_ROOT}/collections/{collection}"},
             {"rel": "root", "type": "application/json", "href": f"{PC_ROOT}/"}]
    if item_id:
        links.append({"rel": "self", "type": "application/geo+json",
                      "href": f"{PC_ROOT}/collections/{collection}/items/{item_id}"})
    return links


def _collection(cid: str, description: str, bbox, start: str, end: str | None, extensions=(), **extra):
    return {
        "type": "Collection", "stac_version": "1.0.0", "id": cid, "description": description,
        "license": "proprietary", "links": [], "stac_extensions": list(extensions),
        "extent": {"spatial": {"bbox": [list(bbox)]}, "temporal": {"interval": [[start, end]]}},
        **extra,
    }


def pc_s2_items(scene: SentinelScene, *, include_baseline4: bool = True, href_base: str | None = None) -> list[dict]:
    """``sentinel-2-l2a`` items (Planetary Computer shape) for the built S2 dates."""
    base = href_base or f"http://{S2_ACCOUNT}.blob.core.windows.net"
    items = []
    for entry in scene.manifest["s2"]:
        if entry["baseline"] >= "04.00" and not include_baseline4:
            continue
        date = dt.datetime.fromisoformat(entry["datetime"].rstrip("Z"))
        stamp = date.strftime("%Y%m%dT%H%M%S")
        item_id = f"S2A_MSIL2A_{stamp}_R011_T18SUJ_{stamp}"
        assets = {}
        for key, a in entry["assets"].items():
            asset = {"href": f"{base}/{a['path']}", "proj:bbox": _proj_bbox(a["shape"], a["transform"]),
                     "proj:shape": a["shape"], "proj:transform": a["transform"], "gsd": float(a["res"]),
                     "type": COG_TYPE, "roles": ["data"]}
            if key == "SCL":
                asset["title"] = "Scene classfication map (SCL)"
            else:
                common, wl = _S2_META[key]
                asset["title"] = f"Band {key[1:].lstrip('0')} - {common} - {a['res']}m"
                asset["eo:bands"] = [{"name": key, "common_name": common, "center_wavelength": wl}]
            assets[key] = asset
        west, south, east, north = scene.manifest["lonlat_bounds"]
        items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "sentinel-2-l2a",
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.0.0/schema.json",
                                "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
                                "https://stac-extensions.github.io/projection/v1.0.0/schema.json"],
            "bbox": [west, south, east, north], "geometry": _polygon(west, south, east, north),
            "links": _links("sentinel-2-l2a", item_id),
            "properties": {
                "datetime": entry["datetime"], "platform": "Sentinel-2A", "proj:epsg": CRS_EPSG,
                "instruments": ["msi"], "s2:mgrs_tile": "18SUJ", "constellation": "Sentinel 2",
                "eo:cloud_cover": entry["cloud_cover"], "s2:product_type": "S2MSI2A",
                "s2:processing_baseline": entry["baseline"], "sat:orbit_state": "descending",
                "sat:relative_orbit": 11, "s2:nodata_pixel_percentage": entry["nodata_pct"],
                "s2:product_uri": f"S2A_MSIL2A_{stamp}_N{entry['baseline'].replace('.', '')}_R011_T18SUJ_{stamp}.SAFE",
            },
            "assets": assets,
        })
    return items


def pc_s1_items(scene: SentinelScene, *, href_base: str | None = None) -> list[dict]:
    """``sentinel-1-rtc`` items (Planetary Computer shape)."""
    base = href_base or f"http://{S1_ACCOUNT}.blob.core.windows.net"
    west, south, east, north = scene.manifest["lonlat_bounds"]
    items = []
    for entry in scene.manifest["s1"]:
        date = dt.datetime.fromisoformat(entry["datetime"].rstrip("Z"))
        stamp = date.strftime("%Y%m%dT%H%M%S")
        item_id = f"S1A_IW_GRDH_1SDV_{stamp}_{stamp}_rtc"
        a0 = entry["assets"]["vv"]
        assets = {}
        for pol, a in entry["assets"].items():
            assets[pol] = {"href": f"{base}/{a['path']}", "type": COG_TYPE, "roles": ["data"],
                           "title": f"{pol.upper()}: vertical transmit, {'vertical' if pol == 'vv' else 'horizontal'} receive",
                           "raster:bands": [{"nodata": -32768, "data_type": "float32", "spatial_resolution": 10.0}]}
        items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "sentinel-1-rtc",
            "stac_extensions": ["https://stac-extensions.github.io/sar/v1.0.0/schema.json",
                                "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
                                "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                                "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
            "bbox": [west, south, east, north], "geometry": _polygon(west, south, east, north),
            "links": _links("sentinel-1-rtc", item_id),
            "properties": {
                "datetime": entry["datetime"], "platform": "SENTINEL-1A", "constellation": "Sentinel-1",
                "proj:epsg": CRS_EPSG, "proj:shape": a0["shape"], "proj:bbox": _proj_bbox(a0["shape"], a0["transform"]),
                "proj:transform": a0["transform"] + [0.0, 0.0, 1.0], "sat:orbit_state": entry["orbit_state"],
                "sar:polarizations": ["VV", "VH"], "sar:product_type": "GRD", "sar:instrument_mode": "IW",
                "sar:frequency_band": "C", "s1:resolution": "high", "sat:relative_orbit": 4,
            },
            "assets": assets,
        })
    return items


def pc_worldcover_items(scene: SentinelScene, *, href_base: str | None = None) -> list[dict]:
    """One ``esa-worldcover`` item (Planetary Computer shape, EPSG:4326, datetime null)."""
    base = href_base or f"http://{WC_ACCOUNT}.blob.core.windows.net"
    wc = scene.manifest["worldcover"]
    west, south, east, north = wc["bbox"]
    item_id = "ESA_WorldCover_10m_2021_v200_N36W078"
    classes = [(10, "Tree cover"), (20, "Shrubland"), (30, "Grassland"), (40, "Cropland"), (50, "Built-up"),
               (60, "Bare / sparse vegetation"), (70, "Snow and ice"), (80, "Permanent water bodies"),
               (90, "Herbaceous wetland"), (95, "Mangroves"), (100, "Moss and lichen")]
    return [{
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "esa-worldcover",
        "stac_extensions": ["https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/classification/v1.0.0/schema.json"],
        "bbox": [west, south, east, north], "geometry": _polygon(west, south, east, north),
        "links": _links("esa-worldcover", item_id),
        "properties": {"datetime": None, "start_datetime": "2021-01-01T00:00:00Z",
                       "end_datetime": "2021-12-31T23:59:59Z", "proj:epsg": 4326,
                       "esa_worldcover:product_version": "2.0.0", "description": "ESA WorldCover product at 10m resolution"},
        "assets": {"map": {
            "href": f"{base}/{wc['path']}", "proj:shape": wc["shape"], "proj:transform": wc["transform"],
            "type": COG_TYPE, "roles": ["data"], "title": "Land Cover Classes",
            "raster:bands": [{"name": "Band1", "nodata": 0, "sampling": "area", "data_type": "uint8",
                              "spatial_resolution": 10}],
            "classification:classes": [{"value": v, "description": d} for v, d in classes],
        }},
    }]


def earth_search_l1c_items(scene: SentinelScene, href_base: str) -> list[dict]:
    """One Earth Search v1 ``sentinel-2-l1c`` item of the real scene (asset keys ``blue``, ``nir08``...)."""
    entry = scene.manifest["l1c"]
    west, south, east, north = scene.manifest["lonlat_bounds"]
    assets = {}
    for band, a in entry["assets"].items():
        common, wl = _S2_META[band]
        assets[EARTH_SEARCH_KEYS[band]] = {
            "href": f"{href_base}/{a['path']}", "type": COG_TYPE, "roles": ["data", "reflectance"],
            "title": f"{common} ({band}) - {a['res']}m", "gsd": a["res"],
            "eo:bands": [{"name": band, "common_name": common, "center_wavelength": wl}],
            "proj:shape": a["shape"], "proj:transform": a["transform"],
            "raster:bands": [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                              "spatial_resolution": a["res"], "scale": 0.0001, "offset": 0}],
        }
    return [{
        "type": "Feature", "stac_version": "1.0.0", "id": "S2A_18SUJ_20210610_0_L1C", "collection": "sentinel-2-l1c",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.0.0/schema.json",
                            "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
                            "https://stac-extensions.github.io/raster/v1.1.0/schema.json"],
        "bbox": [west, south, east, north], "geometry": _polygon(west, south, east, north), "links": [],
        "properties": {"datetime": entry["datetime"], "platform": "sentinel-2a", "constellation": "sentinel-2",
                       "proj:epsg": CRS_EPSG, "eo:cloud_cover": 0.0, "mgrs:utm_zone": 18,
                       "mgrs:latitude_band": "S", "mgrs:grid_square": "UJ",
                       "s2:processing_baseline": entry["baseline"], "s2:product_type": "S2MSI1C"},
        "assets": assets,
    }]


def collections(scene: SentinelScene) -> list[dict]:
    """Collections for the four ids the items use."""
    west, south, east, north = scene.manifest["lonlat_bounds"]
    bbox = [west, south, east, north]
    return [
        _collection("sentinel-2-l2a", "Sentinel-2 Level-2A (test stand-in)", bbox, "2021-06-01T00:00:00Z", None,
                    item_assets={k: {"type": COG_TYPE, "roles": ["data"]} for k in list(_S2_META) + ["SCL"] if k != "B10"}),
        _collection("sentinel-1-rtc", "Sentinel-1 RTC (test stand-in)", bbox, "2021-06-01T00:00:00Z", None,
                    item_assets={"vv": {"type": COG_TYPE}, "vh": {"type": COG_TYPE}}),
        _collection("esa-worldcover", "ESA WorldCover (test stand-in)", bbox, "2021-01-01T00:00:00Z",
                    "2021-12-31T23:59:59Z", item_assets={"map": {"type": COG_TYPE}}),
        _collection("sentinel-2-l1c", "Sentinel-2 L1C, Earth Search shape (test stand-in)", bbox,
                    "2021-06-01T00:00:00Z", None),
    ]


def all_items(scene: SentinelScene, direct_base: str) -> list[dict]:
    """Every item loaded into the local STAC API."""
    return (pc_s2_items(scene) + pc_s1_items(scene) + pc_worldcover_items(scene)
            + earth_search_l1c_items(scene, direct_base))


def with_hrefs(item: dict, base_from: str, base_to: str) -> dict:
    """Copy of ``item`` with every asset href prefix ``base_from`` replaced by ``base_to``."""
    out = copy.deepcopy(item)
    for asset in out["assets"].values():
        asset["href"] = asset["href"].replace(base_from, base_to, 1)
    return out
