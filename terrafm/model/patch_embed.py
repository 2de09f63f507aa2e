"""Modality-specific patch embedding: one conv stem per sensor, modality embeddings, the
release's projection chain (proj1 -> norm_input -> proj2 -> proj3) and cross-attention fusion."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .config import ModelConfig
from .fusion import CrossAttentionFusion

__all__ = ["ModalityPatchEmbed", "Projection"]


class Projection(nn.Module):
    """The release's projection chain; ``proj1`` + ``norm_input`` is the fusion's value map."""

    def __init__(self, attn_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj1 = nn.Linear(attn_dim, attn_dim, bias=False)
        self.norm_input = nn.LayerNorm(attn_dim)
        self.proj2 = nn.Linear(attn_dim, attn_dim)
        self.proj3 = nn.Linear(attn_dim, embed_dim)

    def value(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm_input(self.proj1(tokens))

    def output(self, fused: torch.Tensor) -> torch.Tensor:
        return self.proj3(self.proj2(fused))


class ModalityPatchEmbed(nn.Module):
    """Patchify each present modality with its own stem and fuse them into one token per patch.

    Parameter names follow the released checkpoint: ``conv2d_<key>``, ``<key>_embed`` and
    ``projection.*``; the fusion (absent from the release) lives under ``fusion.*``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.modalities = tuple(config.modalities)
        self.patch_size = config.patch_size
        dim = config.attn_dim
        for key in self.modalities:
            self.add_module(f"conv2d_{key}", nn.Conv2d(config.in_chans(key), dim,
                                                       config.patch_size, config.patch_size))
            self.register_parameter(f"{key}_embed", nn.Parameter(torch.zeros(1, dim)))
        self.projection = Projection(dim, config.embed_dim)
        self.fusion = CrossAttentionFusion(dim, config.fusion_queries, config.fusion_heads)
        for key in self.modalities:
            nn.init.trunc_normal_(getattr(self, f"{key}_embed"), std=0.02)

    def modality_tokens(self, key: str, image: torch.Tensor) -> torch.Tensor:
        """Tokens ``conv(x) + e_m`` of one modality, shape (B, N, attn_dim)."""
        patches = getattr(self, f"conv2d_{key}")(image).flatten(2).transpose(1, 2)
        return patches + getattr(self, f"{key}_embed")

    def forward(self, inputs: Mapping[str, torch.Tensor],
                patch_valid: Mapping[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed and fuse.

        Parameters
        ----------
        inputs : mapping key -> (B, C, H, W)
            Already validated, normalized images; keys in any order.
        patch_valid : mapping key -> bool (B, N), optional
            Per-patch validity of each modality; absent keys are fully valid.

        Returns
        -------
        tokens : Tensor (B, N, embed_dim)
        valid : bool Tensor (B, N) or None when every position is valid.
        """
        keys = [k for k in self.modalities if k in inputs]  # canonical order: order-invariant
        tokens = [self.modality_tokens(k, inputs[k]) for k in keys]
        batch, n_patches, dim = tokens[0].shape
        masks = None
        if patch_valid:
            masks = [patch_valid[k] if k in patch_valid
                     else torch.ones(batch, n_patches, dtype=torch.bool, device=tokens[0].device)
                     for k in keys]
            if all(bool(m.all()) for m in masks):
                masks = None
        if len(keys) == 1 and masks is None:
            return self.projection.output(self.projection.value(tokens[0])), None

        # values per modality in (B, N, D) layout, exactly as the single-modality path computes them
        values = torch.stack([self.projection.value(t) for t in tokens], dim=2)
        values = values.reshape(batch * n_patches, len(keys), dim)
        stacked = torch.stack(tokens, dim=2).reshape(batch * n_patches, len(keys), dim)
        valid = None if masks is None else torch.stack(masks, dim=2).reshape(batch * n_patches, len(keys))
        fused = self.fusion(stacked, values, valid).reshape(batch, n_patches, dim)
        position_valid = None if valid is None else valid.any(dim=1).reshape(batch, n_patches)
        if position_valid is not None and bool(position_valid.all()):
            position_valid = None
        return self.projection.output(fused), position_valid
