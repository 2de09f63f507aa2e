"""embed(): contract, geometry, stitching, masks, zarr resume, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import terrafm
from terrafm.embed import embed
from terrafm.model import create_model
from terrafm.tiling import ChipGrid

from embed_helpers import make_dataset


def test_contract_and_accessor_equal(tiny_model):
    ds = make_dataset(times=2).chunk({"y": 64, "x": 64})
    emb = embed(ds, model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    assert emb.name == "embedding" and emb.dims == ("time", "y", "x", "embedding")
    assert emb.shape == (2, 10, 12, 64) and emb.dtype == np.float32
    assert emb.attrs["model"] == "terrafm_tiny" and emb.attrs["modalities"] == ["s2_l2a", "s1"]
    for key in ("checkpoint_sha256", "normalization", "terrafm_version", "level"):
        assert key in emb.attrs
    assert bool(emb.valid.all()) and np.isfinite(emb.values).all()
    same = ds.terrafm.embed(model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    np.testing.assert_array_equal(same.values, emb.values)
    assert callable(terrafm.embed)


def test_geotransform_locates_a_known_pixel(tiny_model):
    ds = make_dataset(s1=False)
    row, col = 77, 130                      # a pixel; its whole 16x16 patch is made invalid
    pr, pc = row // 16, col // 16
    mask = np.ones((1, 160, 192), bool)
    mask[:, pr * 16:pr * 16 + 16, pc * 16:pc * 16 + 16] = False
    ds["mask_s2_l2a"] = (("time", "y", "x"), mask)
    emb = embed(ds, model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    gbox = ds.odc.geobox
    x, y = gbox.affine @ (col + 0.5, row + 0.5)  # the pixel centre in map coordinates
    cell = emb.sel(x=x, y=y, method="nearest")
    assert not bool(cell.valid.item()) and np.isnan(cell.values).all()
    assert int((~emb.valid).sum()) == 1
    pgbox = emb.odc.geobox
    assert pgbox.crs == gbox.crs
    assert pgbox.affine.a == 160 and pgbox.affine.e == -160
    assert (pgbox.affine.c, pgbox.affine.f) == (gbox.affine.c, gbox.affine.f)


def _local_model():
    """No attention blocks and zero positional embedding: each patch output depends on its own
    pixels only (per-position fusion + final norm), so tiling must not change anything."""
    torch.manual_seed(1)
    model = create_model("terrafm_tiny").eval()
    model.blocks = torch.nn.ModuleList()
    with torch.no_grad():
        model.pos_embed.zero_()
    return model


def test_stitching_equals_one_big_chip_for_a_local_model():
    ds = make_dataset(height=192, width=192, s1=False)
    model = _local_model()
    tiled = embed(ds, model=model, chip_size=64, overlap=16, device="cpu", progress=False)
    big = embed(ds, model=model, chip_size=192, overlap=0, device="cpu", progress=False)
    np.testing.assert_allclose(tiled.values, big.values, rtol=1e-5, atol=1e-5)


def test_seam_metric_bounded_for_global_attention():
    """A ViT with global attention has no exact stitching: every token sees the whole chip. With
    the positional embedding zeroed (so chip size changes only the context), the deviation from
    one big chip must shrink as the chips grow, and must not concentrate at the seams."""
    torch.manual_seed(0)
    model = create_model("terrafm_tiny").eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    ds = make_dataset(height=256, width=256, s1=False, seed=3)
    big = embed(ds, model=model, chip_size=256, overlap=0, device="cpu", progress=False).values[0]
    spread = np.linalg.norm(big - big.mean((0, 1)), axis=-1).mean()
    errors = []
    for chip, overlap in ((64, 0), (96, 16), (160, 48)):
        tiled = embed(ds, model=model, chip_size=chip, overlap=overlap, device="cpu", progress=False).values[0]
        dev = np.linalg.norm(tiled - big, axis=-1)
        errors.append(dev.mean() / spread)
        sp = (chip - 2 * overlap) // 16
        seam = (np.arange(16) % sp == 0) | (np.arange(16) % sp == sp - 1)
        seam_metric = dev[:, seam].mean() / dev[:, ~seam].mean()
        assert seam_metric < 1.1, (chip, seam_metric)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors


def test_masks_and_nan_positions(tiny_model):
    ds = make_dataset()
    s2 = np.ones((1, 160, 192), bool)
    s2[:, :80] = False                           # clouds over the top half
    ds["mask_s2_l2a"] = (("time", "y", "x"), s2)
    ds["s1_vv"][:, 100:] = np.nan                   # S1 nodata in the bottom part
    ds["s1_vh"][:, 100:] = np.nan
    emb = embed(ds, model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    v2, v1 = emb["valid_s2_l2a"].values[0], emb["valid_s1"].values[0]
    np.testing.assert_array_equal(v2, np.repeat((np.arange(10) >= 5)[:, None], 12, 1))
    # S1 patch row 6 covers y 96-112 with 4 of 16 rows valid: below MIN_VALID_FRACTION, so absent,
    # the same rule the model applies to its key padding
    np.testing.assert_array_equal(v1, np.repeat((np.arange(10) * 16 + 8 <= 100)[:, None], 12, 1))
    np.testing.assert_array_equal(emb.valid.values[0], v1 | v2)
    # S2 covers rows 5-9 and S1 rows 0-5: every position has at least one modality
    assert emb.valid.values.all()
    ds["mask_s2_l2a"][:] = False
    ds["s1_vv"][:] = np.nan
    emb = embed(ds, model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    assert not emb.valid.values.any() and np.isnan(emb.values).all()


def test_chip_level(tiny_model):
    ds = make_dataset(s1=False)
    emb = embed(ds, model=tiny_model, level="chip", chip_size=64, device="cpu", progress=False)
    assert emb.shape == (1, 3, 3, 64) and emb.odc.geobox.affine.a == 640
    chip = ds.isel(y=slice(64, 128), x=slice(64, 128))
    one = embed(chip, model=tiny_model, level="chip", chip_size=64, device="cpu", progress=False)
    np.testing.assert_allclose(emb.values[0, 1, 1], one.values[0, 0, 0], rtol=1e-5, atol=1e-6)


def test_zarr_roundtrip_and_refuses_another_run(tiny_model, tmp_path):
    ds = make_dataset()
    kw = dict(model=tiny_model, chip_size=64, overlap=16, device="cpu", progress=False)
    mem = embed(ds, **kw)
    out = tmp_path / "e.zarr"
    z = embed(ds, out=out, **kw)
    np.testing.assert_array_equal(z.values, mem.values)
    assert z.odc.geobox == mem.odc.geobox
    again = embed(ds, out=out, **kw)               # everything done: nothing recomputed
    np.testing.assert_array_equal(again.values, mem.values)
    opened = terrafm.open_embedding(out)           # a later session reads the same contract array
    assert opened.name == "embedding" and opened.dims == mem.dims and opened.attrs == mem.attrs
    assert opened.odc.geobox == mem.odc.geobox
    np.testing.assert_array_equal(opened.values, mem.values)
    np.testing.assert_array_equal(opened["valid"].values, mem["valid"].values)
    np.testing.assert_array_equal(opened["valid_s2_l2a"].values, mem["valid_s2_l2a"].values)
    with pytest.raises(ValueError, match="not a terrafm embedding store"):
        terrafm.open_embedding(terrafm.stac.save(ds, tmp_path / "bands.zarr"))
    with pytest.raises(ValueError, match="another run.*embed_dim"):
        embed(ds, out=out, **{**kw, "model": create_model("terrafm_tiny", embed_dim=32, num_heads=4)})
    with pytest.raises(ValueError, match="another run.*transform"):
        embed(make_dataset(x0=510000.0), out=out, **kw)
    with pytest.raises(ValueError, match="another run.*chip_size"):
        embed(ds, out=out, **{**kw, "chip_size": 96})


@pytest.mark.parametrize("case, match", [
    ("no_crs", "no CRS.*write_crs"),
    ("wrong_bands", "lacks \\['s2_l2a_B12'\\]"),
    ("no_modality", "no modality found"),
    ("small", "smaller than one 224 px chip"),
    ("chip16", "not a positive multiple of 16"),
    ("unknown_modality", "unknown modalities"),
])
def test_bad_inputs(tiny_model, case, match):
    ds = make_dataset(s1=False)
    kw = dict(model=tiny_model, chip_size=64, device="cpu", progress=False)
    if case == "no_crs":
        ds = make_dataset(crs=None)
    elif case == "wrong_bands":
        ds = ds.drop_vars("s2_l2a_B12")
    elif case == "no_modality":
        ds = ds.rename({v: f"band{i}" for i, v in enumerate(terrafm.sensors.MODALITIES["s2_l2a"].variables)})
        for v in ds.data_vars:
            ds[v].attrs = {}
    elif case == "small":
        kw["chip_size"] = 224
    elif case == "chip16":
        kw["chip_size"] = 72
    elif case == "unknown_modality":
        kw["modalities"] = ["S2"]
    with pytest.raises(ValueError, match=match):
        embed(ds, **kw)


def test_nan_everywhere_gives_all_invalid(tiny_model):
    ds = make_dataset(s2=False)
    ds["s1_vv"][:] = np.nan
    ds["s1_vh"][:] = np.nan
    emb = embed(ds, model=tiny_model, chip_size=64, device="cpu", progress=False)
    assert not emb.valid.values.any() and np.isnan(emb.values).all()


def test_chip_grid_geometry():
    from odc.geo.geobox import GeoBox

    gbox = GeoBox.from_bbox((0, 0, 1000, 1000), "EPSG:32631", resolution=10)   # 100 px: not /16
    grid = ChipGrid(gbox, 64, 16)
    assert grid.patch_geobox.shape == (7, 7)
    covered = np.zeros((7, 7), int)
    for chip in grid.chips():
        covered[chip.patch_slices] += 1
        assert chip.y0 == chip.row * 32 - 16
    np.testing.assert_array_equal(covered, 1)       # interiors tile the patch grid exactly once
