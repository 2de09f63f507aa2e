"""TerraFM encoder: modality stems, cross-attention fusion, ViT trunk (timm layout), registry, weights.

``create_model`` is deterministic: the same name, weights and seed give the same parameters.

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

import torch

from .config import HubWeights, ModelConfig, get_config, list_models, register_model
from .device import autocast, autocast_dtype, resolve_device
from .terrafm import TerraFM, TerraFMOutput
from .weights import CheckpointError, LoadResult, load_weights, resolve_weights

__all__ = ["create_model", "load_weights", "list_models", "register_model", "get_config",
           "resolve_device", "autocast", "autocast_dtype", "resolve_weights", "ModelConfig", "HubWeights",
           "TerraFM", "TerraFMOutput", "CheckpointError", "LoadResult"]


def create_model(name: str = "terrafm_base", weights: str | os.PathLike | None = None,
                 seed: int | None = 0, **overrides) -> TerraFM:
    """Build a registered TerraFM model, optionally loading weights.

    Parameters
    ----------
    name : str
        A registered config (:func:`list_models`): ``terrafm_base``, ``terrafm_large``,
        ``terrafm_tiny``, ``terrafm_small_test``.
    weights : path, "hf" or None
        ``"hf"``: the model's published checkpoint (its config's
        :class:`~terrafm.model.HubWeights`; ``$TERRAFM_WEIGHTS`` for TerraFM-B); a path: a
        state dict file; None: no checkpoint (``model.fusion_mode == "random"``, untrained). A
        checkpoint without fusion parameters (the public release) gets the masked-mean fusion
        (``fusion_mode == "mean"``), see :func:`load_weights`.
    seed : int or None
        Seed of the initialisation, drawn from a private generator state: two calls with the
        same arguments give identical models, and the global torch RNG is left untouched.
        None draws from (and advances) the global RNG, e.g. for a pretraining run that seeds
        it itself.
    **overrides
        Config fields to change, e.g. ``drop_path_rate=0.1``.

    Examples
    --------
    >>> model = create_model("terrafm_tiny", drop_path_rate=0.1)
    >>> model.config.drop_path_rate, model.embed_dim, model.fusion_mode
    (0.1, 64, 'random')
    >>> torch.equal(model.cls_token, create_model("terrafm_tiny").cls_token)
    True
    """
    config = get_config(name, **overrides)
    path = None if weights is None else resolve_weights(weights, config)   # fail before building
    if seed is None:
        model = TerraFM(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TerraFM(config)
    if path is not None:
        load_weights(model, path)
    return model
