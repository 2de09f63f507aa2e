"""The ViT trunk's pre-norm transformer block, layer for layer timm's ``vision_transformer.Block``.

Written out here rather than imported: importing timm loads torchvision and ``torch._dynamo``
(about 4.5 s per process on the CI machine, on top of torch's own 4 s), and every process that
embeds pays it (notebook kernels, dask workers, ``torchrun`` ranks, the CLI). The modules are
built in timm's order with timm's parameter names, so a seeded model draws the same initial
values, checkpoints load unchanged, and the forward runs the same operations
(``tests/model/test_vit_block.py`` holds the two side by side, bit for bit).

Examples
--------
>>> import torch
>>> block = Block(64, num_heads=4, qkv_bias=True)
>>> block(torch.zeros(2, 5, 64)).shape
torch.Size([2, 5, 64])
>>> sorted(k for k in block.state_dict() if k.startswith("attn"))
['attn.proj.bias', 'attn.proj.weight', 'attn.qkv.bias', 'attn.qkv.weight']
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Block", "Attention", "Mlp", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability
    ``drop_prob`` (timm's name) and the kept ones scaled by ``1 / (1 - drop_prob)``; the identity
    in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``; ``attn_mask`` is a
    boolean (True = attend) or additive mask broadcastable to (B, heads, N, N)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with GELU."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
