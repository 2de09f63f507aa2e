"""Chip loading throughput: terrafm.stac.load vs bare rasterio windowed reads of the same pixels.

Serves the test scene's real Sentinel COGs (tests/support) from a local Range-capable HTTP server,
then loads N 224 x 224 chips of S2 (12 bands, one date) + S1 (vv, vh, one date) two ways in the
same run:
  * terrafm: ``terrafm.stac.load(items, geobox=chip, chunks=False)`` (odc-stac, eager, no dask)
  * baseline: ``rasterio.open(url).read(window=...)`` per band, 20/60 m bands repeated to 10 m
Prints chips/s, MB/s, the ratio terrafm/baseline (target >= 0.8) and peak RSS. Run:
``python benchmarks/bench_load.py [n_chips]``.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(n_chips: int = 16) -> None:
    import pystac
    import rasterio
    from odc.geo.geobox import GeoBox
    from rasterio.windows import from_bounds

    from support import stac_items
    from support.scene import get_scene
    from support.storage_server import StorageServer

    from terrafm import sensors
    from terrafm.stac import GDAL_HTTP_OPTIONS, load

    scene = get_scene()
    server = StorageServer(root=scene.root).start()
    try:
        base = server.url
        s2 = [pystac.Item.from_dict(d) for d in stac_items.pc_s2_items(scene, include_baseline4=False, href_base=base)][:1]
        s1 = [pystac.Item.from_dict(d) for d in stac_items.pc_s1_items(scene, href_base=base)][:1]
        left, bottom, right, top = scene.bounds
        rng = np.random.default_rng(0)
        chips = []
        for _ in range(n_chips):
            x0 = left + 10 * int(rng.integers(0, (right - left) / 10 - 224))
            y0 = top - 10 * int(rng.integers(0, (top - bottom) / 10 - 224))
            chips.append(GeoBox.from_bbox((x0, y0 - 2240, x0 + 2240, y0), f"EPSG:{scene.epsg}", resolution=10))
        nbytes = 224 * 224 * (12 * 2 + 2 * 4)

        def run_terrafm():
            for gb in chips:
                ds = load(s2 + s1, geobox=gb, catalog=None, pair_window="3D", chunks=False)
                ds[list(sensors.S2_BANDS) + ["vv", "vh"]].compute(scheduler="threads")

        hrefs = [s2[0].assets[b].href for b in sensors.S2_BANDS] + [s1[0].assets[p].href for p in ("vv", "vh")]

        def run_rasterio():
            with rasterio.Env(**GDAL_HTTP_OPTIONS):
                for gb in chips:
                    for href in hrefs:
                        with rasterio.open(href) as src:
                            f = int(round(src.res[0] / 10))
                            win = from_bounds(*gb.boundingbox, transform=src.transform).round_offsets().round_lengths()
                            a = src.read(1, window=win, boundless=True)
                            if f > 1:
                                a = np.repeat(np.repeat(a, f, 0), f, 1)[:224, :224]

        results = {}
        for name, fn in (("rasterio", run_rasterio), ("terrafm", run_terrafm)) * 2:  # warm, then timed
            t = time.perf_counter()
            fn()
            results[name] = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for name, secs in results.items():
            print(f"{name:9s} {n_chips / secs:7.2f} chips/s  {n_chips * nbytes / secs / 1e6:7.2f} MB/s")
        ratio = results["rasterio"] / results["terrafm"]
        print(f"ratio terrafm/rasterio throughput: {ratio:.2f} (target >= 0.8)")
        print(f"peak RSS: {peak:.0f} MB")
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
