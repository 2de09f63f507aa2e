"""to_rgb, similarity/top_k and change on dask-backed embeddings (terrafm.open_embedding).

Each function: the lazy path equals the in-memory path on a small store (uneven chunks, NaN and
valid=False cells, a time dim), and computes on the 403 MB ``large_store`` under a memory cap
that loading the store whole exceeds (the control, so the test can fail).
"""

import dask.array as dask_array
import geopandas as gpd
import numpy as np
import pytest
import xarray as xr
from pyproj import Transformer
from shapely.geometry import box

import terrafm
from analysis_helpers import (CRS, LARGE_CHANGED, LARGE_CLOUD_ROWS, LARGE_SHAPE, ORIGIN, RES, assert_georef,
                              large_class_map, make_embedding)
from bounded_memory import BUDGET_MB, run_bounded_steps
from terrafm.analysis import change, cosine_distance, fit_rgb, similarity, to_rgb, to_zarr, top_k

CHUNKS = {"time": 1, "y": 5, "x": 4}  # 13 x 11 cells -> uneven (5, 5, 3) x (4, 4, 3) blocks


def _lonlat(x: float, y: float) -> tuple[float, float]:
    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(in-memory, lazy from a zarr store) copies of a (3, 13, 11, 6) time series with gaps."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 13, 11, 6)).astype(np.float32) + np.linspace(0, 2, 6, dtype=np.float32)
    for date in (1, 2):  # later dates: the previous one plus a little noise ...
        values[date] = values[date - 1] + rng.normal(scale=0.05, size=values[1].shape).astype(np.float32)
    values[1:, 5:9, 2:6] *= -1  # ... and a patch that changes between dates 0 and 1 (crosses block edges)
    values[0, 0, :4] = np.nan  # cloud strip
    values[1, 12, 10] = np.nan  # last cell of the last (uneven) block
    emb = make_embedding(values)
    valid = emb["valid"].values.copy()
    valid[2, 6, 7] = False  # finite but flagged invalid
    emb = emb.assign_coords(valid=(("time", "y", "x"), valid))
    path = to_zarr(emb, tmp_path_factory.mktemp("small") / "small.zarr")
    lazy = terrafm.open_embedding(path).chunk(CHUNKS)
    assert isinstance(lazy.data, dask_array.Array) and lazy.chunks[1] == (5, 5, 3)
    return emb, lazy


def _assert_lazy_like(result, reference):
    assert isinstance(result.data, dask_array.Array), "the dask path must stay lazy"
    assert result.dims == reference.dims
    assert_georef(result, reference)


def test_to_rgb_lazy_equals_in_memory(small):
    emb, lazy = small
    rgb, reducer = to_rgb(emb, sample=200, seed=4, return_reducer=True)
    lazy_rgb, lazy_reducer = to_rgb(lazy.chunk({"embedding": 2}), sample=200, seed=4, return_reducer=True)
    # the same sample (sample_rows of the valid positions in C order) -> the same fit, bit for bit
    np.testing.assert_array_equal(lazy_reducer.model.components_, reducer.model.components_)
    np.testing.assert_array_equal(lazy_reducer.low, reducer.low)
    assert lazy_reducer.n_fit == reducer.n_fit == 200
    _assert_lazy_like(lazy_rgb, rgb)
    assert lazy_rgb.attrs == rgb.attrs and list(lazy_rgb.band.values) == ["r", "g", "b"]
    values = lazy_rgb.values
    np.testing.assert_allclose(values, rgb.values, atol=2 * np.finfo(np.float32).eps, rtol=0)
    invalid = ~emb["valid"].values
    assert invalid.sum() == 6 and (np.isnan(values).all(-1) == invalid).all()
    # independent reference on the valid cells: float64 PCA projection + the stretch
    vectors = emb.values[~invalid].astype(np.float64)
    projected = (vectors - reducer.model.mean_) @ reducer.model.components_.T
    expected = np.clip((projected - reducer.low) / (reducer.high - reducer.low), 0, 1)
    np.testing.assert_allclose(values[~invalid], expected, atol=1e-5)


