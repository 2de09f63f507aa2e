"""The flow from a shell: ``terrafm embed`` with its analyst options against the suite's local STAC API,
and ``terrafm rgb | similar | change | classify | export`` on small stores, each output checked against
the library called directly (same pixels, same rows); bad arguments are one line, exit code 2."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

from analysis_helpers import make_embedding

import terrafm
from terrafm import analysis
from terrafm.cli import build_parser, main

UNREACHABLE = "http://127.0.0.1:9/stac"     # never contacted: every refusal below comes before the search
BLOCK = (slice(2, 6), slice(2, 6))          # the changed block (rows, cols)
CHANGE_STEP = 3                             # the series changes on BLOCK from this date on


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Single-date stores a, b (b: BLOCK flipped), a 5-date series changing at CHANGE_STEP, point labels."""
    import geopandas as gpd

    root = tmp_path_factory.mktemp("cli_stores")
    rng = np.random.default_rng(7)
    base = rng.normal(size=(12, 10, 8)).astype(np.float32)
    base[:6, :, :4] += 4.0                  # two classes apart in cosine: top and bottom halves
    base[6:, :, 4:] += 4.0
    base[11, 9] = np.nan                    # one invalid position
    later = base.copy()
    later[BLOCK] = -later[BLOCK]
    noise = [rng.normal(scale=0.05, size=base.shape).astype(np.float32) for _ in range(5)]
    series = np.stack([(later if t >= CHANGE_STEP else base) + noise[t] for t in range(5)])
    times = np.array(["2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01", "2024-05-01"], "datetime64[ns]")
    paths = {"a": root / "a.zarr", "b": root / "b.zarr", "series": root / "series.zarr"}
    analysis.to_zarr(make_embedding(base), paths["a"])
    analysis.to_zarr(make_embedding(later), paths["b"])
    analysis.to_zarr(make_embedding(series, times=times), paths["series"])
    emb = terrafm.open_embedding(paths["a"])
    rows, cols = np.meshgrid(np.arange(0, 12, 2), np.arange(0, 10, 3), indexing="ij")
    labels = gpd.GeoDataFrame({"land": np.where(rows.ravel() < 6, "crop", "water")},
                              geometry=gpd.points_from_xy(emb.x.values[cols.ravel()], emb.y.values[rows.ravel()]),
                              crs=emb.rio.crs).to_crs(4326)
    paths["labels"] = root / "labels.parquet"
    labels.to_parquet(paths["labels"])
    return {k: str(v) for k, v in paths.items()}


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def read_tif(path) -> tuple[np.ndarray, rasterio.Affine, dict, list]:
    """Pixels, transform, tags and the band names the CLI records in the 'bands' tag."""
    import json

    with rasterio.open(path) as src:
        tags = src.tags()
        return src.read(), src.transform, tags, json.loads(tags["bands"]) if "bands" in tags else []


def assert_same_grid(transform, emb) -> None:
    assert tuple(transform) == pytest.approx(tuple(emb.rio.transform(recalc=True)))


def lonlat_of(emb, row: int, col: int) -> tuple[float, float]:
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs(emb.rio.crs, 4326, always_xy=True)
    return to_lonlat.transform(float(emb.x[col]), float(emb.y[row]))


# ---------------------------------------------------------------------- store commands, end to end
def test_rgb_matches_to_rgb_and_refuses_to_overwrite(stores, tmp_path, capsys):
    out = tmp_path / "rgb.tif"
    assert run(capsys, "rgb", stores["a"], "--out", out)[0] == 0
    pixels, transform, _, _ = read_tif(out)
    emb = terrafm.open_embedding(stores["a"])
    expected = analysis.to_rgb(emb).transpose("band", "y", "x").values
    np.testing.assert_allclose(pixels, expected, atol=1e-6, equal_nan=True)
    assert np.isnan(pixels[:, 11, 9]).all() and np.isfinite(pixels[:, :11]).all()
    assert_same_grid(transform, emb)
    code, err = run(capsys, "rgb", stores["a"], "--out", out)
    assert code == 2 and "--overwrite" in err
    # a series needs --time; date 4 of the series (the changed date), not date 0
    assert run(capsys, "rgb", stores["series"], "--time", 4, "--out", out, "--overwrite")[0] == 0
    series = terrafm.open_embedding(stores["series"])
    np.testing.assert_allclose(read_tif(out)[0], analysis.to_rgb(series.isel(time=4)).transpose("band", "y", "x"),
                               atol=1e-6, equal_nan=True)


