"""Class 2 of issue 15: a store's resume fingerprint.

A store records everything that changes its values or layout: the weights (the checkpoint file's
sha256, or a hash of the state dict when there is no file), the input data (the STAC items
``terrafm.stac.load`` recorded, else the Dataset's coordinates and a sample of its values),
precision, chip size, overlap, block layout, modalities, fusion, level, area and dates. A resume
with any of them changed is refused: the error names the field, the store's and this run's value and
the fix, and the store's bytes stay identical; ``overwrite=True`` then recomputes it to a store equal
to a clean run. A resume with only the presentation changed (a copied checkpoint, dask vs numpy
input, ``precision="auto"`` that resolves to the store's) finishes to the clean run's store.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embed"))
from bad_input_helpers import interrupted_embed, snapshot  # noqa: E402
from embed_helpers import make_dataset  # noqa: E402


EMBED = importlib.import_module("terrafm.embed")
BASE = dict(chip_size=64, overlap=16, device="cpu", progress=False, block_chips=2, batch_size=4)


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][...]) for name in group.array_keys()}


def assert_same_store(a: Path, b: Path) -> None:
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
    assert left["blocks_done"].all()


def first_block_only(monkeypatch, ds, out, **kw) -> None:
    interrupted_embed(monkeypatch, ds, out, after=1, **kw)
    assert int(store_arrays(out)["blocks_done"].sum()) == 1


def tiny(seed=0, **config):
    from terrafm.model import create_model

    return create_model("terrafm_tiny", seed=seed, **config).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for seed in (3, 4):
        paths[seed] = folder / f"seed{seed}.pth"
        torch.save(tiny(seed).state_dict(), paths[seed])
    paths["copy"] = folder / "elsewhere" / "seed3.pth"
    paths["copy"].parent.mkdir()
    shutil.copy(paths[3], paths["copy"])
    return paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nudged(model):
    import torch

    with torch.no_grad():
        model.norm.bias.add_(1e-3)
    return model


def _mean_fusion(model):
    model.patch_embed.fusion.set_masked_mean()
    model.fusion_mode = "mean"
    return model


def _ds(**changes):
    return make_dataset(height=96, width=96, **changes)


def _scaled_s1(ds):
    return ds.assign(s1_vv=ds["s1_vv"] * 3)


def _with_items(ds, digest):
    ds = ds.copy()
    ds.attrs["terrafm_items_sha256"] = digest
    return ds


def _masked_centre(ds):
    mask = np.ones((1, 96, 96), bool)
    mask[:, 40:56, 40:56] = False
    return ds.assign(mask_s2_l2a=(("time", "y", "x"), mask))


# id -> (first run: dataset, kwargs), (resume: dataset, kwargs), message: the field, both values, the fix
REFUSED = [
    pytest.param(lambda f: ((_ds(), dict(model="terrafm_tiny", weights=f[3])),
                            (_ds(), dict(model="terrafm_tiny", weights=f[4]))),
                 lambda f: (rf"weights: the store has 'file-sha256:{_sha(f[3])[:16]}\.\.\.', this run "
                            rf"'file-sha256:{_sha(f[4])[:16]}\.\.\.'.*run with the store's weights \(the same "
                            r"checkpoint file, or the same model object\)"),
                 id="weights-another-checkpoint-file"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(1)))),
                 lambda f: r"weights: the store has 'state-dict-sha256:[0-9a-f]{16}\.\.\.', this run "
                           r"'state-dict-sha256:[0-9a-f]{16}\.\.\.'.*run with the store's weights",
                 id="weights-untrained-model-another-seed"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=_nudged(tiny(0))))),
                 lambda f: r"weights: the store has 'state-dict-sha256:.*this run 'state-dict-sha256:",
                 id="weights-model-object-with-a-changed-parameter"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=_mean_fusion(tiny(0))))),
                 lambda f: r"fusion: the store has 'random', this run 'mean'.*a model whose fusion_mode is 'random'",
                 id="fusion-mode"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0, embed_dim=32, num_heads=4)))),
                 lambda f: r"embed_dim: the store has 64, this run 32.*a model of width 64",
                 id="model-width"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_scaled_s1(_ds()), dict(model=tiny(0)))),
                 lambda f: r"input: the store has 'sample-sha256:[0-9a-f]{16}\.\.\.', this run "
                           r"'sample-sha256:[0-9a-f]{16}\.\.\.'.*run with the same input data",
                 id="input-values-changed"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(seed=1), dict(model=tiny(0)))),
                 lambda f: r"input: the store has 'sample-sha256:.*the same input data", id="input-another-noise-draw"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_masked_centre(_ds()), dict(model=tiny(0)))),
                 lambda f: r"input: the store has 'sample-sha256:.*the same input data", id="input-another-cloud-mask"),
    pytest.param(lambda f: ((_with_items(_ds(), "a" * 64), dict(model=tiny(0))),
                            (_with_items(_ds(), "b" * 64), dict(model=tiny(0)))),
                 lambda f: r"input: the store has 'stac-items-sha256:a{16}\.\.\.', this run 'stac-items-sha256:b{16}"
                           r"\.\.\.'.*the same input data \(the same STAC items",
                 id="input-other-stac-items"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0), precision="fp32")),
                            (_ds(), dict(model=tiny(0), precision="bf16"))),
                 lambda f: r"precision: the store has 'fp32', this run 'bf16'.*run with precision='fp32'",
                 id="precision"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0), chip_size=96))),
                 lambda f: r"chip_size: the store has 64, this run 96.*run with chip_size=64", id="chip_size"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0), overlap=0))),
                 lambda f: r"overlap: the store has 16, this run 0.*run with overlap=16", id="overlap"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0), block_chips=1))),
                 lambda f: r"block_chips: the store has 2, this run 1.*run with block_chips=2", id="block_chips"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0), modalities=["s1"]))),
                 lambda f: r"modalities: the store has \['s2_l2a', 's1'\], this run \['s1'\].*"
                           r"run with modalities=\['s2_l2a', 's1'\]", id="modalities"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0), level="chip"))),
                 lambda f: r"level: the store has 'patch', this run 'chip'.*run with level='patch'", id="level"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(x0=500320.0), dict(model=tiny(0)))),
                 lambda f: r"transform: the store has \[10\.0, 0\.0, 500000\.0.*this run \[10\.0, 0\.0, 500320\.0.*"
                           r"the same area", id="area"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))),
                            (_ds().assign_coords(time=np.array(["2024-03-15"], "datetime64[ns]")), dict(model=tiny(0)))),
                 lambda f: r"time: the store has \['2024-01-15T00:00:00\.000000000'\], this run "
                           r"\['2024-03-15T00:00:00\.000000000'\].*the same dates", id="dates"),
]


@pytest.mark.parametrize("runs, message", REFUSED)
def test_changed_field_refused_then_overwrite_equals_clean_run(runs, message, files, tmp_path, monkeypatch):
    (first_ds, first_kw), (second_ds, second_kw) = runs(files)
    store = tmp_path / "emb.zarr"
    first_block_only(monkeypatch, first_ds, store, **{**BASE, **first_kw})
    before = snapshot(store)
    with pytest.raises(ValueError, match=f"holds embeddings of another run .*{message(files)}.*overwrite=True to "
                                         "recompute the whole store.*or choose another out= path"):
        EMBED.embed(second_ds, out=store, **{**BASE, **second_kw})
    assert snapshot(store) == before

    EMBED.embed(second_ds, out=store, overwrite=True, **{**BASE, **second_kw})
    EMBED.embed(second_ds, out=tmp_path / "clean.zarr", **{**BASE, **second_kw})
    assert_same_store(store, tmp_path / "clean.zarr")


# resumes that change nothing the store holds: finish to the clean run's store, bit for bit
ACCEPTED = [
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0)))), id="same-settings"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0), precision="fp32")),
                            (_ds(), dict(model=tiny(0), precision="auto"))), id="precision-auto-is-fp32-on-cpu"),
    pytest.param(lambda f: ((_ds(), dict(model="terrafm_tiny", weights=f[3])),
                            (_ds(), dict(model="terrafm_tiny", weights=f["copy"]))), id="checkpoint-copied-elsewhere"),
    pytest.param(lambda f: ((_ds(), dict(model="terrafm_tiny", weights=f[3])),
                            (_ds(), dict(model=_loaded(f[3])))), id="checkpoint-by-path-then-as-model-object"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds(), dict(model=tiny(0).fold_for_inference()))),
                 id="model-object-folded"),
    pytest.param(lambda f: ((_ds(), dict(model=tiny(0))), (_ds().chunk({"y": 32, "x": 48}), dict(model=tiny(0)))),
                 id="input-as-dask-chunks"),
    pytest.param(lambda f: ((_with_items(_ds(), "a" * 64), dict(model=tiny(0))),
                            (_with_items(_ds(), "a" * 64), dict(model=tiny(0)))), id="input-same-stac-items"),
]


def _loaded(path):
    from terrafm.model import load_weights

    model = tiny(9)
    load_weights(model, path)
    return model.eval()


@pytest.mark.parametrize("runs", ACCEPTED)
def test_resume_that_changes_nothing_equals_clean_run(runs, files, tmp_path, monkeypatch):
    (first_ds, first_kw), (second_ds, second_kw) = runs(files)
    store = tmp_path / "emb.zarr"
    first_block_only(monkeypatch, first_ds, store, **{**BASE, **first_kw})
    EMBED.embed(second_ds, out=store, **{**BASE, **second_kw})
    EMBED.embed(first_ds, out=tmp_path / "clean.zarr", **{**BASE, **first_kw})
    assert_same_store(store, tmp_path / "clean.zarr")


# ---------------------------------------------------------------------- STAC provenance (local blob store)
@pytest.fixture(scope="module")
def s2_items(sentinel_scene, pc_environment):
    import pystac
    from support import stac_items

    return [pystac.Item.from_dict(d) for d in stac_items.pc_s2_items(sentinel_scene, include_baseline4=False)]


def _load(items, scene, **kw):
    """The items over a ~1.3 km square at the AOI's centre (134 x 134 px: room for the 96 x 96 px
    area embedded below, a fourteenth of the AOI's reads)."""
    from terrafm.stac import load

    west, south, east, north = scene.aoi_bbox
    cx, cy = (west + east) / 2, (south + north) / 2
    return load(items, (cx - 0.0075, cy - 0.006, cx + 0.0075, cy + 0.006), chunks=False,
                catalog="planetary-computer", **kw)


