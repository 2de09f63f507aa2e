"""Class 8 of issue 15: every mistake an analyst makes through the public API gets an error from
terrafm that names the problem and the fix, raised before the expensive work.

Tables: analysis (top_k, similarity, cluster, to_rgb, Classifier), evaluate (knn shapes,
temperature), pretrain config (impossible values), STAC search / open_sentinel (dates, bbox,
arguments; checked before any request: a fake client records what would have been sent).
"""

from __future__ import annotations

import datetime as dt
import traceback
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
from affine import Affine

import terrafm
from terrafm import stac
from terrafm.analysis import cluster, fit_classifier, similarity, to_rgb, top_k
from terrafm.evaluate import knn, knn_scores
from bad_input_helpers import CRS, ORIGIN, RES, make_embedding  # noqa: E402

TERRAFM_ROOT = Path(terrafm.__file__).parent
UNREACHABLE = "http://127.0.0.1:9/stac"   # nothing listens on the discard port: any request would fail


@pytest.fixture(scope="module")
def emb() -> xr.DataArray:
    values = np.random.default_rng(0).normal(size=(10, 12, 8))
    values[0, :4] = np.nan
    return make_embedding(values)


@pytest.fixture(scope="module")
def score(emb) -> xr.DataArray:
    return similarity(emb, emb.values[5, 5])


def raised_by_terrafm(excinfo) -> bool:
    """The innermost frame of the exception is terrafm's own code, not a library's."""
    frame = traceback.extract_tb(excinfo.tb)[-1]
    return Path(frame.filename).resolve().is_relative_to(TERRAFM_ROOT.resolve())


# ---------------------------------------------------------------- analysis
ANALYSIS_CASES = [
    pytest.param(lambda e, s: top_k(s, k=-3), ValueError, r"k=-3.*positive integer", id="top_k-negative"),
    pytest.param(lambda e, s: top_k(s, k=0), ValueError, r"k=0.*positive integer", id="top_k-zero"),
    pytest.param(lambda e, s: top_k(s, k=2.5), ValueError, r"k=2\.5.*positive integer", id="top_k-float"),
    pytest.param(lambda e, s: top_k(s * np.nan, k=3), ValueError, r"no finite value.*similarity", id="top_k-all-nan"),
    pytest.param(lambda e, s: top_k(s.values, k=3), TypeError, r"DataArray.*similarity\(\)", id="top_k-numpy"),
    pytest.param(lambda e, s: top_k(e, k=3), ValueError, r"\(y, x\) score map.*dims.*embedding.*similarity\(", id="top_k-embedding-not-score"),
    pytest.param(lambda e, s: similarity(e, e.values[5, 5], reduce="min"), ValueError, r"reduce='min'.*'max' or 'mean'", id="similarity-reduce"),
    pytest.param(lambda e, s: similarity(e, e.values[5, 5], metric="dot"), ValueError, r"metric.*'cosine' or 'euclidean'", id="similarity-metric"),
    pytest.param(lambda e, s: similarity(e, None), TypeError, r"query None.*\(lon, lat\).*polygon.*vector", id="similarity-query-none"),
    pytest.param(lambda e, s: similarity(e, "13.4, 52.5"), TypeError, r"query '13.4, 52.5'.*\(lon, lat\) tuple", id="similarity-query-str"),
    pytest.param(lambda e, s: cluster(e, k=2.5), ValueError, r"k=2\.5.*integer >= 2", id="cluster-k-float"),
    pytest.param(lambda e, s: cluster(e, k="4"), ValueError, r"k='4'.*integer >= 2", id="cluster-k-str"),
    pytest.param(lambda e, s: cluster(e, k=3, batch_size=0), ValueError, r"batch_size=0.*positive integer", id="cluster-batch-zero"),
    pytest.param(lambda e, s: to_rgb(e, sample=0), ValueError, r"sample=0.*at least 4.*None", id="rgb-sample-zero"),
    pytest.param(lambda e, s: to_rgb(e, percentiles=(98, 2)), ValueError, r"percentiles=\(98, 2\).*0 <= low < high <= 100", id="rgb-percentiles-reversed"),
    pytest.param(lambda e, s: to_rgb(e, percentiles=(-5, 120)), ValueError, r"percentiles.*0 <= low < high <= 100", id="rgb-percentiles-range"),
    pytest.param(lambda e, s: to_rgb(e, chunk_size=0), ValueError, r"chunk_size=0.*positive integer", id="rgb-chunk-zero"),
    pytest.param(lambda e, s: to_rgb(e, method="pca", n_neighbors=15), ValueError, r"n_neighbors.*not an option of pca.*options:", id="rgb-unknown-option"),
    pytest.param(lambda e, s: to_rgb(e, method="pca", n_components=2), ValueError, r"n_components.*always 3", id="rgb-n-components"),
    pytest.param(lambda e, s: fit_classifier(e, _two_points().drop(columns="geometry")), TypeError,
                 r"got DataFrame.*gpd\.points_from_xy\(df\.lon, df\.lat\)", id="classifier-plain-dataframe"),
    pytest.param(lambda e, s: fit_classifier(e, _rgb_raster()), ValueError,
                 r"label raster has 3 bands.*raster\.isel\(band=0\)", id="classifier-multiband-raster"),
    pytest.param(lambda e, s: fit_classifier(e, _two_points(), temperature=0), ValueError, r"temperature=0.*> 0.*0\.07", id="classifier-temperature-zero"),
    pytest.param(lambda e, s: fit_classifier(e, _two_points(), block_size=0), ValueError, r"block_size=0.*positive integer", id="classifier-block-zero"),
    pytest.param(lambda e, s: fit_classifier(e, _two_points(), n_folds=1), ValueError, r"n_folds=1.*>= 2", id="classifier-one-fold"),
    pytest.param(lambda e, s: fit_classifier(e, _two_points(), k=1).predict_proba(e.values[5, 5]), ValueError,
                 r"\(n, 8\).*got shape \(8,\).*\[None\]", id="classifier-proba-1d"),
]


