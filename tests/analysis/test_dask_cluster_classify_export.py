"""cluster, fit_classifier(...).predict, to_cog and to_geoparquet on dask-backed embeddings.

The lazy path must equal the in-memory path on a small store (uneven chunks, invalid cells, two
dates), and run on ``large_store`` (4x the memory budget) in a capped child process.
"""

import dask
import dask.array as dsa
import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rioxarray
import xarray as xr
from bounded_memory import run_bounded_steps
from shapely.geometry import box

import terrafm
from analysis_helpers import (CRS, LARGE_CLOUD_ROWS, LARGE_SHAPE, ORIGIN, RES, assert_georef, large_class_map,
                              make_embedding)
from terrafm.analysis import cluster, fit_classifier, to_cog, to_geoparquet, to_zarr

NY, NX, DEPTH = 30, 37, 16
CAP_MB = 200   # memory above the child's idle baseline; the large_store is 403 MB
CHUNKS = {"y": 7, "x": 20, "embedding": 8}   # 30 = 4x7 + 2, 37 = 20 + 17: uneven, embedding split


def regions() -> np.ndarray:
    """(y, x) class of the small fixture: three vertical bands, a fourth class in a box."""
    truth = np.zeros((NY, NX), int)
    truth[:, 12:24], truth[:, 24:] = 1, 2
    truth[18:26, 2:9] = 3
    return truth


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(in-memory emb, the same read back lazily from a zarr store): 2 dates, NaN holes, valid=False cells."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, DEPTH)) * 2
    values = centres[regions()][None].repeat(2, 0) + rng.normal(scale=0.3, size=(2, NY, NX, DEPTH))
    values[0, 3:9, 4:7] = np.nan                     # a cloud on the first date
    values[1, 20] = np.nan                           # a missing row on the second
    emb = make_embedding(values, times=np.array(["2020-07-01", "2024-07-01"], dtype="datetime64[ns]"))
    valid = emb["valid"].values.copy()
    valid[1, 0, :5] = False                          # finite vectors the store marks invalid
    emb = emb.assign_coords(valid=(("time", "y", "x"), valid))
    path = to_zarr(emb, tmp_path_factory.mktemp("small") / "small.zarr")
    lazy = terrafm.open_embedding(path).chunk(CHUNKS)
    assert lazy.chunks is not None and lazy.chunksizes["y"] == (7, 7, 7, 7, 2)
    return emb, lazy


def test_cluster_lazy_equals_memory(pair):
    from sklearn.metrics import adjusted_rand_score

    emb, lazy = pair
    for sample in (None, 300):
        ref = cluster(emb, k=4, sample=sample)
        out = cluster(lazy, k=4, sample=sample)
        assert isinstance(out.data, dsa.Array)                          # nothing computed yet
        assert out.chunksizes["y"] == lazy.chunksizes["y"]
        np.testing.assert_array_equal(out.values, ref.values)
        assert out.attrs == ref.attrs and out.attrs["n_fit"] == (300 if sample else int(ref.notnull().sum()))
        assert_georef(out, emb)
    valid = emb["valid"].values
    np.testing.assert_array_equal(np.isfinite(out.values), valid)        # NaN exactly where invalid
    for t in range(2):                                                  # the regions, up to label names
        assert adjusted_rand_score(regions()[valid[t]], out.values[t][valid[t]]) == 1.0


