"""VectorIndex: exact results vs float64 brute force, recall of the approximate indexes (synthetic and real
embeddings), persistence, incremental add, multi-store results, bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from analysis_helpers import CRS, make_embedding

from terrafm.analysis import VectorIndex, to_zarr
from terrafm.analysis.index import StoreChangedError
from terrafm.store import EMBEDDING_VAR

faiss = pytest.importorskip("faiss")

DIM = 16


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """(n, dim) vectors around 40 sub-cluster centres of a 6-dim latent space (unnormalised)."""
    rng = np.random.default_rng(seed)
    lift = rng.normal(size=(6, dim))
    centres = rng.normal(0, 3, (40, 6))
    z = centres[rng.integers(0, 40, n)] + rng.normal(0, 0.6, (n, 6))
    return (z @ lift + rng.normal(0, 0.05, (n, dim)) + 4 * lift[0]).astype(np.float32)


def write(path, values, origin=(404_000.0, 5_342_400.0), crs=CRS, times=None, chunks=None):
    emb = make_embedding(values, crs=crs, origin=origin, times=times)
    if chunks:
        emb = emb.chunk(chunks)
    return to_zarr(emb, path)


def all_valid(stores):
    """Every valid position of ``stores`` (store, time, row, col) and its unit vector in float64."""
    import terrafm

    tables, vectors = [], []
    for store in stores:
        emb = terrafm.open_embedding(store, chunks=None)
        valid = emb["valid"].values
        if "time" not in emb.dims:
            emb, valid = emb.expand_dims(time=[np.datetime64("NaT", "ns")]), valid[None]
        values = emb.transpose("time", "y", "x", "embedding").values.astype(np.float64)
        t, r, c = np.nonzero(np.isfinite(values).all(-1) & valid)
        tables.append(pd.DataFrame({"store": str(store.resolve()), "time": emb["time"].values[t], "row": r, "col": c}))
        vectors.append(values[t, r, c])
    vectors = np.concatenate(vectors)
    return pd.concat(tables, ignore_index=True), vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(stores, query, k, positions=None):
    """float64 cosine top-k over every valid position of ``stores``: a table like VectorIndex.search's."""
    table, vectors = positions or all_valid(stores)
    q = np.asarray(query, np.float64)
    table = table.assign(score=vectors @ (q / np.linalg.norm(q)))
    return table.sort_values("score", ascending=False, kind="stable").head(k).reset_index(drop=True)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS on one thread: its OpenMP threads spin-wait on an oversubscribed shared CI machine."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def recall(found, truth) -> float:
    key = ["store", "time", "row", "col"]
    a = set(map(tuple, found[key].astype(str).values))
    b = set(map(tuple, truth[key].astype(str).values))
    return len(a & b) / len(b)


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """Two stores: 2 dates in UTM 33N chunked 5x7 with a cloudy strip, and one date-less store in UTM 32N."""
    folder = tmp_path_factory.mktemp("index")
    a = clustered(2 * 12 * 14, seed=1).reshape(2, 12, 14, DIM)
    a[0, :2] = np.nan
    b = clustered(9 * 10, seed=2).reshape(9, 10, DIM).astype(np.float64)   # float64 store values
    times = np.array(["2023-06-01", "2024-06-01"], "datetime64[ns]")
    return (write(folder / "a.zarr", a, times=times, chunks={"y": 5, "x": 7}),
            write(folder / "b.zarr", b, origin=(700_000.0, 5_342_000.0), crs="EPSG:32632"))


def test_exact_equals_float64_brute_force_across_stores(two_stores):
    index = VectorIndex.build(list(two_stores), progress=False)
    assert index.method == "exact" and index.dim == DIM
    assert len(index) == 2 * 12 * 14 - 14 * 2 + 9 * 10
    assert index.path == two_stores[0].resolve().with_name("a.zarr.index")
    query = clustered(1, seed=9)[0]
    found = index.search(query, k=25)
    truth = brute_force(two_stores, query, 25)
    assert found["store"].tolist() == truth["store"].tolist()
    assert found[["row", "col"]].values.tolist() == truth[["row", "col"]].values.tolist()
    np.testing.assert_array_equal(found["time"].values.astype("datetime64[ns]"),
                                  truth["time"].values.astype("datetime64[ns]"))
    np.testing.assert_allclose(found["score"], truth["score"], atol=2e-6)
    assert set(found["store"]) == {str(p.resolve()) for p in two_stores}   # results from both stores
    # origin columns: map coordinates of the cell, lon/lat of that point, NaT for the date-less store
    from pyproj import Transformer

    for store, crs, x0, y0 in ((two_stores[0], CRS, 404_000.0, 5_342_400.0),
                               (two_stores[1], "EPSG:32632", 700_000.0, 5_342_000.0)):
        part = found[found["store"] == str(store.resolve())]
        np.testing.assert_allclose(part["x"], x0 + 160 * (part["col"] + 0.5))
        np.testing.assert_allclose(part["y"], y0 - 160 * (part["row"] + 0.5))
        lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(part["x"].values, part["y"].values)
        np.testing.assert_allclose(part["lon"], lon, atol=1e-9)
        np.testing.assert_allclose(part["geometry"].y, lat, atol=1e-9)
    assert found.crs.to_epsg() == 4326
    assert found[found["store"] == str(two_stores[1].resolve())]["time"].isna().all()
    assert not found[found["store"] == str(two_stores[0].resolve())]["time"].isna().any()
    only_b = index.search(query, k=5, stores=[two_stores[1]])
    assert (only_b["store"] == str(two_stores[1].resolve())).all() and len(only_b) == 5