def _rgb_raster():
    values = np.random.default_rng(0).integers(1, 5, (3, 10, 12)).astype("uint8")
    da = xr.DataArray(values, dims=("band", "y", "x"),
                      coords={"band": [1, 2, 3], "y": ORIGIN[1] - RES * (np.arange(10) + 0.5),
                              "x": ORIGIN[0] + RES * (np.arange(12) + 0.5)})
    return da.rio.write_crs(CRS).rio.write_transform(Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1]))


def _two_points():
    import geopandas as gpd
    from shapely.geometry import Point

    xs = ORIGIN[0] + RES * (np.arange(12) + 0.5)
    ys = ORIGIN[1] - RES * (np.arange(2, 10) + 0.5)
    pts = [Point(x, y) for y in ys for x in xs]
    return gpd.GeoDataFrame({"class": ["a" if p.x < xs[6] else "b" for p in pts]}, geometry=pts, crs=CRS)


@pytest.mark.parametrize("call, kind, message", ANALYSIS_CASES)
def test_analysis_mistakes_raise_with_fix(emb, score, call, kind, message):
    with pytest.raises(kind, match=message) as info:
        call(emb, score)
    assert raised_by_terrafm(info)


def test_top_k_larger_than_finite_cells_returns_all_of_them_ranked(score):
    finite = np.isfinite(score.values)
    best = top_k(score, k=10_000)
    assert len(best) == finite.sum()
    np.testing.assert_allclose(best["similarity"].values, np.sort(score.values[finite])[::-1])


# ---------------------------------------------------------------- evaluate: shapes and temperature
def _blobs(n=20, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0, 1, (n, d)) + 3, rng.normal(0, 1, (n, d)) - 3], np.r_[[0] * n, [1] * n]


