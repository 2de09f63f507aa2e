import geopandas as gpd
import numpy as np
import pytest
import xarray as xr
from affine import Affine
from shapely.geometry import Point, box

from analysis_helpers import CELLS, CRS, ORIGIN, RES, assert_georef, bigearthnet_features, make_embedding
from terrafm.analysis import fit_classifier, labels_to_grid

# BigEarthNet-19 primary label -> ESA WorldCover class
WORLDCOVER = {"Arable land": 40, "Pastures": 30, "Complex cultivation patterns": 40, "Coniferous forest": 10}


@pytest.fixture(scope="module")
def mosaic():
    """2x3 mosaic of the real BigEarthNet patches, 8x8 cells each, with one polygon per patch."""
    feats, names, labels = bigearthnet_features()
    grid = feats.reshape(2, 3, CELLS, CELLS, -1).transpose(0, 2, 1, 3, 4).reshape(2 * CELLS, 3 * CELLS, -1)
    emb = make_embedding(grid)
    polys, classes = [], []
    for i, patch_labels in enumerate(labels):
        r, c = divmod(i, 3)
        x0 = ORIGIN[0] + c * CELLS * RES
        y1 = ORIGIN[1] - r * CELLS * RES
        polys.append(box(x0, y1 - CELLS * RES, x0 + CELLS * RES, y1))
        classes.append(patch_labels[0])
    gdf = gpd.GeoDataFrame({"landcover": classes, "patch": names}, geometry=polys, crs=CRS)
    return emb, gdf


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_real_patches_blocked_cv(mosaic, method):
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    emb, gdf = mosaic
    clf = fit_classifier(emb, gdf.to_crs(4326), column="landcover", method=method, block_size=4, k=5)
    report = clf.report
    assert report["n_train"] == 6 * 64 and report["n_folds"] == 5
    # 4 classes, half the cells are 'Arable land': forest and complex cultivation are distinct
    # imagery, two arable patches and the pasture patch look alike (real data, honest numbers)
    assert report["accuracy"] > 0.7 and report["per_class_f1"]["Coniferous forest"] > 0.9
    # independent reference: scikit-learn's blocked CV on the same cells and 4x4-cell groups
    x = emb.values.reshape(-1, emb.sizes["embedding"])
    truth = labels_to_grid(emb, gdf, "landcover")[0]
    rows, cols = np.indices(truth.shape)
    groups = (rows // 4 * 100 + cols // 4).ravel()
    ref = cross_val_predict(KNeighborsClassifier(5, metric="cosine"), x, truth.ravel(), groups=groups,
                            cv=GroupKFold(5))
    assert abs(report["accuracy"] - accuracy_score(truth.ravel(), ref)) < 0.1
    # spatial leakage: with whole patches held out the same features score far lower
    held_out = fit_classifier(emb, gdf, column="landcover", method=method, block_size=8)
    assert held_out.report["accuracy"] < report["accuracy"] - 0.3
    out = clf.predict(emb)
    assert out.attrs["classes"] == sorted(set(gdf.landcover))
    assert (out["class"].values == truth).mean() > 0.8  # resubstitution
    np.testing.assert_allclose(out["probabilities"].sum("class_name").values, 1, atol=1e-5)
    assert_georef(out["class"], emb)
    assert_georef(out["probability"], emb)
    # labels unrelated to the imagery: blocked CV falls to chance level
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(emb.x.values, emb.y.values)
    cells = gpd.GeoDataFrame({"landcover": rng.choice(["a", "b", "c", "d"], xs.size)},
                             geometry=gpd.points_from_xy(xs.ravel(), ys.ravel()), crs=CRS)
    noise = fit_classifier(emb, cells, column="landcover", method=method, block_size=4)
    assert noise.report["accuracy"] < 0.4


def test_points_in_another_crs_are_reprojected(mosaic):
    emb, _ = mosaic
    xs, ys = np.meshgrid(emb.x.values[::3], emb.y.values[::3])
    classes = np.where(xs.ravel() > ORIGIN[0] + 1.5 * CELLS * RES, "east", "west")
    native = gpd.GeoDataFrame({"class": classes}, geometry=gpd.points_from_xy(xs.ravel(), ys.ravel()), crs=CRS)
    grid_native, names = labels_to_grid(emb, native)
    grid_ll, names_ll = labels_to_grid(emb, native.to_crs(4326))
    np.testing.assert_array_equal(grid_native, grid_ll)
    assert names == names_ll == ["east", "west"] and (grid_native >= 0).sum() == len(native)
    assert fit_classifier(emb, native.to_crs(4326)).report["n_train"] == len(native)


def test_worldcover_raster_uses_mode(mosaic):
    emb, gdf = mosaic
    classes = np.array([WORLDCOVER[c] for c in gdf.landcover]).reshape(2, 3)
    per_cell = np.kron(classes, np.ones((CELLS, CELLS), int))  # (16, 24) true class per 160 m cell
    fine = np.kron(per_cell, np.ones((16, 16), int))  # 10 m
    rng = np.random.default_rng(0)
    speckle = rng.random(fine.shape) < 0.35
    fine = np.where(speckle, 80, fine)  # 35% water speckle: the mode is still the patch class
    fine[:16, :16] = 0  # WorldCover "no data" over one whole cell
    raster = xr.DataArray(fine.astype("uint8"), dims=("y", "x"),
                          coords={"y": ORIGIN[1] - 10 * (np.arange(fine.shape[0]) + 0.5),
                                  "x": ORIGIN[0] + 10 * (np.arange(fine.shape[1]) + 0.5)})
    raster = raster.rio.write_crs(CRS).rio.write_transform(Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]))
    grid, names = labels_to_grid(emb, raster)
    assert names == [10, 30, 40]
    decoded = np.where(grid >= 0, np.array(names)[np.clip(grid, 0, None)], 0)
    expected = per_cell.copy()
    expected[0, 0] = 0
    np.testing.assert_array_equal(decoded, expected)
    # the same raster delivered in EPSG:4326 (as WorldCover is): reprojected, still mostly right
    grid_ll, _ = labels_to_grid(emb, raster.rio.reproject("EPSG:4326"))
    decoded_ll = np.where(grid_ll >= 0, np.array(names)[np.clip(grid_ll, 0, None)], 0)
    assert (decoded_ll == expected).mean() > 0.9
    clf = fit_classifier(emb, raster, method="linear", block_size=4)
    assert clf.report["accuracy"] > 0.7 and clf.classes == [10, 30, 40]


def test_bad_labels(mosaic):
    emb, gdf = mosaic
    one = gdf.assign(landcover="Arable land")
    with pytest.raises(ValueError, match="single class"):
        fit_classifier(emb, one, column="landcover")
    with pytest.raises(ValueError, match="no column"):
        fit_classifier(emb, gdf, column="crop")
    with pytest.raises(ValueError, match="no CRS"):
        fit_classifier(emb, gdf.set_crs(None, allow_override=True), column="landcover")
    far = gpd.GeoDataFrame({"class": ["a", "b"]}, geometry=[Point(100, -30), Point(101, -30)], crs=4326)
    with pytest.raises(ValueError, match="overlap"):
        fit_classifier(emb, far)
    with pytest.raises(ValueError, match="no valid positions"):
        fit_classifier(emb, gdf, column="landcover").predict(make_embedding(np.full((4, 4, 8), np.nan)))
    with pytest.raises(ValueError, match="same model"):
        fit_classifier(emb, gdf, column="landcover").predict(make_embedding(np.ones((4, 4, 3))))
    with pytest.raises(ValueError, match="method"):
        fit_classifier(emb, gdf, column="landcover", method="svm")
