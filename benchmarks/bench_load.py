"""Chip loading throughput: terrafm.stac.load vs bare rasterio windowed reads of the same pixels.

Serves the test scene's real Sentinel COGs (tests/support) from a local Range-capable HTTP server,
then loads N 224 x 224 chips of S2 (12 bands, one date) + S1 (vv, vh, one date) three ways, in
interleaved rounds of the same run:

* ``terrafm``: ``terrafm.stac.load(items, geobox=chip, chunks=False)`` -- the eager numpy path (odc-stac's
  grouping and fusing, no dask); it also reads SCL, builds ``mask_s2_l2a`` / ``mask_s1``, pairs S1 with S2
  and returns the georeferenced Dataset.
* ``rio+scl``: ``rasterio.open(url).read(window=...)`` of the same 12 S2 bands, SCL and vv/vh
  (the same files terrafm reads), 20/60 m bands repeated to 10 m. The fair baseline.
* ``rio``: the same without SCL (band pixels only).

Two scenarios: ``chips`` (one load call per 224 px chip: the per-call set-up counts fully) and
``blocks`` (one call per 896 x 896 px block = 16 chips, as an AOI is loaded before being cut into
chips). The first round warms GDAL's caches and checks that terrafm's pixels equal the
baseline's; the next rounds are timed, each method once per round in rotating order. Prints per-method median
chips/s and MB/s (band pixels delivered: 12 x uint16 + 2 x float32 per pixel), ratios of the medians
(target >= 0.85), the median of per-round ratios, the machine load and peak RSS. Band variables are found
by asset key (``B04`` or ``<modality>_B04``), so the benchmark does not depend on the Dataset's naming. Run:
``python benchmarks/bench_load.py [n_chips] [rounds]``.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(n_chips: int = 16, rounds: int = 7) -> None:
    import pystac
    import rasterio
    from odc.geo.geobox import GeoBox
    from rasterio.windows import Window

    from support import stac_items
    from support.scene import get_scene
    from support.storage_server import StorageServer

    from terrafm.stac import GDAL_HTTP_OPTIONS, load

    scene = get_scene()
    server = StorageServer(root=scene.root).start()
    load_before = os.getloadavg()
    try:
        base = server.url
        s2 = [pystac.Item.from_dict(d) for d in stac_items.pc_s2_items(scene, include_baseline4=False, href_base=base)][:1]
        s1 = [pystac.Item.from_dict(d) for d in stac_items.pc_s1_items(scene, href_base=base)][:1]
        left, bottom, right, top = scene.bounds
        rng = np.random.default_rng(0)

        def random_boxes(n, size):
            boxes = []
            for _ in range(n):
                x0 = left + 10 * int(rng.integers(0, (right - left) / 10 - size))
                y0 = top - 10 * int(rng.integers(0, (top - bottom) / 10 - size))
                boxes.append(GeoBox.from_bbox((x0, y0 - 10 * size, x0 + 10 * size, y0), f"EPSG:{scene.epsg}",
                                              resolution=10))
            return boxes

        # "chips": one load call per 224 px chip; "blocks": one call per 4 x 4 chips (896 px), the way
        # an AOI is loaded before it is cut into chips
        scenarios = {"chips": (random_boxes(n_chips, 224), 1),
                     "blocks": (random_boxes(max(1, n_chips // 16), 896), 16)}
        s2_keys = [k for k in s2[0].assets if k != "SCL"]          # B01..B12, B8A: 12 bands
        s1_keys = [k for k in s1[0].assets if k in ("vv", "vh")]
        names = s2_keys + s1_keys
        assert len(s2_keys) == 12 and len(s1_keys) == 2, names
        nbytes = 224 * 224 * (12 * 2 + 2 * 4)
        band_hrefs = [s2[0].assets[b].href for b in s2_keys] + [s1[0].assets[p].href for p in s1_keys]
        scl_href = s2[0].assets["SCL"].href

        def variable(ds, key):
            """The Dataset variable holding asset ``key``: ``key`` itself or ``<modality>_<key>``."""
            found = [v for v in ds.data_vars if v == key or str(v).endswith("_" + key)]
            if len(found) != 1:
                raise KeyError(f"no single variable for asset {key!r} among {list(ds.data_vars)}")
            return ds[found[0]]

        def terrafm_reader(boxes):
            def run():
                out = []
                for gb in boxes:
                    ds = load(s2 + s1, geobox=gb, pair_window="3D", chunks=False)
                    out.append({n: variable(ds, n).values[0] for n in names})
                return out
            return run

        def rasterio_reader(boxes, hrefs):
            def run():
                out = []
                with rasterio.Env(**GDAL_HTTP_OPTIONS):
                    for gb in boxes:
                        h, w = gb.shape
                        arrays = []
                        for href in hrefs:
                            with rasterio.open(href) as src:
                                # box origin in 10 m pixels from the file's origin; a 20/60 m
                                # pixel covers f x f of them (nearest = repetition)
                                f = int(round(src.res[0] / 10))
                                col = int(round((gb.transform.c - src.transform.c) / 10))
                                row = int(round((src.transform.f - gb.transform.f) / 10))
                                r0, c0 = row // f, col // f
                                win = Window(c0, r0, (col + w - 1) // f + 1 - c0, (row + h - 1) // f + 1 - r0)
                                a = src.read(1, window=win)
                                if f > 1:
                                    a = np.repeat(np.repeat(a, f, 0), f, 1)
                                    a = a[row - r0 * f:row - r0 * f + h, col - c0 * f:col - c0 * f + w]
                                arrays.append(a)
                        out.append(dict(zip(names, arrays)))
                return out
            return run

        results = {}
        for scenario, (boxes, per_box) in scenarios.items():
            methods = {"terrafm": terrafm_reader(boxes), "rio+scl": rasterio_reader(boxes, band_hrefs + [scl_href]),
                       "rio": rasterio_reader(boxes, band_hrefs)}
            # warm-up round, and the check that everyone delivers the same pixels
            got = {name: fn() for name, fn in methods.items()}
            for k in range(len(boxes)):
                for n in names:
                    np.testing.assert_array_equal(got["terrafm"][k][n], got["rio+scl"][k][n], err_msg=f"{scenario} {k} {n}")
            del got
            times: dict[str, list[float]] = {name: [] for name in methods}
            order = list(methods)
            for r in range(rounds):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    t = time.perf_counter()
                    methods[name]()
                    times[name].append(time.perf_counter() - t)
            results[scenario] = (times, len(boxes) * per_box)
        load_after = os.getloadavg()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for scenario, (times, chips) in results.items():
            how = "one load per chip" if scenario == "chips" else "one load per 896 px block of 16 chips"
            print(f"[{scenario}] {chips} chips of 224 x 224 px (12 S2 bands uint16 + vv/vh float32), {how}, "
                  f"{rounds} timed rounds, medians")
            med = {}
            for name, secs in times.items():
                med[name] = statistics.median(secs)
                print(f"  {name:8s} {chips / med[name]:7.2f} chips/s  {chips * nbytes / med[name] / 1e6:7.2f} MB/s"
                      f"  (rounds: {' '.join(f'{chips / s:.1f}' for s in secs)} chips/s)")
            for ref in ("rio+scl", "rio"):
                per_round = [b / a for a, b in zip(times["terrafm"], times[ref])]
                print(f"  ratio terrafm/{ref:7s} throughput: {med[ref] / med['terrafm']:.2f} "
                      f"(median of per-round ratios {statistics.median(per_round):.2f}; target >= 0.85)")
        print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")
        print(f"peak RSS: {peak:.0f} MB")
    finally:
        server.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