X, Y = _blobs()
KNN_CASES = [
    pytest.param(lambda: knn_scores(X, Y, X[:, :4], k=3), r"query_features have 4 dims but train_features have 6", id="scores-dim-mismatch"),
    pytest.param(lambda: knn_scores(X, Y[:-1], X, k=3), r"train_labels has 39 rows but train_features has 40", id="scores-label-count"),
    pytest.param(lambda: knn_scores(X[None], Y, X, k=3), r"train_features must be 2-D \(n_samples, dim\).*\(1, 40, 6\)", id="scores-3d"),
    pytest.param(lambda: knn_scores(X, Y, X, k=3, temperature=0), r"temperature=0.*> 0.*0\.07", id="scores-temperature-zero"),
    pytest.param(lambda: knn_scores(X, Y, X, k=3, temperature=-1), r"temperature=-1.*> 0", id="scores-temperature-negative"),
    pytest.param(lambda: knn_scores(X, Y, X, k=3, n_classes=1), r"n_classes=1.*labels go up to 1", id="scores-n-classes-small"),
    pytest.param(lambda: knn_scores(X, Y, X, k=3, batch_size=0), r"batch_size=0.*positive integer", id="scores-batch-zero"),
    pytest.param(lambda: knn(X, Y[:-2], X, Y, ks=(3,)), r"train_labels has 38 rows but train_features has 40", id="knn-train-count"),
    pytest.param(lambda: knn(X, Y, X, Y[:10], ks=(3,)), r"val_labels has 10 rows but val_features has 40", id="knn-val-count"),
    pytest.param(lambda: knn(X, Y, X[:, :3], Y, ks=(3,)), r"val_features have 3 dims but train_features have 6", id="knn-val-dims"),
    pytest.param(lambda: knn(X, np.c_[Y, 1 - Y], X, Y, ks=(3,)), r"multi-hot train_labels.*val_labels.*\(40,\).*same", id="knn-multihot-vs-flat"),
    pytest.param(lambda: knn(X, Y, X, Y, ks=()), r"ks is empty.*PAPER_KS", id="knn-ks-empty"),
    pytest.param(lambda: knn(X, Y, X, Y, ks=(0, 3)), r"ks.*\[0\].*positive integers", id="knn-ks-zero"),
    pytest.param(lambda: knn(X, Y, X, Y, ks=(3,), test_labels=Y), r"test_labels given without test_features", id="knn-test-labels-alone"),
    pytest.param(lambda: knn(X, Y, X, Y, ks=(3,), temperature=0.0), r"temperature=0\.0.*> 0", id="knn-temperature-zero"),
    pytest.param(lambda: knn(X, np.c_[Y, 1 - Y], X, np.c_[Y, 1 - Y], ks=(3,), average="mean"),
                 r"average='mean'.*'micro', 'macro'", id="knn-average-unknown"),
]


