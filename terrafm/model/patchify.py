"""Patchify convolution (kernel = stride, no padding) computed as the GEMM it is where that is faster.

A patchify conv is a matrix product over non-overlapping patches. oneDNN's convolution beats
that GEMM (plus the patch gather) on large patch grids in the forward pass, but is slower for
small grids and few tokens (up to 2x on 32 px crops of the tiny model, single 64-96 px crops
of ViT-B), per call, and its backward is 2-4x slower than the GEMM on small grids. Multi-crop
training with per-sample modality subsets runs many such small stems.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchConv2d"]


def _patches(x: torch.Tensor, patch: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/p * W/p, C * p * p) in the conv weight's (C, kh, kw) order, of the
    batch ``rows`` only if given (gathered within the same copy)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    if rows is not None:
        x = x.index_select(0, rows)
    return x.reshape(x.shape[0] * x.shape[1] * x.shape[2], c * patch * patch)


class _PatchConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, patch):
        out = F.conv2d(x, weight, bias, stride=patch)
        ctx.save_for_backward(x, weight)
        ctx.patch, ctx.has_bias = patch, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        patch = ctx.patch
        dim = weight.shape[0]
        grad = grad_out.permute(0, 2, 3, 1).reshape(-1, dim)        # (B * N, D), a view when possible
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ _patches(x, patch).to(grad.dtype)).view(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            b, c, h, w = x.shape
            cols = (grad @ weight.reshape(dim, -1).to(grad.dtype)).view(b, h // patch, w // patch, c, patch, patch)
            grad_x = cols.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).to(x.dtype)
        return grad_x, grad_w, grad_b, None


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, patch, stride=patch)`` run as a patch GEMM where that is faster.

    Same parameters, state-dict names and outputs (rounding aside) as the convolution. Small
    grids or few tokens: forward and backward are the GEMM; otherwise the forward is the
    convolution and the weight gradient the GEMM.

    Examples
    --------
    >>> conv = PatchConv2d(2, 8, 16)
    >>> x = torch.rand(3, 2, 32, 48)
    >>> out = conv(x)
    >>> out.shape, torch.allclose(out, F.conv2d(x, conv.weight, conv.bias, stride=16), atol=1e-6)
    (torch.Size([3, 8, 2, 3]), True)
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, patch_size, stride=patch_size, bias=bias)
        self.patch_size = patch_size

    #: below these sizes the GEMM forward beats the convolution (measured on CPU, 2 threads);
    #: for a subset of rows, which the convolution needs gathered first, up to the larger grid
    GEMM_MAX_CELLS, GEMM_MAX_TOKENS, GEMM_MAX_CELLS_SUBSET = 4, 128, 16

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve ``x`` (B, C, H, W), or only its batch ``rows`` (long indices) if given.

        ``offset`` (out_channels,) is added to every output (to the bias, not to the output
        array: a per-channel constant such as a modality embedding costs nothing that way).
        """
        b = x.shape[0] if rows is None else rows.numel()
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        cells = grid_h * grid_w
        bias = self.bias
        if offset is not None:
            bias = offset if bias is None else bias + offset
        if cells <= self.GEMM_MAX_CELLS or b * cells <= self.GEMM_MAX_TOKENS or (
                rows is not None and cells <= self.GEMM_MAX_CELLS_SUBSET):
            out = F.linear(_patches(x, self.patch_size, rows), self.weight.view(self.out_channels, -1), bias)
            return out.view(b, grid_h, grid_w, self.out_channels).permute(0, 3, 1, 2)  # conv layout, as a view
        if rows is not None:
            x = x.index_select(0, rows)
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return _PatchConvFunction.apply(x, self.weight, bias, self.patch_size)
        return F.conv2d(x, self.weight, bias, stride=self.patch_size)
