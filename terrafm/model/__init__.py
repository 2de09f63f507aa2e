"""TerraFM encoder: modality stems, cross-attention fusion, timm ViT trunk, registry, weights.

Examples
--------
>>> import torch
>>> from terrafm.model import create_model
>>> model = create_model("terrafm_tiny").eval()
>>> model({"s1": torch.rand(1, 2, 32, 32)}).patch.shape
torch.Size([1, 2, 2, 64])
"""

from __future__ import annotations

import os

from .config import ModelConfig, get_config, list_models, register_model
from .device import autocast, autocast_dtype, resolve_device
from .terrafm import TerraFM, TerraFMOutput
from .weights import CheckpointError, LoadResult, load_weights, resolve_weights

__all__ = ["create_model", "load_weights", "list_models", "register_model", "get_config",
           "resolve_device", "autocast", "autocast_dtype", "resolve_weights", "ModelConfig",
           "TerraFM", "TerraFMOutput", "CheckpointError", "LoadResult"]


def create_model(name: str = "terrafm_base", weights: str | os.PathLike | None = None,
                 **overrides) -> TerraFM:
    """Build a registered TerraFM model, optionally loading weights.

    Parameters
    ----------
    name : str
        A registered config (:func:`list_models`): ``terrafm_base``, ``terrafm_large``,
        ``terrafm_tiny``, ``terrafm_small_test``.
    weights : path, "hf" or None
        ``"hf"``: the released TerraFM-B from Hugging Face (or ``$TERRAFM_WEIGHTS``); a path: a
        state dict file; None: random initialisation.
    **overrides
        Config fields to change, e.g. ``drop_path_rate=0.1``.

    Examples
    --------
    >>> model = create_model("terrafm_tiny", drop_path_rate=0.1)
    >>> model.config.drop_path_rate, model.embed_dim
    (0.1, 64)
    """
    model = TerraFM(get_config(name, **overrides))
    if weights is not None:
        load_weights(model, weights)
    return model
