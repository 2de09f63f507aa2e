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


@pytest.mark.parametrize("name", ["vitb_paper", "vitl", "tiny_cpu"])
def test_shipped_configs_state_their_centering_and_offset(name):
    import yaml

    from pretrain.config import CONFIG_DIR

    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert raw["optim"]["centering"] == "dual" and raw["optim"]["alpha"] == 0.8
    assert raw["data"]["s2_offset"] == "raw"
    assert "cell_stats" in raw["data"]  # dual centering needs it: set on the command line


def test_centering_key_is_parsed_and_validated():
    assert load_config("tiny_cpu").optim.centering == "dual"
    cfg = load_config("tiny_cpu", ["optim.centering=dino"]).validate()
    assert cfg.optim.centering == "dino"
    assert cfg.fingerprint() != load_config("tiny_cpu").fingerprint()
    with pytest.raises(ConfigError, match=r"optim.centering='mean' must be one of \['dual', 'dino'\]"):
        load_config("tiny_cpu", ["optim.centering=mean"]).validate()
    with pytest.raises(ConfigError, match=r"data.frequent_classes=\[\].*or use optim.centering=dino"):
        load_config("tiny_cpu", ["data.frequent_classes=[]"]).validate()
    with pytest.raises(ConfigError, match=r"data.frequent_classes=\[10\] is set but optim.centering='dino'"):
        load_config("tiny_cpu", ["optim.centering=dino", "data.frequent_classes=[10]"]).validate()


def test_offset_key_is_parsed_and_validated():
    assert load_config("tiny_cpu", ["data.s2_offset=harmonize"]).validate().data.s2_offset == "harmonize"
    with pytest.raises(ConfigError, match=r"data.s2_offset='clip' must be one of \['raw', 'harmonize'\]"):
        load_config("tiny_cpu", ["data.s2_offset=clip"]).validate()
    with pytest.raises(ConfigError, match="a GeoTIFF folder does not record"):
        load_config("tiny_cpu", ["data.s2_offset=harmonize", "data.kind=folder"]).validate()


def test_dual_centering_without_land_cover_stops_the_run_with_the_fix(majortom):
    from pretrain.train import build_tiles

    root = majortom["root"]
    cfg = load_config("tiny_cpu", [f"data.root={root}"])
    with pytest.raises(ConfigError, match=r"needs each sample's land cover.*data.cell_stats, which is not set.*"
                                          r"optim.centering=dino"):
        build_tiles(cfg)
    _, frequent = build_tiles(load_config("tiny_cpu", [f"data.root={root}", "optim.centering=dino"]))
    assert frequent == []
    _, frequent = build_tiles(load_config("tiny_cpu", [f"data.root={root}", f"data.cell_stats={root / 'cell_stats.csv'}"]))
    counts = majortom["stats"].worldcover.value_counts()
    assert frequent == [int(counts.index[counts == counts.max()].min())]  # n_frequent: 1, ties: lower class
    with pytest.raises(ConfigError, match="the 'landcover' column of .*labels.csv, which is absent"):
        build_tiles(load_config("tiny_cpu", [f"data.root={root / 'knn'}", "data.kind=folder"]))
