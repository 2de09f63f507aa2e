"""Stores others can read (issue 17 part 3): the STAC Item beside a store, plain xarray/rioxarray
georeferencing, foreign GeoTIFF/zarr vectors through open_embedding, and resume per time step."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from terrafm.store import open_embedding, stac_item_path, write_stac_item

sys.path.insert(0, str(Path(__file__).parents[1] / "bad_inputs"))
from bad_input_helpers import interrupted_embed  # noqa: E402  (the suite's interruption helper)

KW = dict(chip_size=64, overlap=0, block_chips=1, batch_size=4, device="cpu", progress=False)


@pytest.fixture(scope="module")
def series_model():
    import torch

    from terrafm.model import create_model

    torch.manual_seed(0)
    return create_model("terrafm_tiny", seed=0).eval()


@pytest.fixture(scope="module")
def series_ds():
    from embed_helpers import make_dataset

    ds = make_dataset(height=64, width=128, times=3)
    ds.attrs["terrafm_items"] = ["sentinel-2-l2a/S2A_A", "sentinel-2-l2a/S2A_B", "sentinel-1-grd/S1A_C"]
    return ds


@pytest.fixture(scope="module")
def series_run(tmp_path_factory, series_ds, series_model):
    """An uninterrupted series embed: its store and the number of model forwards it took."""
    from terrafm.embed import embed

    out = tmp_path_factory.mktemp("series") / "series.zarr"
    with pytest.MonkeyPatch.context() as patch:
        calls = _forwards(patch, series_model)
        embed(series_ds, model=series_model, out=out, **KW)
    return out, len(calls)


@pytest.fixture(scope="module")
def series_store(series_run):
    return series_run[0]


def _forwards(monkeypatch, model):
    calls = []
    original = model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


def test_resume_per_time_step_recomputes_only_missing_dates(tmp_path, monkeypatch, series_ds, series_model,
                                                            series_run):
    import zarr

    from terrafm.embed import embed

    series_store, full_forwards = series_run
    full = zarr.open_group(str(series_store), mode="r")
    blocks_per_date = int(np.asarray(full["blocks_done"][0]).size)
    assert blocks_per_date >= 2 and full["blocks_done"].shape[0] == 3
    out = tmp_path / "resumed.zarr"
    interrupted_embed(monkeypatch, series_ds, out, after=blocks_per_date, model=series_model, **KW)
    done = np.asarray(zarr.open_group(str(out), mode="r")["blocks_done"][...])
    assert done[0].all() and not done[1:].any()          # first date finished, the others not started
    assert not stac_item_path(out).exists()              # no Item for an unfinished store

    calls = _forwards(monkeypatch, series_model)
    embed(series_ds, model=series_model, out=out, **KW)
    assert len(calls) > 0 and len(calls) * 3 == full_forwards * 2   # only the 2 missing dates recomputed
    assert stac_item_path(out).is_file()
    a, b = zarr.open_group(str(out), mode="r"), full
    for name in ("embedding_vectors", "valid", "valid_s1", "valid_s2_l2a", "blocks_done"):
        np.testing.assert_array_equal(np.asarray(a[name][...]), np.asarray(b[name][...]), strict=True)
        assert np.asarray(a[name][...]).tobytes() == np.asarray(b[name][...]).tobytes()


def test_stac_item_beside_a_finished_store(series_store, series_model):
    import pystac
    from pyproj import Transformer
    from pystac.extensions.projection import ProjectionExtension

    path = stac_item_path(series_store)
    assert path.is_file()
    item = pystac.Item.from_file(str(path))
    emb = open_embedding(series_store)
    # footprint recomputed independently: the store's corners + densified edges through pyproj
    x, y = emb.x.values.astype("float64"), emb.y.values.astype("float64")
    res = x[1] - x[0]
    left, right = x[0] - res / 2, x[-1] + res / 2
    top, bottom = y[0] + res / 2, y[-1] - res / 2
    bounds = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True).transform_bounds(
        left, bottom, right, top, densify_pts=21)
    np.testing.assert_allclose(item.bbox, bounds, atol=1e-7)
    ring = np.asarray(item.geometry["coordinates"][0])
    assert item.geometry["type"] == "Polygon"
    np.testing.assert_allclose([ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()],
                               bounds, atol=1e-7)
    proj = ProjectionExtension.ext(item)
    assert proj.code == "EPSG:32618"
    assert proj.shape == [emb.sizes["y"], emb.sizes["x"]]
    assert proj.transform == [res, 0.0, left, 0.0, -res, top]
    assert item.datetime is None
    assert item.common_metadata.start_datetime.isoformat() == "2024-01-15T00:00:00+00:00"
    assert item.common_metadata.end_datetime.isoformat() == "2024-03-15T00:00:00+00:00"
    props = item.properties
    assert props["mlm:name"] == "terrafm_tiny"
    from terrafm.embed import _weights_digest

    assert props["terrafm:weights"] == _weights_digest(series_model)
    assert props["terrafm:fusion"] == series_model.fusion_mode
    assert props["terrafm:level"] == "patch"
    assert props["terrafm:input_items"] == ["sentinel-2-l2a/S2A_A", "sentinel-2-l2a/S2A_B", "sentinel-1-grd/S1A_C"]
    assert props["cube:dimensions"]["embedding"]["extent"] == [0, emb.sizes["embedding"] - 1]
    assert len(props["cube:dimensions"]["time"]["values"]) == 3
    asset = item.assets["data"]
    assert asset.media_type == "application/vnd+zarr"
    assert asset.get_absolute_href() == str(series_store)
    assert all(u.startswith("https://stac-extensions.github.io/") for u in item.stac_extensions)
    # pystac bundles the core STAC 1.1 schemas (validated offline); extension schemas need the network
    core_only = {**json.loads(path.read_text()), "stac_extensions": []}
    assert pystac.validation.validate_dict(core_only) == [
        "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"]
    with pytest.raises(pystac.errors.STACValidationError):
        pystac.validation.validate_dict({**core_only, "bbox": "whole world"})
    # rewriting replaces a terrafm Item (also one copied with the store); another file only with overwrite=True
    assert write_stac_item(series_store) == path
    import shutil

    other = series_store.with_name("other.zarr")
    shutil.copytree(series_store, other)
    assert pystac.Item.from_file(str(write_stac_item(other))).id == "other"
    stac_item_path(other).write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_stac_item(other)
    assert stac_item_path(other).read_text() == "{}"
    assert write_stac_item(other, overwrite=True) == stac_item_path(other)
    # zarr and open_embedding ignore the Item inside the store
    np.testing.assert_array_equal(np.asarray(open_embedding(other)), np.asarray(open_embedding(series_store)))


def test_store_georeferencing_with_plain_xarray_rioxarray(series_store):
    import rioxarray  # noqa: F401

    emb = open_embedding(series_store)
    plain = xr.open_zarr(series_store, consolidated=False)["embedding_vectors"]   # no terrafm code
    assert plain.rio.crs.to_epsg() == 32618
    assert tuple(plain.rio.transform())[:6] == tuple(emb.rio.transform())[:6]
    x0, y0 = 500000.0, 4100000.0   # make_dataset's corner; patch grid = 16 x 10 m
    assert tuple(plain.rio.transform())[:6] == (160.0, 0.0, x0, 0.0, -160.0, y0)


def _gdal_bands(path: Path, variable: str = "embedding_vectors") -> dict:
    """The store's array through GDAL's zarr driver (rasterio's GDAL), with no open options."""
    import rasterio

    with rasterio.open(f'ZARR:"{path}":/{variable}') as src:
        return {"count": src.count, "shape": (src.height, src.width), "crs": src.crs,
                "transform": tuple(src.transform)[:6], "tags": [src.tags(b) for b in range(1, src.count + 1)],
                "values": src.read()}


def test_series_store_opens_in_gdal_as_a_band_per_date_and_component(series_store):
    """GDAL takes x/y as the raster axes (CF standard_name) and (time, embedding) as bands, with the
    store's CRS and transform: no conversion, no open options."""
    emb = open_embedding(series_store).load()
    t, h, w, d = emb.shape
    gdal = _gdal_bands(series_store)
    assert gdal["count"] == t * d and gdal["shape"] == (h, w)
    assert gdal["crs"].to_epsg() == 32618
    assert gdal["transform"] == (160.0, 0.0, 500000.0, 0.0, -160.0, 4100000.0)
    for band, tags in enumerate(gdal["tags"]):
        ti, k = int(tags["DIM_time_INDEX"]), int(tags["DIM_embedding_INDEX"])
        np.testing.assert_array_equal(gdal["values"][band], emb.values[ti, :, :, k])   # NaN where invalid too
    assert {int(tags["DIM_time_INDEX"]) for tags in gdal["tags"]} == set(range(t))


def test_to_zarr_store_opens_in_gdal_projected_and_geographic(tmp_path):
    """analysis.to_zarr writes the same layout: a UTM embedding and one on a lon/lat grid open in GDAL
    with their own CRS and transform, the vector as bands."""
    import rioxarray  # noqa: F401

    from terrafm.analysis import to_zarr

    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 6, 3)).astype("float32")
    cases = {"utm": (32633, 300000 + 160 * np.arange(6) + 80, 5000000 - 160 * np.arange(4) - 80,
                     (160.0, 0.0, 300000.0, 0.0, -160.0, 5000000.0)),
             "lonlat": (4326, 10 + 0.002 * np.arange(6) + 0.001, 50 - 0.002 * np.arange(4) - 0.001,
                        (0.002, 0.0, 10.0, 0.0, -0.002, 50.0))}
    for name, (epsg, xs, ys, transform) in cases.items():
        emb = xr.DataArray(values, dims=("y", "x", "embedding"), coords={"y": ys, "x": xs}, name="embedding")
        emb = emb.assign_coords(valid=(("y", "x"), np.ones((4, 6), bool))).rio.write_crs(epsg)
        path = to_zarr(emb, tmp_path / f"{name}.zarr")
        gdal = _gdal_bands(path)
        assert gdal["count"] == 3 and gdal["shape"] == (4, 6) and gdal["crs"].to_epsg() == epsg, name
        np.testing.assert_allclose(gdal["transform"], transform, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(gdal["values"], values.transpose(2, 0, 1))
        assert "standard_name" not in emb["x"].attrs        # the caller's array is not modified
        np.testing.assert_array_equal(open_embedding(path).values, values)


def test_a_zarr_v3_store_of_an_earlier_version_still_opens_and_resumes(tmp_path, monkeypatch, series_ds,
                                                                      series_model, series_store):
    """Stores are written as zarr v2 now; a v3 store (terrafm before this change) keeps working: it
    opens, and an unfinished one resumes in place (v3), computing only its missing date."""
    import zarr

    from terrafm.embed import embed

    old = tmp_path / "v3.zarr"
    v2 = xr.open_zarr(series_store, consolidated=False)
    for var in v2.variables.values():          # v2's compressor is no v3 codec: zarr 3's defaults instead
        var.encoding = {k: var.encoding[k] for k in ("chunks", "dtype", "_FillValue", "units", "calendar")
                        if k in var.encoding}
    v2.to_zarr(old, zarr_format=3, consolidated=False)
    group = zarr.open_group(str(old), mode="r+")
    assert group.metadata.zarr_format == 3
    done = group["blocks_done"][...]
    group["blocks_done"][1] = 0                                        # date 1 "not computed yet"
    group["embedding_vectors"][1] = np.nan
    calls = _forwards(monkeypatch, series_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        resumed = embed(series_ds, model=series_model, out=old, **KW)
    assert len(calls) == int(done[1].sum())                            # one forward per block of date 1
    assert zarr.open_group(str(old), mode="r").metadata.zarr_format == 3
    np.testing.assert_array_equal(resumed.values, open_embedding(series_store).values)


def _foreign_vectors(tmp_path, dtype="float32", nodata=-9999.0):
    """A 'foreign' product: 5-band GeoTIFF of vectors, EPSG:32633, 30 m, north-up, some nodata cells."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(5, 7, 9)).astype("float64")
    if dtype != "float32":
        vectors = np.round(vectors * 40)
    vectors[:, 2, 3] = nodata
    path = tmp_path / "vectors.tif"
    with rasterio.open(path, "w", driver="COG", width=9, height=7, count=5, dtype=dtype, crs="EPSG:32633",
                       transform=from_origin(300000, 5000000, 30, 30), nodata=nodata, blocksize=256) as dst:
        dst.write(vectors.astype(dtype))
    return path, vectors


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_foreign_cog_round_trips_through_similarity_and_to_cog(tmp_path, dtype):
    import rasterio

    from terrafm.analysis import similarity, to_cog

    path, vectors = _foreign_vectors(tmp_path, dtype)
    emb = open_embedding(path)
    assert emb.dims == ("y", "x", "embedding") and emb.dtype == np.float32
    assert emb.rio.crs.to_epsg() == 32633
    assert tuple(emb.rio.transform())[:6] == (30.0, 0.0, 300000.0, 0.0, -30.0, 5000000.0)
    valid = np.asarray(emb.valid)
    assert valid.sum() == 62 and not valid[2, 3]
    query = vectors[:, 4, 6].astype("float32").astype("float64")
    sim = similarity(emb, query)
    out = to_cog(sim, tmp_path / "sim.tif")
    v = np.moveaxis(vectors.astype(dtype).astype("float64"), 0, -1)
    expected = (v @ query) / (np.linalg.norm(v, axis=-1) * np.linalg.norm(query))
    expected[2, 3] = np.nan
    with rasterio.open(out) as src:
        got = src.read(1)
        assert src.crs.to_epsg() == 32633 and src.transform == rasterio.open(path).transform
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert got[4, 6] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dim", ["band", "feature"])
def test_foreign_zarr_with_other_vector_dim_name(tmp_path, dim):
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    gbox = GeoBox.from_bbox((600000, 200000, 600400, 200300), "EPSG:32631", resolution=100)
    values = np.random.default_rng(1).normal(size=(4, *gbox.shape)).astype("float64")   # (dim, y, x): other order
    values[:, 0, 0] = np.nan
    ds = xr.Dataset({"vectors": ((dim, "y", "x"), values)}, coords=xr_coords(gbox, crs_coord_name="spatial_ref"))
    store = tmp_path / "foreign.zarr"
    ds.to_zarr(store, consolidated=False)
    emb = open_embedding(store, vector_dim=dim)
    assert emb.dims == ("y", "x", "embedding") and emb.sizes["embedding"] == 4
    assert emb.rio.crs.to_epsg() == 32631
    np.testing.assert_array_equal(np.asarray(emb.valid), np.isfinite(values).all(0))
    np.testing.assert_allclose(np.asarray(emb)[1:, 1:], np.moveaxis(values, 0, -1)[1:, 1:].astype("float32"))
    assert open_embedding(store).dims == emb.dims   # the only non-spatial dim is found without vector_dim
    with pytest.raises(ValueError, match="plus a vector dim 'nope'"):
        open_embedding(store, vector_dim="nope")
    with pytest.raises(ValueError, match="no dim 'nope'"):
        open_embedding(store, vector_dim="nope", variable="vectors")


def test_foreign_inputs_refused_with_clear_errors(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    one = tmp_path / "one_band.tif"
    with rasterio.open(one, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(0, 40, 10, 10)) as dst:
        dst.write(np.ones((1, 4, 4), "float32"))
    with pytest.raises(ValueError, match="not a vector"):
        open_embedding(one)
    no_crs = tmp_path / "no_crs.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(no_crs, "w", driver="GTiff", width=4, height=4, count=3, dtype="float32") as dst:
            dst.write(np.ones((3, 4, 4), "float32"))
        with pytest.raises(ValueError, match="no CRS"):
            open_embedding(no_crs)
    flat = tmp_path / "table.zarr"
    xr.Dataset({"v": (("row", "feature"), np.ones((3, 4)))}).to_zarr(flat, consolidated=False)
    with pytest.raises(ValueError, match="spatial dims 'y' and 'x'"):
        open_embedding(flat)
    with pytest.raises(ValueError, match="not a zarr store"):
        write_stac_item(one)
