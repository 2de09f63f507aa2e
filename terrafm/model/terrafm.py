"""The TerraFM encoder: modality patch embedding + fusion, then a DINO ViT trunk (timm-layout blocks, terrafm.model.vit)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import sensors
from .config import ModelConfig
from .patch_embed import ModalityPatchEmbed
from .vit import Block

__all__ = ["TerraFM", "TerraFMOutput"]


@dataclass
class TerraFMOutput:
    """Encoder output, taken after the final norm.

    Attributes
    ----------
    cls : Tensor (B, D)
    patch : Tensor (B, H/16, W/16, D)
    valid : bool Tensor (B, H/16, W/16); False where no modality was valid (patch zeroed there).
    """

    cls: torch.Tensor
    patch: torch.Tensor
    valid: torch.Tensor



def check_finite_inputs(inputs: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN/inf inputs, naming the modality.

    A finite sum proves every element finite (NaN and inf propagate) at ~1/100 of the element-wise
    test's cost; only a non-finite (e.g. overflowing) sum needs that test. The sums of all
    modalities are read to the host at once (one device sync, not one each).
    """
    sums = torch.stack([x.sum(dtype=torch.float32) for x in inputs.values()])
    if bool(torch.isfinite(sums).all()):
        return
    for (key, x), total in zip(inputs.items(), sums.tolist()):
        if not math.isfinite(total) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{key}: input contains NaN or inf; fill nodata/clouds (e.g. with "
                             "0.5 after normalization) and pass a validity mask in `masks`")