def test_classifier_fit_reads_only_labelled_chunks(pair):
    emb, lazy = pair
    one = lazy.isel(time=1)
    labels = gpd.GeoDataFrame(                       # one box per class, all in rows 14-27 (chunks 2-3)
        {"class": ["a", "b", "c", "d"]},
        geometry=[box(ORIGIN[0] + RES * c0, ORIGIN[1] - RES * 28, ORIGIN[0] + RES * c1, ORIGIN[1] - RES * 14)
                  for c0, c1 in ((9, 12), (14, 20), (26, 33), (3, 8))], crs=CRS)

    def guarded(block, block_info=None):
        (r0, r1), *_ = block_info[0]["array-location"]
        if r1 <= 14 or r0 >= 28:
            raise RuntimeError(f"read rows {r0}-{r1}, which hold no label")
        return block

    watched = one.copy(data=one.data.map_blocks(guarded, dtype=one.dtype))
    clf = fit_classifier(watched, labels, method="linear", block_size=4)
    ref = fit_classifier(emb.isel(time=1), labels, method="linear", block_size=4)
    np.testing.assert_array_equal(clf.train_vectors, ref.train_vectors)
    np.testing.assert_array_equal(clf.train_targets, ref.train_targets)
    assert clf.report == ref.report and clf.report["n_train"] == 13 * (3 + 6 + 7 + 5)  # rows 14-27 but 20 (NaN)
    with pytest.raises(RuntimeError, match="hold no label"):   # the guard is real: predicting reads them all
        clf.predict(watched).compute()


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_predict_lazy_equals_memory(pair, method):
    emb, lazy = pair
    truth = regions()
    rows, cols = np.nonzero(np.indices(truth.shape).sum(0) % 5 == 0)   # every 5th diagonal: ~1/5 of the cells
    labels = gpd.GeoDataFrame({"class": truth[rows, cols]}, crs=CRS, geometry=gpd.points_from_xy(
        ORIGIN[0] + RES * (cols + 0.5), ORIGIN[1] - RES * (rows + 0.5)))
    clf = fit_classifier(lazy.isel(time=1), labels, method=method, k=5)
    out = clf.predict(lazy)                                              # both dates
    assert all(isinstance(out[name].data, dsa.Array) for name in out.data_vars)
    ref = fit_classifier(emb.isel(time=1), labels, method=method, k=5).predict(emb)
    assert out.rio.crs == emb.rio.crs and out.attrs == ref.attrs
    computed = out.compute()
    np.testing.assert_array_equal(computed["class"].values, ref["class"].values)
    np.testing.assert_allclose(computed["probabilities"].values, ref["probabilities"].values, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(computed["probability"].values, computed["probabilities"].max("class_name").values)
    valid = emb["valid"].values
    np.testing.assert_array_equal(np.isfinite(computed["class"].values), valid)
    assert (computed["class"].values[valid] == np.broadcast_to(truth, valid.shape)[valid]).mean() > 0.99
    assert_georef(computed["class"], emb)
    assert list(computed["probabilities"].class_name.values) == ["0", "1", "2", "3"]


def test_to_cog_streams_to_the_same_file(pair, tmp_path):
    emb, lazy = pair
    ids = cluster(lazy, k=4).isel(time=0)
    ref = cluster(emb, k=4).isel(time=0)
    to_cog(ids, tmp_path / "lazy.tif")
    to_cog(ref, tmp_path / "memory.tif")
    ref.rio.write_nodata(np.nan, encoded=False).rio.to_raster(tmp_path / "rioxarray.tif", driver="COG")  # reference
    with rasterio.open(tmp_path / "lazy.tif") as a, rasterio.open(tmp_path / "memory.tif") as b, \
            rasterio.open(tmp_path / "rioxarray.tif") as c:
        assert a.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        for other in (b, c):
            assert (a.crs, a.transform, a.shape, a.count, a.dtypes) == (other.crs, other.transform, other.shape,
                                                                        other.count, other.dtypes)
            assert np.isnan(a.nodata) and np.isnan(other.nodata)
            np.testing.assert_array_equal(a.read(), other.read())
        assert a.tags()["k"] == "4"
    assert (tmp_path / "lazy.tif").read_bytes() == (tmp_path / "memory.tif").read_bytes()
    # a (band, y, x) map chunked across bands, with a numeric nodata: NaN cells get it
    probs = fit_classifier(emb.isel(time=0), gpd.GeoDataFrame(
        {"class": regions()[::3, ::3].ravel()}, crs=CRS, geometry=gpd.points_from_xy(
            np.tile(ORIGIN[0] + RES * (np.arange(0, NX, 3) + 0.5), len(range(0, NY, 3))),
            np.repeat(ORIGIN[1] - RES * (np.arange(0, NY, 3) + 0.5), len(range(0, NX, 3))))), k=3)
    bands = probs.predict(lazy.isel(time=0))["probabilities"].transpose("class_name", "y", "x").chunk({"class_name": 3})
    to_cog(bands, tmp_path / "bands.tif", nodata=-9999)
    written = rioxarray.open_rasterio(tmp_path / "bands.tif", masked=False)
    expected = bands.values
    assert written.rio.nodata == -9999 and written.shape == (4, NY, NX)
    np.testing.assert_array_equal(written.values, np.where(np.isnan(expected), -9999, expected).astype("float32"))
    assert (written.values == -9999).sum() == 4 * int((~emb["valid"].values[0]).sum())


def test_to_geoparquet_streams_the_same_table(pair, tmp_path):
    emb, lazy = pair
    ids_lazy, ids = cluster(lazy, k=4), cluster(emb, k=4)
    returned = to_geoparquet(lazy, tmp_path / "lazy.parquet", extra={"cluster": ids_lazy})
    assert returned == tmp_path / "lazy.parquet"
    ref = to_geoparquet(emb, tmp_path / "memory.parquet", extra={"cluster": ids})
    assert pq.ParquetFile(returned).metadata.num_row_groups == 2 * len(lazy.chunksizes["y"])
    streamed, written = gpd.read_parquet(returned), gpd.read_parquet(tmp_path / "memory.parquet")
    import shapely

    raw = pq.read_table(returned, columns=["geometry"])["geometry"].to_pylist()   # WKB as shapely writes it
    assert raw == list(shapely.to_wkb(shapely.points(streamed.geometry.x, streamed.geometry.y)))
    valid = emb["valid"].values
    t, r, c = np.nonzero(valid)                                          # independent: C order of the valid cells
    for table in (streamed, written, ref):
        assert list(table.columns) == ["row", "col", "time", "cluster", "vector", "geometry"]
        assert table.crs == emb.rio.crs and len(table) == valid.sum()
        np.testing.assert_array_equal(table["row"].to_numpy(), r)
        np.testing.assert_array_equal(table["col"].to_numpy(), c)
        np.testing.assert_array_equal(table["time"].to_numpy().astype("datetime64[ns]"), emb.time.values[t])
        np.testing.assert_array_equal(table["cluster"].to_numpy(), ids.values[t, r, c])
        np.testing.assert_array_equal(np.stack(table["vector"].to_numpy()), emb.values[t, r, c])
        np.testing.assert_array_equal(table.geometry.x.to_numpy(), emb.x.values[c])
        np.testing.assert_array_equal(table.geometry.y.to_numpy(), emb.y.values[r])


def test_bad_input_is_refused_before_any_work(pair, tmp_path):
    emb, lazy = pair
    with pytest.raises(ValueError, match=r"sample=2: sample must be an integer >= 4"):
        cluster(lazy, k=4, sample=2)
    clf = fit_classifier(emb.isel(time=1), gpd.GeoDataFrame(
        {"class": [0, 1]}, crs=CRS, geometry=gpd.points_from_xy(ORIGIN[0] + RES * np.array([10.5, 30.5]),
                                                                [ORIGIN[1] - RES * 0.5] * 2)), k=1)
    with pytest.raises(ValueError, match="no valid positions"):        # reads the valid coord only
        clf.predict(lazy.assign_coords(valid=lazy["valid"] & False))
    one_date_map, dataset = cluster(emb, k=4).chunk(), clf.predict(lazy.isel(time=1))
    with dask.config.set(scheduler=lambda *a, **k: pytest.fail("computed before the check")):
        with pytest.raises(ValueError, match="trained on 16-dim embeddings, got 8; embed with the same model"):
            clf.predict(lazy.isel(embedding=slice(0, 8)))
        with pytest.raises(ValueError, match="one date"):
            to_cog(one_date_map, tmp_path / "x.tif")
        with pytest.raises(TypeError, match=r"pick one variable, e.g. to_cog\(ds\['class'\], path\)"):
            to_cog(dataset, tmp_path / "x.tif")
        with pytest.raises(ValueError, match="nodata must be a number"):
            to_cog(lazy.isel(time=1, embedding=0), tmp_path / "x.tif", nodata="none")
        with pytest.raises(ValueError, match=r"extra\['ids'\] has sizes .* compute it from the same embedding"):
            to_geoparquet(lazy, tmp_path / "x.parquet", extra={"ids": lazy.isel(embedding=0, y=slice(0, 5))})
        with pytest.raises(ValueError, match=r"extra column name 'vector' is taken"):
            to_geoparquet(lazy, tmp_path / "x.parquet", extra={"vector": lazy.isel(embedding=0)})
    assert not list(tmp_path.iterdir())


def test_large_store_under_a_memory_cap(large_store, tmp_path, monkeypatch):
    """The whole store (403 MB) does not fit the child's cap; clustering, classifying and writing it does.

    The cap is 200 MB, not bounded_memory's default 100: opening a zarr store starts zarr's I/O
    threads, whose stacks alone take ~50-80 MB of the data segment that RLIMIT_DATA counts. A fixed
    malloc mmap threshold makes the child hand freed chunk buffers back to the system, so the data
    segment measures live memory rather than glibc's heap fragmentation between steps.
    """
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2**20))
    store, out = str(large_store), str(tmp_path)
    rows, cols = np.arange(LARGE_SHAPE[1]), np.arange(LARGE_SHAPE[2])
    runs = run_bounded_steps({
        "control": f"emb = terrafm.open_embedding({store!r}); result = float(emb.values.sum())",
        "cluster": f"""
            from terrafm.analysis import cluster, to_cog
            emb = terrafm.open_embedding({store!r})
            ids = cluster(emb, k=4, sample=5_000)
            to_cog(ids.isel(time=0), {out!r} + "/clusters.tif")
            result = ids.attrs["n_fit"]
        """,
        "classify": f"""
            import geopandas as gpd
            from analysis_helpers import large_class_map
            from terrafm.analysis import fit_classifier, to_cog
            one = emb.isel(time=1)
            r, c = np.meshgrid(np.arange(8, 768, 64), np.arange(8, 1024, 64), indexing="ij")
            labels = gpd.GeoDataFrame({{"class": large_class_map(r[:, 0], c[0], 1).ravel()}}, crs=emb.rio.crs,
                                      geometry=gpd.points_from_xy(one.x.values[c.ravel()], one.y.values[r.ravel()]))
            clf = fit_classifier(one, labels, k=3)
            to_cog(clf.predict(one)["class"], {out!r} + "/classes.tif")
            result = clf.report["n_train"]
        """,
        "parquet": f"""
            from terrafm.analysis import to_geoparquet
            path = to_geoparquet(emb.isel(time=0), {out!r} + "/points.parquet")
            result = len(emb.data.chunks[1])
        """,
    }, budget_mb=CAP_MB)
    assert runs["control"].memory_error, runs["control"].error           # the cap is real
    for name in ("cluster", "classify", "parquet"):
        assert runs[name].ok, (name, runs[name].error, runs[name].stderr[-2000:])
    assert runs["cluster"].result == 5_000 and runs["classify"].result == 12 * 16
    from sklearn.metrics import adjusted_rand_score

    truth0 = large_class_map(rows, cols, 0)
    clusters = rioxarray.open_rasterio(tmp_path / "clusters.tif").values[0]
    cloud = np.zeros(truth0.shape, bool)
    cloud[LARGE_CLOUD_ROWS] = True
    assert np.isnan(clusters[cloud]).all() and np.isfinite(clusters[~cloud]).all()
    assert adjusted_rand_score(truth0[~cloud], clusters[~cloud]) == 1.0
    classes = rioxarray.open_rasterio(tmp_path / "classes.tif").values[0]
    np.testing.assert_array_equal(classes, large_class_map(rows, cols, 1))   # classes are 0..3, sorted: their own ids
    points = pq.ParquetFile(tmp_path / "points.parquet")
    assert points.metadata.num_rows == int((~cloud).sum())
    assert points.metadata.num_row_groups == runs["parquet"].result > 1         # one per row of chunks
