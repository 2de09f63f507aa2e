"""The modality registry end to end: each stem gets its own pixels, one offset rule, a new sensor
through the registry only, the public release's fusion deterministic, old names refused."""

from __future__ import annotations

import copy

import numpy as np
import pystac
import pytest
import torch
import xarray as xr

from embed_helpers import make_dataset
from terrafm import prepare, sensors
from terrafm.embed import embed
from terrafm.model import create_model

KW = dict(chip_size=64, overlap=0, device="cpu", progress=False)


def _as_level(ds: xr.Dataset, key: str, dn: int) -> xr.Dataset:
    """The L2A bands of ``ds`` renamed to ``key``'s variables, every pixel at ``dn``."""
    l2a = sensors.MODALITIES["s2_l2a"]
    target = sensors.MODALITIES[key]
    out = xr.Dataset(coords=ds.coords)
    for src, dst in zip(l2a.variables, target.variables):
        out[dst] = xr.full_like(ds[src], dn).assign_attrs(modality=key)
    return out


def test_l2a_and_l1c_reach_their_own_stems_with_their_own_masks():
    base = make_dataset(height=64, width=128, s1=False)
    ds = xr.merge([_as_level(base, "s2_l2a", 1111), _as_level(base, "s2_l1c", 2222)])
    mask = np.ones((1, 64, 128), bool)
    mask[..., :64] = False                                    # L1C cloudy on the west chip
    ds["mask_s2_l1c"] = (("time", "y", "x"), mask)
    model = create_model("terrafm_tiny")
    seen = []
    hook = model.patch_embed.register_forward_pre_hook(lambda mod, args: seen.append(
        ({k: v.clone() for k, v in args[0].items()}, {k: v.clone() for k, v in (args[1] or {}).items()})))
    try:
        emb = embed(ds, model=model, batch_size=2, **KW)
    finally:
        hook.remove()
    assert not model.folded                                   # embed gives the caller's model back unfolded
    inputs, patch_valid = seen[0]
    for key, dn in (("s2_l2a", 1111), ("s2_l1c", 2222)):
        expected = sensors.normalize(np.full((sensors.MODALITIES[key].n_bands, 1, 1), dn, "float64"), key)[:, 0, 0]
        got = inputs[key][1, :, 0, 0].double().numpy()          # east chip: both valid
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    l2a_stats = sensors.normalize(np.full((12, 1, 1), 2222.0), "s2_l2a")[:, 0, 0]
    assert not np.allclose(inputs["s2_l1c"][1, :, 0, 0].double().numpy(), l2a_stats)   # not the L2A statistics
    assert not patch_valid["s2_l1c"][0].any() and patch_valid["s2_l1c"][1].all()
    assert emb.valid_s2_l2a.values.all()
    np.testing.assert_array_equal(emb.valid_s2_l1c.values[0], np.repeat([[False] * 4 + [True] * 4], 4, 0))


def test_one_offset_rule_through_load_normalize_and_embed():
    """DN 0..3000 on a baseline >= 04.00 date: the value and validity of stac.load's harmonization,
    prepare.normalize(s2_offset="harmonize") and embed agree (the pretraining reader is checked against
    prepare.normalize_block in tests/pretrain/test_data.py)."""
    l2a = sensors.MODALITIES["s2_l2a"]
    sequence = np.array([0, 1, 500, 999, 1000, 1001, 3000, 4500], "uint16")
    base = make_dataset(height=64, width=64, s1=False)
    tiled = np.resize(sequence, (1, 64, 64)).astype("uint16")
    stored = xr.Dataset({v: (("time", "y", "x"), tiled) for v in l2a.variables}, coords=base.coords)
    stored = stored.assign_coords({l2a.offset_coord: ("time", [1000])})
    # what stac.load(s2_offset="harmonize") stores: the registry's rule, by hand here
    by_hand = np.where(sequence == 0, 0, np.maximum(sequence.astype(int) - 1000, 1))
    np.testing.assert_array_equal(l2a.harmonize(sequence, 1000), by_hand)
    loaded = stored.copy()
    for v in l2a.variables:
        loaded[v] = (("time", "y", "x"), l2a.harmonize(tiled, 1000))
    loaded = loaded.assign_coords({l2a.offset_coord: ("time", [0])})

    from_stored = prepare.normalize(stored, s2_offset="harmonize")
    from_loaded = prepare.normalize(loaded)
    np.testing.assert_array_equal(from_stored.s2_l2a.values, from_loaded.s2_l2a.values)
    np.testing.assert_array_equal(from_stored.mask_s2_l2a.values, from_loaded.mask_s2_l2a.values)
    np.testing.assert_array_equal(from_stored.mask_s2_l2a.values[0], tiled[0] != 0)   # only DN 0 is invalid

    model = create_model("terrafm_tiny")
    a, b = embed(from_stored, model=model, **KW), embed(loaded, model=model, **KW)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.valid.values, b.valid.values)


