"""Cross-attention fusion invariants on a tiny model, and an independent per-position loop."""

from __future__ import annotations

import math

import pytest
import torch

from terrafm.model import create_model
from terrafm.model.fusion import CrossAttentionFusion

B, S = 2, 64


@pytest.fixture(scope="module", params=[False, True], ids=["layered", "folded"])
def model(request):
    """The untrained tiny model (random fusion: non-trivial attention), on both stem paths."""
    return create_model("terrafm_tiny").eval().fold_for_inference(request.param)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return {"s2_l2a": torch.rand(B, 12, S, S, generator=g), "s2_l1c": torch.rand(B, 12, S, S, generator=g),
            "s1": torch.rand(B, 2, S, S, generator=g)}


def run(model, inputs, masks=None):
    with torch.inference_mode():
        return model(inputs, masks)


def test_one_modality_is_the_single_path_bit_for_bit(model, images):
    single = run(model, {"s2_l2a": images["s2_l2a"]})
    masked_others = run(model, images, {"s2_l1c": torch.zeros(B, 4, 4, dtype=torch.bool),
                                        "s1": torch.zeros(B, S, S, dtype=torch.bool)})
    assert torch.equal(single.cls, masked_others.cls)
    assert torch.equal(single.patch, masked_others.patch)
    assert masked_others.valid.all()


def test_modality_order_does_not_matter(model, images):
    forward = run(model, images)
    backward = run(model, dict(reversed(list(images.items()))))
    assert torch.equal(forward.patch, backward.patch)


def test_fusion_changes_the_output_and_uses_every_modality(model, images):
    fused = run(model, images)
    single = run(model, {"s2_l2a": images["s2_l2a"]})
    assert not torch.allclose(fused.patch, single.patch, atol=1e-4)
    changed = dict(images, s1=images["s1"] + 0.3)
    assert not torch.allclose(run(model, changed).patch, fused.patch, atol=1e-5)


