"""Named TerraFM configurations and the model registry (timm style).

A config lists its modalities explicitly and says where its published weights live
(:class:`HubWeights`), so a registered model never changes when a sensor is added to
:mod:`terrafm.sensors` and no weight location is hard-coded in the loader.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Callable

from .. import sensors
from ..sensors import PATCH_SIZE

__all__ = ["ModelConfig", "HubWeights", "register_model", "list_models", "get_config"]

#: The stems of the public TerraFM release, in its order (its state dict has exactly these): a
#: fixed tuple owned by the registry, not the registry's current contents.
_RELEASE_MODALITIES = sensors.RELEASE_MODALITIES


@dataclass(frozen=True)
class HubWeights:
    """Where a model's published checkpoint lives on the Hugging Face Hub.

    Attributes
    ----------
    repo_id, filename : str
        Passed to ``huggingface_hub.hf_hub_download``.
    revision : str or None
        A branch, tag or commit of the repo; None follows the hub's default branch.
    local_env : str or None
        An environment variable that, when set, names a local copy of this file to use
        instead of the hub (e.g. ``TERRAFM_WEIGHTS`` for an air-gapped machine).

    Examples
    --------
    >>> get_config("terrafm_base").weights.repo_id
    'MBZUAI/TerraFM'
    """

    repo_id: str
    filename: str
    revision: str | None = None
    local_env: str | None = None

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}/{self.filename}{at}"


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
        Keys of :data:`terrafm.sensors.MODALITIES` the model has a stem for, in state-dict
        order. Required: a config never follows the global modality table.
    weights : HubWeights or None
        Published checkpoint for ``weights="hf"``; None if the model has none.

    Examples
    --------
    >>> cfg = ModelConfig("toy", modalities=("s1",), embed_dim=64, depth=1, num_heads=4, fusion_heads=4)
    >>> cfg.in_chans("s1"), cfg.attn_dim
    (2, 192)
    """

    name: str
    modalities: tuple[str, ...]
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = PATCH_SIZE
    img_size: int = 224
    fusion_queries: int = 5
    fusion_heads: int = 12
    drop_path_rate: float = 0.0
    weights: HubWeights | None = None

    @property
    def attn_dim(self) -> int:
        """Width of the modality tokens before ``proj3`` (3 x embed_dim in the release)."""
        return 3 * self.embed_dim

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def in_chans(self, modality: str) -> int:
        """Input channels of a modality's stem (its band count in the modality registry)."""
        return sensors.MODALITIES[modality].n_bands

    def __post_init__(self) -> None:
        if isinstance(self.modalities, str) or not isinstance(self.modalities, (tuple, list)):
            raise TypeError(f"invalid TerraFM config {self.name!r}: modalities must be a tuple of "
                            f"modality keys, e.g. ('s2_l2a', 's1'), got {self.modalities!r}")
        object.__setattr__(self, "modalities", tuple(self.modalities))
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.attn_dim % self.fusion_heads:
            problems.append(f"attn_dim {self.attn_dim} is not divisible by fusion_heads {self.fusion_heads}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        unknown = [m for m in self.modalities if m not in sensors.MODALITIES]
        if unknown:
            problems.append(f"unknown modalities {unknown}: register them in terrafm.sensors or use "
                            f"known keys {list(sensors.MODALITIES)}")
        if not self.modalities:
            problems.append("modalities is empty: list at least one, e.g. ('s2_l2a',)")
        if len(set(self.modalities)) != len(self.modalities):
            problems.append(f"modalities {list(self.modalities)} repeat a key")
        if self.weights is not None and not isinstance(self.weights, HubWeights):
            problems.append(f"weights must be a HubWeights(repo_id, filename, revision) or None, "
                            f"got {self.weights!r}")
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
    ...     return dataclasses.replace(terrafm_base(), name="terrafm_base_s1_only", modalities=("s1",),
    ...                                weights=None)
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
    return ModelConfig("terrafm_base", modalities=_RELEASE_MODALITIES, embed_dim=768, depth=12,
                       num_heads=12, fusion_heads=12,
                       weights=HubWeights("MBZUAI/TerraFM", "TerraFM-B.pth", local_env="TERRAFM_WEIGHTS"))


@register_model
def terrafm_large() -> ModelConfig:
    """TerraFM-L: ViT-L/16 trunk (advertised by the authors; no checkpoint is published)."""
    return ModelConfig("terrafm_large", modalities=_RELEASE_MODALITIES, embed_dim=1024, depth=24,
                       num_heads=16, fusion_heads=16)


@register_model
def terrafm_tiny() -> ModelConfig:
    """A 2-block, 64-wide model for tests and CPU smoke runs (untrained)."""
    return ModelConfig("terrafm_tiny", modalities=("s2_l2a", "s2_l1c", "s1"), embed_dim=64, depth=2,
                       num_heads=4, fusion_heads=4)


@register_model
def terrafm_small_test() -> ModelConfig:
    """A 4-block, 96-wide model: deep enough for ``get_intermediate_layers`` at (0, 1, 2, 3)."""
    return ModelConfig("terrafm_small_test", modalities=("s2_l2a", "s2_l1c", "s1"), embed_dim=96,
                       depth=4, num_heads=4, fusion_heads=4)
