"""Class 9 of issue 15: ``terrafm.prepare.composite`` of Datasets without ``mask_<key>``.

A composite must take the bands that exist, judge each pixel by the registry's validity rule
(nodata, finiteness, positivity, the quality layer when present) and match a numpy
``nanmedian`` recomputed here by hand; a Dataset it cannot composite raises an error that names
the problem and the fix instead of returning an empty Dataset.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from terrafm import prepare, sensors

TIMES = pd.to_datetime(["2021-01-03", "2021-01-13", "2021-01-23", "2021-02-02", "2021-02-12", "2021-03-04"])
SHAPE = (len(TIMES), 6, 7)
S2_FEW = ("B02", "B03", "B04")
SCL_CLOUD, SCL_VEGETATION = 8, 4


def _coords() -> dict:
    return {"time": TIMES, "y": 5_000_000.0 - 10.0 * np.arange(SHAPE[1]), "x": 400_000.0 + 10.0 * np.arange(SHAPE[2])}


def _s2(key: str, bands, seed: int) -> dict:
    """uint16 DN with about 15 % nodata (0) per band."""
    rng = np.random.default_rng(seed)
    out = {}
    for band in bands:
        dn = rng.integers(1, 6000, SHAPE).astype("uint16")
        dn[rng.random(SHAPE) < 0.15] = 0
        out[f"{key}_{band}"] = (("time", "y", "x"), dn)
    return out


def _s1(seed: int) -> dict:
    """float32 linear power with NaN, zero and negative values (all invalid by the registry)."""
    rng = np.random.default_rng(seed)
    out = {}
    for band in ("vv", "vh"):
        power = rng.gamma(2.0, 0.03, SHAPE).astype("float32")
        flat = power.reshape(-1)
        pick = rng.permutation(flat.size)[:30]
        flat[pick[:10]], flat[pick[10:20]], flat[pick[20:]] = np.nan, 0.0, -0.01
        out[f"s1_{band}"] = (("time", "y", "x"), power)
    return out


def _random_mask(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE) > 0.3


def _scl(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(SHAPE) < 0.25, SCL_CLOUD, SCL_VEGETATION).astype("uint8")


def s2_full_no_mask():
    return xr.Dataset(_s2("s2_l2a", sensors.S2_BANDS, 1), coords=_coords())


def s2_few_bands_no_mask():
    return xr.Dataset(_s2("s2_l2a", S2_FEW, 2), coords=_coords())


def s1_no_mask():
    return xr.Dataset(_s1(3), coords=_coords())


def s1_and_s2_no_masks():
    return xr.Dataset({**_s2("s2_l2a", sensors.S2_BANDS, 4), **_s1(5)}, coords=_coords())


def mask_for_one_modality_only():
    ds = xr.Dataset({**_s2("s2_l2a", S2_FEW, 6), **_s1(7)}, coords=_coords())
    return ds.assign(mask_s2_l2a=(("time", "y", "x"), _random_mask(8)))


def scl_without_mask():
    ds = xr.Dataset(_s2("s2_l2a", S2_FEW, 9), coords=_coords())
    return ds.assign(s2_l2a_SCL=(("time", "y", "x"), _scl(10)))


def dask_no_mask():
    return xr.Dataset({**_s2("s2_l2a", S2_FEW, 11), **_s1(12)}, coords=_coords()).chunk({"time": 2, "y": 3, "x": 4})


def l1c_no_mask():
    return xr.Dataset(_s2("s2_l1c", sensors.S2_BANDS, 13), coords=_coords())


def a_month_with_no_valid_observation():
    ds = xr.Dataset(_s2("s2_l2a", S2_FEW, 14), coords=_coords())
    february = ds.time.dt.month == 2
    return ds.map(lambda v: v.where(~february, 0).astype("uint16"))


def stale_modality_attrs_after_subsetting():
    """ds[s1 variables] keeps attrs that still list s2_l2a; only s1 has bands."""
    ds = xr.Dataset({**_s2("s2_l2a", S2_FEW, 15), **_s1(16)}, coords=_coords(),
                    attrs={"terrafm_modalities": ["s2_l2a", "s1"]})
    return ds[["s1_vv", "s1_vh"]]


def _reference(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Monthly composites by hand: per modality, a pixel is valid where every present band is
    not the registry's nodata, finite, > 0 for power, mask_<key> and the SCL class allow it."""
    months = pd.DatetimeIndex(ds.time.values).to_period("M")
    out: dict[str, np.ndarray] = {}
    for m in sensors.MODALITIES.values():
        names = [v for v in m.variables if v in ds.data_vars]
        if not names:
            continue
        values = {v: np.asarray(ds[v].values, dtype="float64") for v in names}
        valid = np.ones(SHAPE, dtype=bool)
        for v in values.values():
            valid &= (v != m.nodata) & np.isfinite(v)
            if m.positive:
                valid &= v > 0
        if m.mask_variable in ds:
            valid &= np.asarray(ds[m.mask_variable].values, dtype=bool)
        if m.quality is not None and m.quality_variable in ds:
            valid &= ~np.isin(ds[m.quality_variable].values, m.quality.invalid_classes)
        medians = {v: [] for v in names}
        counts = []
        for month in sorted(set(months)):
            rows = np.flatnonzero(months == month)
            ok = valid[rows]
            counts.append(ok.sum(0))
            for v in names:
                with warnings.catch_warnings():  # all-NaN slices: the median is NaN, as wanted
                    warnings.simplefilter("ignore", RuntimeWarning)
                    medians[v].append(np.nanmedian(np.where(ok, values[v][rows], np.nan), axis=0))
        for v in names:
            out[v] = np.stack(medians[v])
        out[f"count_{m.key}"] = np.stack(counts)
    return out