def test_masked_modality_has_no_influence(model, images):
    mask = torch.ones(B, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = False
    mask[1] = False
    masks = {"s1": mask}
    base = run(model, images, masks)
    # change S1 pixels only under its invalid patches
    pixel_invalid = (~mask).repeat_interleave(16, 1).repeat_interleave(16, 2)
    altered = images["s1"] + 5.0 * pixel_invalid.unsqueeze(1)
    other = run(model, dict(images, s1=altered), masks)
    assert torch.equal(base.patch, other.patch) and torch.equal(base.cls, other.cls)
    # sample 1 has S1 masked everywhere: identical to the S2-only run for that sample
    no_s1 = run(model, {k: v for k, v in images.items() if k != "s1"})
    assert torch.equal(base.patch[1], no_s1.patch[1])


def test_all_masked_position_is_invalid_finite_and_isolated(model, images):
    masks = {k: torch.ones(B, 4, 4, dtype=torch.bool) for k in images}
    for m in masks.values():
        m[0, 2, 3] = False
    out = run(model, images, masks)
    assert not out.valid[0, 2, 3] and out.valid.sum() == B * 16 - 1
    assert torch.isfinite(out.patch).all() and torch.isfinite(out.cls).all()
    assert torch.count_nonzero(out.patch[0, 2, 3]) == 0
    # pixels at the invalid position do not reach any other output
    altered = {k: v.clone() for k, v in images.items()}
    for v in altered.values():
        v[0, :, 32:48, 48:64] += 3.0
    again = run(model, altered, masks)
    assert torch.equal(out.patch, again.patch) and torch.equal(out.cls, again.cls)


def test_all_positions_masked_gives_all_invalid(model, images):
    masks = {k: torch.zeros(B, S, S, dtype=torch.bool) for k in images}
    out = run(model, images, masks)
    assert not out.valid.any() and torch.isfinite(out.cls).all()
    with torch.enable_grad():  # the training path too (stems on zero rows)
        trained = create_model("terrafm_tiny")(images, masks)
    assert not trained.valid.any() and torch.isfinite(trained.cls).all()


def test_pixel_masks_reduce_to_patches_at_half_coverage(model, images):
    pixel = torch.ones(B, S, S, dtype=torch.bool)
    pixel[:, :16, :16] = False          # patch (0, 0): 0 % valid -> invalid
    pixel[:, 16:32, :8] = False         # patch (1, 0): 50 % valid -> valid
    pixel[:, 32:48, :9] = False         # patch (2, 0): 43.75 % valid -> invalid
    patch = torch.ones(B, 4, 4, dtype=torch.bool)
    patch[:, 0, 0] = patch[:, 2, 0] = False
    a = run(model, images, {"s1": pixel})
    b = run(model, images, {"s1": patch})
    assert torch.equal(a.patch, b.patch)


def test_gradients_reach_the_fusion_parameters(images):
    model = create_model("terrafm_tiny").train()
    out = model(images, {"s1": torch.rand(B, 4, 4) > 0.3})
    (out.patch.square().mean() + out.cls.square().mean()).backward()
    fusion = dict(model.patch_embed.fusion.named_parameters())
    assert set(fusion) == {"queries", "query_proj.weight", "query_proj.bias", "key_proj.weight",
                           "key_proj.bias", "score"}
    for name, p in fusion.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fusion_matches_a_per_position_loop(model, images):
    """The batched fusion against the paper's per-position pseudocode, in float64."""
    pe = model.patch_embed
    fusion = pe.fusion
    keys = ["s2_l2a", "s2_l1c", "s1"]
    valid = torch.rand(B * 16, 3, generator=torch.Generator().manual_seed(3)) > 0.4
    with torch.no_grad():
        tokens = torch.stack([pe.modality_tokens(k, images[k]) for k in keys], 2).reshape(B * 16, 3, -1)
        values = pe.projection.value(tokens)
        batched = fusion(tokens, values, valid)
        Q = (fusion.queries.double() @ fusion.query_proj.weight.double().T + fusion.query_proj.bias.double())
        heads = fusion.num_heads
        dim = Q.shape[-1]
        hd = dim // heads
        for n in range(B * 16):
            idx = valid[n].nonzero().flatten()
            if len(idx) == 0:
                assert torch.count_nonzero(batched[n]) == 0
                continue
            Z = tokens[n, idx].double()
            K = Z @ fusion.key_proj.weight.double().T + fusion.key_proj.bias.double()
            V = values[n, idx].double()
            out = torch.empty(Q.shape[0], dim, dtype=torch.float64)
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                a = torch.softmax(Q[:, sl] @ K[:, sl].T / math.sqrt(hd), dim=-1)
                out[:, sl] = a @ V[:, sl]
            w = torch.softmax(out @ fusion.score.double(), dim=0)
            expected = (w[:, None] * out).sum(0)
            assert torch.allclose(batched[n].double(), expected, atol=1e-5), n


def _per_sample_selection(n: int = 6):
    """Modality subsets per sample as modality augmentation draws them (one, two or three)."""
    subsets = [("s2_l2a",), ("s1",), ("s2_l2a", "s1"), ("s2_l1c", "s2_l2a", "s1"), ("s2_l1c",), ("s2_l1c", "s1")]
    return subsets[:n]


@pytest.mark.parametrize("grad, folded", [(False, False), (True, False), (False, True)])
def test_per_sample_selection_equals_each_sample_alone(grad, folded):
    """A batch where each sample selects its own modalities through whole-sample masks gives, per
    sample, what that sample gives alone with only its modalities (the stems only run on the
    samples that selected them)."""
    net = create_model("terrafm_tiny").train(grad).fold_for_inference(folded)
    subsets = _per_sample_selection()
    n = len(subsets)
    g = torch.Generator().manual_seed(5)
    images = {"s2_l2a": torch.rand(n, 12, S, S, generator=g), "s2_l1c": torch.rand(n, 12, S, S, generator=g),
              "s1": torch.rand(n, 2, S, S, generator=g)}
    masks = {k: torch.tensor([k in sub for sub in subsets])[:, None, None].expand(n, 4, 4).contiguous()
             for k in images}
    rows_seen = {}
    hooks = [getattr(net.patch_embed, f"conv2d_{k}").register_forward_hook(
        lambda mod, inp, out, k=k: rows_seen.__setitem__(k, out.shape[0])) for k in images]
    with torch.set_grad_enabled(grad):
        batched = net(images, masks)
    for h in hooks:
        h.remove()
    if not folded:   # layer-by-layer path: each stem saw only the samples that selected it
        assert rows_seen == {k: sum(k in sub for sub in subsets) for k in images}
    if grad:
        batched.cls.sum().backward()
        assert all(getattr(net.patch_embed, f"conv2d_{k}").weight.grad.abs().sum() > 0 for k in images)
    for i, sub in enumerate(subsets):
        with torch.no_grad():
            alone = net({k: images[k][i:i + 1] for k in sub})
        torch.testing.assert_close(batched.cls[i:i + 1].detach(), alone.cls, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(batched.patch[i:i + 1].detach(), alone.patch, atol=2e-5, rtol=1e-5)


def _combine_by_autograd(fusion, values, logits, index, valid, batch):
    """The fusion written plainly per (modality, batch row, position, head, query), for autograd
    to differentiate: the reference for the hand-written backward."""
    n_rows, n_pos, dim = values.shape
    heads, n_q = fusion.num_heads, fusion.num_queries
    n_mod = valid.shape[0]
    dense_v = values.new_zeros((n_mod * batch, n_pos, dim)).index_copy(0, index, values)
    dense_l = logits.new_zeros((n_mod * batch, n_pos, heads * n_q)).index_copy(0, index, logits)
    v = dense_v.view(n_mod, batch, n_pos, heads, dim // heads)
    logit = dense_l.view(n_mod, batch, n_pos, heads, n_q)
    usable = valid[..., None, None]
    any_valid = valid.any(dim=0)[..., None, None]
    logit = torch.where(usable | ~any_valid, logit, torch.full_like(logit, -math.inf))
    attn = logit.softmax(dim=0)                                             # over modalities
    attended = torch.einsum("mbnhq,mbnhd->bnqhd", attn, v)                  # z'_j per head
    weight = torch.einsum("bnqhd,hd->bnq", attended, fusion.score.view(heads, -1)).softmax(dim=-1)
    fused = torch.einsum("bnq,bnqhd->bnhd", weight, attended).reshape(batch, n_pos, dim)
    count = valid.sum(dim=0)
    single = (valid[..., None] * dense_v.view(n_mod, batch, n_pos, dim)).sum(dim=0)
    return torch.where((count == 1)[..., None], single, torch.where((count == 0)[..., None], 0.0, fused))


@pytest.mark.parametrize("partial", [False, True])
def test_fusion_gradients_equal_autograd_of_the_plain_formula(partial):
    """The hand-written backward of the fusion against autograd through the formula, in float64,
    on packed rows (some modality absent from some samples) with per-position masks."""
    torch.manual_seed(2)
    fusion = CrossAttentionFusion(24, num_queries=5, num_heads=4).double()
    n_mod, batch, n_pos = 3, 6, 5
    present = torch.rand(n_mod, batch) > 0.4
    present[:, 0] = True                                  # a sample with all three
    present[1:, 1] = False                                # and one with a single modality
    valid = present[..., None] & (torch.rand(n_mod, batch, n_pos) > (0.3 if partial else -1.0))
    valid[:, 2, 0] = False                                # a position without any modality
    pairs = present.nonzero()
    index = pairs[:, 0] * batch + pairs[:, 1]
    values = torch.randn(len(index), n_pos, 24, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(len(index), n_pos, 20, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(batch, n_pos, 24, dtype=torch.float64)

    results = []
    for combine in (fusion.combine, lambda *a: _combine_by_autograd(fusion, *a)):
        fusion.zero_grad()
        v, lg = values.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
        out = combine(v, lg, index, valid, batch)
        (out * upstream).sum().backward()
        results.append((out.detach(), v.grad, lg.grad, fusion.score.grad.clone()))
    for ours, reference, name in zip(*results, ("output", "d values", "d logits", "d score")):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12, msg=name)
    assert results[0][3].abs().sum() > 0


def test_fusion_backward_passes_gradcheck():
    from terrafm.model.fusion import _FusePositions

    torch.manual_seed(3)
    valid = torch.rand(2, 3, 4) > 0.3
    values = torch.randn(6, 4, 8, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(6, 4, 6, dtype=torch.float64, requires_grad=True)
    score = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, lg, s: _FusePositions.apply(v, lg, s, None, valid, 3, 2, 3), (values, logits, score))
