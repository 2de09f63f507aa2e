"""Configs: the shipped ones validate; inconsistent ones fail with the problem and the fix."""

import pytest

from pretrain.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["vitb_paper", "vitl", "tiny_cpu"])
def test_shipped_configs_validate(name):
    cfg = load_config(name).validate()
    assert cfg.total_iters > 0


def test_paper_recipe_numbers():
    cfg = load_config("vitb_paper")
    assert (cfg.model.name, cfg.optim.epochs, cfg.optim.batch_size) == ("terrafm_base", 150, 1024)
    assert (cfg.augment.global_size, cfg.augment.local_size, cfg.data.tile_size) == (224, 96, 534)
    assert cfg.model.out_dim == 65536 and cfg.optim.alpha == 0.8
    assert load_config("vitl").model.name == "terrafm_large"


def test_inconsistent_sizes_are_reported_with_fixes():
    cfg = load_config("tiny_cpu", ["augment.global_size=40", "data.tile_size=16", "optim.batch_size=7"])
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=2)
    text = str(info.value)
    assert "global_size=40 must be a positive multiple of 16" in text
    assert "tile_size=16 is smaller than augment.local_size=32" in text
    assert "not divisible by the 2 ranks" in text


def test_unknown_keys_and_bad_overrides():
    with pytest.raises(ConfigError, match="unknown keys \\['globl_size'\\]"):
        load_config("tiny_cpu", ["augment.globl_size=64"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config("tiny_cpu", ["epochs=3"])
    with pytest.raises(FileNotFoundError, match="tiny_cpu"):
        load_config("no_such_config")
