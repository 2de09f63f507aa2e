"""Crop geometry, co-registration across modalities, and modality-selection frequencies."""

import itertools

import numpy as np
import pytest
import torch

from pretrain.augment import MultiCropAugmentation, sample_crop_box, select_modalities


def test_crop_boxes_respect_scale_and_bounds():
    rng = np.random.default_rng(0)
    for scale in ((0.25, 1.0), (0.05, 0.25)):
        for _ in range(300):
            top, left, h, w = sample_crop_box(rng, 534, 534, scale)
            assert 0 <= top and top + h <= 534 and 0 <= left and left + w <= 534
            # rounding of the sides allows a small slack on the area fraction
            assert scale[0] * 0.97 <= h * w / 534 ** 2 <= scale[1] * 1.03
            assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_views_are_co_registered_across_modalities():
    # a coordinate ramp: the same geometry must give the same values in every modality
    side = 64
    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    ramp = yy * side + xx
    images = {"s2_l2a": ramp.expand(12, side, side).clone(), "s1": ramp.expand(2, side, side).clone()}
    mask = torch.ones(side, side, dtype=torch.bool)
    mask[:8] = False
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3, jitter_prob=0.0,
                                blur_probs=(0.0, 0.0, 0.0))
    views = aug(images, {"s2_l2a": mask, "s1": mask}, np.random.default_rng(3))
    assert [v.images["s1"].shape[-1] for v in views] == [32, 32, 16, 16, 16]
    for view in views:
        torch.testing.assert_close(view.images["s2_l2a"][0], view.images["s1"][0])
        assert torch.equal(view.masks["s2_l2a"], view.masks["s1"])
    # each view is exactly: crop the recorded box, resize, flip, rotate (an independent recomputation)
    for view in views:
        top, left, h, w = view.box
        size = view.images["s1"].shape[-1]
        expected = torch.nn.functional.interpolate(ramp[None, None, top:top + h, left:left + w], size=(size, size),
                                                   mode="bilinear", align_corners=False, antialias=True)[0, 0]
        if view.flips[0]:
            expected = expected.flip(-1)
        if view.flips[1]:
            expected = expected.flip(-2)
        expected = torch.rot90(expected, view.rotation, (-2, -1))
        torch.testing.assert_close(view.images["s1"][1], expected)
        mask_crop = mask[top:top + h, left:left + w]
        assert view.masks["s1"].float().mean() == pytest.approx(mask_crop.float().mean().item(), abs=0.08)


def test_mismatched_modality_sizes_are_rejected():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=1)
    with pytest.raises(ValueError, match="co-registered"):
        aug({"s2_l2a": torch.rand(12, 64, 64), "s1": torch.rand(2, 60, 60)}, {}, np.random.default_rng(0))


def test_modality_selection_frequencies_match_the_rule():
    available = ["s2_l2a", "s2_l1c", "s1"]
    rng = np.random.default_rng(0)
    n = 40000
    draws = [select_modalities(available, rng) for _ in range(n)]
    # P(kept) = 1/2 each; if none kept (1/8) one is drawn uniformly
    expected_single = 3 * (1 / 8) + 1 / 8
    singles = np.mean([len(d) == 1 for d in draws])
    assert singles == pytest.approx(expected_single, abs=0.01)
    for m in available:
        assert np.mean([m in d for d in draws]) == pytest.approx(0.5 + 1 / 8 / 3, abs=0.01)
    combos = {c: 0 for r in (2, 3) for c in itertools.combinations(available, r)}
    for d in draws:
        if len(d) > 1:
            combos[d] += 1
    for c, count in combos.items():
        assert count / n == pytest.approx(1 / 8, abs=0.01)  # each fusion subset: prob 1/8
    assert all(len(d) >= 1 for d in draws)
