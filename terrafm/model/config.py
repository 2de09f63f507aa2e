"""Named TerraFM configurations and the model registry (timm style)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Callable

from ..sensors import MODALITIES, MODALITY_KEYS, PATCH_SIZE

__all__ = ["ModelConfig", "register_model", "list_models", "get_config"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a TerraFM encoder.

    Attributes
    ----------
    name : str
        Registry name, recorded in embedding provenance.
    embed_dim, depth, num_heads, mlp_ratio : trunk (DINO ViT) width, blocks, heads, MLP ratio.
    patch_size : int
        Patch side in pixels (16).
    img_size : int
        Side the learned ``pos_embed`` grid is defined for (224 -> 14x14); other multiples of
        ``patch_size`` are served by bicubic resizing.
    fusion_queries : int
        Learned queries of the cross-attention fusion (N_q, 5 in the paper).
    fusion_heads : int
        Heads of the fusion attention; must divide ``attn_dim``.
    drop_path_rate : float
        Stochastic depth, linearly increasing over blocks (0.1 for pretraining).
    modalities : tuple of str
        Modality stems, in the release's order.
    weights : str or None
        Published checkpoint for ``weights="hf"`` as ``"repo_id/filename"``, None if unpublished.
    """

    name: str
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = PATCH_SIZE
    img_size: int = 224
    fusion_queries: int = 5
    fusion_heads: int = 12
    drop_path_rate: float = 0.0
    modalities: tuple[str, ...] = MODALITY_KEYS
    weights: str | None = None

    @property
    def attn_dim(self) -> int:
        """Width of the modality tokens before ``proj3`` (3 x embed_dim in the release)."""
        return 3 * self.embed_dim

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def in_chans(self, modality: str) -> int:
        return MODALITIES[modality].n_bands

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.attn_dim % self.fusion_heads:
            problems.append(f"attn_dim {self.attn_dim} is not divisible by fusion_heads {self.fusion_heads}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            problems.append(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
        if self.fusion_queries < 1 or self.depth < 1:
            problems.append("fusion_queries and depth must be >= 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate {self.drop_path_rate} must lie in [0, 1)")
        if problems:
            raise ValueError(f"invalid TerraFM config {self.name!r}: " + "; ".join(problems))


_REGISTRY: dict[str, Callable[[], ModelConfig]] = {}


def register_model(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Register a function returning a :class:`ModelConfig` under its function name.

    Examples
    --------
    >>> @register_model
    ... def terrafm_base_s1_only() -> ModelConfig:
    ...     return dataclasses.replace(terrafm_base(), name="terrafm_base_s1_only", modalities=("s1",))
    >>> get_config("terrafm_base_s1_only").modalities
    ('s1',)
    >>> _ = _REGISTRY.pop("terrafm_base_s1_only")
    """
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob ``pattern``.

    Examples
    --------
    >>> list_models("terrafm_*")
    ['terrafm_base', 'terrafm_large', 'terrafm_small_test', 'terrafm_tiny']
    """
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides) -> ModelConfig:
    """The registered config ``name`` with ``overrides`` applied (e.g. ``drop_path_rate=0.1``).

    Examples
    --------
    >>> cfg = get_config("terrafm_base", drop_path_rate=0.1)
    >>> cfg.embed_dim, cfg.depth, cfg.drop_path_rate
    (768, 12, 0.1)
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown TerraFM model {name!r}; registered: {list_models()}")
    config = _REGISTRY[name]()
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(f"unknown config overrides {bad} for {name!r}; valid: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


@register_model
def terrafm_base() -> ModelConfig:
    """TerraFM-B: ViT-B/16 trunk, the published checkpoint (MBZUAI/TerraFM TerraFM-B.pth)."""
    return ModelConfig("terrafm_base", 768, 12, 12, fusion_heads=12, weights="MBZUAI/TerraFM/TerraFM-B.pth")


@register_model
def terrafm_large() -> ModelConfig:
    """TerraFM-L: ViT-L/16 trunk (advertised by the authors; no checkpoint is published)."""
    return ModelConfig("terrafm_large", 1024, 24, 16, fusion_heads=16)


@register_model
def terrafm_tiny() -> ModelConfig:
    """A 2-block, 64-wide model for tests and CPU smoke runs (untrained)."""
    return ModelConfig("terrafm_tiny", 64, 2, 4, fusion_heads=4)


@register_model
def terrafm_small_test() -> ModelConfig:
    """A 4-block, 96-wide model: deep enough for ``get_intermediate_layers`` at (0, 1, 2, 3)."""
    return ModelConfig("terrafm_small_test", 96, 4, 4, fusion_heads=4)