def test_locations_and_examples_follow_the_documented_rule(two_stores, tmp_path):
    import terrafm

    # a third store: the area of a.zarr at another date, so a point is looked up in two stores, three dates
    c = clustered(12 * 14, seed=3).reshape(12, 14, DIM)
    later = write(tmp_path / "c.zarr", c[None], times=np.array(["2025-06-01"], "datetime64[ns]"))
    stores = [two_stores[0], two_stores[1], later]
    index = VectorIndex.build(stores, path=tmp_path / "abc.index", progress=False)
    emb_a = terrafm.open_embedding(two_stores[0], chunks=None)
    lon, lat = float(index._positions.query("store == 0 and row == 6 and col == 3")["lon"].iloc[0]), \
        float(index._positions.query("store == 0 and row == 6 and col == 3")["lat"].iloc[0])
    examples = np.concatenate([emb_a.values[:, 6, 3], c[6, 3][None]]).astype(np.float64)
    unit = examples / np.linalg.norm(examples, axis=1, keepdims=True)
    found = index.search((lon, lat), k=10)
    truth = brute_force(stores, unit.mean(0), 10 + 3)
    truth = truth[~((truth["row"] == 6) & (truth["col"] == 3) & (truth["store"] != str(two_stores[1].resolve())))]
    assert found[["store", "row", "col"]].values.tolist() == truth.head(10)[["store", "row", "col"]].values.tolist()
    kept = index.search((lon, lat), k=3, exclude_query=False)
    assert len(kept) == 3 and set(zip(kept["row"], kept["col"])) <= {(6, 3)} | set(zip(truth["row"], truth["col"]))
    # positive minus negative, one vector each, and a polygon (mean of the valid cells inside, both dates)
    negative = clustered(1, seed=11)[0].astype(np.float64)
    found = index.search(positive=unit[2], negative=negative, k=5)
    direction = unit[2] - negative / np.linalg.norm(negative)
    assert found[["row", "col"]].values.tolist() == brute_force(stores, direction, 5)[["row", "col"]].values.tolist()
    import geopandas as gpd

    cells = gpd.GeoSeries(gpd.points_from_xy([404_000 + 160 * 2.5, 404_000 + 160 * 3.5],
                                             [5_342_400 - 160 * 8.5] * 2), crs=CRS)
    polygon = cells.buffer(60).union_all().envelope            # covers cells (8, 2) and (8, 3) of a/c
    found = index.search(gpd.GeoDataFrame(geometry=[polygon], crs=CRS), k=4)
    inside = np.concatenate([emb_a.values[:, 8, 2:4].reshape(-1, DIM), c[8, 2:4]]).astype(np.float64)
    mean = (inside / np.linalg.norm(inside, axis=1, keepdims=True)).mean(0)
    truth = brute_force(stores, mean, 20)
    truth = truth[~(truth["row"].eq(8) & truth["col"].isin([2, 3]) & truth["store"].ne(str(two_stores[1].resolve())))]
    assert found[["row", "col"]].values.tolist() == truth.head(4)[["row", "col"]].values.tolist()


@pytest.mark.parametrize("method", ["hnsw", "auto"])
def test_approximate_recall_on_clustered_vectors(tmp_path_factory, method):
    folder = tmp_path_factory.mktemp(f"recall-{method}")
    values = clustered(2 * 60 * 100 + 40, seed=5)
    stores = [write(folder / f"s{i}.zarr", values[i * 6000:(i + 1) * 6000].reshape(60, 100, DIM), chunks={"y": 20})
              for i in range(2)]
    index = VectorIndex.build(stores, method=method, exact_below=5_000, progress=False)
    assert index.method == ("hnsw" if method == "auto" else method) and len(index) == 12_000
    positions = all_valid(stores)
    recalls = [recall(index.search(q, k=20), brute_force(stores, q, 20, positions)) for q in values[-40:]]
    assert np.mean(recalls) >= 0.95, (method, np.mean(recalls))


