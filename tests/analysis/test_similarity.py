import numpy as np
import pytest
from pyproj import Transformer
from scipy.spatial.distance import cdist
from shapely.geometry import box

from analysis_helpers import CRS, assert_georef, make_embedding
from terrafm.analysis import similarity, top_k


def _lonlat(emb, row, col):
    x, y = float(emb.x[col]), float(emb.y[row])
    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)


def test_location_is_most_similar_to_itself(random_emb):
    lon, lat = _lonlat(random_emb, 7, 9)
    sim = similarity(random_emb, (lon, lat))
    assert float(sim[7, 9]) == pytest.approx(1.0, abs=1e-6)
    assert np.nanmax(sim.values) == pytest.approx(1.0, abs=1e-6)
    # independent reference: scipy cosine distance
    vecs = random_emb.values.reshape(-1, 16)
    ref = 1 - cdist(vecs, random_emb.values[7, 9][None].astype(np.float64), "cosine")[:, 0]
    np.testing.assert_allclose(sim.values.ravel(), ref, atol=1e-6, equal_nan=True)
    assert np.isnan(sim.values[0, :3]).all()
    assert_georef(sim, random_emb)
    best = top_k(sim, k=3)
    assert (best.loc[0, "row"], best.loc[0, "col"]) == (7, 9)
    assert best.crs == random_emb.rio.crs
    assert best.geometry.iloc[0].x == pytest.approx(float(random_emb.x[9]))


def test_copied_patch_is_top1_and_polygon_query():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(30, 30, 32))
    values[20:24, 5:9] = values[2:6, 10:14]  # copy a 4x4 patch
    emb = make_embedding(values)
    # query by the copied patch's polygon (EPSG:4326): mean vector of the 16 cells
    x0, x1 = float(emb.x[10]) - 80, float(emb.x[13]) + 80
    y0, y1 = float(emb.y[5]) - 80, float(emb.y[2]) + 80
    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    (lon0, lon1), (lat0, lat1) = to_ll.transform([x0 + 1, x1 - 1], [y0 + 1, y1 - 1])
    polygon = box(min(lon0, lon1), min(lat0, lat1), max(lon0, lon1), max(lat0, lat1))
    sim = similarity(emb, values[2:6, 10:14].reshape(16, -1), reduce="max")
    best = top_k(sim, k=32)
    cells = set(zip(best.row[:32], best.col[:32]))
    assert cells == {(r, c) for r in range(2, 6) for c in range(10, 14)} | {
        (r, c) for r in range(20, 24) for c in range(5, 9)}
    mean_query = similarity(emb, polygon)
    expected = values[2:6, 10:14].reshape(16, -1).mean(0)
    ref = 1 - cdist(values.reshape(-1, 32), expected[None], "cosine")[:, 0]
    np.testing.assert_allclose(mean_query.values.ravel(), ref, atol=1e-5)


def test_euclidean_and_list_of_vectors(random_emb):
    queries = [random_emb.values[5, 5], random_emb.values[10, 10]]
    sim = similarity(random_emb, queries, metric="euclidean", reduce="mean")
    ref = -cdist(random_emb.values.reshape(-1, 16), np.array(queries, dtype=np.float64)).mean(1)
    np.testing.assert_allclose(sim.values.ravel(), ref, rtol=1e-5, equal_nan=True)


def test_bad_queries(random_emb):
    with pytest.raises(ValueError, match="outside the embedding area"):
        similarity(random_emb, (100.0, -30.0))
    with pytest.raises(ValueError, match="invalid"):
        similarity(random_emb, _lonlat(random_emb, 0, 1))
    with pytest.raises(ValueError, match="16 dims"):
        similarity(random_emb, np.ones(5))
    with pytest.raises(ValueError, match="covers no valid"):
        similarity(random_emb, box(100, -30, 101, -29))
