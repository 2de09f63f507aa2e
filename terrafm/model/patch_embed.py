"""Modality-specific patch embedding: one conv stem per sensor, modality embeddings, the
release's projection chain (proj1 -> norm_input -> proj2 -> proj3) and cross-attention fusion."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fusion import CrossAttentionFusion
from .patchify import PatchConv2d

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
    """Inference-only products of the stem's consecutive linear maps, computed in float64.

    ``conv -> +embed -> proj1`` is one linear map of the pixels, and so are ``conv -> +embed ->
    fusion logits`` (:meth:`CrossAttentionFusion.token_queries`) and ``proj2 -> proj3``; folding
    them removes two (2304 x 2304) matmuls per token from TerraFM-B. Rebuilt whenever a parameter
    changes (version counter, storage, device).
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
        wq, bq = embed.fusion.token_queries(torch.float64)
        folded = {}
        for key in embed.modalities:
            conv = getattr(embed, f"conv2d_{key}")
            shape = conv.weight.shape
            wc = conv.weight.double().reshape(shape[0], -1)
            offset = conv.bias.double() + getattr(embed, f"{key}_embed").double().reshape(-1)
            value_weight, value_bias = w1 @ wc, w1 @ offset
            folded[f"{key}.value.weight"] = value_weight.reshape(shape).to(dtype)
            folded[f"{key}.value.bias"] = value_bias.to(dtype)
            # for fusion: the value map and the fusion logits as one conv (extra output channels)
            folded[f"{key}.fusion.weight"] = torch.cat([value_weight, wq @ wc]).reshape(
                (shape[0] + wq.shape[0],) + tuple(shape[1:])).to(dtype)
            folded[f"{key}.fusion.bias"] = torch.cat([value_bias, wq @ offset + bq]).to(dtype)
        w2, b2 = proj.proj2.weight.double(), proj.proj2.bias.double()
        w3, b3 = proj.proj3.weight.double(), proj.proj3.bias.double()
        folded["out.weight"] = (w3 @ w2).to(dtype)
        folded["out.bias"] = (w3 @ b2 + b3).to(dtype)
        return folded