def test_similar_point_and_vector_file_match_the_library(stores, tmp_path, capsys):
    emb = terrafm.open_embedding(stores["a"])
    lon, lat = lonlat_of(emb, 4, 3)
    sim_path, top_path = tmp_path / "sim.tif", tmp_path / "top.parquet"
    code, _ = run(capsys, "similar", stores["a"], "--point", repr(lon), repr(lat), "--out", sim_path,
                  "--top-k", 5, "--top-out", top_path)
    assert code == 0
    expected = analysis.similarity(emb, (lon, lat)).compute()
    pixels, transform, _, _ = read_tif(sim_path)
    np.testing.assert_allclose(pixels[0], expected.values, atol=1e-6, equal_nan=True)
    assert pixels[0, 4, 3] == pytest.approx(1.0, abs=1e-6)       # the query position is its own best match
    assert_same_grid(transform, emb)
    import geopandas as gpd

    top = gpd.read_parquet(top_path)
    reference = analysis.top_k(expected, k=5)
    assert top[["rank", "row", "col"]].values.tolist() == reference[["rank", "row", "col"]].values.tolist()
    assert (top.iloc[0]["row"], top.iloc[0]["col"]) == (4, 3)
    # float64 (n, D) query vectors from a file: the float64 recomputation of the cosine, max over queries
    vectors = np.stack([emb.values[0, 0], emb.values[9, 8]]).astype(np.float64)
    np.save(tmp_path / "q.npy", vectors)
    assert run(capsys, "similar", stores["a"], "--vector-file", tmp_path / "q.npy", "--out", sim_path,
               "--overwrite")[0] == 0
    flat = emb.values.reshape(-1, 8).astype(np.float64)
    cos = (flat @ vectors.T) / np.linalg.norm(flat, axis=1)[:, None] / np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(read_tif(sim_path)[0][0].ravel(), cos.max(1), atol=1e-5, equal_nan=True)


