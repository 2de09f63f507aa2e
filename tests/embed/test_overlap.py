"""The overlap default and settings: the default's seams on real imagery, the settings' rules,
refusal of a store computed with another overlap, the seam figures by hand."""

from __future__ import annotations

import numpy as np
import pytest

import terrafm
from terrafm.tiling import OVERLAP_SETTINGS, default_margin, resolve_margin, seam_figures, seam_positions

from embed_helpers import make_dataset

PREVIOUS_DEFAULT = 48      # a quarter of a 224 px chip, the default before the overlap table
# measured on this scene (benchmarks/README.md): step ratio 1.25 with the default, 1.56 without
# overlap; seam metric 1.00; deviation from one chip 0.58 (0.55 without overlap)
STEP_BOUND = 1.35
SEAM_BOUND = 1.05
DEVIATION_BOUND = 0.65


@pytest.fixture(scope="module")
def real_scene():
    """The real Sentinel-2 L1C demo scene (448 x 448 px, 12 bands) as s2_l1c_<band> variables."""
    import rioxarray
    import xarray as xr

    from terrafm.demo import DEMO_FILE
    from terrafm.sensors import MODALITIES

    da = rioxarray.open_rasterio(DEMO_FILE)
    return xr.Dataset({v: da.isel(band=i, drop=True) for i, v in enumerate(MODALITIES["s2_l1c"].variables)})


def test_default_overlap_keeps_seams_invisible_on_real_imagery(real_scene):
    """TerraFM-B with release-layout random weights on real pixels: with the default overlap the
    neighbour differences across chip boundaries stay under the bound no overlap exceeds, the
    deviation from one chip over the whole scene is not concentrated at the seams and stays
    bounded (overlap table in benchmarks/README.md)."""
    import torch

    from terrafm.model import create_model

    torch.set_num_threads(2)
    model = create_model("terrafm_base", seed=0).eval()
    kw = dict(model=model, device="cpu", progress=False, precision="fp32", batch_size=8)
    reference = terrafm.embed(real_scene, chip_size=448, overlap=0, **kw).values
    default = terrafm.embed(real_scene, chip_size=224, **kw)
    assert default.attrs["overlap"] == default_margin(224)
    none = terrafm.embed(real_scene, chip_size=224, overlap=0, **kw).values
    chosen = seam_figures(default.values, reference, 224, default_margin(224))
    without = seam_figures(none, reference, 224, 0)
    assert chosen["step_ratio"] < STEP_BOUND < without["step_ratio"], (chosen, without)
    assert chosen["seam_metric"] < SEAM_BOUND, chosen
    assert chosen["relative_deviation"] < DEVIATION_BOUND, chosen


def test_overlap_settings():
    assert resolve_margin(224, None) == default_margin(224) == resolve_margin(224, "default")
    assert resolve_margin(224, "fast") == OVERLAP_SETTINGS["fast"](224) < default_margin(224)
    assert resolve_margin(320, np.int64(32)) == 32 and isinstance(resolve_margin(320, np.int64(32)), int)
    assert [default_margin(c) for c in (48, 64, 224, 320, 448)] == [0, 16, 16, 16, 16]
    with pytest.raises(ValueError, match="overlap='wide' is not a setting.*'default', 'fast'"):
        resolve_margin(224, "wide")
    for bad in (True, 2.5, "32"):
        with pytest.raises((TypeError, ValueError), match="overlap="):
            resolve_margin(224, bad)


def test_bad_overlap_refused_before_the_model_is_built(tiny_model):
    ds = make_dataset(height=96, width=96, s1=False)
    with pytest.raises(ValueError, match="overlap='wide' is not a setting"):
        terrafm.embed(ds, model="no_such_model", chip_size=64, overlap="wide", device="cpu", progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        terrafm.embed(ds, model=tiny_model, chip_size=64, overlap=24, device="cpu", progress=False)


def test_store_of_the_previous_default_is_refused_by_the_new_default(tiny_model, tmp_path):
    """A store made with the old default (48 px on 224 px chips) is not mixed with blocks of the
    new default: the resume is refused naming the overlap and the fix; likewise compile=True."""
    import zarr

    from terrafm.store import EMBEDDING_VAR

    ds = make_dataset(height=224, width=224, s1=False)
    kw = dict(model=tiny_model, chip_size=224, device="cpu", progress=False)
    out = tmp_path / "old.zarr"
    terrafm.embed(ds, out=out, overlap=PREVIOUS_DEFAULT, **kw)
    before = np.asarray(zarr.open_group(str(out), mode="r")[EMBEDDING_VAR][...])
    with pytest.raises(ValueError, match=rf"overlap: the store has {PREVIOUS_DEFAULT}, this run "
                                         rf"{default_margin(224)}.*overlap={PREVIOUS_DEFAULT}"):
        terrafm.embed(ds, out=out, **kw)
    with pytest.raises(ValueError, match="compile: the store has False, this run True.*compile=False"):
        terrafm.embed(ds, out=out, overlap=PREVIOUS_DEFAULT, compile=True, **kw)
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(out), mode="r")[EMBEDDING_VAR][...]), before)
    assert "compile" not in terrafm.embed(ds, out=out, overlap=PREVIOUS_DEFAULT, **kw).attrs   # resumes as it was


def test_seam_figures_by_hand():
    # 8 x 8 patches, chips of 96 px with 16 px overlap: interiors of 4 patches, seams at 3 and 4
    assert np.flatnonzero(seam_positions(8, 96, 16)).tolist() == [3, 4]
    assert not seam_positions(8, 224, 0).any()              # one interior covers the whole axis
    y, x = np.mgrid[0:8, 0:8].astype(float)
    reference = np.stack([x, y, np.zeros_like(x)], -1)
    seam = seam_positions(8, 96, 16)
    offset = np.where(seam[:, None] | seam[None, :], 2.0, 1.0)
    tiled = reference + offset[..., None] * np.array([0, 0, 1.0])
    figures = seam_figures(tiled, reference, 96, 16)
    spread = np.hypot(x - 3.5, y - 3.5).mean()
    assert figures["seam_metric"] == pytest.approx(2.0)
    assert figures["relative_deviation"] == pytest.approx(offset.mean() / spread)
    # a map whose values jump by 3 more across each chip boundary than between neighbours within
    jumps = np.stack([x + 3 * (x // 4), y + 3 * (y // 4)], -1)
    assert seam_figures(jumps, np.zeros_like(jumps), 96, 16)["step_ratio"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="same \\(y, x, D\\) grid"):
        seam_figures(tiled[:4], reference, 96, 16)
