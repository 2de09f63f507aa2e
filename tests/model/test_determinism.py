"""Deterministic defaults of the model: seeded construction, the masked-mean fusion of a checkpoint
without fusion parameters, and the explicitly chosen folded inference stem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_terrafm import random_release_checkpoint
from terrafm import sensors
from terrafm.model import create_model, load_weights
from terrafm.model.fusion import CrossAttentionFusion

B, S = 2, 64
KEYS = ("s2_l2a", "s2_l1c", "s1")
FUSION = "patch_embed.fusion."


def _images(seed: int = 1, batch: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(batch, sensors.MODALITIES[k].n_bands, S, S, generator=g) for k in KEYS}


def _equal_state(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- create_model(weights=None)
def test_untrained_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = create_model("terrafm_tiny"), create_model("terrafm_tiny")
    assert torch.equal(torch.get_rng_state(), before)
    assert _equal_state(first, second) and first.fusion_mode == "random"
    other = create_model("terrafm_tiny", seed=1)
    assert not torch.equal(other.cls_token, first.cls_token)
    assert not torch.equal(other.patch_embed.fusion.queries, first.patch_embed.fusion.queries)
    with torch.inference_mode():
        assert torch.equal(first.eval()(_images()).patch, second.eval()(_images()).patch)


def test_seed_none_draws_from_the_global_rng():
    """For pretraining, whose run seed governs the initialisation (build_student_teacher)."""
    torch.manual_seed(5)
    a = create_model("terrafm_tiny", seed=None)
    torch.manual_seed(5)
    b = create_model("terrafm_tiny", seed=None)
    c = create_model("terrafm_tiny", seed=None)
    assert _equal_state(a, b) and not torch.equal(b.cls_token, c.cls_token)


# ---------------------------------------------------------------------- masked-mean fusion
@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
    """A tiny model saved in the release layout (no fusion) and loaded back: the 'mean' fusion."""
    state = random_release_checkpoint(seed=7, embed=64, depth=2)   # weights of realistic scale
    path = tmp_path_factory.mktemp("release") / "tiny_release.pth"
    torch.save(state, path)
    model = create_model("terrafm_tiny", weights=path).eval()
    assert model.fusion_mode == "mean"
    return path, state, model


def _reference_tokens(state, images, patch_valid):
    """Stem tokens in float64 from the state dict alone: per modality ``norm_input(proj1(conv(x) +
    e_m))``, their plain mean over the valid modalities (zero where none is), ``proj3(proj2(.))``."""
    s = {k: v.double() for k, v in state.items()}
    pe = "patch_embed."
    values = []
    for k in KEYS:
        t = F.conv2d(images[k].double(), s[pe + f"conv2d_{k}.weight"], s[pe + f"conv2d_{k}.bias"], stride=16)
        t = t.flatten(2).transpose(1, 2) + s[pe + f"{k}_embed"]
        t = F.layer_norm(t @ s[pe + "projection.proj1.weight"].T, t.shape[-1:],
                         s[pe + "projection.norm_input.weight"], s[pe + "projection.norm_input.bias"])
        values.append(t)
    values = torch.stack(values)                                     # (M, B, N, D)
    valid = torch.stack([patch_valid[k] for k in KEYS]).double()     # (M, B, N)
    count = valid.sum(0)
    mean = (values * valid[..., None]).sum(0) / count.clamp(min=1)[..., None]
    out = mean @ s[pe + "projection.proj2.weight"].T + s[pe + "projection.proj2.bias"]
    return out @ s[pe + "projection.proj3.weight"].T + s[pe + "projection.proj3.bias"], count


@pytest.mark.parametrize("folded", [False, True])
def test_fusion_without_checkpoint_parameters_is_the_masked_mean(release_like, folded):
    """Against a float64 masked mean, at positions with 3, 2, 1 and 0 valid modalities.

    Tolerance 2e-5: float32 stems over 12x16x16 = 3072 inputs and 192-wide projections round
    to ~1e-6 relative on tokens of magnitude ~3 (measured max 2.4e-6 layered, 5.2e-6 folded);
    the former random fusion initialisation, near-uniform as it is, is off by 1e-3."""
    _, state, model = release_like
    images = _images()
    g = torch.Generator().manual_seed(2)
    patch_valid = {k: torch.rand(B, 16, generator=g) > 0.4 for k in KEYS}
    patch_valid["s2_l2a"][0, :4] = True      # position 0..3 of sample 0: 3, 2, 1, 0 valid
    patch_valid["s2_l1c"][0, :4] = torch.tensor([True, True, False, False])
    patch_valid["s1"][0, :4] = torch.tensor([True, False, False, False])
    patch_valid["s2_l2a"][0, 3] = False
    expected, count = _reference_tokens(state, images, patch_valid)
    assert {0, 1, 2, 3} <= set(count.flatten().long().tolist())
    model.fold_for_inference(folded)
    try:
        with torch.inference_mode():
            tokens, position_valid = model.patch_embed(images, patch_valid)
    finally:
        model.fold_for_inference(False)
    assert torch.equal(position_valid, count > 0)
    error = (tokens.double() - expected).abs()
    assert error.max().item() <= 2e-5, error.max()
    assert expected.abs().max() > 1.0           # the comparison is on tokens of real size


def test_mean_fusion_module_is_the_mean_to_rounding():
    """The fusion step alone, on values 1e3 apart: the mean up to a few float32 ulp."""
    fusion = CrossAttentionFusion(dim=24, num_queries=5, num_heads=4)
    fusion.set_masked_mean()
    g = torch.Generator().manual_seed(0)
    tokens, values = torch.randn(7, 3, 24, generator=g), 1e3 * torch.randn(7, 3, 24, generator=g)
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]]).bool()
    fused = fusion(tokens, values, valid).double()
    v64, w64 = values.double(), valid.double()
    mean = (v64 * w64[..., None]).sum(1) / w64.sum(1).clamp(min=1)[:, None]
    assert (fused - mean).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * 3e3
    assert torch.equal(fused[3], v64[3, 0]) and torch.equal(fused[4], v64[4, 2])   # one: exact
    assert torch.count_nonzero(fused[5]) == 0                                       # none: zero


def test_single_modality_with_the_mean_fusion_is_the_release_path(release_like):
    _, _, model = release_like
    images = _images()
    masks = {"s2_l1c": torch.zeros(B, 4, 4, dtype=torch.bool), "s1": torch.zeros(B, S, S, dtype=torch.bool)}
    with torch.inference_mode():
        alone, masked = model({"s2_l2a": images["s2_l2a"]}), model(images, masks)
    assert torch.equal(alone.patch, masked.patch) and torch.equal(alone.cls, masked.cls)


def test_two_loads_of_a_release_layout_file_are_bit_identical(release_like):
    path, _, model = release_like
    again = create_model("terrafm_tiny", weights=path, seed=3).eval()   # another starting point
    assert _equal_state(model, again)
    images = _images(9)
    with torch.inference_mode():
        a, b = model({"s2_l2a": images["s2_l2a"], "s1": images["s1"]}), again({"s2_l2a": images["s2_l2a"],
                                                                              "s1": images["s1"]})
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)


# ---------------------------------------------------------------------- folded inference stem
def test_grad_mode_no_longer_chooses_the_stem(monkeypatch):
    """Off by default, whatever the grad mode; on only after fold_for_inference()."""
    from terrafm.model import patch_embed

    folds = []
    original = patch_embed._FoldedStem._fold
    monkeypatch.setattr(patch_embed._FoldedStem, "_fold", staticmethod(lambda e: folds.append(1) or original(e)))
    model = create_model("terrafm_tiny").eval()
    assert not model.folded_for_inference
    with torch.inference_mode():
        model(_images())
    assert folds == []
    with torch.inference_mode():
        model.fold_for_inference()(_images())
        model(_images())
    assert folds == [1]                       # folded once, then reused


def test_folded_path_refuses_a_forward_that_needs_parameter_gradients():
    model = create_model("terrafm_tiny").train().fold_for_inference()
    with pytest.raises(RuntimeError, match=r"fold_for_inference\(False\).*no_grad"):
        model(_images())
    out = model.fold_for_inference(False)(_images())
    out.cls.square().sum().backward()   # (a plain sum of a LayerNorm output has zero gradient)
    assert model.patch_embed.conv2d_s1.weight.grad.abs().sum() > 0


def test_folded_path_with_frozen_parameters_gives_input_gradients():
    """Folding only forbids parameter gradients: with the parameters frozen, gradients with
    respect to the pixels (e.g. saliency) are those of the exact path."""
    model = create_model("terrafm_tiny").eval().requires_grad_(False)
    grads = []
    for folded in (True, False):
        image = _images()["s1"].requires_grad_()
        out = model.fold_for_inference(folded)({"s1": image, "s2_l2a": _images()["s2_l2a"]})
        out.cls.square().sum().backward()
        grads.append(image.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_engine_turns_the_folded_path_on():
    from terrafm.engine import Engine

    model = create_model("terrafm_tiny")
    assert Engine(model, device="cpu").model.folded_for_inference


def test_pixel_to_patch_rule_is_the_registry_one(monkeypatch):
    """The model's input check delegates pixel masks to terrafm.sensors.patch_valid."""
    model = create_model("terrafm_tiny").eval()
    images = {"s2_l2a": _images()["s2_l2a"], "s1": _images()["s1"]}
    pixel = torch.ones(B, S, S, dtype=torch.bool)
    pixel[:, :16, :16] = False
    calls = []
    real = sensors.patch_valid
    monkeypatch.setattr(sensors, "patch_valid", lambda m, p=16: calls.append(tuple(m.shape)) or real(m, p))
    with torch.inference_mode():
        by_pixel = model(images, {"s1": pixel})
        by_patch = model(images, {"s1": real(pixel, 16)})
    assert calls == [(B, S, S)]
    assert torch.equal(by_pixel.patch, by_patch.patch)