def test_to_rgb_lazy_other_layout_and_reused_reducer(small):
    emb, lazy = small
    reducer = fit_rgb(emb.isel(time=0), sample=None)
    # (x, y) order and float64 values: result still (y, x, band), same colours as in memory
    other = lazy.isel(time=1).transpose("x", "y", "embedding").astype(np.float64)
    rgb = reducer.transform(other)
    assert isinstance(rgb.data, dask_array.Array) and rgb.dims == ("y", "x", "band")
    np.testing.assert_allclose(rgb.values, reducer.transform(emb.isel(time=1)).values, atol=1e-6)
    with pytest.raises(ValueError, match="fitted on 6-dim embeddings but emb has 4"):
        reducer.transform(lazy.isel(embedding=slice(0, 4)))


def test_similarity_and_top_k_lazy_equal_in_memory(small):
    emb, lazy = small
    emb1, lazy1 = emb.isel(time=1), lazy.isel(time=1)
    point = _lonlat(float(emb.x[3]), float(emb.y[6]))
    # a GeoDataFrame in the grid's CRS: edges 40 m around the centres of rows 4-9, cols 1-5
    polygon = gpd.GeoDataFrame(geometry=[box(float(emb.x[1]) - 40, float(emb.y[9]) - 40, float(emb.x[5]) + 40,
                                             float(emb.y[4]) + 40)], crs=CRS)
    queries = [(point, "cosine", "max"), (polygon, "cosine", "max"),
               (emb1.values[[2, 7], [3, 9]], "euclidean", "mean")]
    for query, metric, reduce in queries:
        sim = similarity(emb1, query, metric=metric, reduce=reduce)
        lazy_sim = similarity(lazy1, query, metric=metric, reduce=reduce)
        _assert_lazy_like(lazy_sim, sim)
        np.testing.assert_allclose(lazy_sim.values, sim.values, rtol=1e-6, atol=1e-6)
        for k in (1, 7, 500):  # 500 > the 142 finite cells: all of them, ranked
            expected, got = top_k(sim, k), top_k(lazy_sim, k)
            assert list(got.columns) == list(expected.columns)
            np.testing.assert_array_equal(got[["rank", "row", "col"]].values, expected[["rank", "row", "col"]].values)
            assert got.geometry.equals(expected.geometry) and got.crs == expected.crs
    # independent reference for the polygon: mean of the valid vectors whose cell centre is inside
    inside = np.zeros((13, 11), bool)
    inside[4:10, 1:6] = True
    inside &= emb1["valid"].values
    mean = emb1.values[inside].astype(np.float64).mean(0)
    data = emb1.values.astype(np.float64)
    expected = data @ mean / (np.linalg.norm(data, axis=-1) * np.linalg.norm(mean))
    np.testing.assert_allclose(similarity(lazy1, polygon).values, expected, atol=1e-6)


def test_top_k_ties_break_by_row_major_position():
    # three blocks of equal scores: ties must come out in (y, x) order, the same as in memory
    scores = np.tile(np.array([0.5, 0.9, 0.9, 0.2, 0.9, 0.5, 0.9], np.float32), (6, 1))
    scores[0, 1] = np.nan
    score = make_embedding(np.zeros((6, 7, 1))).isel(embedding=0, drop=True).copy(data=scores)
    score = score.drop_vars("valid").rename("similarity")
    lazy = score.chunk({"y": 4, "x": 3})
    expected = top_k(score, 10)
    got = top_k(lazy, 10)
    np.testing.assert_array_equal(got[["row", "col"]].values, expected[["row", "col"]].values)
    rows, cols = np.nonzero(np.where(np.isnan(scores), 0, scores) == np.float32(0.9))
    assert list(zip(got["row"], got["col"])) == list(zip(rows, cols))[:10]  # row-major among equals
    low = top_k(lazy, 3, largest=False)
    assert list(zip(low["row"], low["col"])) == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="no finite value"):
        top_k(lazy * np.nan, 3)


