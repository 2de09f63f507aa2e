"""Modality-specific patch embedding: one conv stem per sensor, modality embeddings, the
release's projection chain (proj1 -> norm_input -> proj2 -> proj3) and cross-attention fusion."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
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


class _FoldedStem:
    """Inference-time products of the stem's consecutive linear maps, computed in float64.

    ``conv -> +embed -> proj1`` is one linear map of the pixels, and so are ``conv -> +embed ->
    key_proj`` and ``proj2 -> proj3``; folding them removes two (2304 x 2304) matmuls per token
    from TerraFM-B. Rebuilt whenever a parameter changes (version counter, storage, device).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weights: dict[str, torch.Tensor] = {}

    @staticmethod
    def _signature(params) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)

    def get(self, embed: "ModalityPatchEmbed") -> dict[str, torch.Tensor]:
        params = list(embed.parameters())
        key = self._signature(params)
        if key != self.key:
            self.weights = self._fold(embed)
            self.key = key
        return self.weights

    @staticmethod
    @torch.no_grad()
    def _fold(embed: "ModalityPatchEmbed") -> dict[str, torch.Tensor]:
        proj = embed.projection
        dtype = proj.proj1.weight.dtype
        w1 = proj.proj1.weight.double()
        wk, bk = embed.fusion.key_proj.weight.double(), embed.fusion.key_proj.bias.double()
        folded = {}
        for key in embed.modalities:
            conv = getattr(embed, f"conv2d_{key}")
            shape = conv.weight.shape
            wc = conv.weight.double().reshape(shape[0], -1)
            offset = conv.bias.double() + getattr(embed, f"{key}_embed").double().reshape(-1)
            folded[f"{key}.value.weight"] = (w1 @ wc).reshape(shape).to(dtype)
            folded[f"{key}.value.bias"] = (w1 @ offset).to(dtype)
            folded[f"{key}.key.weight"] = (wk @ wc).reshape(shape).to(dtype)
            folded[f"{key}.key.bias"] = (wk @ offset + bk).to(dtype)
        w2, b2 = proj.proj2.weight.double(), proj.proj2.bias.double()
        w3, b3 = proj.proj3.weight.double(), proj.proj3.bias.double()
        folded["out.weight"] = (w3 @ w2).to(dtype)
        folded["out.bias"] = (w3 @ b2 + b3).to(dtype)
        return folded


class ModalityPatchEmbed(nn.Module):
    """Patchify each present modality with its own stem and fuse them into one token per patch.

    Parameter names follow the released checkpoint: ``conv2d_<key>``, ``<key>_embed`` and
    ``projection.*``; the fusion (absent from the release) lives under ``fusion.*``. Without
    gradients (inference) the linear chain runs folded (see :class:`_FoldedStem`); with
    gradients it runs layer by layer.
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
        self._folded = _FoldedStem()

    def modality_tokens(self, key: str, image: torch.Tensor) -> torch.Tensor:
        """Tokens ``Z = conv(x) + e_m`` of one modality, shape (B, N, attn_dim)."""
        patches = getattr(self, f"conv2d_{key}")(image).flatten(2).transpose(1, 2)
        return patches + getattr(self, f"{key}_embed")

    def _stem(self, key: str, image: torch.Tensor, key_rows: torch.Tensor | bool, folded):
        """Values ``norm_input(proj1(Z))`` of one modality and, for fusion, keys ``key_proj(Z)``
        of the rows selected by ``key_rows`` (a bool per row, or True / False for all / none)."""
        if torch.is_tensor(key_rows) and bool(key_rows.all()):
            key_rows = True
        elif torch.is_tensor(key_rows) and not bool(key_rows.any()):
            key_rows = False

        def rows(tensor):
            return tensor if key_rows is True else tensor[key_rows]

        if folded is None:
            tokens = self.modality_tokens(key, image)
            keys = None if key_rows is False else self.fusion.key_proj(rows(tokens))
            return self.projection.value(tokens), keys

        def patchify(name, pixels):
            out = F.conv2d(pixels, folded[f"{key}.{name}.weight"], folded[f"{key}.{name}.bias"],
                           stride=self.patch_size)
            return out.flatten(2).transpose(1, 2)

        values = self.projection.norm_input(patchify("value", image))
        return values, (None if key_rows is False else patchify("key", rows(image)))

    def _output(self, fused: torch.Tensor, folded) -> torch.Tensor:
        if folded is None:
            return self.projection.output(fused)
        return F.linear(fused, folded["out.weight"], folded["out.bias"])

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
        folded = None if torch.is_grad_enabled() else self._folded.get(self)
        first = inputs[keys[0]]
        batch = first.shape[0]
        n_patches = (first.shape[2] // self.patch_size) * (first.shape[3] // self.patch_size)
        masks = None
        if patch_valid:
            masks = [patch_valid[k] if k in patch_valid
                     else torch.ones(batch, n_patches, dtype=torch.bool, device=first.device)
                     for k in keys]
            if all(bool(m.all()) for m in masks):
                masks = None
            elif len(keys) > 1 and any(bool(m.any()) for m in masks):
                # a modality without a single valid patch in the batch cannot change the output
                used = [i for i, m in enumerate(masks) if bool(m.any())]
                keys, masks = [keys[i] for i in used], [masks[i] for i in used]
                first = inputs[keys[0]]
        need_fusion = len(keys) > 1 or masks is not None
        if not need_fusion:
            return self._output(self._stem(keys[0], first, False, folded)[0], folded), None

        # Per sample, a stem runs only if its modality has a valid patch there, and keys are
        # computed only for samples where another modality is valid too: a masked token never
        # reaches the output, and a position with one valid modality takes its value as is.
        if masks is None:
            present = torch.ones(len(keys), batch, dtype=torch.bool, device=first.device)
        else:
            present = torch.stack([m.any(dim=1) for m in masks])         # (modalities, batch)
        mixing = present.sum(dim=0) > 1
        value_list, key_list = [], []
        for key, rows in zip(keys, present):
            key_rows = rows & mixing
            v, k = self._stem(key, _take_rows(inputs[key], rows), key_rows[rows], folded)
            v = _put_rows(v, rows, batch)
            value_list.append(v)
            key_list.append(torch.zeros_like(v) if k is None else _put_rows(k, key_rows, batch))

        dim = value_list[0].shape[-1]
        values = torch.stack(value_list, dim=2).reshape(batch * n_patches, len(keys), dim)
        key_tokens = torch.stack(key_list, dim=2).reshape(batch * n_patches, len(keys), dim)
        valid = None if masks is None else torch.stack(masks, dim=2).reshape(batch * n_patches, len(keys))
        fused = self.fusion(key_tokens, values, valid).reshape(batch, n_patches, dim)
        position_valid = None if valid is None else valid.any(dim=1).reshape(batch, n_patches)
        if position_valid is not None and bool(position_valid.all()):
            position_valid = None
        return self._output(fused, folded), position_valid


def _take_rows(tensor: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` where ``selected`` (bool per row) is True."""
    return tensor if bool(selected.all()) else tensor[selected]


def _put_rows(rows_tensor: torch.Tensor, selected: torch.Tensor, batch: int) -> torch.Tensor:
    """Place the rows computed for ``selected`` samples into a zero tensor of ``batch`` rows."""
    if rows_tensor.shape[0] == batch:
        return rows_tensor
    index = selected.nonzero().squeeze(1)
    full = rows_tensor.new_zeros((batch,) + tuple(rows_tensor.shape[1:]))
    return full.index_copy(0, index, rows_tensor)
