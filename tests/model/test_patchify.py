"""PatchConv2d equals nn.Conv2d (float64) in outputs and all gradients, on both of its paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from terrafm.model.patchify import PatchConv2d


@pytest.mark.parametrize("shape, rows", [
    ((3, 2, 32, 48), None),            # 6 cells, 18 tokens: GEMM forward
    ((9, 3, 64, 64), None),            # 16 cells, 144 tokens: conv forward, GEMM backward
    ((12, 3, 64, 64), [0, 3, 4, 11, 7, 8, 9, 10, 1, 2]),  # a subset of rows, 16 cells: GEMM, rows gathered in the patch copy
    ((4, 2, 96, 80), [3, 1])])         # a subset, 30 cells: gathered, then conv forward, GEMM backward
@pytest.mark.parametrize("with_offset", [False, True])
def test_outputs_and_gradients_equal_the_convolution(shape, rows, with_offset):
    """Also with a per-channel ``offset`` (a modality embedding) folded into the bias: it must get
    the gradient of an offset added to the output."""
    torch.manual_seed(0)
    conv = PatchConv2d(shape[1], 8, 16).double()
    x = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(8, dtype=torch.float64, requires_grad=True)
    index = None if rows is None else torch.tensor(rows)
    out = conv(x, index, offset if with_offset else None)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (x, conv.weight, conv.bias, offset), grad, allow_unused=True)
    ref_out = F.conv2d(x if rows is None else x[index], conv.weight, conv.bias, stride=16)
    if with_offset:
        ref_out = ref_out + offset[:, None, None]
    ref = torch.autograd.grad(ref_out, (x, conv.weight, conv.bias, offset), grad, allow_unused=True)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(mine, ref):
        if b is None:   # no offset: it takes no part
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inference_and_frozen_weights_take_no_custom_backward():
    conv = PatchConv2d(2, 4, 16).requires_grad_(False)
    out = conv(torch.rand(20, 2, 64, 64))
    assert out.grad_fn is None and out.shape == (20, 4, 4, 4)
