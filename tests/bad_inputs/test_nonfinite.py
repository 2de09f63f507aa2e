"""Class 5 of issue 15: non-finite results must never be marked valid.

- ``load_weights`` (and so ``create_model(weights=...)`` and ``embed(weights=...)``) refuses a
  checkpoint with NaN or inf values, naming the tensors; an empty file is a clear error.
- ``embed`` refuses a model object with non-finite parameters before any compute.
- ``Engine.process`` marks every output vector that is not finite invalid (NaN in the embedding,
  ``valid`` False) and logs how many, whatever produced it (a model, inputs that overflow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embed"))

from embed_helpers import make_dataset  # noqa: E402

import terrafm  # noqa: E402
from terrafm.model import CheckpointError, create_model, load_weights  # noqa: E402
from terrafm.model.terrafm import TerraFMOutput  # noqa: E402
from bad_input_helpers import SEE, run  # noqa: E402



def _poisoned_state(**values):
    state = {k: v.clone() for k, v in create_model("terrafm_tiny").state_dict().items()}
    for name, (index, value) in values.items():
        state[name].view(-1)[index] = value
    return state


CHECKPOINTS = [
    pytest.param(lambda: _poisoned_state(cls_token=(0, float("nan"))),
                 r"holds non-finite parameters: cls_token \(1 of 64 values NaN/inf\)", id="nan-cls-token"),
    pytest.param(lambda: _poisoned_state(**{"blocks.0.attn.qkv.weight": (5, float("inf"))}),
                 r"blocks\.0\.attn\.qkv\.weight \(1 of 12288 values NaN/inf\)", id="inf-in-attention"),
    pytest.param(lambda: _poisoned_state(pos_embed=(3, float("-inf")), **{"norm.weight": (0, float("nan"))}),
                 r"norm\.weight \(1 of 64 values NaN/inf\), pos_embed \(1 of \d+ values NaN/inf\)",
                 id="two-tensors-named"),
    pytest.param(lambda: _poisoned_state(**{"patch_embed.fusion.queries": (0, float("nan"))}),
                 r"patch_embed\.fusion\.queries", id="nan-in-trained-fusion"),
    pytest.param(lambda: {"model": {f"module.{k}": v for k, v in _poisoned_state(cls_token=(1, float("nan"))).items()}},
                 r"cls_token \(1 of 64", id="nan-in-wrapped-ddp-checkpoint"),
]


@pytest.mark.parametrize("make, message", CHECKPOINTS)
def test_checkpoints_with_non_finite_values_are_refused(make, message, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save(make(), path)
    target = create_model("terrafm_tiny")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=message + r".*gives NaN embeddings.*download the weights again"):
        load_weights(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())   # nothing loaded
    with pytest.raises(CheckpointError, match=message):
        create_model("terrafm_tiny", weights=path)


def test_embed_with_a_non_finite_checkpoint_fails_before_reading(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save(_poisoned_state(cls_token=(0, float("nan"))), path)
    with pytest.raises(CheckpointError, match="cls_token"):
        terrafm.embed(make_dataset(64, 64), model="terrafm_tiny", weights=path, chip_size=64, device="cpu",
                      progress=False)


@pytest.mark.parametrize("content, message", [
    pytest.param(b"", r"is empty \(0 bytes\): a download or export that was interrupted.*download or export it again",
                 id="empty-checkpoint"),
    pytest.param(b"PK\x03\x04garbage", r"is corrupt or truncated \(.*\); delete it and download or export it again",
                 id="garbage-checkpoint"),
])
def test_empty_and_garbage_checkpoints_are_clear_errors(content, message, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_weights(create_model("terrafm_tiny"), path)
    with pytest.raises(CheckpointError, match=message):
        create_model("terrafm_tiny", weights=path)


@pytest.mark.parametrize("tensor, value", [("cls_token", float("nan")), ("norm.weight", float("inf"))],
                         ids=["model-object-nan", "model-object-inf"])
def test_embed_refuses_a_model_object_with_non_finite_parameters(tensor, value):
    net = create_model("terrafm_tiny").eval()
    with torch.no_grad():
        dict(net.named_parameters())[tensor].view(-1)[0] = value
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=rf"the model has non-finite parameters: {tensor} \(1 of \d+ values.*"
                                         r"Load a good checkpoint.*" + SEE):
        run(make_dataset(64, 64), net)
    assert calls == []


def test_finite_weights_whose_sum_overflows_are_not_flagged_and_a_nan_among_them_is():
    from terrafm.model.weights import non_finite_tensors

    big = torch.full((4,), 3e38)                  # each value finite, the float32 sum is inf
    assert not torch.isfinite(big.sum())
    assert non_finite_tensors({"big": big, "n": torch.tensor([1, 2])}) == ""
    poisoned = big.clone()
    poisoned[2] = float("nan")
    assert non_finite_tensors({"big": big, "bad": poisoned}) == "bad (1 of 4 values NaN/inf)"
    half = torch.tensor([float("-inf"), 1.0], dtype=torch.float16)
    assert non_finite_tensors({"h": half}) == "h (1 of 2 values NaN/inf)"


# ------------------------------------------------------------------ every non-finite output is invalid
class Poisoned(torch.nn.Module):
    """The tiny model, with NaN/inf written into known output positions (finite parameters)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.embed_dim = inner.embed_dim

    def fold_for_inference(self, enabled=True):
        self.inner.fold_for_inference(enabled)
        return self

    @staticmethod
    def poison(h, w):
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        bad = (ii + jj) % 3 == 0
        bad[0, 1] = True
        return bad

    def forward(self, inputs, masks=None):
        out = self.inner(inputs, masks=masks)
        patch, cls = out.patch.clone(), out.cls.clone()
        h, w = patch.shape[1:3]
        bad = torch.as_tensor(self.poison(h, w))
        patch[:, bad] = float("nan")
        patch[:, 0, 1, 3] = float("inf")
        cls[0, 2] = float("nan")           # the first chip of each batch
        return TerraFMOutput(cls, patch, out.valid)


