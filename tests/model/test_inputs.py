"""Bad inputs get an error that names the problem and the fix; registry and devices."""

from __future__ import annotations

import pytest
import torch

from terrafm.model import autocast_dtype, create_model, get_config, list_models, resolve_device


@pytest.fixture(scope="module")
def model():
    return create_model("terrafm_tiny").eval()


def x(c=12, s=32, b=2):
    return torch.rand(b, c, s, s)


@pytest.mark.parametrize("inputs, error, pattern", [
    ({}, ValueError, "inputs is empty"),
    ({"sentinel2": x()}, KeyError, r"unknown modality keys \['sentinel2'\].*s2_l2a"),
    ({"s2_l2a": x(c=13)}, ValueError, r"expected 12 channels .*B01.*got 13"),
    ({"s1": x(c=3)}, ValueError, r"expected 2 channels \['vv', 'vh'\]"),
    ({"s2_l2a": x(s=40)}, ValueError, r"multiples of 16, got 40x40.*48"),
    ({"s2_l2a": x(), "s1": x(c=2, b=3)}, ValueError, "disagree on batch or size"),
    ({"s2_l2a": x(), "s1": x(c=2, s=48)}, ValueError, "disagree on batch or size"),
    ({"s2_l2a": x().to(torch.int32)}, TypeError, "sensors.normalize"),
    ({"s2_l2a": torch.rand(12, 32, 32)}, ValueError, r"\(B, C, H, W\)"),
])
def test_bad_inputs(model, inputs, error, pattern):
    with pytest.raises(error, match=pattern):
        model(inputs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_points_to_masks(model, value):
    image = x()
    image[0, 3, 5, 5] = value
    with pytest.raises(ValueError, match="NaN or inf.*masks"):
        model({"s2_l2a": image})


def test_non_finite_input_is_named_among_several_modalities(model):
    s1 = x(c=2)
    s1[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^s1: input contains NaN"):
        model({"s2_l2a": x(), "s1": s1})


def test_finite_input_whose_sum_overflows_is_accepted(model):
    """The fast test sums the input; a sum that overflows must fall back to the element test."""
    image = torch.full((2, 12, 32, 32), 3e38)
    assert not torch.isfinite(image.sum())
    assert model.eval()({"s2_l2a": image}).cls.shape == (2, model.embed_dim)


def test_bad_masks(model):
    with pytest.raises(ValueError, match=r"per pixel \(2, 32, 32\) or per patch \(2, 2, 2\)"):
        model({"s1": x(c=2)}, {"s1": torch.ones(2, 3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="boolean"):
        model({"s1": x(c=2)}, {"s1": torch.ones(2, 2, 2)})
    with pytest.raises(KeyError, match="no input for it"):
        model({"s1": x(c=2)}, {"s2_l2a": torch.ones(2, 2, 2, dtype=torch.bool)})


def test_registry_and_overrides():
    assert {"terrafm_base", "terrafm_large", "terrafm_tiny"} <= set(list_models())
    base, large = get_config("terrafm_base"), get_config("terrafm_large")
    assert (base.embed_dim, base.depth, base.num_heads, base.attn_dim) == (768, 12, 12, 2304)
    assert (large.embed_dim, large.depth, large.num_heads, large.attn_dim) == (1024, 24, 16, 3072)
    model = create_model("terrafm_tiny", drop_path_rate=0.2)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.2])
    with pytest.raises(KeyError, match="registered"):
        create_model("terrafm_huge")
    with pytest.raises(TypeError, match="unknown config overrides \\['depht'\\]"):
        create_model("terrafm_tiny", depht=3)
    with pytest.raises(ValueError, match="not divisible"):
        create_model("terrafm_tiny", num_heads=5)


def test_device_and_precision_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_dtype(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cpu_bf16_autocast_stays_close(model):
    from terrafm.model import autocast

    image = {"s2_l2a": x()}
    with torch.inference_mode():
        full = model(image).patch
        with autocast(torch.device("cpu"), "bf16"):
            low = model(image).patch.float()
    assert torch.allclose(full, low, atol=0.1)


def test_config_modalities_are_explicit_and_known():
    from terrafm.model import ModelConfig

    with pytest.raises(TypeError, match="modalities"):
        ModelConfig("no_modalities", embed_dim=64, num_heads=4, fusion_heads=4)
    with pytest.raises(ValueError, match=r"unknown modalities \['s3_olci'\]: register them in terrafm.sensors"):
        ModelConfig("toy", modalities=("s2_l2a", "s3_olci"), embed_dim=64, num_heads=4, fusion_heads=4)
    with pytest.raises(ValueError, match="repeat a key"):
        ModelConfig("toy", modalities=("s1", "s1"), embed_dim=64, num_heads=4, fusion_heads=4)
    with pytest.raises(TypeError, match=r"tuple of modality keys, e.g."):
        ModelConfig("toy", modalities="s1", embed_dim=64, num_heads=4, fusion_heads=4)
    config = ModelConfig("toy", modalities=["s1"], embed_dim=64, num_heads=4, fusion_heads=4)
    assert config.modalities == ("s1",) and config.in_chans("s1") == 2