RESULT_CASES = [
    pytest.param(s2_full_no_mask, ["s2_l2a"], id="c9-s2-all-bands-no-mask"),
    pytest.param(s2_few_bands_no_mask, ["s2_l2a"], id="c9-s2-three-bands-no-mask"),
    pytest.param(s1_no_mask, ["s1"], id="c9-s1-nan-zero-negative-no-mask"),
    pytest.param(s1_and_s2_no_masks, ["s2_l2a", "s1"], id="c9-s1-and-s2-no-masks"),
    pytest.param(mask_for_one_modality_only, ["s2_l2a", "s1"], id="c9-mask-for-one-modality-only"),
    pytest.param(scl_without_mask, ["s2_l2a"], id="c9-scl-quality-layer-no-mask"),
    pytest.param(dask_no_mask, ["s2_l2a", "s1"], id="c9-dask-no-mask"),
    pytest.param(l1c_no_mask, ["s2_l1c"], id="c9-l1c-no-mask"),
    pytest.param(a_month_with_no_valid_observation, ["s2_l2a"], id="c9-month-without-valid-observation"),
    pytest.param(stale_modality_attrs_after_subsetting, ["s1"], id="c9-stale-attrs-after-subsetting"),
]


@pytest.mark.parametrize("make, keys", RESULT_CASES)
def test_composite_without_masks_matches_nanmedian(make, keys):
    ds = make()
    expected = _reference(ds.compute())
    out = prepare.composite(ds, "month").compute()
    assert out.sizes["time"] == 3
    np.testing.assert_array_equal(out.time.values, pd.to_datetime(["2021-01-01", "2021-02-01", "2021-03-01"]).values)
    for key in keys:
        m = sensors.MODALITIES[key]
        np.testing.assert_array_equal(out[f"count_{key}"].values, expected[f"count_{key}"])
        np.testing.assert_array_equal(out[m.mask_variable].values, expected[f"count_{key}"] > 0)
        assert out[f"count_{key}"].values.sum() > 0
    band_vars = [v for v in expected if not v.startswith("count_")]
    assert sorted(v for v in out.data_vars if not v.startswith(("count_", "mask_"))) == sorted(band_vars)
    for name in band_vars:
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name].values, expected[name], rtol=1e-6, equal_nan=True)
    assert list(out.attrs.get("terrafm_modalities", keys)) == keys


def test_month_without_valid_observation_is_nan_and_uncounted():
    out = prepare.composite(a_month_with_no_valid_observation(), "month")
    february = out.sel(time="2021-02-01")
    assert np.isnan(february.s2_l2a_B04.values).all()
    assert (february.count_s2_l2a.values == 0).all() and not february.mask_s2_l2a.values.any()


def nothing_but_other_variables():
    return xr.Dataset({"ndvi": (("time", "y", "x"), np.zeros(SHAPE, "float32"))}, coords=_coords())


def a_mask_without_bands():
    return xr.Dataset({"mask_s2_l2a": (("time", "y", "x"), np.ones(SHAPE, bool))}, coords=_coords())


def no_time_dimension():
    return s1_no_mask().isel(time=0, drop=True)


def old_bare_band_names():
    ds = s2_few_bands_no_mask()
    return ds.rename({f"s2_l2a_{b}": b for b in S2_FEW})


def empty_dataset():
    return xr.Dataset(coords=_coords())


ERROR_CASES = [
    pytest.param(nothing_but_other_variables, ValueError,
                 r"no modality found in the Dataset.*<modality>_<band>.*Load it with terrafm\.stac\.load or rename",
                 id="c9-no-modality-only-other-variables"),
    pytest.param(a_mask_without_bands, ValueError,
                 r"no modality found in the Dataset.*has \['mask_s2_l2a'\].*rename", id="c9-mask-without-bands"),
    pytest.param(empty_dataset, ValueError, r"no modality found in the Dataset.*has \[\]", id="c9-empty-dataset"),
    pytest.param(no_time_dimension, ValueError,
                 r"composite needs a 'time' dimension.*dims \(y, x\).*expand_dims", id="c9-no-time-dimension"),
    pytest.param(old_bare_band_names, ValueError, r"old bare names.*ds\.rename\(", id="c9-old-bare-band-names"),
]


@pytest.mark.parametrize("make, error, message", ERROR_CASES)
def test_composite_refuses_what_it_cannot_composite(make, error, message):
    with pytest.raises(error, match=message):
        prepare.composite(make(), "month")
