"""terrafm_base with a release-layout checkpoint == an independent float64 re-implementation;
the release's pinned modalities and its deterministic (masked-mean) fusion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reference_terrafm import reference_forward, release_shapes
from terrafm import sensors
from terrafm.model import ModelConfig, create_model, get_config, load_weights

STEMS = {"s2_l2a": 12, "s2_l1c": 12, "s1": 2}


@pytest.fixture(scope="module")
def release_file(release_checkpoint):
    """The session's release-layout file (random_release_checkpoint(seed=1)) and its tensors in
    float64, converted once for every reference_forward of the module (a call would otherwise
    convert all 113 M values, ~1 s, each time)."""
    state = torch.load(release_checkpoint, mmap=True, weights_only=True)
    return release_checkpoint, {k: v.double() for k, v in state.items()}


@pytest.fixture(scope="module")
def base_model(release_file):
    path, _ = release_file
    model = create_model("terrafm_base")
    result = load_weights(model, path)
    assert result.n_tensors == 164 and result.fusion_mode == model.fusion_mode == "mean"
    return model.eval()


def test_release_layout_counts(release_file, base_model):
    _, state = release_file
    assert len(state) == 164
    assert sum(v.numel() for v in state.values()) == 112_951_296
    model_state = base_model.state_dict()   # create_model("terrafm_base"): its keys and shapes
    released = {k: tuple(v.shape) for k, v in model_state.items() if not k.startswith("patch_embed.fusion.")}
    assert released == release_shapes()


@pytest.mark.parametrize("modality", list(STEMS))
def test_every_stem_matches_float64_reference_at_224(base_model, release_file, modality):
    _, state = release_file
    torch.manual_seed(2)
    # a batch of two for the first stem (samples stay apart); the other stems differ only before
    # the shared trunk, and each float64 reference image costs seconds
    x = torch.rand(2 if modality == "s2_l2a" else 1, STEMS[modality], 224, 224)
    with torch.inference_mode():
        out = base_model({modality: x})
    cls, patch = reference_forward(state, modality, x)
    assert out.valid.all()
    assert (out.cls.double() - cls).abs().max().item() <= 1e-5
    assert (out.patch.double() - patch).abs().max().item() <= 1e-5


@pytest.mark.parametrize("side", [128, 256])
def test_other_sizes_resize_pos_embed_bicubically(base_model, release_file, side):
    _, state = release_file
    x = torch.rand(1, 12, side, side, generator=torch.Generator().manual_seed(side))
    with torch.inference_mode():
        out = base_model({"s2_l2a": x})
        again = base_model({"s2_l2a": x})  # served from the pos_embed cache
    cls, patch = reference_forward(state, "s2_l2a", x)
    assert out.patch.shape == (1, side // 16, side // 16, 768)
    assert (out.patch.double() - patch).abs().max().item() <= 1e-4
    assert (out.cls.double() - cls).abs().max().item() <= 1e-4
    assert torch.equal(out.patch, again.patch)


def test_non_square_input(base_model, release_file):
    _, state = release_file
    x = torch.rand(1, 2, 96, 160, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        out = base_model({"s1": x})
    cls, patch = reference_forward(state, "s1", x)
    assert out.patch.shape == (1, 6, 10, 768)
    assert (out.patch.double() - patch).abs().max().item() <= 1e-4


@pytest.mark.parametrize("modalities", [("s2_l1c",), ("s2_l2a", "s1")])
def test_folded_path_equals_the_layer_by_layer_path(base_model, modalities):
    """fold_for_inference changes the arithmetic, not the function: the folded maps are float64
    products rounded once to float32, the layer path rounds after every matmul (K = 2304 terms),
    so the two differ by float32 rounding only; measured <= 2e-6 on the normalized outputs."""
    g = torch.Generator().manual_seed(4)
    x = {k: torch.rand(2, sensors.MODALITIES[k].n_bands, 64, 64, generator=g) for k in modalities}
    masks = {k: torch.rand(2, 4, 4, generator=g) > 0.3 for k in modalities[1:]}
    try:
        with torch.inference_mode():
            folded = base_model.fold_for_inference()(x, masks)
            layered = base_model.fold_for_inference(False)(x, masks)
    finally:
        base_model.fold_for_inference(False)
    assert torch.equal(folded.valid, layered.valid)
    assert (folded.patch - layered.patch).abs().max().item() <= 1e-5
    assert (folded.cls - layered.cls).abs().max().item() <= 1e-5


def test_release_without_fusion_is_deterministic(release_file):
    """Two models built from the same fusion-less file are the same model, bit for bit."""
    path, _ = release_file
    first, second = (create_model("terrafm_base", weights=path).eval() for _ in range(2))
    assert first.fusion_mode == second.fusion_mode == "mean"
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(6)
    x = {"s2_l2a": torch.rand(2, 12, 64, 64, generator=g), "s1": torch.rand(2, 2, 64, 64, generator=g)}
    masks = {"s1": torch.rand(2, 64, 64, generator=g) > 0.2}
    with torch.inference_mode():
        out_a, out_b = first(x, masks), second(x, masks)
    assert torch.equal(out_a.patch, out_b.patch) and torch.equal(out_a.cls, out_b.cls)
    del first, second


def test_release_modalities_are_pinned_not_taken_from_the_registry(release_file, monkeypatch):
    """A modality added to the registry changes neither terrafm_base's stems nor its strict load."""
    path, _ = release_file
    assert "modalities" not in {f.name for f in dataclasses.fields(ModelConfig)
                                if f.default is not dataclasses.MISSING}
    monkeypatch.setitem(sensors.MODALITIES, "toy4", sensors.MODALITIES["s1"])
    for name in ("terrafm_base", "terrafm_large"):
        assert get_config(name).modalities == ("s2_l2a", "s2_l1c", "s1")
    model = create_model("terrafm_base", weights=path)
    assert model.modalities == ("s2_l2a", "s2_l1c", "s1") and model.fusion_mode == "mean"
    del model


def test_intermediate_layers_match_reference_depths(base_model, release_file):
    """The last requested layer with the final norm is the model output."""
    x = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        layers = base_model.get_intermediate_layers({"s1": x}, indices=(3, 5, 7, 11))
        out = base_model({"s1": x})
    assert [tuple(t.shape) for t in layers] == [(1, 4, 4, 768)] * 4
    assert torch.allclose(layers[-1], out.patch, atol=1e-6)
    assert not torch.allclose(layers[0], layers[-1])
    with torch.inference_mode():
        last_two = base_model.get_intermediate_layers({"s1": x}, indices=2)
    assert torch.allclose(last_two[1], out.patch, atol=1e-6)


def test_pos_embed_cache_follows_parameter_updates(base_model):
    x = torch.rand(1, 2, 96, 96)
    with torch.inference_mode():
        before = base_model({"s1": x}).cls.clone()
    saved = base_model.pos_embed.detach().clone()
    try:
        with torch.no_grad():
            base_model.pos_embed.add_(0.5)
        with torch.inference_mode():
            after = base_model({"s1": x}).cls
        assert not torch.allclose(before, after)
    finally:
        with torch.no_grad():
            base_model.pos_embed.copy_(saved)