@pytest.fixture
def toy_sensor():
    toy = sensors.register_modality(sensors.Modality(
        key="toy", bands=("b1", "b2", "b3", "b4"), mean=(1200.0, 1100.0, 1000.0, 2500.0),
        std=(600.0, 600.0, 700.0, 1200.0), dtype="uint16", nodata=0, units="DN",
        description="a 4-band test sensor"))
    yield toy
    sensors.unregister_modality("toy")


def test_a_sensor_added_only_through_the_registry_loads_and_embeds(toy_sensor, sentinel_scene, cog_server_url):
    from support import stac_items
    from terrafm.stac import load

    d = copy.deepcopy(stac_items.earth_search_l1c_items(sentinel_scene, cog_server_url)[0])
    four = {"b1": "blue", "b2": "green", "b3": "red", "b4": "nir"}
    d["assets"] = {new: d["assets"][old] for new, old in four.items()}
    d["collection"], d["id"] = "toy-collection", "toy-item"
    del d["properties"]["s2:product_type"]
    ds = load([pystac.Item.from_dict(d)], sentinel_scene.aoi_bbox, chunks=False)
    assert ds.attrs["terrafm_modalities"] == ["toy"] and list(ds.data_vars)[:4] == list(toy_sensor.variables)
    assert ds.mask_toy.values.mean() > 0.99

    model = create_model("terrafm_tiny", modalities=("toy",))
    emb = embed(ds.isel(time=0), model=model, **KW)
    assert emb.attrs["modalities"] == ["toy"] and emb.valid.values[:, :-1].all()    # last column: past the scene
    # the first chip's patches are the model's output on the registry-normalized pixels
    stack = np.stack([ds[v].values[0, :64, :64] for v in toy_sensor.variables])[None]
    with torch.inference_mode():
        ref = model({"toy": torch.from_numpy(sensors.normalize(stack, "toy"))}).patch[0].numpy()
    np.testing.assert_allclose(emb.values[:4, :4], ref, rtol=1e-4, atol=1e-4)


def _release_layout_file(tmp_path, seed):
    state = create_model("terrafm_tiny", seed=seed).state_dict()
    path = tmp_path / f"release_like_{seed}.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("patch_embed.fusion.")}, path)
    return path


def test_public_release_layout_gives_the_same_fused_embedding_every_time(tmp_path):
    weights = _release_layout_file(tmp_path, seed=7)
    ds = make_dataset(height=64, width=128)
    first = embed(ds, model=create_model("terrafm_tiny", weights=weights, seed=1), **KW)
    second = embed(ds, model=create_model("terrafm_tiny", weights=weights, seed=2), **KW)
    np.testing.assert_array_equal(first.values, second.values)
    assert first.attrs["fusion"] == "mean" and first.valid_s1.values.all() and first.valid_s2_l2a.values.all()
    trained = embed(ds, model=create_model("terrafm_tiny", seed=7), **KW)
    assert trained.attrs["fusion"] == "random" and not np.allclose(trained.values, first.values)


def test_old_bare_band_names_and_a_mix_are_refused_before_any_compute():
    ds = make_dataset(height=64, width=64)
    old = ds.rename({v: v.split("_", 2)[-1] for v in sensors.MODALITIES["s2_l2a"].variables})
    model = create_model("terrafm_tiny")
    with pytest.raises(ValueError, match=r"mixes new variable names \(of \['s1'\]\) with old bare band names.*s2_l2a_B"):
        embed(old, model=model, **KW)
    only_old = old.rename(s1_vv="vv", s1_vh="vh")
    with pytest.raises(ValueError, match=r"old bare names.*ds.rename\(\{'B01': 's2_l2a_B01'"):
        prepare.normalize(only_old)


def test_l2a_and_l1c_on_different_grids_merged_are_refused():
    a = _as_level(make_dataset(height=64, width=64, s1=False), "s2_l2a", 1500)
    b = _as_level(make_dataset(height=64, width=64, s1=False), "s2_l1c", 1500)
    b = b.assign_coords(x=b.x.values + 3.0)                  # the L1C grid 3 m east
    # what xr.merge(join="outer") makes of them: the union of both x axes, NaN where a level has no pixel
    x = np.union1d(a.x.values, b.x.values)
    padded = {}
    for part in (a, b):
        at = np.searchsorted(x, part.x.values)
        for v in part.data_vars:
            full = np.full((1, 64, len(x)), np.nan, "float32")
            full[..., at] = part[v].values
            padded[v] = (("time", "y", "x"), full)
    merged = xr.Dataset(padded, coords={"time": a.time.values, "y": a.y.values, "x": x, "spatial_ref": a.spatial_ref.variable})
    with pytest.raises(ValueError, match="'x' coordinate is not a regular grid.*terrafm.stac.load"):
        embed(merged, model=create_model("terrafm_tiny"), **KW)
