"""Class 6 of issue 15: labels. Sentinels, NaN, single classes, mixed types, k larger than the data.

Rules under test (documented in ``terrafm.analysis.labels_to_grid`` and ``terrafm.evaluate``):
- training labels for ``fit_classifier``: -1, NaN and None mean "unlabelled" and are ignored;
  any other negative number is refused (a nodata sentinel such as -9999 must be declared or
  replaced by -1); one column mixes no value types; a cell given two classes is left unlabelled
  with a warning; only points and polygons are labels.
- evaluation labels for ``knn``/``knn_scores``: class indices 0..C-1 (whole numbers) or multi-hot
  0/1 rows; anything else is an error that says how to encode or filter them.
- ``k`` never exceeds the number of training vectors: an error naming both numbers.
"""

from __future__ import annotations

import re
import warnings

import geopandas as gpd
import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
from affine import Affine
from shapely.geometry import LineString, Point, box

from terrafm.analysis import fit_classifier, labels_to_grid
from terrafm.evaluate import knn, knn_scores
from bad_input_helpers import CRS, ORIGIN, RES, make_embedding  # noqa: E402

NY, NX, DEPTH = 12, 12, 8


@pytest.fixture(scope="module")
def emb() -> xr.DataArray:
    """Two separable halves: west cells near e0, east cells near e1."""
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.05, (NY, NX, DEPTH))
    values[:, : NX // 2, 0] += 1
    values[:, NX // 2 :, 1] += 1
    return make_embedding(values)


def cell_center(row: int, col: int) -> Point:
    return Point(ORIGIN[0] + RES * (col + 0.5), ORIGIN[1] - RES * (row + 0.5))


def points(cells: list[tuple[int, int]], classes: list, column: str = "class") -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({column: classes}, geometry=[cell_center(r, c) for r, c in cells], crs=CRS)


# 20 points: 10 west (col 1..2), 10 east (col 9..10)
WEST = [(r, c) for r in range(0, 10, 2) for c in (1, 2)]
EAST = [(r, c) for r in range(1, 11, 2) for c in (9, 10)]


def cell_box(rows: tuple[int, int], cols: tuple[int, int]):
    """Polygon covering cells rows[0]..rows[1]-1, cols[0]..cols[1]-1."""
    return box(ORIGIN[0] + RES * cols[0], ORIGIN[1] - RES * rows[1], ORIGIN[0] + RES * cols[1], ORIGIN[1] - RES * rows[0])


def raster(values: np.ndarray, nodata=None) -> xr.DataArray:
    """A label raster on exactly the embedding grid."""
    da = xr.DataArray(values, dims=("y", "x"),
                      coords={"y": ORIGIN[1] - RES * (np.arange(values.shape[0]) + 0.5),
                              "x": ORIGIN[0] + RES * (np.arange(values.shape[1]) + 0.5)})
    da = da.rio.write_crs(CRS).rio.write_transform(Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1]))
    return da if nodata is None else da.rio.write_nodata(nodata)


