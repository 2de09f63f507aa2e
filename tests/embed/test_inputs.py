"""From stored bands to model input: one normalization path for prepare.normalize and embed()."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from embed_helpers import make_dataset
from terrafm import prepare, sensors
from terrafm.embed import embed


def _reference(raw: np.ndarray, modality: str, mask: np.ndarray, offset: float = 0.0):
    """Float64 re-computation from the reference's formula, pixel by pixel semantics."""
    spec = sensors.MODALITIES[modality]
    raw64 = raw.astype("float64")
    valid = mask & np.all(raw64 != spec.nodata, axis=0) & np.all(np.isfinite(raw64), axis=0)
    if modality == "s1":     # linear power: positive, in dB
        valid &= np.all(raw64 > 0, axis=0)
        values = 10 * np.log10(np.maximum(raw64, 1e-10))
    else:                    # the reference's offset rule: valid DN -> max(DN - offset, 1)
        values = np.maximum(raw64 - offset, 1)
    mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
    out = (values - (mean - 2 * std)) / (4 * std)
    return np.where(valid[None], out, prepare.FILL_VALUE), valid


def test_normalize_block_against_float64_s2_with_offset_nodata_and_mask():
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 6000, size=(12, 9, 7)).astype("uint16")
    raw[3, 2, 2] = 0                    # one band at nodata: the pixel is invalid
    raw[:, 4, 4] = 0                    # all bands at nodata
    raw[5, 6, 1] = 700                  # below the 1000 offset: DN 1 after harmonizing, still valid
    mask = np.ones((9, 7), bool)
    mask[0, :] = False                  # e.g. cloud from SCL
    x, valid = prepare.normalize_block(raw, "s2_l2a", mask, offset=1000.0)
    ref, ref_valid = _reference(raw, "s2_l2a", mask, offset=1000.0)
    np.testing.assert_array_equal(valid, ref_valid)
    assert not valid[2, 2] and not valid[4, 4] and valid[6, 1] and not valid[0].any()
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    assert np.all(x[:, ~valid] == prepare.FILL_VALUE)


def test_normalize_block_s1_in_db_and_its_nodata():
    raw = np.full((2, 3, 4), 0.05, "float32")
    raw[1, 0, 0] = np.nan
    raw[0, 1, 1] = 0.0                  # zero power: masked, not -inf
    raw[0, 2, 2] = sensors.MODALITIES["s1"].nodata
    raw[1, 2, 3] = -0.01
    x, valid = prepare.normalize_block(raw, "s1", np.ones((3, 4), bool))
    ref, ref_valid = _reference(raw, "s1", np.ones((3, 4), bool))
    np.testing.assert_array_equal(valid, ref_valid)
    assert valid.sum() == 12 - 4 and np.isfinite(x).all()
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    # hand-worked: 0.05 W -> -13.0103 dB -> (-13.0103 - (-12.7572 - 2 * 5.8491)) / (4 * 5.8491)
    assert x[0, 0, 1] == pytest.approx((-13.0103 + 12.7572 + 2 * 5.8491) / (4 * 5.8491), abs=1e-4)


def test_prepare_normalize_stays_lazy_and_equals_the_block_core():
    ds = make_dataset(height=64, width=80, times=2).chunk({"y": 32, "x": 40})
    ds["s2_l2a_B03"] = ds["s2_l2a_B03"].where(ds["s2_l2a_B03"] > 1000, 0).astype("uint16")   # some nodata pixels
    ds["mask_s2_l2a"] = (("time", "y", "x"), da.from_array(np.arange(64 * 80 * 2).reshape(2, 64, 80) % 7 > 0,
                                                           chunks=(1, 32, 40)))
    computed = []
    with dask.config.set(scheduler=lambda dsk, keys, **kw: computed.append(keys) or dask.get(dsk, keys)):
        x = prepare.normalize(ds)
    assert computed == [], "normalize() must build a lazy graph, not read the data"
    assert x.s2_l2a.chunks is not None and x.s2_l2a.dims == ("time", "band_s2_l2a", "y", "x")
    raw = np.stack([ds[v].values for v in sensors.MODALITIES["s2_l2a"].variables], axis=1)
    for t in range(2):
        ref, ref_valid = _reference(raw[t], "s2_l2a", ds["mask_s2_l2a"].values[t])
        np.testing.assert_array_equal(x.mask_s2_l2a.values[t], ref_valid)
        np.testing.assert_allclose(x.s2_l2a.values[t], ref, rtol=1e-6, atol=1e-6)
    assert (~x.mask_s2_l2a.values).sum() > (~ds["mask_s2_l2a"].values).sum()   # nodata added


def test_embed_of_stored_bands_equals_embed_of_prepare_normalize(tiny_model):
    ds = make_dataset(height=96, width=112)
    ds["s1_vv"][:, :20] = np.nan
    kw = dict(model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    from_raw = embed(ds, **kw)
    from_normalized = embed(prepare.normalize(ds), **kw)
    np.testing.assert_array_equal(from_raw.values, from_normalized.values)
    for name in ("valid", "valid_s1", "valid_s2_l2a"):
        np.testing.assert_array_equal(from_raw[name].values, from_normalized[name].values)
    assert not from_raw["valid_s1"].values[0, :1].any()


def test_wrong_band_names_and_missing_bands_name_the_fix():
    ds = make_dataset(height=32, width=32, s1=False)
    renamed = ds.rename(s2_l2a_B8A="s2_l2a_B8X")
    with pytest.raises(ValueError, match=r"lacks \['s2_l2a_B8A'\].*fill_missing_bands"):
        prepare.normalize(renamed)
    with pytest.raises(ValueError, match="no modality found.*rename the variables"):
        prepare.normalize(xr.Dataset({"red": ds["s2_l2a_B04"].drop_attrs()}))