def test_non_finite_patch_vectors_are_invalid_and_counted(model, caplog):
    ds = make_dataset(64, 128)
    reference = run(ds, model)
    with caplog.at_level("WARNING", logger="terrafm.engine"):
        emb = run(ds, Poisoned(model))
    bad = np.tile(Poisoned.poison(4, 4), (1, 2))       # 4 x 8 patches: two 4 x 4 chips side by side
    expected_valid = reference.valid.values & ~bad
    np.testing.assert_array_equal(emb.valid.values, expected_valid)
    assert np.isnan(emb.values[~expected_valid]).all()
    np.testing.assert_array_equal(emb.values[expected_valid], reference.values[expected_valid])
    n_bad = int((reference.valid.values & bad).sum())
    assert n_bad > 0 and f"{n_bad} of 32 output positions are NaN/inf and are marked invalid" in caplog.text


def test_non_finite_chip_vectors_are_invalid(model, caplog):
    ds = make_dataset(64, 128)
    reference = run(ds, model, level="chip")
    with caplog.at_level("WARNING", logger="terrafm.engine"):
        emb = run(ds, Poisoned(model), level="chip")
    assert reference.valid.values.all()
    np.testing.assert_array_equal(emb.valid.values, [[[False, True]]])       # (time, y, x): chip (0, 0) poisoned
    assert np.isnan(emb.values[0, 0, 0]).all()
    np.testing.assert_array_equal(emb.values[0, 0, 1], reference.values[0, 0, 1])
    assert "1 of 2 output positions are NaN/inf" in caplog.text


def test_inputs_that_overflow_in_the_model_are_invalid(model, caplog):
    """Raw values finite in float32 whose products overflow: the engine, not the input check, is
    the last line here (embed's check refuses them earlier; see test_units_ranges)."""
    from odc.geo.geobox import GeoBox

    from terrafm.engine import Engine, ModalityInput
    from terrafm.tiling import ChipGrid

    ds = make_dataset(64, 64, s1=False)
    stack = np.stack([ds[v].values[0] for v in terrafm.sensors.MODALITIES["s2_l2a"].variables]).astype("float32")
    stack[:, :32] = 1e30
    engine = Engine(model, device="cpu")
    grid = ChipGrid(GeoBox.from_bbox((0, 0, 640, 640), "EPSG:32631", resolution=10), 64, 0)
    with caplog.at_level("WARNING", logger="terrafm.engine"):
        (result,) = list(engine.run({"s2_l2a": ModalityInput(stack, np.ones((64, 64), bool), raw=True)},
                                    grid, "patch", 1))
    finite = np.isfinite(result.embedding).all(-1)
    assert not finite.all(), "the overflow did not reach the output: this test no longer tests anything"
    np.testing.assert_array_equal(result.valid, finite)
    assert f"{int((~finite).sum())} of 16 output positions are NaN/inf" in caplog.text
