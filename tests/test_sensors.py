"""terrafm.sensors against the reference text and float64 hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrafm import sensors

# Values copied from the reference table (TerraTorch PR #947), independently of sensors.py.
L2A_B04 = (1526.9789, 1221.4198)
L1C_B09 = (1389.849, 608.362)
S1_VH = (-19.6423, 5.8516)


def test_band_order_and_counts():
    assert sensors.S2_BANDS == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                                "B09", "B11", "B12")
    assert "B10" not in sensors.S2_BANDS
    for key, n in (("s2_l2a", 12), ("s2_l1c", 12), ("s1", 2)):
        spec = sensors.MODALITIES[key]
        assert spec.n_bands == n == len(spec.mean) == len(spec.std)


def test_hand_worked_normalization_values():
    # B04 L2A, DN 2000: (2000 - (1526.9789 - 2*1221.4198)) / (4*1221.4198)
    mu, sd = L2A_B04
    expected = (2000 - (mu - 2 * sd)) / (4 * sd)
    x = np.zeros((12, 1, 1), dtype=np.float64)
    x[3] = 2000
    assert sensors.normalize(x, "s2_l2a")[3, 0, 0] == pytest.approx(expected, abs=1e-12)
    # B09 L1C, DN 500
    mu, sd = L1C_B09
    x[9] = 500
    assert sensors.normalize(x, "s2_l1c")[9, 0, 0] == pytest.approx((500 - mu + 2 * sd) / (4 * sd), abs=1e-12)


def test_s1_goes_through_decibels():
    linear = np.array([0.05, 0.004], dtype=np.float64).reshape(2, 1, 1)
    out = sensors.normalize(linear, "s1")
    vh_db = 10 * np.log10(0.004)
    mu, sd = S1_VH
    assert out[1, 0, 0] == pytest.approx((vh_db - (mu - 2 * sd)) / (4 * sd), abs=1e-12)


def test_mean_maps_to_half_and_roundtrip_numpy_and_torch():
    rng = np.random.default_rng(0)
    for key in ("s2_l2a", "s2_l1c"):
        spec = sensors.MODALITIES[key]
        mean = np.asarray(spec.mean).reshape(1, -1, 1, 1)
        assert np.allclose(sensors.normalize(np.broadcast_to(mean, (2, 12, 3, 3)), key), 0.5)
        x = rng.integers(1, 10000, size=(2, 12, 8, 8)).astype(np.uint16)
        n_np = sensors.normalize(x, key)
        n_t = sensors.normalize(torch.from_numpy(x.astype(np.int32)), key)
        assert n_np.dtype == np.float32 and n_t.dtype == torch.float32
        np.testing.assert_allclose(n_t.numpy(), n_np, rtol=1e-6)
        np.testing.assert_allclose(sensors.denormalize(n_np, key), x, rtol=1e-5)


def test_channel_axis_last():
    x = np.full((4, 4, 2), 0.1)
    a = sensors.normalize(x, "s1", channel_axis=-1)
    b = sensors.normalize(np.moveaxis(x, -1, 0), "s1")
    np.testing.assert_allclose(np.moveaxis(a, -1, 0), b)


def test_wrong_channel_count_names_the_fix():
    with pytest.raises(ValueError, match=r"expected 12 channels .*B01.*got 13"):
        sensors.normalize(np.zeros((13, 4, 4)), "s2_l1c")


def test_unknown_modality_lists_known_ones():
    with pytest.raises(KeyError, match="s2_l2a"):
        sensors.normalize(np.zeros((3, 4, 4)), "landsat")
    assert sensors.get_modality("sentinel-1-rtc").key == "s1"


def test_validate_bands_order_missing_and_extra():
    assert sensors.validate_bands(list(sensors.S2_BANDS), "s2_l2a") == list(sensors.S2_BANDS)
    swapped = list(sensors.S2_BANDS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(ValueError, match="wrong order"):
        sensors.validate_bands(swapped, "s2_l2a")
    with pytest.raises(ValueError, match=r"missing \['B09'\].*unexpected \['B10'\]"):
        sensors.validate_bands([b if b != "B09" else "B10" for b in sensors.S2_BANDS], "s2_l2a")


def test_fill_missing_bands_uses_the_mean_and_reorders():
    present = ["B04", "B03", "B02", "B08"]
    x = np.stack([np.full((2, 2), v, dtype=np.uint16) for v in (4, 3, 2, 8)])
    full, filled = sensors.fill_missing_bands(x, present, "s2_l2a")
    assert filled == [b for b in sensors.S2_BANDS if b not in present]
    assert full[sensors.S2_BANDS.index("B08"), 0, 0] == 8
    assert full[sensors.S2_BANDS.index("B02"), 0, 0] == 2
    normalized = sensors.normalize(full, "s2_l2a")
    for band in filled:
        assert np.allclose(normalized[sensors.S2_BANDS.index(band)], 0.5)


def test_fill_missing_s1_band_normalizes_to_half():
    full, filled = sensors.fill_missing_bands(np.full((1, 2, 2), 0.02), ["vv"], "s1")
    assert filled == ["vh"]
    assert np.allclose(sensors.normalize(full, "s1")[1], 0.5, atol=1e-6)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(sensors, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


# ---------------------------------------------------------------------------- the registry's rules
def test_pixel_valid_is_one_rule_for_every_modality_numpy_and_dask():
    import dask.array as da

    l2a, s1 = sensors.MODALITIES["s2_l2a"], sensors.MODALITIES["s1"]
    dn = np.array([[[0, 5, 7]], [[3, 0, 9]]], "uint16")              # two of the 12 bands; the others fine
    bands = [dn[0], dn[1]] + [np.full((1, 3), 100, "uint16")] * 10
    np.testing.assert_array_equal(l2a.pixel_valid(bands), [[False, False, True]])
    scl = np.array([[4, 4, 9]], "uint8")                               # vegetation, vegetation, cloud high
    np.testing.assert_array_equal(l2a.pixel_valid(bands, quality=scl), [[False, False, False]])
    power = np.array([0.1, 0.0, -0.01, np.nan, -32768.0, np.inf], "float32")
    vh = np.full(6, 0.02, "float32")
    np.testing.assert_array_equal(s1.pixel_valid([power, vh]), [True, False, False, False, False, False])
    lazy = s1.pixel_valid([da.from_array(power, chunks=3), da.from_array(vh, chunks=3)])
    np.testing.assert_array_equal(lazy.compute(), s1.pixel_valid([power, vh]))
    codes = da.from_array(np.array([0, 1, 3, 4, 8, 9, 10, 11], "uint8"), chunks=4)
    assert sensors.MODALITIES["s2_l2a"].quality.decode(codes).compute().tolist() == [
        False, False, False, True, False, False, False, True]


def test_harmonize_rule_by_hand_for_every_dtype():
    l1c = sensors.MODALITIES["s2_l1c"]
    dn = np.array([0, 1, 999, 1000, 1001, 65535], "uint16")
    np.testing.assert_array_equal(l1c.harmonize(dn, 1000), [0, 1, 1, 1, 1, 64535])
    np.testing.assert_array_equal(l1c.harmonize(dn, 0), dn)             # no offset: unchanged
    per_step = np.array([[1500, 0], [1500, 0]], "uint16")              # (time, x), offsets per step
    np.testing.assert_array_equal(l1c.harmonize(per_step, np.array([[1000], [0]])), [[500, 0], [1500, 0]])
    assert sensors.MODALITIES["s1"].harmonize(np.array([0.5], "float32"), 1000)[0] == np.float32(0.5)  # no rule
    rule = l1c.offset
    assert l1c.stored_offset("04.00") == 1000 and l1c.stored_offset("02.14") == 0
    assert l1c.stored_offset(None, np.datetime64("2022-01-25").astype(object)) == 1000
    assert l1c.stored_offset(None, np.datetime64("2022-01-24").astype(object)) == 0 and rule.start.isoformat() == "2022-01-25"


def test_patch_valid_numpy_and_torch_agree_with_the_half_rule():
    rng = np.random.default_rng(3)
    mask = rng.random((2, 32, 48)) < 0.5
    fraction = mask.reshape(2, 2, 16, 3, 16).mean(axis=(2, 4))
    expected = fraction >= 0.5
    np.testing.assert_array_equal(sensors.patch_valid(mask), expected)
    np.testing.assert_array_equal(sensors.patch_valid(torch.from_numpy(mask)).numpy(), expected)
    exactly_half = np.zeros((16, 16), bool)
    exactly_half[:8] = True
    assert sensors.patch_valid(exactly_half).item() is True


def test_registry_names_and_a_registered_sensor():
    l2a = sensors.MODALITIES["s2_l2a"]
    assert l2a.variables[0] == "s2_l2a_B01" and l2a.mask_variable == "mask_s2_l2a"
    assert l2a.offset_coord == "s2_l2a_offset" and sensors.MODALITIES["s1"].gap_variable == "s1_time_gap"
    assert set(l2a.variables).isdisjoint(sensors.MODALITIES["s2_l1c"].variables)
    toy = sensors.Modality("toy4", ("a", "b", "c", "d"), (1.0,) * 4, (2.0,) * 4, "uint16", 0, "DN", "toy")
    sensors.register_modality(toy)
    try:
        assert list(sensors.MODALITIES)[-1] == "toy4"
        x = np.full((4, 2, 2), 1.0)
        np.testing.assert_allclose(sensors.normalize(x, "toy4"), 0.5)      # mu maps to 0.5
    finally:
        sensors.unregister_modality("toy4")
    assert "toy4" not in sensors.MODALITIES
    with pytest.raises(ValueError, match="1 bands need as many means"):
        sensors.Modality("bad", ("a",), (1.0, 2.0), (1.0,), "uint16", 0, "DN", "bad")