class TerraFM(nn.Module):
    """TerraFM encoder (arXiv 2506.06281) with the released parameter names.

    Build it with :func:`terrafm.create_model`.

    Attributes
    ----------
    fusion_mode : str
        ``"trained"``: fusion parameters loaded from the checkpoint; ``"mean"``: the checkpoint
        had none (the public release) and the fusion is the masked mean of the modality values;
        ``"random"``: no checkpoint loaded (untrained, seeded initialisation).
    checkpoint_sha256, checkpoint_path : str or None
        The loaded checkpoint, for provenance.

    Examples
    --------
    >>> import torch
    >>> from terrafm.model import create_model
    >>> model = create_model("terrafm_tiny").eval()
    >>> out = model({"s2_l2a": torch.rand(2, 12, 64, 64), "s1": torch.rand(2, 2, 64, 64)})
    >>> tuple(out.cls.shape), tuple(out.patch.shape), bool(out.valid.all())
    ((2, 64), (2, 4, 4, 64), True)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.modalities = tuple(config.modalities)
        self.checkpoint_sha256: str | None = None
        self.checkpoint_path: str | None = None
        self.fusion_mode = "random"

        self.patch_embed = ModalityPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size ** 2 + 1, config.embed_dim))
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, qkv_bias=True,
                  drop_path=rate, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for rate in rates
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        fusion = self.patch_embed.fusion
        for module in self.modules():
            if module is fusion or any(module is m for m in fusion.modules()):
                continue
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ execution choices
    def fold_for_inference(self, enabled: bool = True) -> "TerraFM":
        """Run the stem's linear maps folded into fewer, precomputed ones (inference only).

        ``conv -> +modality embedding -> proj1`` (and the fusion logits), and ``proj2 -> proj3``,
        are each one linear map; folded in float64 they save two ``attn_dim``-square matmuls per
        token (most of the stem's time on TerraFM-B). Outputs equal the layer-by-layer path up to
        float32 rounding. The folded maps are rebuilt when a parameter changes, and they are
        constants: a forward that needs gradients of the model's parameters raises instead of
        silently giving none, so switch it off (``enabled=False``, the default state) to train.
        :class:`terrafm.engine.Engine` turns it on. Returns the model.

        Examples
        --------
        >>> import torch
        >>> from terrafm.model import create_model
        >>> model = create_model("terrafm_tiny").eval().fold_for_inference()
        >>> x = {"s1": torch.rand(1, 2, 32, 32)}
        >>> with torch.no_grad():
        ...     folded = model(x).patch
        ...     exact = model.fold_for_inference(False)(x).patch
        >>> bool((folded - exact).abs().max() < 1e-5)
        True
        """
        self.patch_embed.folded = bool(enabled)
        return self

    @property
    def folded(self) -> bool:
        """Whether :meth:`fold_for_inference` is on."""
        return self.patch_embed.folded

    @property
    def folded_for_inference(self) -> bool:
        """Whether :meth:`fold_for_inference` is on."""
        return self.patch_embed.folded

    @contextlib.contextmanager
    def reuse_fusion_queries(self) -> Iterator[None]:
        """Build the fusion's query map once for every forward inside the block.

        The map depends on the fusion parameters only, so several forwards with unchanged
        parameters (e.g. the global and local crop groups of one pretraining step) can share it;
        its gradient accumulates from every use. Do not change parameters inside the block.

        Examples
        --------
        >>> import torch
        >>> from terrafm.model import create_model
        >>> model = create_model("terrafm_tiny")
        >>> x = {"s1": torch.rand(1, 2, 32, 32), "s2_l2a": torch.rand(1, 12, 32, 32)}
        >>> with model.reuse_fusion_queries():
        ...     a, b = model(x).cls, model(x).cls
        >>> torch.equal(a, b)
        True
        """
        with self.patch_embed.fusion.reuse_token_queries():
            yield

    # ------------------------------------------------------------------ positional embedding
    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """``pos_embed`` for a ``grid_h x grid_w`` patch grid.

        The learned grid is resized bicubically exactly as the release (and DINO) does it: a
        scale factor of ``(grid + 0.1) / side`` rather than a target size, which is what makes
        outputs at other input sizes agree with the published model. Cached while the parameter
        is unchanged and no gradient is needed.
        """
        n_learned = self.pos_embed.shape[1] - 1
        side = int(round(n_learned ** 0.5))
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        cacheable = not (torch.is_grad_enabled() and self.pos_embed.requires_grad)
        key = (grid_h, grid_w, self.pos_embed._version, self.pos_embed.device, self.pos_embed.dtype)
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
                             mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"pos_embed resize produced {tuple(grid.shape[-2:])}, wanted {(grid_h, grid_w)}")
        grid = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        resized = torch.cat([cls_pos, grid], dim=1)
        if cacheable:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[2] == key[2]}
            self._pos_cache[key] = resized.detach()
        return resized

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, inputs: Mapping[str, torch.Tensor],
                      masks: Mapping[str, torch.Tensor] | None, check_finite: bool = True):
        if not isinstance(inputs, Mapping):
            raise TypeError("inputs must be a mapping from modality key to a (B, C, H, W) tensor, "
                            f"e.g. {{'s2_l2a': x}}; got {type(inputs).__name__}")
        if not inputs:
            raise ValueError("inputs is empty: pass at least one modality, e.g. {'s2_l2a': x} "
                             f"with keys from {list(self.modalities)}")
        unknown = [k for k in inputs if k not in self.modalities]
        if unknown:
            raise KeyError(f"unknown modality keys {unknown}; this model has stems for "
                           f"{list(self.modalities)} (rename the keys, e.g. 'S2' -> 's2_l2a')")
        shape = None
        for key, x in inputs.items():
            if not torch.is_tensor(x) or x.ndim != 4:
                raise ValueError(f"{key}: expected a (B, C, H, W) tensor, got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
            expected = self.config.in_chans(key)
            if x.shape[1] != expected:
                from ..sensors import MODALITIES
                raise ValueError(f"{key}: expected {expected} channels {list(MODALITIES[key].bands)}, "
                                 f"got {x.shape[1]}; select the bands in this order "
                                 "(terrafm.sensors.fill_missing_bands fills absent ones)")
            b, _, h, w = x.shape
            if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
                raise ValueError(f"{key}: height and width must be positive multiples of "
                                 f"{self.patch_size}, got {h}x{w}; crop or pad to e.g. "
                                 f"{(h // self.patch_size + 1) * self.patch_size}")
            if not x.is_floating_point():
                raise TypeError(f"{key}: expected a normalized float tensor, got {x.dtype}; "
                                "apply terrafm.sensors.normalize first")
            if shape is None:
                shape = (b, h, w)
            elif (b, h, w) != shape:
                raise ValueError(f"modalities disagree on batch or size: {key} is {(b, h, w)} "
                                 f"(B, H, W) but another is {shape}; co-register and batch them together")
        if check_finite:
            check_finite_inputs(inputs)
        b, h, w = shape
        gh, gw = h // self.patch_size, w // self.patch_size
        patch_valid = {}
        for key, mask in (masks or {}).items():
            if key not in inputs:
                raise KeyError(f"mask given for {key!r} but no input for it; inputs: {list(inputs)}")
            if not torch.is_tensor(mask):
                mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool:
                raise TypeError(f"mask {key!r} must be boolean (True = valid), got {mask.dtype}")
            if tuple(mask.shape) == (b, h, w):
                mask = sensors.patch_valid(mask, self.patch_size)
            elif tuple(mask.shape) != (b, gh, gw):
                raise ValueError(f"mask {key!r} has shape {tuple(mask.shape)}; expected per pixel "
                                 f"{(b, h, w)} or per patch {(b, gh, gw)}")
            patch_valid[key] = mask.reshape(b, gh * gw)
        return (b, gh, gw), patch_valid

    # ------------------------------------------------------------------ forward
    def _tokens(self, inputs, masks, check_finite: bool = True):
        (batch, gh, gw), patch_valid = self._check_inputs(inputs, masks, check_finite)
        tokens, valid = self.patch_embed(inputs, patch_valid)
        cls = self.cls_token.expand(batch, -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_embed(gh, gw).to(tokens.dtype)
        attn_mask = None
        if valid is not None:
            keep = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=valid.device), valid], 1)
            attn_mask = keep[:, None, None, :]  # invalid positions are never attended to
        else:
            valid = torch.ones(batch, gh * gw, dtype=torch.bool, device=tokens.device)
        return x, attn_mask, valid, (batch, gh, gw)

    def forward(self, inputs: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor] | None = None, check_finite: bool = True) -> TerraFMOutput:
        """Encode normalized images of any subset of modalities.

        Parameters
        ----------
        inputs : mapping str -> Tensor (B, C, H, W)
            Normalized images (:func:`terrafm.sensors.normalize`), keys from
            ``model.modalities``, H and W multiples of 16, same B, H, W for all.
        masks : mapping str -> bool Tensor, optional
            Validity (True = valid) per pixel (B, H, W) or per patch (B, H/16, W/16). Pixels
            become patches by :func:`terrafm.sensors.patch_valid` (valid when at least
            ``MIN_VALID_FRACTION`` of its pixels are). Invalid modality tokens
            take no part in the fusion; positions with no valid modality are excluded from the
            trunk's attention, zeroed, and flagged in ``valid``. Masks may stay on the host
            while the inputs are on a GPU: what they decide (which stems run on which rows) is
            then decided on the host, with no device sync (:class:`terrafm.engine.Engine` does so).
        check_finite : bool
            Refuse NaN/inf inputs (reads one sum per modality back to the host: a device sync).
            ``False`` is for callers that checked on the host already (:class:`terrafm.engine.Engine`).

        Returns
        -------
        TerraFMOutput
        """
        x, attn_mask, valid, (batch, gh, gw) = self._tokens(inputs, masks, check_finite)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self._output(self.norm(x), valid, batch, gh, gw)

    def _output(self, x, valid, batch, gh, gw) -> TerraFMOutput:
        patch = x[:, 1:].reshape(batch, gh, gw, -1)
        grid_valid = valid.reshape(batch, gh, gw)
        patch = patch.masked_fill(~grid_valid.unsqueeze(-1), 0.0)  # unconditional: no host sync
        return TerraFMOutput(cls=x[:, 0], patch=patch, valid=grid_valid)

    def get_intermediate_layers(self, inputs: Mapping[str, torch.Tensor],
                                indices: int | Sequence[int] = (3, 5, 7, 11), norm: bool = True,
                                masks: Mapping[str, torch.Tensor] | None = None
                                ) -> list[torch.Tensor]:
        """Patch tokens after the given blocks (DINO style), each (B, H/16, W/16, D).

        ``indices`` is a sequence of block indices or an int ``n`` for the last ``n`` blocks;
        ``norm`` applies the final LayerNorm to each. Invalid positions are zeroed.
        """
        depth = len(self.blocks)
        wanted = list(range(depth - indices, depth)) if isinstance(indices, int) else list(indices)
        bad = [i for i in wanted if not -depth <= i < depth]
        if bad:
            raise IndexError(f"block indices {bad} out of range for a {depth}-block model")
        wanted = sorted({i % depth for i in wanted})
        x, attn_mask, valid, (batch, gh, gw) = self._tokens(inputs, masks)
        outputs = []
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x, attn_mask=attn_mask)
            if i in wanted:
                outputs.append(self._output(self.norm(x) if norm else x, valid, batch, gh, gw).patch)
        return outputs