def test_change_of_two_stores_and_of_a_series_with_first_persistent_change(stores, tmp_path, capsys):
    a, b = terrafm.open_embedding(stores["a"]), terrafm.open_embedding(stores["b"])
    assert run(capsys, "change", stores["a"], stores["b"], "--out", tmp_path / "pair.tif")[0] == 0
    pixels, transform, tags, names = read_tif(tmp_path / "pair.tif")
    expected = analysis.change(a, b).compute()
    assert names == ["distance", "changed"]
    np.testing.assert_allclose(pixels[0], expected["distance"].values, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(pixels[1], expected["changed"].values)
    changed = np.zeros((12, 10), bool)
    changed[BLOCK] = True
    np.testing.assert_array_equal(pixels[1][:11] == 1, changed[:11])   # flipped vectors: distance 2 on BLOCK
    assert float(tags["threshold"]) == pytest.approx(expected.attrs["threshold"])
    assert_same_grid(transform, a)

    series = terrafm.open_embedding(stores["series"])
    code, _ = run(capsys, "change", stores["series"], "--out", tmp_path / "steps.tif", "--threshold", "0.5",
                  "--first-change", tmp_path / "first.tif", "--min-steps", 2)
    assert code == 0
    steps, _, _, names = read_tif(tmp_path / "steps.tif")
    expected = analysis.change(series, threshold=0.5).compute()
    assert names[:4] == ["distance_2024-02-01", "distance_2024-03-01", "distance_2024-04-01", "distance_2024-05-01"]
    np.testing.assert_allclose(steps[:4], expected["distance"].values, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(steps[4:], expected["changed"].values)
    first, _, tags, _ = read_tif(tmp_path / "first.tif")
    reference = analysis.first_persistent_change(series, threshold=0.5, min_steps=2)["first_change_index"]
    np.testing.assert_array_equal(first[0], reference.values)
    hand = np.where(changed, CHANGE_STEP, -1)                    # the injected change: date 3 on BLOCK only
    np.testing.assert_array_equal(first[0][:11], hand[:11])
    assert "2024-04-01" in tags["dates"] and tags["min_steps"] == "2"


def test_classify_matches_fit_classifier_and_predict(stores, tmp_path, capsys):
    import geopandas as gpd

    out = tmp_path / "classes.tif"
    assert run(capsys, "classify", stores["a"], "--labels", stores["labels"], "--column", "land", "--k", 3,
               "--out", out)[0] == 0
    emb = terrafm.open_embedding(stores["a"])
    labels = gpd.read_parquet(stores["labels"])
    pred = analysis.fit_classifier(emb, labels, column="land", k=3).predict(emb).compute()
    pixels, transform, tags, names = read_tif(out)
    assert names == ["class", "probability"]
    np.testing.assert_array_equal(pixels[0], pred["class"].values)
    np.testing.assert_allclose(pixels[1], pred["probability"].values, atol=1e-6, equal_nan=True)
    truth = np.where(np.arange(12) < 6, 0, 1)[:, None] * np.ones(10)          # classes ['crop', 'water']
    assert "crop" in tags["classes"] and (pixels[0][:11] == truth[:11]).all()
    assert_same_grid(transform, emb)
    assert run(capsys, "classify", stores["a"], "--labels", stores["labels"], "--column", "land",
               "--method", "logreg", "--out", out, "--overwrite")[0] == 0
    linear = analysis.fit_classifier(emb, labels, column="land", method="linear").predict(emb).compute()
    np.testing.assert_array_equal(read_tif(out)[0][0], linear["class"].values)


def test_export_to_cog_geoparquet_and_zarr_keeps_every_vector(stores, tmp_path, capsys):
    import geopandas as gpd

    emb = terrafm.open_embedding(stores["series"])
    assert run(capsys, "export", stores["series"], "--to", "cog", "--time", 1, "--out", tmp_path / "v.tif")[0] == 0
    pixels, transform, _, _ = read_tif(tmp_path / "v.tif")
    np.testing.assert_array_equal(pixels, emb.isel(time=1).transpose("embedding", "y", "x").values)
    assert_same_grid(transform, emb)
    assert run(capsys, "export", stores["series"], "--to", "geoparquet", "--out", tmp_path / "v.parquet")[0] == 0
    rows = gpd.read_parquet(tmp_path / "v.parquet")
    reference = analysis.to_geoparquet(emb.load())
    assert len(rows) == len(reference) == 5 * (12 * 10 - 1)
    assert rows[["row", "col"]].values.tolist() == reference[["row", "col"]].values.tolist()
    np.testing.assert_array_equal(np.stack(rows["vector"]), np.stack(reference["vector"]))
    assert run(capsys, "export", stores["series"], "--to", "zarr", "--out", tmp_path / "copy.zarr")[0] == 0
    copy = terrafm.open_embedding(tmp_path / "copy.zarr")
    np.testing.assert_array_equal(copy.values, emb.values)
    assert copy.rio.crs == emb.rio.crs and (copy["time"].values == emb["time"].values).all()


# ---------------------------------------------------------------------- embed with the analyst options
def test_embed_options_against_the_local_stac_api(stac_api_url, sentinel_scene, tmp_path, capsys):
    west, south, east, north = sentinel_scene.aoi_bbox
    east, north = west + 0.3 * (east - west), south + 0.3 * (north - south)   # ~1.5 km: 3 x 3 chips of 64 px
    bbox = (west, south, east, north)
    out = tmp_path / "monthly.zarr"
    start, end = "2021-06-10", "2021-07-20"     # S2 on 06-15, 06-25, 07-05 (55 % cloud: dropped), 07-15
    code, err = run(capsys, "embed", "--bbox", west, south, east, north, "--start", start, "--end", end,
                    "--out", out, "--catalog", stac_api_url,
                    "--collections", "sentinel-2-l2a", "--max-cloud", 40, "--composite", "monthly",
                    "--chip-size", 64, "--overlap", "fast", "--batch-size", 8, "--precision", "fp32",
                    "--modalities", "s2_l2a", "--model", "terrafm_tiny", "--weights", "random", "--device", "cpu")
    assert code == 0, err
    stored = terrafm.open_embedding(out)
    ds = terrafm.open_sentinel(bbox, start, end, collections=("sentinel-2-l2a",), max_cloud=40,
                               url=stac_api_url)
    assert [str(t)[:10] for t in ds["time"].values] == ["2021-06-15", "2021-06-25", "2021-07-15"]
    ds = terrafm.prepare.composite(ds, "month")
    expected = terrafm.embed(ds, model="terrafm_tiny", weights="random", chip_size=64, overlap=0, batch_size=8,
                             precision="fp32", modalities=["s2_l2a"], device="cpu", progress=False)
    assert [str(t)[:10] for t in stored["time"].values] == ["2021-06-01", "2021-07-01"]
    assert stored.attrs["chip_size"] == 64 and stored.attrs["overlap"] == 0
    assert list(stored.attrs["modalities"]) == ["s2_l2a"]
    assert min(stored.sizes["y"], stored.sizes["x"]) >= 8 and np.isfinite(stored.values).mean() > 0.5
    np.testing.assert_array_equal(stored.values, expected.values)


@pytest.mark.parametrize("extra, message", [
    (["--chip-size", "50"], r"--chip-size 50 / --overlap None: chip_size=50 is not a positive multiple of 16"),
    (["--overlap", "7"], r"--overlap 7: overlap margin=7 must be a non-negative multiple of 16"),
    (["--chip-size", "64", "--overlap", "32"], r"leaves no interior in a 64 px chip"),
    (["--overlap", "wide"], r"overlap='wide' is not a setting.*fast"),
    (["--max-cloud", "120"], r"--max-cloud 120: cloud cover is a percentage in \[0, 100\]"),
    (["--composite", "weekly"], r"--composite 'weekly' is not a period; use monthly or seasonal"),
    (["--batch-size", "0"], r"--batch-size 0: chips per forward pass must be >= 1"),
    (["--modalities", "s3"], r"--modalities: unknown modality 's3'; registered:"),
    (["--precision", "fp8"], r"argument --precision: invalid choice: 'fp8'"),
], ids=["chip-size", "overlap-px", "overlap-too-wide", "overlap-name", "max-cloud", "composite", "batch-size",
        "modality", "precision"])
def test_embed_option_refused_before_the_search(tmp_path, capsys, extra, message):
    import re

    code, err = run(capsys, "embed", "--bbox", "11.50", "48.10", "11.56", "48.14", "--start", "2024-06-01",
                    "--end", "2024-06-30", "--out", tmp_path / "x.zarr", "--catalog", UNREACHABLE,
                    "--model", "terrafm_tiny", "--weights", "random", *extra)
    assert code == 2 and re.search(message, err), err
    assert err.count("\n") == 1 and err.startswith("terrafm embed: error: ") and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists()


# ---------------------------------------------------------------------- bad arguments of the store commands
BAD = [
    (lambda s, t: ["rgb", str(t / "missing.zarr"), "--out", str(t / "o.tif")], r"missing\.zarr: no such zarr store"),
    (lambda s, t: ["rgb", s["labels"], "--out", str(t / "o.tif")], r"labels\.parquet"),
    (lambda s, t: ["rgb", s["series"], "--out", str(t / "o.tif")], r"series of 5 dates; pick one with --time"),
    (lambda s, t: ["rgb", s["series"], "--time", "5", "--out", str(t / "o.tif")], r"--time 5 is outside"),
    (lambda s, t: ["rgb", s["a"], "--method", "tsne", "--out", str(t / "o.tif")], r"invalid choice: 'tsne'"),
    (lambda s, t: ["similar", s["a"], "--point", "52.5", "--out", str(t / "o.tif")], r"--point: expected 2"),
    (lambda s, t: ["similar", s["a"], "--point", "48.1", "200", "--out", str(t / "o.tif")],
     r"--point 48.1 200 is not lon/lat degrees"),
    (lambda s, t: ["similar", s["a"], "--point", "0", "0", "--out", str(t / "o.tif")], r"outside the embedding area"),
    (lambda s, t: ["similar", s["a"], "--point", "0", "0", "--top-k", "0", "--top-out", str(t / "top.parquet"),
                   "--out", str(t / "o.tif")], r"--top-k 0: the number of best positions must be >= 1"),
    (lambda s, t: ["similar", s["a"], "--out", str(t / "o.tif")], r"one of the arguments --point --vector-file"),
    (lambda s, t: ["similar", s["a"], "--vector-file", str(t / "q.npy"), "--out", str(t / "o.tif")],
     r"holds an array of shape \(3,\); the store's vectors have 8 dimensions"),
    (lambda s, t: ["change", s["a"], s["b"], "--threshold", "abc", "--out", str(t / "o.tif")],
     r"--threshold 'abc': pass a cosine distance in \[0, 2\]"),
    (lambda s, t: ["change", s["a"], "--out", str(t / "o.tif")], r"holds a single date; pass a second store"),
    (lambda s, t: ["change", s["a"], s["series"], "--out", str(t / "o.tif")],
     r"STORE_B .*series\.zarr is a series of 5 dates; compare two single-date stores"),
    (lambda s, t: ["change", s["a"], s["b"], "--first-change", str(t / "f.tif"), "--out", str(t / "o.tif")],
     r"--first-change needs one time-series store"),
    (lambda s, t: ["change", s["series"], "--min-steps", "9", "--first-change", str(t / "f.tif"),
                   "--out", str(t / "o.tif")], r"--min-steps 9 is longer than the 4 dates"),
    (lambda s, t: ["classify", s["a"], "--labels", s["labels"], "--out", str(t / "o.tif")],
     r"has no column 'class' \(it has \['land'\]\); pass --column NAME"),
    (lambda s, t: ["classify", s["a"], "--labels", str(t / "none.gpkg"), "--out", str(t / "o.tif")],
     r"--labels .*none\.gpkg: no such file"),
    (lambda s, t: ["classify", s["a"], "--labels", str(t / "q.npy"), "--column", "land", "--out", str(t / "o.tif")],
     r"cannot read it as points/polygons"),
    (lambda s, t: ["export", s["a"], "--to", "netcdf", "--out", str(t / "o.nc")], r"argument --to: invalid choice"),
    (lambda s, t: ["export", s["a"], "--to", "cog", "--out", str(t / "existing.tif")],
     r"--out .*existing\.tif exists; pass --overwrite"),
    (lambda s, t: ["export", s["a"], "--to", "zarr", "--out", s["a"], "--overwrite"], r"--out .*a\.zarr: "),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[
    "missing-store", "not-a-store", "series-without-time", "time-outside", "rgb-method", "point-one-number",
    "point-swapped", "point-outside", "top-k-zero", "no-query", "vector-wrong-dim", "threshold-abc",
    "change-one-date", "change-store-b-series", "first-change-two-stores", "min-steps-too-long", "labels-missing-column",
    "labels-missing-file", "labels-not-vector", "unknown-to", "existing-out", "out-is-the-input"])
def test_bad_argument_is_one_line_exit_2(stores, tmp_path, capsys, argv, message):
    import re

    np.save(tmp_path / "q.npy", np.ones(3))
    (tmp_path / "existing.tif").write_bytes(b"keep me")
    args = argv(stores, tmp_path)
    code, err = run(capsys, *args)
    assert code == 2 and re.search(message, err), err
    assert err.count("\n") == 1 and err.startswith(f"terrafm {args[0]}") and "Traceback" not in err
    assert (tmp_path / "existing.tif").read_bytes() == b"keep me"
    assert not (tmp_path / "o.tif").exists() and not (tmp_path / "f.tif").exists()


# ---------------------------------------------------------------------- help
def test_every_subcommand_help_ends_with_examples(capsys):
    for command in ("embed", "rgb", "similar", "change", "classify", "export", "demo"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        tail = text[text.index("Examples:"):].splitlines()
        examples = [shlex.split(line, comments=True) for line in "\n".join(tail[1:]).replace("\\\n", " ").splitlines()]
        assert tail[0] == "Examples:" and len(examples) >= 2
        for example in examples:     # each example is a valid command line of this subcommand
            assert example[:2] == ["terrafm", command]
            assert build_parser().parse_args(example[1:]).command == command
    done = subprocess.run([str(Path(sys.executable).parent / "terrafm"), "--help"], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert all(name in done.stdout for name in ("rgb", "similar", "change", "classify", "export", "embed"))
