"""Classes 1 (data loss) and 3 (``embed``'s output path) of issue 15.

Rule: nothing is deleted or overwritten that this run did not write, unless ``overwrite=True``; never
the store or file the data being written is still read from; writes go through a temporary sibling
renamed at the end. Each refused case hashes every file of what it protects before and after (bytes
identical, no temporary sibling left); each allowed case checks the result against the data written.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embed"))
from bad_input_helpers import interrupted_embed, snapshot  # noqa: E402
from embed_helpers import make_dataset  # noqa: E402

import terrafm  # noqa: E402
from terrafm.analysis import to_cog, to_geoparquet, to_zarr  # noqa: E402
from terrafm.store import EMBEDDING_VAR, open_embedding  # noqa: E402


EMBED = importlib.import_module("terrafm.embed")
KW = dict(chip_size=64, overlap=16, device="cpu", progress=False, block_chips=2)


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][...]) for name in (EMBEDDING_VAR, "valid", "blocks_done")}


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(height=96, width=96)


class Made:
    """What the tables make from the module's dataset, computed once per module: embedding stores
    and ``stac.save`` stores (copied into each test's folder, so every test owns its bytes), the
    in-memory embedding and the single-date map (deep copies handed out)."""

    def __init__(self, folder: Path, model, dataset):
        self.folder, self.model, self.ds, self.made = folder, model, dataset, {}

    def _once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def store_copy(self, path: Path, **changes) -> Path:
        def make() -> Path:
            template = self.folder / f"store{len(self.made)}.zarr"
            EMBED.embed(self.ds, out=template, **{**KW, "model": self.model, **changes})
            return template

        shutil.copytree(self._once(("store", tuple(sorted(changes.items()))), make), path)
        return path

    def bands_copy(self, path: Path) -> Path:
        template = self._once("bands", lambda: terrafm.stac.save(self.ds, self.folder / "bands.zarr"))
        shutil.copytree(template, path)
        return path

    def embedding(self) -> xr.DataArray:
        return self._once("embedding", lambda: EMBED.embed(self.ds, **KW, model=self.model)).copy(deep=True)

    def map(self) -> xr.DataArray:
        return self._once("map", lambda: EMBED.embed(self.ds.isel(time=0), **KW, model=self.model)).copy(deep=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory, model, dataset):
    return Made(tmp_path_factory.mktemp("made"), model, dataset)


class World:
    """Things a user already has on disk, made on demand in ``tmp_path``."""

    def __init__(self, tmp_path: Path, model, dataset, monkeypatch, made: Made):
        self.tmp, self.model, self.ds, self.monkeypatch, self.made = tmp_path, model, dataset, monkeypatch, made

    def kw(self, **changes):
        return {**KW, "model": self.model, **changes}

    def store(self, name="emb.zarr", **changes) -> Path:
        path = self.tmp / name
        if self.ds is self.made.ds:
            return self.made.store_copy(path, **changes)
        EMBED.embed(self.ds, out=path, **self.kw(**changes))
        return path

    def partial_store(self, name="emb.zarr", after=1, ds=None, **changes) -> Path:
        path = self.tmp / name
        interrupted_embed(self.monkeypatch, self.ds if ds is None else ds, path, after, **self.kw(**changes))
        return path

    def bands(self, name="bands.zarr") -> Path:
        if self.ds is self.made.ds:
            return self.made.bands_copy(self.tmp / name)
        return terrafm.stac.save(self.ds, self.tmp / name)

    def folder(self) -> Path:
        folder = self.tmp / "thesis"
        folder.mkdir()
        (folder / "chapter1.tex").write_text("months of work")
        return folder

    def file(self, name="notes.txt") -> Path:
        path = self.tmp / name
        path.write_text("my notes")
        return path

    def map(self):
        emb = self.made.map() if self.ds is self.made.ds else EMBED.embed(self.ds.isel(time=0), **self.kw())
        return emb.isel(embedding=0).rio.write_crs(emb.rio.crs)

    def tif(self, name="map.tif") -> Path:
        return to_cog(self.map(), self.tmp / name)

    def memory_embedding(self):
        return self.made.embedding() if self.ds is self.made.ds else EMBED.embed(self.ds, **self.kw())


@pytest.fixture
def world(tmp_path, model, dataset, monkeypatch, made):
    return World(tmp_path, model, dataset, monkeypatch, made)


def _lazy_tif(path: Path) -> xr.DataArray:
    import rioxarray

    return rioxarray.open_rasterio(path, chunks={"band": 1, "y": 32, "x": 32}).squeeze("band", drop=True)


OWN_INPUT = r"is where the .* is still read from .*destroy its own input\. Write to another path"
EXISTS = r"exists and was not written by this run: pass overwrite=True to replace it, or choose another path"
NOT_A_STORE_DIR = r"directory that is not a zarr store \(it holds 'chapter1.tex'\).*never other directories: choose another path"


def _resume_block_chips(old, new, height):
    def setup(w):
        w.ds = make_dataset(height=height, width=height)
        store = w.partial_store(block_chips=old, after=1)
        return store, lambda: EMBED.embed(w.ds, out=store, **w.kw(block_chips=new))
    return setup


# id, setup(world) -> (what must stay byte-identical, the action), exception, message (problem + fix)
REFUSED = [
    # a resumed embed whose block layout changed (5x5 chips: 3 and 4 chips per block both give 2x2
    # blocks, so before the fix this resumed silently and left 28 NaN cells in a "complete" store)
    pytest.param(_resume_block_chips(3, 4, 160), ValueError,
                 r"block_chips: the store has 3, this run 4.*run with block_chips=3.*overwrite=True",
                 id="embed-resume-block_chips-raised-same-block-grid"),
    pytest.param(_resume_block_chips(2, 1, 96), ValueError,
                 r"block_chips: the store has 2, this run 1.*run with block_chips=2.*overwrite=True",
                 id="embed-resume-block_chips-lowered"),
    pytest.param(_resume_block_chips(1, 2, 96), ValueError,
                 r"block_chips: the store has 1, this run 2.*run with block_chips=1.*overwrite=True",
                 id="embed-resume-block_chips-raised"),
    # analysis results written where they are read from
    pytest.param(lambda w: (s := w.store(), lambda: to_zarr(open_embedding(s), s)), ValueError, OWN_INPUT,
                 id="to_zarr-into-its-own-store"),
    pytest.param(lambda w: (s := w.store(), lambda: to_zarr(open_embedding(s), s, overwrite=True)), ValueError,
                 OWN_INPUT, id="to_zarr-into-its-own-store-overwrite"),
    pytest.param(lambda w: (s := w.store(), lambda: to_zarr(open_embedding(s).isel(y=slice(0, 2)) * 2, s,
                                                               overwrite=True)),
                 ValueError, OWN_INPUT, id="to_zarr-lazy-derived-result-into-its-store"),
    pytest.param(lambda w: (s := w.store(), lambda: to_zarr(open_embedding(s)["valid"], s / "valid", overwrite=True)),
                 ValueError, OWN_INPUT, id="to_zarr-inside-its-own-store"),
    pytest.param(lambda w: (t := w.tif(), lambda: to_cog(_lazy_tif(t) * 2, t, overwrite=True)), ValueError, OWN_INPUT,
                 id="to_cog-over-the-tif-it-reads"),
    pytest.param(lambda w: (s := w.store(), lambda: to_geoparquet(open_embedding(s), s, overwrite=True)), ValueError,
                 OWN_INPUT, id="to_geoparquet-over-the-store-it-reads"),
    pytest.param(lambda w: (s := w.store(), lambda: open_embedding(s).terrafm.to_geoparquet(s, overwrite=True)),
                 ValueError, OWN_INPUT, id="accessor-to_geoparquet-over-the-store-it-reads"),
    pytest.param(lambda w: (b := w.bands(), lambda: EMBED.embed(xr.open_zarr(b, decode_coords="all"), out=b,
                                                                overwrite=True, **w.kw())),
                 ValueError, OWN_INPUT, id="embed-out-is-its-input-store"),
    pytest.param(lambda w: (b := w.bands(), lambda: terrafm.stac.save(
        xr.open_zarr(b, decode_coords="all").isel(x=slice(0, 40)), b, overwrite=True)),
                 ValueError, OWN_INPUT, id="stac.save-over-the-store-it-reads"),
    # existing things this run did not write
    pytest.param(lambda w: (f := w.folder(), lambda: to_zarr(w.memory_embedding(), f)), IsADirectoryError,
                 NOT_A_STORE_DIR, id="to_zarr-over-a-folder"),
    pytest.param(lambda w: (f := w.folder(), lambda: to_zarr(w.memory_embedding(), f, overwrite=True)),
                 IsADirectoryError, NOT_A_STORE_DIR, id="to_zarr-over-a-folder-overwrite"),
    pytest.param(lambda w: (b := w.bands(), lambda: to_zarr(w.memory_embedding(), b)), FileExistsError, EXISTS,
                 id="to_zarr-over-another-store"),
    pytest.param(lambda w: (t := w.tif("other.tif"), lambda: to_cog(w.map() * 3, t)), FileExistsError, EXISTS,
                 id="to_cog-over-another-tif"),
    pytest.param(lambda w: (f := w.file("v.parquet"), lambda: to_geoparquet(w.memory_embedding(), f)),
                 FileExistsError, EXISTS, id="to_geoparquet-over-a-file"),
    pytest.param(lambda w: (f := w.file("v.parquet"), lambda: w.memory_embedding().terrafm.to_geoparquet(f)),
                 FileExistsError, EXISTS, id="accessor-to_geoparquet-over-a-file"),
    pytest.param(lambda w: (f := w.folder(), lambda: terrafm.stac.save(w.ds, f)), IsADirectoryError, NOT_A_STORE_DIR,
                 id="stac.save-over-a-folder"),
    pytest.param(lambda w: (f := w.folder(), lambda: terrafm.stac.save(w.ds, f, overwrite=True)), IsADirectoryError,
                 NOT_A_STORE_DIR, id="stac.save-over-a-folder-overwrite"),
    pytest.param(lambda w: (f := w.file(), lambda: terrafm.stac.save(w.ds, f)), FileExistsError, EXISTS,
                 id="stac.save-over-a-file"),
    pytest.param(lambda w: (b := w.bands(), lambda: terrafm.stac.save(make_dataset(96, 96, seed=5), b)),
                 FileExistsError, EXISTS, id="stac.save-over-another-save"),
    pytest.param(lambda w: (f := w.folder(), lambda: EMBED.embed(w.ds, out=f, **w.kw())), IsADirectoryError,
                 NOT_A_STORE_DIR, id="embed-out-a-folder"),
    pytest.param(lambda w: (f := w.folder(), lambda: EMBED.embed(w.ds, out=f, overwrite=True, **w.kw())),
                 IsADirectoryError, NOT_A_STORE_DIR, id="embed-out-a-folder-overwrite"),
    pytest.param(lambda w: (f := w.file(), lambda: EMBED.embed(w.ds, out=f, **w.kw())), FileExistsError,
                 r"not a terrafm embedding store.*choose another out= path, or pass overwrite=True",
                 id="embed-out-a-file"),
    pytest.param(lambda w: (b := w.bands(), lambda: EMBED.embed(w.ds, out=b, **w.kw())), FileExistsError,
                 r"not a terrafm embedding store.*choose another out= path, or pass overwrite=True",
                 id="embed-out-another-zarr-store"),
]


@pytest.mark.parametrize("setup, error, message", REFUSED)
def test_refused_and_left_byte_identical(world, setup, error, message):
    protected, action = setup(world)
    before, neighbours = snapshot(protected), sorted(protected.parent.iterdir())
    with pytest.raises(error, match=message):
        action()
    assert snapshot(protected) == before
    assert sorted(protected.parent.iterdir()) == neighbours, "a temporary sibling was left behind"


# ---------------------------------------------------------------------- class 3: before any compute
@pytest.mark.parametrize("out, error, message", [
    pytest.param(lambda w: w.file() / "emb.zarr", NotADirectoryError,
                 r"cannot write .*notes.txt/emb.zarr: .*notes.txt is a file, not a directory; choose a path in a directory",
                 id="out-parent-is-a-file"),
    pytest.param(lambda w: w.file() / "a" / "b" / "emb.zarr", NotADirectoryError, r"notes.txt is a file, not a directory",
                 id="out-grandparent-is-a-file"),
    pytest.param(lambda w: Path("/proc/terrafm-test/emb.zarr"), PermissionError,
                 r"cannot write /proc/terrafm-test/emb.zarr: /proc is not writable.*choose a writable path",
                 id="out-unwritable-parent"),
    pytest.param(lambda w: w.file(), FileExistsError, r"not a terrafm embedding store", id="out-is-a-file"),
])
def test_embed_output_path_checked_before_any_compute(world, monkeypatch, out, error, message):
    path = out(world)

    def no_compute(*args, **kwargs):
        raise AssertionError("the model was built or run before the output path was checked")

    monkeypatch.setattr(EMBED, "_build_model", no_compute)
    monkeypatch.setattr("terrafm.engine.Engine.run", no_compute)
    with pytest.raises(error, match=message):
        EMBED.embed(world.ds, out=path, **world.kw())
    assert not (path.exists() and path.is_dir())


def test_embed_creates_missing_parents(world):
    emb = EMBED.embed(world.ds, out=world.tmp / "new" / "dir" / "emb.zarr", **world.kw())
    np.testing.assert_array_equal(emb.values, world.memory_embedding().values)


# ---------------------------------------------------------------------- allowed: complete correctly
def test_embed_overwrite_recomputes_to_a_clean_run(world):
    store = world.store(block_chips=1)
    clean = world.store("clean.zarr")
    emb = EMBED.embed(world.ds, out=store, overwrite=True, **world.kw())
    a, b = store_arrays(store), store_arrays(clean)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(p.name for p in world.tmp.iterdir()) == ["clean.zarr", "emb.zarr"]
    assert emb.attrs == open_embedding(clean).attrs


def test_embed_overwrite_interrupted_keeps_the_old_store_then_resumes(world, monkeypatch):
    store = world.store(block_chips=1)
    old = snapshot(store)
    interrupted_embed(monkeypatch, world.ds, store, 2, overwrite=True, **world.kw())
    assert snapshot(store) == old                            # the old store is untouched until the new one is done
    partial = world.tmp / ".emb.zarr.partial"
    assert int(store_arrays(partial)["blocks_done"].sum()) == 2
    written = []
    original = EMBED._write_block
    monkeypatch.setattr(EMBED, "_write_block", lambda *a, **k: (written.append(1), original(*a, **k)))
    EMBED.embed(world.ds, out=store, overwrite=True, **world.kw())
    assert len(written) == 2                                 # 2x2 blocks: the 2 finished ones were kept
    clean = world.store("clean.zarr")
    a, b = store_arrays(store), store_arrays(clean)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not partial.exists()


def test_overwrite_replaces_with_the_new_values(world):
    emb = world.memory_embedding()
    target = world.bands("target.zarr")
    to_zarr(emb, target, overwrite=True)
    np.testing.assert_array_equal(open_embedding(target).values, emb.values)

    tif = world.tif()
    doubled = world.map() * 2
    to_cog(doubled, tif, overwrite=True)
    np.testing.assert_array_equal(_lazy_tif(tif).values, doubled.values)

    parquet = world.file("v.parquet")
    to_geoparquet(emb, parquet, overwrite=True)
    import geopandas as gpd

    gdf = gpd.read_parquet(parquet)
    assert len(gdf) == int(emb["valid"].sum())
    np.testing.assert_array_equal(np.stack(gdf["vector"].to_numpy()), emb.values[emb["valid"].values])

    saved = world.bands("saved.zarr")
    other = make_dataset(96, 96, seed=5)
    terrafm.stac.save(other, saved, overwrite=True)
    np.testing.assert_array_equal(xr.open_zarr(saved)["s1_vv"].values, other["s1_vv"].values)


def test_loaded_data_may_overwrite_its_own_store(world):
    store = world.store()
    loaded = open_embedding(store).load()
    to_zarr(loaded, store, overwrite=True)
    np.testing.assert_array_equal(open_embedding(store).values, loaded.values)


def _failing(like: xr.DataArray) -> xr.DataArray:
    import dask.array as da

    def fail(block):
        raise RuntimeError("asset disappeared")

    return like.copy(data=da.map_blocks(fail, da.zeros(like.shape, chunks=like.shape, dtype=like.dtype),
                                        dtype=like.dtype))


@pytest.mark.parametrize("write, make", [
    pytest.param(lambda w, t: to_zarr(_failing(w.memory_embedding()), t, overwrite=True), lambda w: w.store(),
                 id="to_zarr"),
    pytest.param(lambda w, t: to_cog(_failing(w.map()), t, overwrite=True), lambda w: w.tif(), id="to_cog"),
    pytest.param(lambda w, t: terrafm.stac.save(w.ds.assign(s1_vv=_failing(w.ds["s1_vv"])), t, overwrite=True),
                 lambda w: w.bands(), id="stac.save"),
])
def test_a_failed_overwrite_leaves_the_old_bytes(world, write, make):
    target = make(world)
    before, neighbours = snapshot(target), sorted(target.parent.iterdir())
    with pytest.raises(RuntimeError, match="asset disappeared"):
        write(world, target)
    assert snapshot(target) == before
    assert sorted(target.parent.iterdir()) == neighbours


# ---------------------------------------------------------------------- an unfinished store says so
def test_open_embedding_counts_missing_blocks(world):
    store = world.partial_store(after=1)
    with pytest.warns(terrafm.store.IncompleteStoreWarning,
                      match=r"unfinished: 3 of 4 blocks are not computed.*rerunning terrafm.embed.*out="):
        emb = open_embedding(store)
    assert int(emb["valid"].sum()) < int(world.memory_embedding()["valid"].sum())
    EMBED.embed(world.ds, out=store, **world.kw())              # finishing it: no warning any more
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", terrafm.store.IncompleteStoreWarning)
        np.testing.assert_array_equal(open_embedding(store).values, world.memory_embedding().values)


def test_an_empty_folder_is_written_into_without_overwrite(world):
    (world.tmp / "emb.zarr").mkdir()
    emb = EMBED.embed(world.ds, out=world.tmp / "emb.zarr", **world.kw())
    np.testing.assert_array_equal(emb.values, world.memory_embedding().values)
    (world.tmp / "copy.zarr").mkdir()
    to_zarr(emb.load(), world.tmp / "copy.zarr")
    np.testing.assert_array_equal(open_embedding(world.tmp / "copy.zarr").values, emb.values)
    assert sorted(p.name for p in world.tmp.iterdir()) == ["copy.zarr", "emb.zarr"]