def test_change_lazy_equals_in_memory(small):
    emb, lazy = small
    series, lazy_series = change(emb), change(lazy)
    assert lazy_series.attrs["threshold"] == series.attrs["threshold"]  # streamed histogram: bit for bit
    for name in ("distance", "changed"):
        _assert_lazy_like(lazy_series[name], series[name])
        np.testing.assert_array_equal(lazy_series[name].values, series[name].values)
    # independent reference for the distance of dates 0 -> 1
    a, b = emb.values[0].astype(np.float64), emb.values[1].astype(np.float64)
    reference = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(lazy_series["distance"].values[0], reference, atol=1e-6)
    changed = np.zeros((2, 13, 11), bool)
    changed[0, 5:9, 2:6] = True
    finite = np.isfinite(series["distance"].values)
    assert (lazy_series["changed"].values[finite] == changed[finite]).all()  # the flipped patch, nothing else
    pair = change(lazy.isel(time=0), emb.isel(time=1), percentile=90)  # lazy and in-memory mixed
    reference_pair = change(emb.isel(time=0), emb.isel(time=1), percentile=90)
    assert pair.attrs["threshold"] == reference_pair.attrs["threshold"]
    np.testing.assert_array_equal(pair["changed"].values, reference_pair["changed"].values)
    fixed = change(lazy.isel(time=1), lazy.isel(time=2), threshold=0.5)
    assert isinstance(fixed["changed"].data, dask_array.Array) and fixed.attrs["threshold"] == 0.5
    np.testing.assert_array_equal(cosine_distance(lazy.isel(time=1), lazy.isel(time=2)).values,
                                  cosine_distance(emb.isel(time=1), emb.isel(time=2)).values)


def _unreadable(emb: xr.DataArray) -> xr.DataArray:
    """``emb`` whose every chunk fails to read: an error from it means the function computed."""
    def fail(block):
        raise RuntimeError("a chunk was read")

    return emb.copy(data=dask_array.map_blocks(fail, emb.chunk({"y": 5}).data, dtype=emb.dtype))


def _readable_only(emb: xr.DataArray, rows: slice, cols: slice) -> xr.DataArray:
    """``emb`` in (5, 4) blocks of which only those meeting ``rows`` x ``cols`` can be read."""
    values = emb.transpose("y", "x", "embedding").values

    def read(block_info=None):
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        if r1 <= rows.start or r0 >= rows.stop or c1 <= cols.start or c0 >= cols.stop:
            raise RuntimeError(f"block rows {r0}-{r1}, cols {c0}-{c1} was read")
        return values[r0:r1, c0:c1]

    data = dask_array.map_blocks(read, chunks=((5, 5, 3), (4, 4, 3), (values.shape[-1],)), dtype=values.dtype)
    return emb.transpose("y", "x", "embedding").copy(data=data)


def test_queries_read_only_their_chunks(small):
    emb, _ = small
    emb1 = emb.isel(time=1)
    point = _lonlat(float(emb.x[9]), float(emb.y[7]))  # block (1, 2)
    lazy = _readable_only(emb1, slice(7, 8), slice(9, 10))
    sim = similarity(lazy, point)  # resolving the query reads the point's block and nothing else
    with pytest.raises(RuntimeError, match="was read"):
        sim.compute()  # the map needs every block
    window = gpd.GeoDataFrame(geometry=[box(float(emb.x[5]) - 40, float(emb.y[4]) - 40, float(emb.x[6]) + 40,
                                            float(emb.y[3]) + 40)], crs=CRS)  # rows 3-4, cols 5-6
    similarity(_readable_only(emb1, slice(3, 5), slice(5, 7)), window)
    expected = emb1.values[3:5, 5:7].reshape(-1, 6).astype(np.float64).mean(0)
    np.testing.assert_allclose(similarity(_readable_only(emb1, slice(0, 13), slice(0, 11)), window).values,
                               similarity(emb1, expected).values, atol=1e-6)


def test_bad_input_is_refused_before_any_chunk_is_read(small):
    emb, _ = small
    lazy = _unreadable(emb.isel(time=1))
    outside = _lonlat(ORIGIN[0] - 5_000, ORIGIN[1] + 5_000)
    with pytest.raises(ValueError, match="falls outside the embedding area"):
        similarity(lazy, outside)
    far = box(*_lonlat(ORIGIN[0] - 9_000, ORIGIN[1] + 5_000), *_lonlat(ORIGIN[0] - 6_000, ORIGIN[1] + 8_000))
    with pytest.raises(ValueError, match="covers no valid embedding position"):
        similarity(lazy, far)
    with pytest.raises(ValueError, match="embedding has 6 dims"):
        similarity(lazy, np.ones(5))
    with pytest.raises(ValueError, match="different grids"):
        change(lazy, _unreadable(emb.isel(time=2)).isel(y=slice(0, 12)))
    with pytest.raises(ValueError, match="fitted on 6-dim"):
        to_rgb(_unreadable(emb.isel(time=0, embedding=slice(0, 3))), reducer=fit_rgb(emb, sample=None))
    with pytest.raises(RuntimeError, match="a chunk was read"):  # the control: computing does read
        similarity(lazy, np.ones(6)).compute()


