"""terrafm.model.vit.Block against timm's vision_transformer.Block (the independent reference; timm
is a test dependency only): same parameter names, the same seeded initial values, the same bits
forward and backward, with and without an attention mask, in eval mode and in training with
stochastic depth (the same random draws). And importing terrafm.model no longer imports timm."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

from terrafm.model.vit import Block


def _pair(drop_path: float, dim: int = 64, heads: int = 4, seed: int = 3):
    from timm.models.vision_transformer import Block as TimmBlock

    torch.manual_seed(seed)
    ours = Block(dim, heads, 4.0, qkv_bias=True, drop_path=drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    torch.manual_seed(seed)
    timm = TimmBlock(dim, heads, 4.0, qkv_bias=True, drop_path=drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return ours, timm


def test_same_names_and_seeded_values_as_timm():
    ours, timm = _pair(0.1)
    mine, theirs = ours.state_dict(), timm.state_dict()
    assert list(mine) == list(theirs)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    # timm's checkpoints load with strict=True
    ours.load_state_dict(theirs, strict=True)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
def test_eval_forward_and_backward_are_bit_identical(masked):
    ours, timm = _pair(0.0)
    ours.eval(), timm.eval()
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(0))
    mask = None
    if masked:   # TerraFM's mask: CLS always attended, some positions never
        keep = torch.rand(3, 17, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[:, 0] = True
        mask = keep[:, None, None, :]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, attn_mask=mask), timm(xb, attn_mask=mask)
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for (name, p), q in zip(ours.named_parameters(), timm.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_training_with_stochastic_depth_draws_the_same_samples():
    ours, timm = _pair(0.5)
    ours.train(), timm.train()
    x = torch.randn(8, 5, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    a = ours(x)
    torch.manual_seed(7)
    b = timm(x)
    assert torch.equal(a, b)
    torch.manual_seed(7)
    again = ours(x)
    torch.manual_seed(8)
    other = ours(x)
    assert torch.equal(a, again) and not torch.equal(a, other)   # the draw is random, and seeded


def test_importing_the_model_does_not_import_timm():
    code = ("import sys; import terrafm.model; m = terrafm.model.create_model('terrafm_tiny', seed=0); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('timm', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
