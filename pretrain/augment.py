"""Multi-crop with identical geometry across co-registered modalities, and modality augmentation.

Everything is driven by an explicit ``numpy.random.Generator`` per sample, so a sample's views
depend only on (seed, epoch, position in the global batch): the same on 1 or N ranks, and on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from terrafm.sensors import get_modality

__all__ = ["sample_crop_box", "MultiCropAugmentation", "select_modalities", "View"]


@dataclass
class View:
    """One augmented crop: normalized images and validity masks per modality."""

    images: dict[str, torch.Tensor]  # key -> (C, S, S) float32
    masks: dict[str, torch.Tensor]   # key -> (S, S) bool
    box: tuple[int, int, int, int]   # top, left, height, width in the tile
    flips: tuple[bool, bool]         # horizontal, vertical
    rotation: int = 0                # quarter turns (torch.rot90 over H, W), after the flips


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
                    ) -> tuple[int, int, int, int]:
    """A random-resized-crop box (top, left, h, w) whose area fraction lies in ``scale``.

    Same algorithm as torchvision's RandomResizedCrop (10 tries, then a centred fallback).

    Examples
    --------
    >>> top, left, h, w = sample_crop_box(np.random.default_rng(0), 534, 534, (0.25, 1.0))
    >>> 0.25 <= h * w / 534 ** 2 <= 1.0
    True
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = int(round(math.sqrt(area * min(max(scale[0], 0.0) + (scale[1] - scale[0]) / 2, 1.0))))
    h, w = min(side, height), min(side, width)
    return (height - h) // 2, (width - w) // 2, h, w


def select_modalities(available: Sequence[str], rng: np.random.Generator,
                      threshold: float = 0.5) -> tuple[str, ...]:
    """Keep each modality when a uniform draw falls below ``threshold``; never return none.

    If no modality is kept, one is chosen uniformly. One kept -> that stem; several -> fusion.

    Examples
    --------
    >>> select_modalities(["s2_l2a", "s1"], np.random.default_rng(1))
    ('s2_l2a',)
    """
    if not available:
        raise ValueError("no modality available for this sample; the dataset must yield at least one")
    draws = rng.random(len(available))
    chosen = tuple(m for m, d in zip(available, draws) if d < threshold)
    return chosen or (available[int(rng.integers(len(available)))],)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x[None].float(), size=(size, size), mode="nearest")[0]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


@dataclass
class MultiCropAugmentation:
    """2 global crops and ``n_local`` local crops of a tile, identical across modalities.

    Geometry (crop box, flips, 90° rotation) is drawn once per view and applied to every
    modality and its mask. Radiometric jitter works in normalized space: for reflectance a
    random gain/offset around the mean (0.5) ("colour jitter" on all bands together), for a
    modality normalized in dB (``Modality.to_db`` in the registry: SAR) an additive dB shift (a
    calibration gain), ``s`` dB being ``s / (4 sigma_b)`` in band b; Gaussian blur on all modalities (p = 1.0 / 0.1
    on the two globals, 0.5 on locals, as DINO). Solarization/grayscale are not meaningful for
    multispectral reflectance or backscatter and are left out.

    Examples
    --------
    >>> aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    >>> tile = {"s1": torch.rand(2, 64, 64)}
    >>> views = aug(tile, {"s1": torch.ones(64, 64, dtype=torch.bool)}, np.random.default_rng(0))
    >>> [tuple(v.images["s1"].shape) for v in views]
    [(2, 32, 32), (2, 32, 32), (2, 16, 16), (2, 16, 16)]
    """

    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    jitter_prob: float = 0.8
    gain_range: float = 0.2
    offset_range: float = 0.05
    sar_shift_db: float = 1.0
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    def __call__(self, images: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 rng: np.random.Generator) -> list[View]:
        shapes = {tuple(x.shape[-2:]) for x in images.values()}
        if len(shapes) != 1:
            raise ValueError(f"modalities of one tile are not co-registered: sizes {sorted(shapes)}; "
                             "resample all modalities to the same 10 m grid first")
        height, width = shapes.pop()
        views = []
        for i in range(self.n_views):
            is_global = i < 2
            size = self.global_size if is_global else self.local_size
            scale = self.global_scale if is_global else self.local_scale
            blur_p = self.blur_probs[i] if is_global else self.blur_probs[2]
            views.append(self._view(images, masks, rng, height, width, size, scale, blur_p))
        return views

    def _view(self, images, masks, rng, height, width, size, scale, blur_p) -> View:
        top, left, h, w = sample_crop_box(rng, height, width, scale)
        flip_h, flip_v = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        rot = int(rng.integers(4))
        jitter = rng.random() < self.jitter_prob
        gain = 1.0 + rng.uniform(-self.gain_range, self.gain_range)
        offset = rng.uniform(-self.offset_range, self.offset_range)
        sar_shift = rng.uniform(-self.sar_shift_db, self.sar_shift_db)
        blur = rng.random() < blur_p
        sigma = rng.uniform(*self.blur_sigma)
        out_images, out_masks = {}, {}
        for key, x in images.items():
            crop = _resize(x[:, top:top + h, left:left + w].float(), size, "bilinear")
            mask = masks.get(key)
            mask = (torch.ones(size, size, dtype=torch.bool) if mask is None else
                    _resize(mask[None, top:top + h, left:left + w], size, "nearest")[0] > 0.5)
            if jitter:
                spec = get_modality(key)
                if spec.to_db:
                    crop = crop + torch.tensor([sar_shift / (4 * s) for s in spec.std]).view(-1, 1, 1)
                else:
                    crop = (crop - 0.5) * gain + 0.5 + offset
            if blur:
                crop = _gaussian_blur(crop, sigma)
            out_images[key], out_masks[key] = crop, mask
        for key in out_images:
            for flag, dim in ((flip_h, -1), (flip_v, -2)):
                if flag:
                    out_images[key] = out_images[key].flip(dim)
                    out_masks[key] = out_masks[key].flip(dim)
            if rot:
                out_images[key] = torch.rot90(out_images[key], rot, (-2, -1))
                out_masks[key] = torch.rot90(out_masks[key], rot, (-2, -1))
            out_images[key] = out_images[key].contiguous()
            out_masks[key] = out_masks[key].contiguous()
        return View(out_images, out_masks, (top, left, h, w), (flip_h, flip_v), rot)
