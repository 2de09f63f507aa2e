"""The engine's block pipeline (outputs gathered per block, one host sync per block) gives the
same bits as the per-batch algorithm it replaced, and syncs once per block, not per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrafm.embed import prepare_inputs
from terrafm.engine import Engine, plan_blocks
from terrafm.sensors import PATCH_SIZE, patch_valid
from terrafm.tiling import ChipGrid

from embed_helpers import make_dataset


def _previous_algorithm(model, engine, grid, level, block, chips, images, masks, batch_size):
    """The engine's process() before the block buffers: one forward and one host copy per batch,
    interiors cropped from the full numpy outputs."""
    h, w = block.out_y.stop - block.out_y.start, block.out_x.stop - block.out_x.start
    emb = np.full((h, w, model.embed_dim), np.nan, "float32")
    valid = np.zeros((h, w), bool)
    mvalid = {k: np.zeros((h, w), bool) for k in images}
    m = grid.margin // PATCH_SIZE
    for start in range(0, len(chips), batch_size):
        sl = slice(start, start + batch_size)
        with torch.inference_mode():
            out = model({k: torch.from_numpy(np.ascontiguousarray(v[sl])) for k, v in images.items()},
                        masks={k: torch.from_numpy(np.ascontiguousarray(v[sl])) for k, v in masks.items()})
        cls, patch, pvalid = out.cls.float().numpy(), out.patch.float().numpy(), out.valid.numpy()
        patch_masks = {k: patch_valid(v[sl], PATCH_SIZE) for k, v in masks.items()}
        for i, chip in enumerate(chips[sl]):
            if level == "chip":
                oy, ox = chip.row - block.out_y.start, chip.col - block.out_x.start
                ok = bool(pvalid[i].any()) and bool(np.isfinite(cls[i]).all())
                valid[oy, ox] = ok
                emb[oy, ox] = cls[i] if ok else np.nan
                for k in images:
                    mvalid[k][oy, ox] = patch_masks[k][i].any()
                continue
            oy, ox = chip.py0 - block.out_y.start, chip.px0 - block.out_x.start
            inner = (slice(m, m + chip.ph), slice(m, m + chip.pw))
            ok = pvalid[i][inner] & np.isfinite(patch[i][inner]).all(-1)
            tile = patch[i][inner].copy()
            tile[~ok] = np.nan
            emb[oy:oy + chip.ph, ox:ox + chip.pw] = tile
            valid[oy:oy + chip.ph, ox:ox + chip.pw] = ok
            for k in images:
                mvalid[k][oy:oy + chip.ph, ox:ox + chip.pw] = patch_masks[k][i][inner]
    return emb, valid, mvalid


@pytest.fixture(scope="module")
def masked_inputs():
    """S2 + S1 on an area that is not a whole number of chips (edge chips keep fewer patches),
    with an S2 cloud, S1 nodata and a hole in both, so validity and padding differ between chips."""
    ds = make_dataset(height=112, width=144, seed=5)
    cloud = np.ones((1, 112, 144), bool)
    cloud[:, 24:80, 16:72] = False
    ds["mask_s2_l2a"] = (("time", "y", "x"), cloud)
    ds["s1_vv"][:, 100:] = np.nan
    ds["s1_vh"][:, 100:] = np.nan
    ds["s1_vv"][:, 32:72, 24:60] = np.nan
    ds["s1_vh"][:, 32:72, 24:60] = np.nan
    arrays, _ = prepare_inputs(ds.isel(time=0))
    return ds.odc.geobox, arrays


@pytest.mark.parametrize("level, chip, margin, batch_size", [
    ("patch", 64, 16, 3),      # batches of 3 straddle the rows of a 2x2 block, and its end
    ("patch", 48, 0, 2),       # no overlap: the whole chip is its interior
    ("chip", 64, 0, 3),
])
def test_block_buffers_give_the_same_bits_as_per_batch_copies(tiny_model, masked_inputs, level, chip, margin,
                                                              batch_size):
    gbox, arrays = masked_inputs
    grid = ChipGrid(gbox, chip, margin)
    engine = Engine(tiny_model, device="cpu", batch_size=batch_size)
    results = list(engine.run(arrays, grid, level, block_chips=2))
    assert len(results) == len(plan_blocks(grid, level, 2)) > 1
    for result in results:
        chips, images, masks = engine.read_block(arrays, grid, result.block)
        emb, valid, mvalid = _previous_algorithm(engine.model, engine, grid, level, result.block, chips,
                                                 images, masks, batch_size)
        np.testing.assert_array_equal(result.embedding, emb)    # NaN at the same places, same bits elsewhere
        np.testing.assert_array_equal(result.valid, valid)
        for key in mvalid:
            np.testing.assert_array_equal(result.modality_valid[key], mvalid[key])
    stitched_valid = np.concatenate([r.valid.ravel() for r in results])
    assert stitched_valid.any() and (level == "chip" or not stitched_valid.all())   # patch level: invalid positions too


def test_one_host_sync_per_block_not_per_batch(tiny_model, masked_inputs):
    gbox, arrays = masked_inputs
    grid = ChipGrid(gbox, 64, 16)
    engine = Engine(tiny_model, device="cpu", batch_size=1)
    syncs = []
    engine._sync = lambda: syncs.append(len(syncs))
    forwards = []
    handle = engine.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        blocks = list(engine.run(arrays, grid, "patch", block_chips=2))
    finally:
        handle.remove()
    n_chips = sum(r.block.n_chips for r in blocks)
    assert len(forwards) == n_chips > len(blocks)     # one forward per chip (batch_size=1) ...
    assert len(syncs) == len(blocks)                  # ... and one sync per block


def test_the_nan_check_runs_once_per_block_on_the_host_and_still_refuses(tiny_model, masked_inputs, monkeypatch):
    """The model's NaN check reads a sum back to the host (a device sync per batch): the engine checks each
    block on the host tensors instead and tells the model to skip it; a NaN chip is still refused by name."""
    import terrafm.model.terrafm as terrafm_module

    gbox, arrays = masked_inputs
    grid = ChipGrid(gbox, 64, 16)
    engine = Engine(tiny_model, device="cpu", batch_size=1)
    checked_devices = []
    original = terrafm_module.check_finite_inputs
    monkeypatch.setattr(terrafm_module, "check_finite_inputs",
                        lambda inputs: checked_devices.append({v.device.type for v in inputs.values()})
                        or original(inputs))
    blocks = list(engine.run(arrays, grid, "patch", block_chips=2))
    assert len(checked_devices) == len(blocks) and all(d == {"cpu"} for d in checked_devices)
    block = plan_blocks(grid, "patch", 2)[0]
    chips, images, masks = engine.read_block(arrays, grid, block)
    key = next(iter(images))
    images[key][0, 0, 3, 5] = np.nan
    with pytest.raises(ValueError, match=f"{key}: input contains NaN or inf"):
        engine.process(grid, block, "patch", chips, images, masks)


def test_staged_inputs_are_host_tensors_without_pinning_on_cpu(tiny_model):
    engine = Engine(tiny_model, device="cpu")
    array = np.arange(24, dtype="float32").reshape(2, 3, 4)[:, ::-1]     # a non-contiguous view
    (staged,) = engine.stage({"s1": array}).values()
    assert isinstance(staged, torch.Tensor) and not staged.is_pinned() and staged.is_contiguous()
    np.testing.assert_array_equal(staged.numpy(), array)


def test_the_model_gets_per_patch_masks_on_the_host(tiny_model, masked_inputs):
    """The engine hands the model per-patch masks as host tensors (the model's own pixel -> patch rule,
    applied once per block), so the model's mask decisions (which stems run on which rows) read no
    device memory: on a GPU no forward waits for a device-to-host copy. Same bits: the test above."""
    gbox, arrays = masked_inputs
    grid = ChipGrid(gbox, 64, 16)
    engine = Engine(tiny_model, device="cpu", batch_size=3)
    seen = []

    def record(module, args, kwargs):
        images = args[0]
        seen.append({k: (m.device.type, m.dtype, tuple(m.shape), tuple(images[k].shape)) for k, m in kwargs["masks"].items()})

    handle = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        results = list(engine.run(arrays, grid, "patch", block_chips=2))
    finally:
        handle.remove()
    assert seen and {frozenset(s) for s in seen} == {frozenset(arrays)}
    for masks in seen:
        for device, dtype, shape, image_shape in masks.values():
            b, _, h, w = image_shape
            assert (device, dtype, shape) == ("cpu", torch.bool, (b, h // PATCH_SIZE, w // PATCH_SIZE))
    # and the per-patch modality validity the engine reports is the model's rule on the same masks
    block = results[0].block
    chips, _, masks = engine.read_block(arrays, grid, block)
    key = next(iter(masks))
    expected = patch_valid(torch.from_numpy(masks[key]), PATCH_SIZE).numpy()
    m = grid.margin // PATCH_SIZE
    chip = chips[0]
    np.testing.assert_array_equal(results[0].modality_valid[key][:chip.ph, :chip.pw],
                                  expected[0][m:m + chip.ph, m:m + chip.pw])
