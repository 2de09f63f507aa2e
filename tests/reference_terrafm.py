"""An independent float64 TerraFM forward written from the reference text (terrafm-reference.md
sections 1-3), sharing no code with terrafm.model: plain torch functional ops on a state dict."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# key -> shape of the released TerraFM-B checkpoint, spelled out from the reference text
def release_shapes(embed: int = 768, depth: int = 12, grid: int = 14) -> dict[str, tuple[int, ...]]:
    attn = 3 * embed
    shapes = {
        "cls_token": (1, 1, embed),
        "pos_embed": (1, grid * grid + 1, embed),
        "norm.weight": (embed,), "norm.bias": (embed,),
        "patch_embed.conv2d_s2_l2a.weight": (attn, 12, 16, 16), "patch_embed.conv2d_s2_l2a.bias": (attn,),
        "patch_embed.conv2d_s2_l1c.weight": (attn, 12, 16, 16), "patch_embed.conv2d_s2_l1c.bias": (attn,),
        "patch_embed.conv2d_s1.weight": (attn, 2, 16, 16), "patch_embed.conv2d_s1.bias": (attn,),
        "patch_embed.s2_l2a_embed": (1, attn), "patch_embed.s2_l1c_embed": (1, attn),
        "patch_embed.s1_embed": (1, attn),
        "patch_embed.projection.proj1.weight": (attn, attn),
        "patch_embed.projection.norm_input.weight": (attn,), "patch_embed.projection.norm_input.bias": (attn,),
        "patch_embed.projection.proj2.weight": (attn, attn), "patch_embed.projection.proj2.bias": (attn,),
        "patch_embed.projection.proj3.weight": (embed, attn), "patch_embed.projection.proj3.bias": (embed,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (embed,), p + "norm1.bias": (embed,),
            p + "attn.qkv.weight": (3 * embed, embed), p + "attn.qkv.bias": (3 * embed,),
            p + "attn.proj.weight": (embed, embed), p + "attn.proj.bias": (embed,),
            p + "norm2.weight": (embed,), p + "norm2.bias": (embed,),
            p + "mlp.fc1.weight": (4 * embed, embed), p + "mlp.fc1.bias": (4 * embed,),
            p + "mlp.fc2.weight": (embed, 4 * embed), p + "mlp.fc2.bias": (embed,),
        })
    return shapes


def random_release_checkpoint(seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Release-layout weights with realistic scales (norm gains ~1, small weights)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release_shapes(**kwargs).items():
        if key.endswith("norm.weight") or "norm1.weight" in key or "norm2.weight" in key \
                or key.endswith("norm_input.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("pos_embed") or key.endswith("_embed") or key.endswith("cls_token"):
            value = 0.5 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        state[key] = value.float()
    return state


def _resize_pos(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if (gh, gw) == (side, side):
        return pos
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    # the release (DINO) resizes by a scale factor with a +0.1 guard, not to a target size
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic",
                         align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


def reference_forward(state: dict[str, torch.Tensor], modality: str, image: torch.Tensor,
                      num_heads: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Released single-modality path in float64: returns (cls (B, D), patch (B, h, w, D))."""
    s = {k: v.double() for k, v in state.items()}
    x = image.double()
    b, _, h, w = x.shape
    gh, gw = h // 16, w // 16
    pe = "patch_embed."
    t = F.conv2d(x, s[pe + f"conv2d_{modality}.weight"], s[pe + f"conv2d_{modality}.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2) + s[pe + f"{modality}_embed"]
    t = t @ s[pe + "projection.proj1.weight"].T
    t = F.layer_norm(t, t.shape[-1:], s[pe + "projection.norm_input.weight"],
                     s[pe + "projection.norm_input.bias"], eps=1e-5)
    t = t @ s[pe + "projection.proj2.weight"].T + s[pe + "projection.proj2.bias"]
    t = t @ s[pe + "projection.proj3.weight"].T + s[pe + "projection.proj3.bias"]
    z = torch.cat([s["cls_token"].expand(b, -1, -1), t], dim=1) + _resize_pos(s["pos_embed"], gh, gw)
    dim = z.shape[-1]
    hd = dim // num_heads
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = f"blocks.{i}."
        y = F.layer_norm(z, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        qkv = (y @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]).reshape(b, -1, 3, num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, -1, dim)
        z = z + o @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        y = F.layer_norm(z, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        z = z + y @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
        i += 1
    z = F.layer_norm(z, (dim,), s["norm.weight"], s["norm.bias"], eps=1e-6)
    return z[:, 0], z[:, 1:].reshape(b, gh, gw, dim)
