import numpy as np
import pytest

from analysis_helpers import assert_georef, make_embedding
from terrafm.analysis import fit_rgb, to_rgb


def test_pca_matches_numpy_svd(random_emb):
    rgb, reducer = to_rgb(random_emb, method="pca", sample=None, return_reducer=True)
    data = random_emb.values.reshape(-1, 16).astype(np.float64)
    data = data[np.isfinite(data).all(1)]
    centred = data - data.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:3].T
    got = reducer.project(data.astype(np.float32))
    for band in range(3):  # components agree up to sign
        corr = np.corrcoef(expected[:, band], got[:, band])[0, 1]
        assert abs(corr) > 0.9999
        np.testing.assert_allclose(np.abs(got[:, band]), np.abs(expected[:, band]), atol=1e-4)
    # robust stretch: 2nd/98th percentiles of the fitted sample -> 0/1
    vals = rgb.values[np.isfinite(rgb.values).all(-1)]
    assert vals.min() == 0 and vals.max() == 1
    for band in range(3):
        assert np.mean(vals[:, band] == 0) == pytest.approx(0.02, abs=0.01)
    assert rgb.dims == ("y", "x", "band") and list(rgb.band.values) == ["r", "g", "b"]
    assert np.isnan(rgb.values[0, :3]).all() and np.isfinite(rgb.values[1:]).all()
    assert_georef(rgb, random_emb)


def test_second_date_uses_same_colour_space(random_emb):
    rgb1, reducer = to_rgb(random_emb, return_reducer=True)
    shifted = make_embedding(random_emb.values + 10.0, origin=(404_000.0, 5_342_400.0))
    rgb2 = to_rgb(shifted, reducer=reducer)
    # a constant shift along every dim moves projections by the same amount: not refitted
    refit = to_rgb(shifted)
    np.testing.assert_allclose(np.nan_to_num(refit.values), np.nan_to_num(rgb1.values), atol=1e-5)
    assert not np.allclose(np.nan_to_num(rgb2.values), np.nan_to_num(rgb1.values))
    np.testing.assert_allclose(reducer.project(np.full((1, 16), 10, np.float32)) - reducer.project(
        np.zeros((1, 16), np.float32)), (reducer.model.components_ @ np.full(16, 10.0))[None], atol=1e-4)


def test_umap_fit_on_sample_transforms_all():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=5, size=(3, 8))
    values = centres[rng.integers(0, 3, size=(15, 20))] + rng.normal(scale=0.3, size=(15, 20, 8))
    emb = make_embedding(values)
    rgb, reducer = to_rgb(emb, method="umap", sample=150, seed=0, return_reducer=True, n_epochs=50,
                          chunk_size=100)
    assert reducer.n_fit == 150
    assert np.isfinite(rgb.values).all() and rgb.shape == (15, 20, 3)
    assert_georef(rgb, emb)


def test_time_series_and_bad_input(random_emb):
    import xarray as xr

    series = xr.concat([random_emb, random_emb], dim="time")
    assert to_rgb(series).dims == ("time", "y", "x", "band")
    with pytest.raises(ValueError, match="method"):
        fit_rgb(random_emb, method="tsne")
    with pytest.raises(ValueError, match="no valid positions"):
        to_rgb(make_embedding(np.full((4, 4, 8), np.nan)))
    with pytest.raises(ValueError, match="no CRS"):
        to_rgb(random_emb.drop_vars("spatial_ref"))
    _, reducer = to_rgb(random_emb, return_reducer=True)
    with pytest.raises(ValueError, match="same model"):
        to_rgb(make_embedding(np.ones((4, 4, 8))), reducer=reducer)