def halves(west_value, east_value, dtype) -> np.ndarray:
    grid = np.empty((NY, NX), dtype=dtype)
    grid[:, : NX // 2], grid[:, NX // 2 :] = west_value, east_value
    return grid


def expected_grid(cells, classes, ignored=(-1,)) -> tuple[np.ndarray, list]:
    """Independent rasterisation of point labels: class index per cell, -1 elsewhere."""
    kept = [(rc, c) for rc, c in zip(cells, classes) if c is not None and c == c and c not in ignored]
    names = sorted({c for _, c in kept})
    grid = np.full((NY, NX), -1)
    for (r, c), cls in kept:
        grid[r, c] = names.index(cls)
    return grid, names


# ---------------------------------------------------------------- labels that must be ignored, not become classes
IGNORED_CASES = [
    pytest.param(WEST + EAST + [(5, 5), (6, 6)], [1] * 10 + [2] * 10 + [-1, -1], id="int-minus-one-is-unlabelled"),
    pytest.param(WEST + EAST + [(5, 5)], [1.0] * 10 + [2.0] * 10 + [-1.0], id="float-minus-one-is-unlabelled"),
    pytest.param(WEST + EAST + [(5, 5), (6, 6)], [1.0] * 10 + [2.0] * 10 + [np.nan, np.nan], id="nan-is-unlabelled"),
    pytest.param(WEST + EAST + [(5, 5)], ["crop"] * 10 + ["forest"] * 10 + [None], id="none-in-str-is-unlabelled"),
]


@pytest.mark.parametrize("cells, classes", IGNORED_CASES)
def test_unlabelled_values_are_ignored_not_a_phantom_class(emb, cells, classes):
    grid, names = labels_to_grid(emb, points(cells, classes))
    ref_grid, ref_names = expected_grid(cells, classes)
    assert names == ref_names and len(names) == 2
    np.testing.assert_array_equal(grid, ref_grid)
    clf = fit_classifier(emb, points(cells, classes), k=3, block_size=3)
    assert clf.classes == ref_names and clf.report["n_train"] == 20
    out = clf.predict(emb)
    assert out.sizes["class_name"] == 2
    assert (out["class"].values[:, : NX // 2] == 0).all() and (out["class"].values[:, NX // 2 :] == 1).all()


def test_raster_minus_one_is_unlabelled(emb):
    values = halves(10, 30, "int16")
    values[:3, :3] = -1
    grid, names = labels_to_grid(emb, raster(values))
    assert names == [10, 30]
    expected = np.where(values == -1, -1, np.where(values == 10, 0, 1))
    np.testing.assert_array_equal(grid, expected)


def test_raster_declared_nodata_sentinel_is_unlabelled(emb):
    values = halves(10, 30, "int32")
    values[:3, :3] = -9999
    grid, names = labels_to_grid(emb, raster(values, nodata=-9999))
    assert names == [10, 30] and (grid[:3, :3] == -1).all() and (grid >= 0).sum() == NY * NX - 9


def test_float_raster_nan_nodata_is_unlabelled(emb):
    values = halves(10.0, 30.0, "float32")
    values[:3, :3] = np.nan
    grid, names = labels_to_grid(emb, raster(values, nodata=np.nan))
    assert names == [10, 30] and (grid[:3, :3] == -1).all() and (grid >= 0).sum() == NY * NX - 9


# ---------------------------------------------------------------- clear errors and warnings
def gdf_bad(kind: str) -> gpd.GeoDataFrame:
    if kind == "sentinel":
        return points(WEST + EAST + [(5, 5)], [1] * 10 + [2] * 10 + [-9999])
    if kind == "mixed":
        return points(WEST + EAST, [1] * 10 + ["forest"] * 10)
    if kind == "single-after-ignore":
        return points(WEST + EAST, [3] * 10 + [-1] * 10)
    if kind == "single":
        return points(WEST + EAST, ["water"] * 20)
    if kind == "lines":
        return gpd.GeoDataFrame({"class": ["road", "river"]},
                                geometry=[LineString([cell_center(0, 0), cell_center(5, 5)]),
                                          LineString([cell_center(0, 9), cell_center(9, 9)])], crs=CRS)
    raise AssertionError(kind)


def raster_bad(kind: str) -> xr.DataArray:
    if kind == "raster-sentinel":
        values = halves(10, 30, "int32")
        values[:2] = -9999
        return raster(values)
    if kind == "raster-continuous":
        return raster(halves(0.25, 0.75, "float32"))
    if kind == "raster-single":
        return raster(halves(0, 40, "uint8"))
    raise AssertionError(kind)


ERROR_CASES = [
    pytest.param("sentinel", {}, r"negative class value.*-9999.*only -1 means unlabelled.*replace.*-1", id="gdf-sentinel-9999"),
    pytest.param("mixed", {}, r"mixes value types.*int.*str.*astype\(str\)", id="gdf-mixed-int-str"),
    pytest.param("single-after-ignore", {}, r"single class \(3\).*add examples of other classes", id="gdf-single-after-minus-one"),
    pytest.param("single", {}, r"single class \('water'\).*add examples", id="gdf-single-class"),
    pytest.param("lines", {}, r"LineString.*points and polygons.*buffer", id="gdf-line-geometries"),
    pytest.param("raster-sentinel", {}, r"negative class value.*-9999.*write_nodata\(-9999\)", id="raster-sentinel-undeclared"),
    pytest.param("raster-continuous", {}, r"not whole numbers.*class codes.*astype", id="raster-continuous-values"),
    pytest.param("raster-single", {}, r"single class \(40\)", id="raster-single-class"),
    pytest.param("k-too-large", {"k": 50}, r"k=50 .*only 20 labelled positions.*lower k", id="k-larger-than-labels"),
    pytest.param("k-zero", {"k": 0}, r"k=0.*positive integer", id="k-zero"),
    pytest.param("k-float", {"k": 2.5}, r"k=2\.5.*positive integer", id="k-float"),
]


@pytest.mark.parametrize("kind, kwargs, message", ERROR_CASES)
def test_fit_classifier_bad_labels_raise_with_fix(emb, kind, kwargs, message):
    if kind.startswith("raster"):
        labels = raster_bad(kind)
    elif kind.startswith("k-"):
        labels = points(WEST + EAST, ["a"] * 10 + ["b"] * 10)
    else:
        labels = gdf_bad(kind)
    with pytest.raises(ValueError, match=message):
        fit_classifier(emb, labels, **kwargs)


def test_uint8_255_without_nodata_warns(emb):
    values = halves(10, 30, "uint8")
    values[:2, :2] = 255
    with pytest.warns(UserWarning, match=r"255.*often nodata.*write_nodata\(255\)"):
        grid, names = labels_to_grid(emb, raster(values))
    assert names == [10, 30, 255]      # taken as a class, as the raster says, but not silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        grid, names = labels_to_grid(emb, raster(values, nodata=255))
    assert names == [10, 30] and (grid[:2, :2] == -1).all()


def test_conflicting_point_labels_leave_the_cell_unlabelled(emb):
    cells = WEST + EAST + [(2, 1)]            # (2, 1) is already a west 'a' point: now also 'b'
    labels = points(cells, ["a"] * 10 + ["b"] * 10 + ["b"])
    with pytest.warns(UserWarning, match=r"1 cell.*different classes.*left unlabelled"):
        grid, names = labels_to_grid(emb, labels)
    ref, _ = expected_grid(WEST + EAST, ["a"] * 10 + ["b"] * 10)
    ref[2, 1] = -1
    np.testing.assert_array_equal(grid, ref)


def test_same_class_twice_on_a_cell_is_no_conflict(emb):
    labels = points(WEST + EAST + [(2, 1)], ["a"] * 10 + ["b"] * 10 + ["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        grid, _ = labels_to_grid(emb, labels)
    assert grid[2, 1] == 0 and (grid >= 0).sum() == 20


def test_overlapping_polygons_of_two_classes_leave_the_overlap_unlabelled(emb):
    labels = gpd.GeoDataFrame({"class": ["a", "b"]},
                              geometry=[cell_box((0, 6), (0, 7)), cell_box((0, 6), (5, 12))], crs=CRS)
    with pytest.warns(UserWarning, match=r"12 cells.*different classes.*left unlabelled"):
        grid, names = labels_to_grid(emb, labels)
    expected = np.full((NY, NX), -1)
    expected[:6, :5], expected[:6, 7:] = 0, 1
    np.testing.assert_array_equal(grid, expected)


# ---------------------------------------------------------------- kNN evaluation labels
def blobs(n_per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    x = np.r_[rng.normal(0, 1, (n_per_class, 6)) + 3, rng.normal(0, 1, (n_per_class, 6)) - 3]
    return x, np.r_[[0] * n_per_class, [1] * n_per_class]


KNN_LABEL_CASES = [
    pytest.param(lambda y: np.where(np.arange(len(y)) % 7 == 0, -1, y), "train",
                 r"train_labels contain negative values \[-1\].*class indices 0\.\.C-1.*keep = labels >= 0", id="knn-train-minus-one"),
    pytest.param(lambda y: np.where(np.arange(len(y)) % 5 == 0, -1, y), "val",
                 r"val_labels contain negative values \[-1\].*keep = labels >= 0", id="knn-val-minus-one"),
    pytest.param(lambda y: np.array(["crop", "forest"])[y], "train",
                 r"train_labels are str.*integer class indices.*np\.unique.*return_inverse=True", id="knn-str-labels"),
    pytest.param(lambda y: [1 if v else "forest" for v in y], "train",
                 r"train_labels are str.*np\.unique", id="knn-mixed-int-str"),
    pytest.param(lambda y: y + 0.5, "train", r"train_labels are not whole numbers.*class indices", id="knn-fractional-labels"),
    pytest.param(lambda y: np.c_[y, 1 - y] * 2, "train", r"multi-hot train_labels must hold 0/1.*found \[0, 2\]", id="knn-multihot-not-binary"),
]


@pytest.mark.parametrize("corrupt, which, message", KNN_LABEL_CASES)
def test_knn_bad_labels_raise_with_fix(corrupt, which, message):
    x, y = blobs()
    train_y = corrupt(y) if which == "train" else y
    val_y = corrupt(y) if which == "val" else y
    with pytest.raises(ValueError, match=message):
        knn(x, train_y, x, val_y, ks=(3,))


def test_knn_integral_float_labels_equal_int_labels():
    x, y = blobs()
    ref = knn(x, y, x[::-1], y[::-1], ks=(3, 5))
    assert knn(x, y.astype(float), x[::-1], y[::-1].astype(float), ks=(3, 5)) == ref


def test_knn_ks_larger_than_train_set_name_the_usable_ones():
    x, y = blobs(10)  # 20 training samples
    with pytest.raises(ValueError, match=re.escape("ks [30, 50, 100] exceed the 20 training samples") +
                       r".*pass ks=\(3, 5, 7, 10, 15, 20\)"):
        knn(x, y, x, y)


@pytest.mark.parametrize("k, message", [
    pytest.param(41, r"k=41 exceeds the 40 training samples.*k <= 40", id="knn-scores-k-too-large"),
    pytest.param(0, r"k=0.*positive integer", id="knn-scores-k-zero"),
    pytest.param(-2, r"k=-2.*positive integer", id="knn-scores-k-negative"),
])
def test_knn_scores_bad_k(k, message):
    x, y = blobs()
    with pytest.raises(ValueError, match=message):
        knn_scores(x, y, x[:3], k=k)


def test_knn_scores_k_equal_to_train_size_is_the_weighted_vote_of_all():
    x, y = blobs(5)
    query = x[:2] * 0.5
    probs = knn_scores(x, y, query, k=len(x), temperature=0.5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    w = np.exp(qn @ xn.T / 0.5)
    ref = np.stack([w[:, y == 0].sum(1), w[:, y == 1].sum(1)], 1) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, ref, rtol=1e-5)
