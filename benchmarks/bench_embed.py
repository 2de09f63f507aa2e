"""Benchmark embed(): end-to-end chips/s over local COGs / model-only chips/s on the same chips,
peak RSS of a 4x larger area / base area, km^2/s. One run, ratios printed side by side.

    python benchmarks/bench_embed.py [--model terrafm_base] [--chips 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
import rioxarray, xarray as xr
from terrafm.embed import embed
from terrafm.model import create_model
from terrafm.sensors import S2_BANDS
path, model_name, chip = sys.argv[1], sys.argv[2], int(sys.argv[3])
da = rioxarray.open_rasterio(path, chunks={"x": 512, "y": 512})
ds = xr.Dataset({b: da.isel(band=i, drop=True) for i, b in enumerate(S2_BANDS)})
for b in S2_BANDS:
    ds[b].attrs = {"modality": "s2_l1c"}
torch.manual_seed(0)
model = create_model(model_name).eval()
with torch.inference_mode():  # same warm-up as the model-only loop (stem folding, allocator)
    model({"s2_l1c": torch.zeros(8, 12, chip, chip)})
t = time.perf_counter()
emb = embed(ds, model=model, chip_size=chip, overlap=0, batch_size=8, device="cpu", progress=False)
dt = time.perf_counter() - t
n = (ds.sizes["y"] // chip) * (ds.sizes["x"] // chip)
print(json.dumps({"seconds": dt, "chips": n, "km2": ds.sizes["y"] * ds.sizes["x"] * 1e-4,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _write_cog(path: Path, reps: int) -> None:
    import rasterio

    from terrafm.demo import DEMO_FILE

    with rasterio.open(DEMO_FILE) as src:
        data, profile = src.read(), src.profile
    data = np.tile(data, (1, reps, reps))
    profile.update(width=data.shape[2], height=data.shape[1], tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def _child(path: Path, model: str, chip: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), model, str(chip)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _model_only(model_name: str, chip: int, n: int) -> float:
    import torch

    from terrafm.model import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    x = torch.rand(8, 12, chip, chip)
    with torch.inference_mode():
        model({"s2_l1c": x})
        t = time.perf_counter()
        done = 0
        while done < n:
            model({"s2_l1c": x})
            done += 8
    return done / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="terrafm_base")
    parser.add_argument("--chip", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, big = Path(tmp) / "base.tif", Path(tmp) / "big.tif"
        _write_cog(base, 1)
        _write_cog(big, 2)
        r_base = _child(base, args.model, args.chip)
        r_big = _child(big, args.model, args.chip)
    e2e = r_base["chips"] / r_base["seconds"]
    model_only = _model_only(args.model, args.chip, r_base["chips"])
    print(f"model {args.model}, chip {args.chip}, CPU 2 threads")
    print(f"end-to-end embed(): {e2e:.2f} chips/s   model only: {model_only:.2f} chips/s   "
          f"ratio {e2e / model_only:.3f} (target >= 0.85)")
    print(f"peak RSS base {r_base['peak_rss_mb']:.0f} MB, 4x area {r_big['peak_rss_mb']:.0f} MB, "
          f"ratio {r_big['peak_rss_mb'] / r_base['peak_rss_mb']:.3f} (target <= 1.15)")
    print(f"throughput {r_big['km2'] / r_big['seconds']:.3f} km^2/s (4x area)")


if __name__ == "__main__":
    main()