class ModalityPatchEmbed(nn.Module):
    """Patchify each present modality with its own stem and fuse them into one token per patch.

    Parameter names follow the released checkpoint: ``conv2d_<key>``, ``<key>_embed`` and
    ``projection.*``; the fusion (absent from the release) lives under ``fusion.*``. The linear
    chain runs layer by layer (trainable), or folded (see :class:`_FoldedStem`) once ``folded``
    is set (``TerraFM.fold_for_inference``): faster, but the folded maps are constants, so no
    gradient reaches the stem's parameters.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.modalities = tuple(config.modalities)
        self.patch_size = config.patch_size
        dim = config.attn_dim
        for key in self.modalities:
            self.add_module(f"conv2d_{key}", PatchConv2d(config.in_chans(key), dim, config.patch_size))
            self.register_parameter(f"{key}_embed", nn.Parameter(torch.zeros(1, dim)))
        self.projection = Projection(dim, config.embed_dim)
        self.fusion = CrossAttentionFusion(dim, config.fusion_queries, config.fusion_heads)
        for key in self.modalities:
            nn.init.trunc_normal_(getattr(self, f"{key}_embed"), std=0.02)
        self._folded = _FoldedStem()
        self.folded = False

    def modality_tokens(self, key: str, image: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``Z = conv(x) + e_m`` of one modality (of its batch ``rows`` only if given),
        shape (B, N, attn_dim); ``e_m`` is added through the convolution's bias."""
        embed = getattr(self, f"{key}_embed").view(-1)
        return getattr(self, f"conv2d_{key}")(image, rows, embed).flatten(2).transpose(1, 2)

    def _stem(self, key: str, image: torch.Tensor, folded) -> torch.Tensor:
        """Values ``norm_input(proj1(Z))`` of one modality (the released single-modality path)."""
        if folded is None:
            return self.projection.value(self.modality_tokens(key, image))
        return self.projection.norm_input(self._patchify(image, folded, f"{key}.value"))

    def _patchify(self, image: torch.Tensor, folded, name: str) -> torch.Tensor:
        """A folded stem ``name`` applied to the pixels, shape (B, N, out channels)."""
        out = F.conv2d(image, folded[f"{name}.weight"], folded[f"{name}.bias"], stride=self.patch_size)
        return out.flatten(2).transpose(1, 2)

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
        folded = None
        if self.folded:
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise RuntimeError(
                    "the folded inference stem is on (model.fold_for_inference()) while gradients are "
                    "required: its folded weights are constants, so the stem's parameters would get no "
                    "gradient. Call model.fold_for_inference(False) to train, or run the forward under "
                    "torch.inference_mode() / torch.no_grad()")
            folded = self._folded.get(self)
        first = inputs[keys[0]]
        batch = first.shape[0]
        n_patches = (first.shape[2] // self.patch_size) * (first.shape[3] // self.patch_size)
        valid = position_valid = None                     # (M, B, N) and (B, N), or None
        if patch_valid and any(k in patch_valid for k in keys):
            # the decisions below are taken where the masks are: on the host for masks given on
            # the host (the engine's), so a GPU forward never waits for them
            where = next(patch_valid[k].device for k in keys if k in patch_valid)
            valid = torch.stack([patch_valid[k].to(where) if k in patch_valid
                                 else torch.ones(batch, n_patches, dtype=torch.bool, device=where)
                                 for k in keys])
            present = valid.any(dim=2)             # (M, B): the modality has a valid patch in the row
            position_valid = valid.any(dim=0)
            # one host read for every decision below (a device sync when the masks are on a GPU)
            summary = torch.cat([present.sum(dim=1), valid.all().view(1).long(),
                                 position_valid.all().view(1).long()]).tolist()
            n_rows = summary[:-2]
            if summary[-1]:
                position_valid = None
            if summary[-2]:
                valid = None
        if valid is not None:
            used = [i for i, n in enumerate(n_rows) if n]
            if len(keys) > 1 and used and len(used) < len(keys):
                # a modality without a single valid patch in the batch cannot change the output
                keys, n_rows = [keys[i] for i in used], [n_rows[i] for i in used]
                valid, present = valid[used], present[used]
                first = inputs[keys[0]]
        if len(keys) == 1 and valid is None:  # the released single-modality path
            return self._output(self._stem(keys[0], first, folded), folded), None

        # Per sample, a stem runs only if its modality has a valid patch there (a masked token
        # never reaches the output); the rows of all modalities are then packed, modality-major,
        # so that everything after the stems runs once for all of them.
        rows, index = [None] * len(keys), None
        if valid is not None and any(n != batch for n in n_rows):
            pairs = present.nonzero()              # (modality, row), modality-major
            index = pairs[:, 0] * batch + pairs[:, 1]
            rows = [None if n == batch else r for n, r in zip(n_rows, pairs[:, 1].split(n_rows))]
        if valid is not None and valid.device != first.device:
            moved = [t if t is None else t.to(first.device, non_blocking=True)
                     for t in (valid, position_valid, index, *rows)]
            valid, position_valid, index, rows = moved[0], moved[1], moved[2], moved[3:]
        stems = []
        for key, sel in zip(keys, rows):
            if folded is None:
                stems.append(self.modality_tokens(key, inputs[key], sel))
            else:
                image = inputs[key] if sel is None else inputs[key].index_select(0, sel)
                stems.append(self._patchify(image, folded, f"{key}.fusion"))
        packed = torch.cat(stems) if len(stems) > 1 else stems[0]
        if folded is None:   # packed holds the tokens Z
            values, logits = self.projection.value(packed), F.linear(packed, *self.fusion.token_queries())
        else:
            dim = self.projection.proj1.weight.shape[0]
            values, logits = self.projection.norm_input(packed[..., :dim]), packed[..., dim:]
        fused = self.fusion.combine(values, logits, index, valid, batch)
        return self._output(fused, folded), position_valid