def test_stac_load_records_the_items_and_settings_it_read(s2_items, sentinel_scene):
    assert len(s2_items) >= 2
    ds = _load(s2_items, sentinel_scene)
    assert ds.attrs["terrafm_items"] == sorted(f"sentinel-2-l2a/{item.id}" for item in s2_items)
    digest = ds.attrs["terrafm_items_sha256"]
    assert len(digest) == 64
    assert _load(s2_items[::-1], sentinel_scene).attrs["terrafm_items_sha256"] == digest      # order is not content
    assert _load(s2_items[1:], sentinel_scene).attrs["terrafm_items_sha256"] != digest
    assert _load(s2_items, sentinel_scene, resampling="bilinear").attrs["terrafm_items_sha256"] != digest


def test_stac_input_resume_refused_when_the_load_differs(s2_items, sentinel_scene, tmp_path, monkeypatch):
    def area(ds):
        return ds.isel(time=[0], y=slice(0, 96), x=slice(0, 96))

    ds = area(_load(s2_items, sentinel_scene))
    kw = {**BASE, "model": tiny(0)}
    store = tmp_path / "emb.zarr"
    first_block_only(monkeypatch, ds, store, **kw)
    before = snapshot(store)
    bilinear = area(_load(s2_items, sentinel_scene, resampling="bilinear"))
    np.testing.assert_array_equal(bilinear.time.values, ds.time.values)
    with pytest.raises(ValueError, match=r"input: the store has 'stac-items-sha256:[0-9a-f]{16}\.\.\.', this run "
                                         r"'stac-items-sha256:[0-9a-f]{16}\.\.\.'.*the same STAC items"):
        EMBED.embed(bilinear, out=store, **kw)
    assert snapshot(store) == before
    EMBED.embed(area(_load(s2_items, sentinel_scene)), out=store, **kw)       # the same load in a new session
    EMBED.embed(ds, out=tmp_path / "clean.zarr", **kw)
    assert_same_store(store, tmp_path / "clean.zarr")