# ---------------------------------------------------------------------- real embeddings
@pytest.fixture(scope="module")
def real_stores(sentinel_scene, tmp_path_factory):
    """The tiny model's embeddings of the suite's real Sentinel-2 scene (two dates, 256 px, patch level)."""
    import rasterio
    import torch
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    from terrafm import embed, sensors
    from terrafm.model import create_model

    size = 256
    left, top = sentinel_scene.bounds[0], sentinel_scene.bounds[3]
    gbox = GeoBox.from_bbox((left, top - 10 * size, left + 10 * size, top), f"EPSG:{sentinel_scene.epsg}",
                            resolution=10)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model("terrafm_tiny").eval()
    folder = tmp_path_factory.mktemp("real")
    stores = []
    for entry in (sentinel_scene.manifest["s2"][0], sentinel_scene.manifest["s2"][4]):
        data = {}
        for band in sensors.S2_BANDS:
            asset = entry["assets"][band]
            with rasterio.open(sentinel_scene.root / asset["path"]) as src:
                pixels = src.read(1)
            factor = asset["res"] // 10
            pixels = np.repeat(np.repeat(pixels, factor, 0), factor, 1)[:size, :size]
            data[f"s2_l2a_{band}"] = (("y", "x"), pixels, {"modality": "s2_l2a"})
        ds = xr.Dataset(data, coords=dict(xr_coords(gbox, crs_coord_name="spatial_ref")))
        out = folder / f"{entry['datetime'][:10]}.zarr"
        embed(ds, model=model, chip_size=128, device="cpu", progress=False, out=out)
        stores.append(out)
    return stores


@pytest.mark.parametrize("method", ["hnsw"])
def test_approximate_recall_on_real_embeddings(real_stores, method):
    import terrafm

    index = VectorIndex.build(real_stores, method=method, exact_below=100, progress=False)
    assert len(index) == 2 * 16 * 16 and index.dim == 64
    rng = np.random.default_rng(0)
    emb = terrafm.open_embedding(real_stores[1], chunks=None).values
    picks = rng.choice(16 * 16, 30, replace=False)
    queries = emb.reshape(-1, 64)[picks] + 0.01 * rng.normal(size=(30, 64)) * np.abs(emb).mean()
    positions = all_valid(real_stores)
    recalls = [recall(index.search(q, k=20), brute_force(real_stores, q, 20, positions)) for q in queries]
    assert np.mean(recalls) >= 0.95, (method, np.mean(recalls))


# ---------------------------------------------------------------------- persistence and growth
def test_save_open_round_trip_and_overwrite_rules(two_stores, tmp_path):
    index = VectorIndex.build(list(two_stores), path=tmp_path / "x.index", progress=False)
    saved = index.save()
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "positions.parquet", "vectors.faiss"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.index"]                 # no temporary sibling left
    reopened = VectorIndex.open(saved)
    query = clustered(1, seed=21)[0]
    pd.testing.assert_frame_equal(pd.DataFrame(reopened.search(query, k=30)), pd.DataFrame(index.search(query, k=30)))
    assert (reopened.method, reopened.dim, reopened.stores, len(reopened)) == \
        (index.method, index.dim, index.stores, len(index))
    reopened.save()                                   # the same index: replaced without overwrite
    with pytest.raises(FileExistsError, match="another vector index.*overwrite=True"):
        VectorIndex.build([two_stores[1]], path=saved, progress=False)        # refused before building
    other = VectorIndex.build([two_stores[1]], path=tmp_path / "other.index", progress=False)
    with pytest.raises(FileExistsError, match="another vector index.*overwrite=True"):
        other.save(saved)
    assert len(VectorIndex.open(saved)) == len(index)
    other.save(saved, overwrite=True)
    assert len(VectorIndex.open(saved)) == 9 * 10
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(IsADirectoryError, match="not a terrafm vector index"):
        other.save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="inside.*embedding store"):
        other.save(two_stores[1] / "index")


def _grow_block(store, t, cy, cx, values):
    """What terrafm.embed does when a block completes: values and valid, then blocks_done."""
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    rows, cols = slice(cy * 4, cy * 4 + 4), slice(cx * 5, cx * 5 + 5)
    group[EMBEDDING_VAR][t, rows, cols] = values
    group["valid"][t, rows, cols] = np.isfinite(values).all(-1)
    group["blocks_done"][t, cy, cx] = 1


def _unfinished_store(path):
    """An embed-layout store of 2 dates x 2x2 blocks of 4x5 cells; block (date 1, 1, 0) not yet done."""
    values = clustered(2 * 8 * 10, seed=31).reshape(2, 8, 10, DIM)
    values[1, 4:8, 0:5] = np.nan
    emb = make_embedding(values, times=np.array(["2023-01-01", "2023-02-01"], "datetime64[ns]"))
    emb = emb.chunk({"time": 1, "y": 4, "x": 5})
    to_zarr(emb, path)
    done = np.ones((2, 2, 2), "int8")
    done[1, 1, 0] = 0
    xr.Dataset({"blocks_done": (("time", "block_y", "block_x"), done)}).to_zarr(path, mode="a")
    return values


