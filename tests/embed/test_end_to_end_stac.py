"""STAC search → signed COG reads → embed(): the whole pipeline against the real local stack
(pgstac STAC API, Range COG server with SAS signing) on real Sentinel pixels with clouds."""

from __future__ import annotations

import numpy as np
import pytest

import terrafm


@pytest.fixture(scope="module")
def scene_dataset(stac_api_url, sentinel_scene):
    return terrafm.open_sentinel(sentinel_scene.aoi_bbox, sentinel_scene.start, sentinel_scene.end,
                                 url=stac_api_url)


@pytest.fixture(scope="module")
def scene_embedding(scene_dataset):
    return terrafm.embed(scene_dataset, model="terrafm_tiny", weights="random", chip_size=224,
                         device="cpu", progress=False)


def _patch_fraction(mask: np.ndarray, gy: int, gx: int) -> np.ndarray:
    """Fraction of valid pixels per 16 x 16 patch, padding outside the image as invalid."""
    t, h, w = mask.shape
    padded = np.zeros((t, gy * 16, gx * 16), dtype=bool)
    padded[:, :h, :w] = mask
    return padded.reshape(t, gy, 16, gx, 16).mean(axis=(2, 4))


def test_area_is_larger_than_a_chip_with_both_sensors(scene_dataset):
    assert scene_dataset.sizes["x"] > 224 and scene_dataset.sizes["y"] > 224
    assert {"mask_s2_l2a", "mask_s1", "s2_l2a_B04", "s1_vv"} <= set(scene_dataset.data_vars)
    s2_valid = float(scene_dataset["mask_s2_l2a"].mean().compute())
    assert 0.3 < s2_valid < 0.99, "the scene should have clouds"


def test_grid_is_derived_from_the_input_geobox(scene_dataset, scene_embedding):
    emb = scene_embedding
    assert emb.dims == ("time", "y", "x", "embedding")
    assert emb.sizes["time"] == scene_dataset.sizes["time"]
    assert emb.rio.crs == scene_dataset.rio.crs
    pixel, patch = scene_dataset.odc.geobox, emb.odc.geobox
    assert patch.resolution.x == 16 * pixel.resolution.x and patch.resolution.y == 16 * pixel.resolution.y
    assert (patch.transform.c, patch.transform.f) == (pixel.transform.c, pixel.transform.f)
    assert patch.shape == (-(-pixel.shape[0] // 16), -(-pixel.shape[1] // 16))


def test_validity_follows_the_cloud_and_nodata_masks(scene_dataset, scene_embedding):
    emb = scene_embedding
    gy, gx = emb.sizes["y"], emb.sizes["x"]
    s2 = _patch_fraction(scene_dataset["mask_s2_l2a"].values, gy, gx) >= 0.5
    s1 = _patch_fraction(scene_dataset["mask_s1"].values, gy, gx) >= 0.5
    expected = s2 | s1
    np.testing.assert_array_equal(emb["valid"].values, expected)
    np.testing.assert_array_equal(emb["valid_s2_l2a"].values, s2)   # the same rule per modality
    np.testing.assert_array_equal(emb["valid_s1"].values, s1)
    values = emb.values
    assert np.isfinite(values[expected]).all()
    assert np.isnan(values[~expected]).all()
    # clouds hide S2 at some positions that S1 still covers: those keep a vector
    s1_only = s1 & ~s2
    assert s1_only.sum() > 0 and np.isfinite(values[s1_only]).all()


def test_embedding_reflects_the_pixels(scene_embedding):
    """Different places get different vectors; the same place on two dates stays related."""
    emb = scene_embedding
    v = emb.values
    valid = emb["valid"].values
    t = int(np.argmax(valid.reshape(valid.shape[0], -1).sum(1)))
    vectors = v[t][valid[t]]
    assert len(vectors) > 50
    assert np.std(vectors, axis=0).mean() > 1e-3