def test_large_store_streams_under_a_memory_cap(large_store):
    n_time, n_y, n_x, _ = LARGE_SHAPE
    row, col = 300, 200  # a class patch away from the changed box and the cloud rows
    query = _lonlat(ORIGIN[0] + RES * (col + 0.5), ORIGIN[1] - RES * (row + 0.5))
    window = dict(time=0, y=slice(LARGE_CLOUD_ROWS.start - 6, LARGE_CLOUD_ROWS.stop + 6), x=slice(100, 300))
    runs = run_bounded_steps({  # one child; the steps least likely to leave memory behind first
        "open": f"emb = terrafm.open_embedding({str(large_store)!r}); result = list(emb.data.chunksize)",
        "change": """
            ds = terrafm.analysis.change(emb.isel(time=0), emb.isel(time=1))
            changed, valid = dask.compute(ds.changed.sum(), ds.distance.notnull().sum())
            result = {"threshold": ds.attrs["threshold"], "changed": float(changed), "valid": int(valid)}
            del ds
        """,
        "similarity": f"""
            sim = terrafm.analysis.similarity(emb.isel(time=1), {query!r})
            best = terrafm.analysis.top_k(sim, k=200)
            result = {{"row": best["row"].tolist(), "col": best["col"].tolist(),
                       "score": best["similarity"].tolist()}}
            del sim, best
        """,
        "to_rgb": f"""
            rgb, reducer = terrafm.analysis.to_rgb(emb, sample=20_000, return_reducer=True)
            nan, low, high = dask.compute(rgb.isnull().any("band").sum(), rgb.min(), rgb.max())
            part = rgb.isel({window!r}).values
            diff = np.nanmax(np.abs(part - reducer.transform(emb.isel({window!r}).load()).values))
            result = {{"nan": int(nan), "low": float(low), "high": float(high), "diff": float(diff),
                       "nan_window": int(np.isnan(part).all(-1).sum())}}
            del rgb, reducer, part
        """,
        "control": "result = float(emb.values.sum())",
    })
    for name in ("open", "to_rgb", "similarity", "change"):
        assert runs[name].ok, f"{name} failed under the {BUDGET_MB} MB cap: {runs[name].error}"
    control = runs["control"]
    assert not control.ok and control.memory_error, f"loading the store whole should exceed the cap: {control}"

    rgb = runs["to_rgb"].result
    assert rgb["nan"] == (LARGE_CLOUD_ROWS.stop - LARGE_CLOUD_ROWS.start) * n_x  # cloud rows of date 0 only
    assert rgb["nan_window"] == (LARGE_CLOUD_ROWS.stop - LARGE_CLOUD_ROWS.start) * 200
    assert (rgb["low"], rgb["high"]) == (0.0, 1.0) and rgb["diff"] <= 1e-6

    best = runs["similarity"].result
    classes = large_class_map(np.arange(n_y), np.arange(n_x), 1)
    assert (classes[best["row"], best["col"]] == classes[row, col]).all()  # 200 of the query's class
    scores = np.array(best["score"])
    assert scores[0] == pytest.approx(1.0, abs=1e-6) and (np.diff(scores) <= 0).all()
    flat = np.array(best["row"]) * n_x + np.array(best["col"])
    assert (np.diff(flat)[np.diff(scores) == 0] > 0).all()  # equal scores in row-major order
    assert row * n_x + col in flat[scores == scores[0]]

    found = runs["change"].result
    box_cells = (LARGE_CHANGED[0].stop - LARGE_CHANGED[0].start) * (LARGE_CHANGED[1].stop - LARGE_CHANGED[1].start)
    assert found["changed"] == box_cells  # exactly the box that changed class
    assert found["valid"] == (n_y - (LARGE_CLOUD_ROWS.stop - LARGE_CLOUD_ROWS.start)) * n_x
    assert 0.3 < found["threshold"] < 0.8  # between unchanged (~0.2) and changed (~1) distances
