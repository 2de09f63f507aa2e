import geopandas as gpd
import numpy as np
import pytest
import rioxarray
import xarray as xr

import terrafm
import terrafm.analysis.accessor  # noqa: F401  registers .emb
from analysis_helpers import assert_georef, make_embedding
from terrafm.analysis import cluster, to_cog, to_geoparquet, to_rgb, to_zarr


@pytest.fixture(scope="module")
def three_regions():
    rng = np.random.default_rng(2)
    truth = np.zeros((18, 18), int)
    truth[:, 6:12], truth[:, 12:] = 1, 2
    centres = rng.normal(size=(3, 24)) * 3
    values = centres[truth] + rng.normal(scale=0.2, size=(18, 18, 24))
    values[17, 17] = np.nan
    return make_embedding(values), truth


def test_cluster_recovers_regions(three_regions):
    from sklearn.metrics import adjusted_rand_score

    emb, truth = three_regions
    ids = cluster(emb, k=3)
    ok = np.isfinite(ids.values)
    assert not ok[17, 17] and ok.sum() == 18 * 18 - 1
    assert adjusted_rand_score(truth[ok], ids.values[ok]) == 1.0
    assert_georef(ids, emb)
    with pytest.raises(ValueError, match="k must be"):
        cluster(emb, k=1)


def test_cog_zarr_geoparquet_roundtrip(three_regions, tmp_path):
    emb, _ = three_regions
    rgb = to_rgb(emb)
    cog = rioxarray.open_rasterio(to_cog(rgb, tmp_path / "rgb.tif"))
    assert cog.rio.crs == emb.rio.crs and cog.shape == (3, 18, 18)
    assert tuple(cog.rio.transform()) == pytest.approx(tuple(emb.rio.transform()))
    np.testing.assert_allclose(cog.values, rgb.transpose("band", "y", "x").values, equal_nan=True)
    ids = cluster(emb, k=3)
    single = rioxarray.open_rasterio(to_cog(ids, tmp_path / "ids.tif")).squeeze("band", drop=True)
    np.testing.assert_array_equal(single.values, ids.values)

    back = terrafm.open_embedding(to_zarr(emb, tmp_path / "emb.zarr"))
    assert back.name == "embedding" and back.dims == emb.dims and back.rio.crs == emb.rio.crs
    assert back.attrs == emb.attrs
    assert_georef(back, emb)
    np.testing.assert_array_equal(back["valid"].values, emb["valid"].values)
    np.testing.assert_array_equal(back.values, emb.values)

    gdf = to_geoparquet(emb, tmp_path / "emb.parquet", extra={"cluster": ids})
    read = gpd.read_parquet(tmp_path / "emb.parquet")
    assert len(read) == 18 * 18 - 1 and read.crs == emb.rio.crs
    first = read.iloc[5]
    np.testing.assert_allclose(np.asarray(first.vector), emb.values[first.row, first.col])
    assert first.geometry.x == pytest.approx(float(emb.x[first.col]))
    assert first.cluster == ids.values[first.row, first.col]
    with pytest.raises(ValueError, match="one date"):
        to_cog(xr.concat([rgb, rgb], "time"), tmp_path / "x.tif")


def test_accessor_and_lazy_names(three_regions):
    emb, truth = three_regions
    np.testing.assert_array_equal(emb.emb.cluster(3).values, cluster(emb, 3).values)
    sim = emb.emb.similar(emb.values[0, 0])
    assert float(sim[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert emb.emb.change(emb).changed.sum() == 0
    assert terrafm.to_rgb is to_rgb and callable(terrafm.knn)