def test_add_a_new_store_and_a_grown_store_equals_a_fresh_build(two_stores, tmp_path):
    grown = tmp_path / "grown.zarr"
    full = _unfinished_store(grown)
    full[1, 4:8, 0:5] = clustered(20, seed=32).reshape(4, 5, DIM)
    index = VectorIndex.build([two_stores[1]], path=tmp_path / "g.index", progress=False)
    assert index.add(grown, progress=False) == 2 * 80 - 20
    index.save()
    _grow_block(grown, 1, 1, 0, full[1, 4:8, 0:5])
    with pytest.warns(UserWarning, match="grew since it was indexed.*index.add"):
        index = VectorIndex.open(tmp_path / "g.index")
    assert index.add(grown, progress=False) == 20             # only the completed block
    assert index.add(grown, progress=False) == 0              # nothing new
    # a new date appended to the store
    extra = make_embedding(clustered(80, seed=33).reshape(1, 8, 10, DIM),
                           times=np.array(["2023-03-01"], "datetime64[ns]"))
    from terrafm.store import embedding_to_dataset

    ds = embedding_to_dataset(extra.chunk({"time": 1, "y": 4, "x": 5}))
    ds["blocks_done"] = (("time", "block_y", "block_x"), np.ones((1, 2, 2), "int8"))
    ds.drop_vars("spatial_ref").to_zarr(grown, mode="a", append_dim="time")
    assert index.add(grown, progress=False) == 80
    index.save()
    fresh = VectorIndex.build([two_stores[1], grown], path=tmp_path / "fresh.index", progress=False)
    assert len(VectorIndex.open(tmp_path / "g.index")) == len(fresh) == 90 + 240
    for seed in (41, 42):
        query = clustered(1, seed=seed)[0]
        a, b = index.search(query, k=40), fresh.search(query, k=40)
        pd.testing.assert_frame_equal(pd.DataFrame(a), pd.DataFrame(b))
    # the values of an indexed block change: refused, with the fix
    _grow_block(grown, 0, 0, 0, clustered(20, seed=50).reshape(4, 5, DIM))
    with pytest.raises(StoreChangedError, match="values of block .* differ.*rebuild"):
        index.add(grown, progress=False)
    with pytest.raises(StoreChangedError, match="changed since it was indexed"):
        VectorIndex.open(tmp_path / "g.index")
    assert len(VectorIndex.open(tmp_path / "g.index", check=False)) == 330


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_work(two_stores, tmp_path):
    other_dim = write(tmp_path / "d8.zarr", clustered(20, dim=8).reshape(4, 5, 8))
    with pytest.raises(ValueError, match="dimension mismatch.*8-dim.*16"):
        VectorIndex.build([two_stores[1], other_dim], progress=False)
    index = VectorIndex.build([two_stores[1]], path=tmp_path / "b.index", progress=False)
    with pytest.raises(ValueError, match="dimension mismatch.*8-dim"):
        index.add(other_dim)
    with pytest.raises(ValueError, match=r"dimension mismatch.*\(1, 8\).*16-dim"):
        index.search(np.ones(8))
    empty = write(tmp_path / "empty.zarr", np.full((3, 3, DIM), np.nan))
    with pytest.raises(ValueError, match="no valid position.*nothing to index"):
        VectorIndex.build([empty], progress=False)
    with pytest.raises(ValueError, match="outside every indexed store"):
        index.search((0.0, 0.0))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(np.ones(DIM), k=0)
    with pytest.raises(ValueError, match="method='flat'.*choose one of"):
        VectorIndex.build([two_stores[1]], method="flat")
    not_embedding = tmp_path / "plain.zarr"
    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(not_embedding)
    with pytest.raises(ValueError, match="is not an? (terrafm )?embedding store"):
        VectorIndex.build([not_embedding])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a zarr store"):
        VectorIndex.build([tmp_path / "folder"])
    with pytest.raises(FileNotFoundError, match="no such embedding store"):
        VectorIndex.build([tmp_path / "missing.zarr"])
    with pytest.raises(ValueError, match="negative examples alone"):
        index.search(negative=np.ones(DIM))
    with pytest.raises(ValueError, match="not in the index"):
        index.search(np.ones(DIM), stores=[two_stores[0]])
    with pytest.raises(FileNotFoundError, match="not a terrafm vector index"):
        VectorIndex.open(tmp_path / "folder")
    assert json.loads((index.save() / "manifest.json").read_text())["method"] == "exact"
