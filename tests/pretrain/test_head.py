"""DINO head shape/normalisation, teacher without gradients, EMA update formula."""

import pytest
import torch

from pretrain.head import DINOHead, build_student_teacher, ema_update

HEAD = dict(out_dim=32, hidden_dim=16, bottleneck_dim=8)


def test_head_last_layer_is_weight_normalised_and_frozen_in_norm():
    head = DINOHead(64, **HEAD)
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    out = head(x)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    expected = z @ (v / v.norm(dim=1, keepdim=True)).T  # g fixed at 1
    torch.testing.assert_close(out, expected)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3


def test_teacher_gets_no_gradient_and_starts_equal():
    student, teacher = build_student_teacher("terrafm_tiny", HEAD, drop_path_rate=0.1)
    for (ns, ps), (nt, pt) in zip(student.named_parameters(), teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt)
    x = {"s1": torch.rand(2, 2, 32, 32), "s2_l2a": torch.rand(2, 12, 32, 32)}
    loss = student(x).sum() + teacher(x).sum()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert teacher.backbone.config.drop_path_rate == 0.0 and student.backbone.config.drop_path_rate == 0.1


def test_ema_update_formula():
    student, teacher = build_student_teacher("terrafm_tiny", HEAD)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone().double() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t1.double(), 0.9 * t0 + 0.1 * s.double(), rtol=1e-5, atol=1e-6)


def test_groups_share_one_query_map_with_the_gradients_of_separate_forwards():
    """A forward over several crop groups builds the fusion's query map once; outputs and every
    gradient equal those of the groups run one by one (each building its own map).

    Gradients to rounding: the shared map sums the groups' gradients before its backward, the
    separate maps after theirs, so elements differ by a few float32 ulp of the gradient's scale
    (measured <= 2.6e-9 on query gradients of max 4e-3, seeds 0-2): atol = 1e-6 x that scale."""
    torch.manual_seed(0)
    student, _ = build_student_teacher("terrafm_tiny", HEAD, drop_path_rate=0.0)
    g = torch.Generator().manual_seed(0)

    def group(n, size):
        images = {"s2_l2a": torch.rand(n, 12, size, size, generator=g), "s1": torch.rand(n, 2, size, size, generator=g)}
        keep = torch.tensor([True, False, True, True][:n])
        return images, {"s1": keep[:, None, None].expand(n, size // 16, size // 16).contiguous()}

    groups = [group(4, 64), group(3, 32)]
    fusion = student.backbone.patch_embed.fusion
    built = []
    original = fusion._token_queries
    fusion._token_queries = lambda dtype: built.append(dtype) or original(dtype)
    shared = student(groups)
    assert built == [None]                      # one map for both groups
    (shared.square().sum()).backward()
    shared_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    student.zero_grad()
    separate = torch.cat([student(i, m) for i, m in groups])
    assert built == [None, None, None]          # outside the block: one map per forward
    (separate.square().sum()).backward()
    torch.testing.assert_close(shared, separate, rtol=0, atol=0)
    assert shared_grads.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    for name, p in student.named_parameters():
        if p.grad is not None:
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(shared_grads[name], p.grad, rtol=1e-6, atol=1e-6 * scale, msg=name)
    assert shared_grads["backbone.patch_embed.fusion.queries"].abs().sum() > 0
    assert fusion._reused_queries is None       # nothing kept after the block


def test_teacher_runs_the_public_forward_under_no_grad_on_the_exact_stem(monkeypatch):
    """No fold per step: the teacher's backbone keeps the layer-by-layer stem, so its no_grad
    forward is bit-identical to a grad-mode forward and never builds folded maps."""
    from terrafm.model import patch_embed

    monkeypatch.setattr(patch_embed._FoldedStem, "_fold", staticmethod(lambda e: pytest.fail("stem folded")))
    student, teacher = build_student_teacher("terrafm_tiny", HEAD)
    assert not teacher.backbone.folded_for_inference and not student.backbone.folded_for_inference
    g = torch.Generator().manual_seed(1)
    groups = [({"s2_l2a": torch.rand(2, 12, 32, 32, generator=g), "s1": torch.rand(2, 2, 32, 32, generator=g)},
               {"s1": torch.tensor([True, False])[:, None, None].expand(2, 2, 2).contiguous()})]
    with torch.no_grad():
        quiet = teacher(groups)
    recorded = teacher(groups)
    assert not recorded.requires_grad
    torch.testing.assert_close(quiet, recorded, rtol=0, atol=0)


def test_backbones_initialise_from_the_global_seed():
    """The run seed (torch.manual_seed in pretrain.train) decides the start, not a fixed seed."""
    torch.manual_seed(0)
    a, _ = build_student_teacher("terrafm_tiny", HEAD)
    torch.manual_seed(0)
    b, _ = build_student_teacher("terrafm_tiny", HEAD)
    torch.manual_seed(1)
    c, _ = build_student_teacher("terrafm_tiny", HEAD)
    assert torch.equal(a.backbone.cls_token, b.backbone.cls_token)
    assert not torch.equal(a.backbone.cls_token, c.backbone.cls_token)
