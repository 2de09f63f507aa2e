"""Class 3 of issue 15: values in the wrong unit, dtype or range, checked before any model work.

Each modality's registry entry (``terrafm.sensors.Modality.plausible``) declares its accepted
dtypes, plausible and typical ranges and the unit mistakes it recognises; ``terrafm.embed`` checks
a deterministic sample of the (lazy) Dataset against them before the model runs
(``terrafm.validate``). Every error case asserts that the model never ran and that the message
names the problem and the fix; where the fix is a one-liner, applying it must give the embedding
of the correct input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embed"))

from embed_helpers import make_dataset  # noqa: E402

from terrafm import sensors  # noqa: E402
from terrafm.validate import InputWarning, check_values, sample_windows  # noqa: E402
from bad_input_helpers import SEE, run  # noqa: E402

S2 = list(sensors.MODALITIES["s2_l2a"].variables)
S1 = list(sensors.MODALITIES["s1"].variables)


def base(s1=True, s2=True, times=1):
    return make_dataset(64, 64, times=times, s1=s1, s2=s2)


@pytest.fixture(scope="module")
def base_embedding(model):
    """``run(base(), model)``: the reference of the dtype and fix tests, computed once (read only)."""
    return run(base(), model)


def with_vars(ds, names, fn):
    ds = ds.copy()
    for v in names:
        ds[v] = fn(ds[v])
    return ds


def s2_normalized_as_dn(ds):
    stack = xr.concat([ds[v] for v in S2], dim="band_s2_l2a").astype("float32")
    return xr.Dataset({"s2_l2a": stack}, coords=ds.coords)


def s1_normalized_as_db(ds):
    stack = xr.concat([10 * np.log10(ds[v]) for v in S1], dim="band_s1").astype("float32")
    return xr.Dataset({"s1": stack}, coords=ds.coords)


def s1_partly_zero(ds):
    ds = ds.copy()
    for v in S1:
        ds[v] = ds[v].where(ds.x > ds.x[6], 0.0)         # 10 of 64 columns: 16% zero power
    return ds


def scl_codes_as_mask(ds):
    ds = ds.copy()
    scl = np.full((1, 64, 64), 4, "uint8")
    scl[:, :20] = 8                                       # cloud (medium probability)
    ds["mask_s2_l2a"] = (("time", "y", "x"), scl)
    return ds


def float_mask_with_nan(ds):
    ds = ds.copy()
    mask = np.ones((1, 64, 64), "float32")
    mask[:, :10] = np.nan
    ds["mask_s2_l2a"] = (("time", "y", "x"), mask)
    return ds


def l1c_reflectance(ds):
    ds = ds.rename({v: v.replace("s2_l2a", "s2_l1c") for v in S2})
    return with_vars(ds, [v.replace("s2_l2a", "s2_l1c") for v in S2], lambda x: (x / 10000).astype("float32"))


def only_last_date_in_db(ds):
    ds = ds.copy()
    for v in S1:
        ds[v] = xr.concat([ds[v].isel(time=slice(0, 2)), 10 * np.log10(ds[v].isel(time=slice(2, 3)))], "time")
    return ds


ERRORS = [
    pytest.param(lambda: with_vars(base(s2=False), S1, lambda x: 10 * np.log10(x)),
                 r"s1 looks like dB .*pass linear power \(10 \*\* \(dB / 10\)\)", id="s1-in-db"),
    pytest.param(lambda: with_vars(base(), S1, lambda x: 10 * np.log10(x)),
                 r"s1 looks like dB .*10 \*\* \(ds\[v\] / 10\)", id="s1-in-db-beside-s2"),
    pytest.param(lambda: with_vars(base(s2=False), ["s1_vh"], lambda x: 10 * np.log10(x)),
                 r"s1 looks like dB", id="s1-vh-alone-in-db"),
    pytest.param(lambda: only_last_date_in_db(base(s2=False, times=3)),
                 r"s1 looks like dB", id="s1-last-date-in-db"),
    pytest.param(lambda: with_vars(base(s2=False), S1, lambda x: (x * 1e4).astype("float32")),
                 r"s1 looks like scaled digital numbers.*pass calibrated backscatter .*linear power",
                 id="s1-scaled-dn"),
    pytest.param(lambda: with_vars(base(s2=False), S1, lambda x: (x * 1e4).astype("uint16")),
                 r"s1 bands have dtype uint16.*linear power.*astype\('float32'\)", id="s1-uint16"),
    pytest.param(lambda: with_vars(base(s2=False), S1, lambda x: np.sqrt(x).astype("complex64")),
                 r"s1 bands have dtype complex64.*abs\(z\) \*\* 2", id="s1-complex-slc"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: (x / 10000).astype("float32")),
                 r"s2_l2a looks like reflectance \(0-1\), not DN.*\(ds\[v\] \* 10000\)\.round\(\)", id="s2-reflectance"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: (x / 10000 - 0.1).astype("float32")),
                 r"s2_l2a looks like reflectance.*Earth Search L2A: DN = \(reflectance \+ 0\.1\) x 10000",
                 id="s2-reflectance-earth-search-offset"),
    pytest.param(lambda: l1c_reflectance(base(s1=False)),
                 r"s2_l1c looks like reflectance", id="s2-l1c-reflectance"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: (x // 20).astype("int8")),
                 r"s2_l2a bands have dtype int8; s2_l2a stores DN as one of .*astype\('uint16'\)", id="s2-int8"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: (x // 20).astype("uint8")),
                 r"s2_l2a bands have dtype uint8.*8-bit", id="s2-uint8-visual"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: x > 1500),
                 r"s2_l2a bands have dtype bool", id="s2-bool"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: x.astype("complex64")),
                 r"s2_l2a bands have dtype complex64.*complex arrays are not Sentinel-2 DN", id="s2-complex"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: x.astype("int16").where(x.x > x.x[10], -9999)),
                 r"s2_l2a: .* outside the plausible range \[0, 65535\] of DN \(most common: -9999, a nodata marker\?\)"
                 r".*ds\[v\]\.where\(ds\[v\] != -9999, 0\)", id="s2-nodata-minus-9999-int16"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: x.astype("float32").where(x.y > x.y[20], -9999.0)),
                 r"most common: -9999, a nodata marker\?", id="s2-nodata-minus-9999-float"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: x.astype("float64") * 1e36),
                 r"outside the plausible range \[0, 65535\].*beyond float32", id="s2-overflows-float32"),
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: x.astype("float32") * 100),
                 r"outside the plausible range \[0, 65535\] of DN", id="s2-dn-times-100"),
    pytest.param(lambda: with_vars(base(s2=False), S1, lambda x: x.astype("float64") * 1e40),
                 r"s1 looks like scaled digital numbers", id="s1-overflows-float32"),
    pytest.param(lambda: scl_codes_as_mask(base(s1=False)),
                 r"mask_s2_l2a holds values \[4, 8\], not True/False.*SCL classes.*"
                 r"~ds\['mask_s2_l2a'\]\.isin\(\[0, 1, 3, 8, 9, 10\]\)", id="mask-is-scl-codes"),
    pytest.param(lambda: float_mask_with_nan(base(s1=False)),
                 r"mask_s2_l2a holds NaN, which would count as valid.*fillna\(0\)\.astype\(bool\)", id="mask-float-nan"),
    pytest.param(lambda: s2_normalized_as_dn(base(s1=False)),
                 r"s2_l2a: 100% of the sampled values are outside .* look like stored values.*terrafm\.prepare\.normalize",
                 id="normalized-input-holds-dn"),
    pytest.param(lambda: s1_normalized_as_db(base(s2=False)),
                 r"s1: 100% of the sampled values are outside .*normalized linear power", id="normalized-input-holds-db"),
]


@pytest.mark.parametrize("make, message", ERRORS)
def test_wrong_units_are_refused_before_the_model_runs(make, message, counted):
    model, calls = counted
    with pytest.raises(ValueError, match=message) as info:
        run(make(), model)
    assert SEE in str(info.value)
    assert calls == [], "the model ran before the input was refused"


WARNINGS = [
    pytest.param(lambda: with_vars(base(s1=False), S2, lambda x: (x / 100).astype("float32")),
                 r"s2_l2a: the median of the sampled valid values is 1[0-9]\.\d+, outside the typical \[100, 15000\] DN",
                 id="s2-reflectance-in-percent"),
    pytest.param(lambda: s1_partly_zero(base(s2=False)),
                 r"s1: \d+% of sampled values are <= 0 and count as invalid", id="s1-many-zero-power"),
]


@pytest.mark.parametrize("make, message", WARNINGS)
def test_borderline_values_warn_and_embed(make, message, model):
    with pytest.warns(InputWarning, match=message):
        emb = run(make(), model)
    assert np.isfinite(emb.values[emb.valid.values]).all()


def _equal(a, b, atol=0.0):
    np.testing.assert_array_equal(a.valid.values, b.valid.values)
    np.testing.assert_allclose(a.values, b.values, atol=atol, rtol=0, equal_nan=True)


@pytest.mark.parametrize("convert", [
    pytest.param(lambda x: x.astype("float32"), id="s2-float32-dn"),
    pytest.param(lambda x: x.astype("int16"), id="s2-int16-dn"),
    pytest.param(lambda x: x.astype("float64"), id="s2-float64-dn"),
])
def test_other_dn_dtypes_embed_like_uint16(convert, model, base_embedding, recwarn):
    ds = base()
    _equal(run(with_vars(ds, S2, convert), model), base_embedding)
    assert not [w for w in recwarn if issubclass(w.category, InputWarning)]


def test_a_0_1_mask_of_integers_equals_the_boolean_mask(model):
    ds = base()
    clear = np.ones((1, 64, 64), bool)
    clear[:, :, :24] = False
    as_bool = ds.assign(mask_s2_l2a=(("time", "y", "x"), clear))
    as_int = ds.assign(mask_s2_l2a=(("time", "y", "x"), clear.astype("uint8")))
    _equal(run(as_int, model), run(as_bool, model))


def test_registered_s1_nodata_and_nan_are_not_range_errors(model, recwarn):
    ds = base(s2=False)
    ds["s1_vv"] = ds["s1_vv"].where(ds.x > ds.x[3], -32768.0)
    ds["s1_vh"] = ds["s1_vh"].where(ds.y < ds.y[3], np.nan)
    emb = run(ds, model)
    assert emb.valid.values.any() and not [w for w in recwarn if issubclass(w.category, InputWarning)]


# ------------------------------------------------------------------ the fixes in the messages work
def test_fix_for_s1_in_db_gives_the_linear_embedding(model, base_embedding):
    ds = base()
    db = with_vars(ds, S1, lambda x: 10 * np.log10(x))
    with pytest.raises(ValueError, match="looks like dB"):
        run(db, model)
    fixed = with_vars(db, S1, lambda x: 10 ** (x / 10))                   # the fix named in the message
    _equal(run(fixed, model), base_embedding, atol=1e-4)


def test_fix_for_reflectance_gives_the_dn_embedding(model, base_embedding):
    ds = base()
    reflectance = with_vars(ds, S2, lambda x: (x / 10000).astype("float32"))
    fixed = with_vars(reflectance, S2, lambda x: (x * 10000).round().clip(1, 65535).astype("uint16"))
    _equal(run(fixed, model), base_embedding)


def test_fix_for_minus_9999_gives_the_nodata_embedding(model):
    ds = base(s1=False)
    hole = ds.x <= ds.x[40]
    marked = with_vars(ds, S2, lambda x: x.astype("int16").where(~hole, -9999))
    fixed = with_vars(marked, S2, lambda x: x.where(x != -9999, 0))
    reference = with_vars(ds, S2, lambda x: x.where(~hole, 0))            # nodata in the registered value
    result, expected = run(fixed, model), run(reference, model)
    _equal(result, expected)
    assert not expected.valid.values[:, :, :2].any() and expected.valid.values[:, :, 3:].all()


def test_fix_for_scl_codes_gives_the_boolean_mask_embedding(model):
    ds = scl_codes_as_mask(base(s1=False))
    scl = ds["mask_s2_l2a"]
    fixed = ds.assign(mask_s2_l2a=~scl.isin([0, 1, 3, 8, 9, 10]))
    reference = ds.assign(mask_s2_l2a=scl == 4)                          # vegetation only: valid
    emb = run(fixed, model)
    _equal(emb, run(reference, model))
    assert not emb.valid.values[:, :1].any() and emb.valid.values[:, 2:].all()   # rows 0-19 are cloud


# ------------------------------------------------------------------ bounded sampling of lazy data
def test_the_check_reads_a_few_windows_not_the_area():
    import dask.array as da

    n, chunk, dates = 4096, 256, 6
    read = []

    def block(x, band, block_info=None):
        read.append((band, *block_info[None]["chunk-location"]))
        return np.full(x.shape, 1500, "uint16")

    ds = base(s1=False)
    coords = {"time": np.arange(dates).astype("datetime64[D]").astype("datetime64[ns]"),
              "y": 4100000 - 10 * (np.arange(n) + 0.5), "x": 500000 + 10 * (np.arange(n) + 0.5)}
    bands = {v: (("time", "y", "x"), da.zeros((dates, n, n), "uint16", chunks=(1, chunk, chunk))
                 .map_blocks(block, v, dtype="uint16", name=f"read-{v}")) for v in S2}
    big = xr.Dataset(bands, coords=coords).rio.write_crs("EPSG:32618")
    check_values(big)
    windows = sample_windows(n, n)
    assert len(windows) == 5 and len(read) == len(set(read))
    assert len(read) == len(windows) * 3 * len(S2)       # one chunk per window, 3 of the 6 dates, each band once
    assert {t for _, t, _, _ in read} == {0, 2, 5}


def test_sample_is_deterministic():
    assert sample_windows(640, 480) == sample_windows(640, 480)
    assert sample_windows(640, 480) == [(slice(320, 352), slice(240, 272)), (slice(0, 32), slice(0, 32)),
                                        (slice(0, 32), slice(448, 480)), (slice(608, 640), slice(0, 32)),
                                        (slice(608, 640), slice(448, 480))]