@pytest.mark.parametrize("call, message", KNN_CASES)
def test_knn_mistakes_raise_with_fix(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert raised_by_terrafm(info)


# ---------------------------------------------------------------- pretrain config: impossible values
CONFIG_CASES = [
    pytest.param(["optim.base_lr=-1.0e-4"], r"optim\.base_lr=-0\.0001 must be > 0", id="lr-negative"),
    pytest.param(["optim.base_lr=0"], r"optim\.base_lr=0 must be > 0", id="lr-zero"),
    pytest.param(["optim.min_lr=-1.0e-6"], r"optim\.min_lr=-1e-06 must be >= 0", id="min-lr-negative"),
    pytest.param(["optim.teacher_temp=0"], r"optim\.teacher_temp=0 must be > 0.*temperature.*divides", id="teacher-temp-zero"),
    pytest.param(["optim.student_temp=0"], r"optim\.student_temp=0 must be > 0", id="student-temp-zero"),
    pytest.param(["optim.warmup_teacher_temp=-0.04"], r"optim\.warmup_teacher_temp=-0\.04 must be > 0", id="warmup-temp-negative"),
    pytest.param(["optim.momentum_teacher=1.5"], r"optim\.momentum_teacher=1\.5 must lie in \[0, 1\]", id="momentum-above-one"),
    pytest.param(["optim.center_momentum=-0.1"], r"optim\.center_momentum=-0\.1 must lie in \[0, 1\]", id="center-momentum-negative"),
    pytest.param(["optim.weight_decay=-0.04"], r"optim\.weight_decay=-0\.04 must be >= 0", id="weight-decay-negative"),
    pytest.param(["optim.weight_decay_end=-1"], r"optim\.weight_decay_end=-1 must be >= 0", id="weight-decay-end-negative"),
    pytest.param(["optim.epochs=0"], r"optim\.epochs=0 must be >= 1", id="epochs-zero"),
    pytest.param(["optim.batch_size=0"], r"optim\.batch_size=0 must be >= 1", id="batch-zero"),
    pytest.param(["optim.clip_grad=0"], r"optim\.clip_grad=0 must be > 0.*zero every gradient", id="clip-zero"),
    pytest.param(["optim.warmup_teacher_temp_epochs=-1"], r"warmup_teacher_temp_epochs=-1 must lie in \[0, epochs", id="temp-warmup-negative"),
    pytest.param(["optim.freeze_last_layer_epochs=-1"], r"freeze_last_layer_epochs=-1 must be >= 0", id="freeze-negative"),
    pytest.param(["model.drop_path_rate=1.5"], r"model\.drop_path_rate=1\.5 must lie in \[0, 1\)", id="drop-path-above-one"),
    pytest.param(["model.head_layers=0"], r"model\.head_layers=0 must be >= 1", id="head-layers-zero"),
    pytest.param(["run.checkpoint_every=0"], r"run\.checkpoint_every=0 must be >= 1", id="checkpoint-every-zero"),
    pytest.param(["run.log_every=0"], r"run\.log_every=0 must be >= 1", id="log-every-zero"),
    pytest.param(["run.knn_every=-5"], r"run\.knn_every=-5 must be >= 0 \(0 turns the kNN monitor off\)", id="knn-every-negative"),
    pytest.param(["run.knn_k=0"], r"run\.knn_k=0 must be >= 1", id="knn-k-zero"),
    pytest.param(["run.seed=-1"], r"run\.seed=-1 must be >= 0", id="seed-negative"),
    pytest.param(["data.num_workers=-1"], r"data\.num_workers=-1 must be >= 0", id="workers-negative"),
    pytest.param(["data.ocean_keep=2"], r"data\.ocean_keep=2 must lie in \[0, 1\]", id="ocean-keep-above-one"),
    pytest.param(["optim.epochs=2.5"], r"optim\.epochs=2\.5 must be an integer", id="epochs-float"),
    pytest.param(["optim.epochs=ten"], r"optim\.epochs='ten' must be an integer", id="epochs-text"),
    pytest.param(["optim.base_lr=fast"], r"optim\.base_lr='fast' must be a number", id="lr-text"),
    pytest.param(["run.tensorboard=maybe"], r"run\.tensorboard='maybe' must be true or false", id="bool-text"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES)
def test_impossible_config_values_are_refused(overrides, message):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", overrides + ["optim.centering=dino"]).validate()


@pytest.mark.parametrize("text, overrides, message", [
    pytest.param("- optim\n- data\n", [], r"holds a list, not a mapping of sections", id="file-is-a-list"),
    pytest.param("optim: 5\n", [], r"section 'optim' of .* is 5, not a mapping.*'optim: \{key: value\}'", id="section-not-mapping"),
    pytest.param("optim: {epochs: [1\n", [], r"is not valid YAML at line \d+, column \d+.*fix the file", id="yaml-syntax"),
    pytest.param("optim: {epochs: 3}\n", ["optim.epochs=[1"], r"override 'optim.epochs=\[1': '\[1' is not a YAML value",
                 id="override-bad-yaml"),
    pytest.param("optim: 5\n", ["optim.epochs=3"], r"section 'optim' .* is 5, not a mapping", id="override-into-scalar"),
])
def test_config_file_mistakes(tmp_path, text, overrides, message):
    from pretrain.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_yaml_exponent_without_dot_is_read_as_a_number():
    """YAML 1.1 reads ``1e-4`` as a string; a float field takes it as the number it means."""
    from pretrain.config import load_config

    cfg = load_config("tiny_cpu", ["optim.base_lr=1e-4", "optim.centering=dino"]).validate()
    assert cfg.optim.base_lr == 1e-4 and isinstance(cfg.optim.base_lr, float)


def test_every_problem_is_listed_at_once():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["optim.base_lr=-1", "optim.teacher_temp=0", "optim.centering=dino"]).validate()
    assert "base_lr=-1 must be > 0" in str(info.value) and "teacher_temp=0 must be > 0" in str(info.value)


# ---------------------------------------------------------------- STAC: dates, bbox, arguments before any request
class FakeClient:
    """Stands in for pystac_client.Client: records the searches, finds nothing."""

    searches: list = []

    @classmethod
    def open(cls, url, **kwargs):
        return cls()

    def search(self, **kwargs):
        FakeClient.searches.append(kwargs)

        class Empty:
            def items(self):
                return iter(())
        return Empty()


@pytest.fixture
def fake_client(monkeypatch):
    import pystac_client

    FakeClient.searches = []
    monkeypatch.setattr(pystac_client, "Client", FakeClient)
    return FakeClient


BBOX = (11.50, 48.10, 11.56, 48.14)


def _gdf_without_crs():
    import geopandas as gpd
    from shapely.geometry import box

    return gpd.GeoDataFrame(geometry=[box(*BBOX)])


STAC_CASES = [
    pytest.param(lambda: stac.search(BBOX, "2024-06-30/2024-06-01", url=UNREACHABLE), ValueError,
                 r"starts after it ends: 2024-06-30 > 2024-06-01.*swap", id="search-start-after-end"),
    pytest.param(lambda: stac.search(BBOX, ("2024-06-30", "2024-06-01"), url=UNREACHABLE), ValueError,
                 r"starts after it ends.*swap", id="search-tuple-start-after-end"),
    pytest.param(lambda: stac.search(BBOX, "2024-13-01/2024-12-31", url=UNREACHABLE), ValueError,
                 r"'2024-13-01' is not a date: month must be in 1\.\.12.*YYYY-MM-DD", id="search-month-13"),
    pytest.param(lambda: stac.search(BBOX, "2024-02-30/2024-03-01", url=UNREACHABLE), ValueError,
                 r"'2024-02-30' is not a date: day is out of range", id="search-feb-30"),
    pytest.param(lambda: stac.search(BBOX, "yesterday/today", url=UNREACHABLE), ValueError,
                 r"'yesterday' is not a date.*YYYY-MM-DD", id="search-words"),
    pytest.param(lambda: stac.search(BBOX, "06/01/2024", url=UNREACHABLE), ValueError,
                 r"'06/01/2024' has 3 parts.*'start/end'.*YYYY-MM-DD", id="search-us-date"),
    pytest.param(lambda: stac.search(BBOX, "../..", url=UNREACHABLE), ValueError,
                 r"open at both ends.*start or an end", id="search-open-both-ends"),
    pytest.param(lambda: stac.search((200, 48.1, 201, 48.2), "2024-06", url=UNREACHABLE), ValueError,
                 r"longitude outside \[-180, 180\].*\(west, south, east, north\)", id="search-longitude-200"),
    pytest.param(lambda: stac.search((11.5, float("nan"), 11.6, 48.2), "2024-06", url=UNREACHABLE), ValueError,
                 r"not finite.*4 finite numbers", id="search-bbox-nan"),
    pytest.param(lambda: stac.search((11.5, 48.1, 11.5, 48.2), "2024-06", url=UNREACHABLE), ValueError,
                 r"no area \(west == east\).*buffer", id="search-bbox-zero-width"),
    pytest.param(lambda: stac.search(BBOX, "2024-06", url=UNREACHABLE, max_cloud=150), ValueError,
                 r"max_cloud=150.*percentage in \[0, 100\]", id="search-max-cloud"),
    pytest.param(lambda: stac.search(BBOX, "2024-06", url=UNREACHABLE, limit=0), ValueError,
                 r"limit=0.*positive integer.*None", id="search-limit-zero"),
    pytest.param(lambda: stac.search(BBOX, "2024-06", url=UNREACHABLE, max_clouds=20), ValueError,
                 r"max_clouds=20 is neither an argument of search \(did you mean max_cloud=\?\) nor a STAC query term.*"
                 r"query=\{'sat:orbit_state'", id="search-misspelt-argument"),
    pytest.param(lambda: stac.search(BBOX, "2024-06", url=UNREACHABLE, query={"eo:cloud_cover": 20}), ValueError,
                 r"eo:cloud_cover=20 is neither.*operators: \['eq'", id="search-query-term-without-operator"),
    pytest.param(lambda: stac.search(_gdf_without_crs(), "2024-06", url=UNREACHABLE), ValueError,
                 r"AOI GeoDataFrame has no CRS.*set_crs\('EPSG:4326'\)", id="search-aoi-without-crs"),
    pytest.param(lambda: stac.open_sentinel(BBOX, "2024-06-30", "2024-06-01", url=UNREACHABLE), ValueError,
                 r"starts after it ends: 2024-06-30 > 2024-06-01.*swap", id="open-start-after-end"),
    pytest.param(lambda: stac.open_sentinel(BBOX, "2024-06-01", "2024-31-06", url=UNREACHABLE), ValueError,
                 r"'2024-31-06' is not a date", id="open-day-month-swapped"),
    pytest.param(lambda: stac.open_sentinel((179.0, 48.10, 181.0, 48.14), "2024-06-01", "2024-06-30", url=UNREACHABLE),
                 ValueError, r"longitude outside \[-180, 180\]", id="open-bbox-range"),
    pytest.param(lambda: stac.open_sentinel(BBOX, "2024-06-01", "2024-06-30", url=UNREACHABLE, resolutoin=20), TypeError,
                 r"unknown argument 'resolutoin'.*terrafm\.stac\.load.*resolution", id="open-unknown-load-kwarg"),
    pytest.param(lambda: stac.open_sentinel(BBOX, "2024-06-01", "2024-06-30", url=UNREACHABLE, resolution=0), ValueError,
                 r"resolution=0.*metres.*positive", id="open-resolution-zero"),
    pytest.param(lambda: stac.open_sentinel(BBOX, "2024-06-01", "2024-06-30", catalog="planetry-computer"), ValueError,
                 r"planetry-computer", id="open-unknown-catalog"),
]


@pytest.mark.parametrize("call, kind, message", STAC_CASES)
def test_stac_mistakes_raise_before_any_request(fake_client, call, kind, message):
    with pytest.raises(kind, match=message) as info:
        call()
    assert fake_client.searches == []
    assert raised_by_terrafm(info)


def test_dates_reach_the_api_in_stac_form(fake_client):
    """Datetime objects, pandas Timestamps and partial dates are sent as RFC 3339 / STAC ranges."""
    import pandas as pd

    for given, sent in [
        ((dt.datetime(2024, 6, 1, 12), dt.datetime(2024, 6, 30)), "2024-06-01T12:00:00Z/2024-06-30T00:00:00Z"),
        ((pd.Timestamp("2024-06-01"), dt.date(2024, 6, 30)), "2024-06-01T00:00:00Z/2024-06-30"),
        ("2024-06/2024-07", "2024-06/2024-07"),
        ("2024-06-15/2024-06", "2024-06-15/2024-06"),       # the end month includes the 15th: in order
        ("2024-06-01/..", "2024-06-01/.."),
    ]:
        FakeClient.searches = []
        with pytest.raises(ValueError, match="no items"):
            stac.search(BBOX, given, url=UNREACHABLE, collections=("sentinel-2-l2a",))
        assert FakeClient.searches[0]["datetime"] == sent, given


def test_a_single_collection_string_is_one_collection(fake_client):
    with pytest.raises(ValueError, match=r"no items in \['sentinel-2-l2a'\]"):
        stac.search(BBOX, "2024-06", url=UNREACHABLE, collections="sentinel-2-l2a")
    assert [s["collections"] for s in fake_client.searches] == [["sentinel-2-l2a"]] * len(fake_client.searches)


def test_query_terms_with_operators_reach_the_api(fake_client):
    with pytest.raises(ValueError, match="no items"):
        stac.search(BBOX, "2024-06", ("sentinel-1-rtc",), url=UNREACHABLE, query={"sat:orbit_state": {"eq": "ascending"}},
                    platform={"eq": "sentinel-1a"})
    assert fake_client.searches[0]["query"] == {"sat:orbit_state": {"eq": "ascending"}, "platform": {"eq": "sentinel-1a"}}
