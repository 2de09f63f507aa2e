"""Strict loading of TerraFM checkpoints: the Hugging Face release, local files, our exports.

Where a model's published checkpoint lives is part of its config (:class:`HubWeights` on
:class:`ModelConfig`); this module only resolves and checks it.

The fusion parameters (``patch_embed.fusion.*``) are all present (a trained fusion, e.g. from
``pretrain.export``) or all absent (the public release). Absent, they are set so that the fusion
is the masked mean of the valid modalities' values
(:meth:`~terrafm.model.fusion.CrossAttentionFusion.set_masked_mean`), never a random
draw; ``model.fusion_mode`` records which (``"trained"``, ``"mean"``; ``"random"`` for a model
that loaded no checkpoint).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, get_config, list_models

__all__ = ["load_weights", "resolve_weights", "non_finite_tensors", "CheckpointError", "LoadResult",
           "FUSION_PREFIX", "FUSION_MODES"]

logger = logging.getLogger(__name__)

FUSION_PREFIX = "patch_embed.fusion."
FUSION_MODES = ("trained", "mean", "random")
"""Values of ``TerraFM.fusion_mode``: fusion parameters from the checkpoint; the masked mean set
for a checkpoint without them; the seeded random initialisation of a model without weights."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model as it is."""


@dataclass
class LoadResult:
    """What :func:`load_weights` did."""

    path: str
    sha256: str
    n_tensors: int
    missing_fusion: list[str] = field(default_factory=list)

    @property
    def fusion_mode(self) -> str:
        """``"trained"`` when the checkpoint held the fusion, ``"mean"`` when it had none."""
        return "mean" if self.missing_fusion else "trained"

    @property
    def fusion_trained(self) -> bool:
        return not self.missing_fusion


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _published(config: ModelConfig):
    """The config's :class:`HubWeights`, or a CheckpointError naming the models that have some."""
    if config.weights is not None:
        return config.weights
    published = [n for n in list_models() if get_config(n).weights is not None]
    raise CheckpointError(f"no published weights for {config.name!r}: its config has no hub location "
                          f"(ModelConfig.weights); models with published weights: {published}. "
                          "Pass a local checkpoint path, or weights=None for an untrained model")


def resolve_weights(source: str | os.PathLike, model: str | ModelConfig = "terrafm_base") -> Path:
    """Turn a weights source into a local file path.

    ``"hf"`` means the model's published checkpoint, located by its config's
    :class:`~terrafm.model.HubWeights`: the file named by the config's ``local_env`` variable
    when that is set (``TERRAFM_WEIGHTS`` for TerraFM-B), else ``repo_id``/``filename`` at
    ``revision`` through huggingface_hub's cache (which honours ``HF_HUB_OFFLINE`` and
    ``HF_HOME``).

    Parameters
    ----------
    source : path or "hf"
    model : str or ModelConfig
        A registered model name or a config.

    Examples
    --------
    >>> resolve_weights("hf", "terrafm_tiny")
    Traceback (most recent call last):
    ...
    terrafm.model.weights.CheckpointError: no published weights for 'terrafm_tiny': its config has no hub location (ModelConfig.weights); models with published weights: ['terrafm_base']. Pass a local checkpoint path, or weights=None for an untrained model
    """
    if str(source) != "hf":
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the path of a "
                                    f".pth state dict, or weights='hf' for a model's published checkpoint")
        return path
    config = get_config(model) if isinstance(model, str) else model
    hub = _published(config)
    env = os.environ.get(hub.local_env) if hub.local_env else None
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{hub.local_env}={env!r} does not point to a file; fix or unset it")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision))
    except Exception as exc:  # offline, no cache, hub unreachable
        revision = f" --revision {hub.revision}" if hub.revision else ""
        local = (f", or set {hub.local_env}=/path/to/{hub.filename}" if hub.local_env else "")
        raise CheckpointError(
            f"could not get {hub.filename} from the Hugging Face repo {hub.repo_id} ({type(exc).__name__}: "
            f"{exc}). Download it once where the hub is reachable "
            f"(huggingface-cli download {hub.repo_id} {hub.filename}{revision}) and copy the cache "
            f"(HF_HOME){local}; for an untrained model use weights=None."
        ) from exc


def non_finite_tensors(state) -> str:
    """The floating tensors of a state dict that hold NaN or inf, listed with their counts ("" if none).

    Examples
    --------
    >>> non_finite_tensors({"w": torch.tensor([1.0, float("inf")]), "n": torch.tensor([3])})
    'w (1 of 2 values NaN/inf)'
    """
    floating = {name: tensor for name, tensor in state.items()
                if torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex())}
    # screen with one sum per tensor (NaN/inf make it non-finite; 20x cheaper than isfinite over
    # every value, and embed() checks its model on every call); count exactly only on a hit, which
    # also clears a finite tensor whose sum merely overflowed
    if not floating or bool(torch.stack([t.sum() for t in floating.values()]).isfinite().all()):
        return ""
    bad = []
    for name, tensor in floating.items():
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            bad.append(f"{name} ({count} of {tensor.numel()} values NaN/inf)")
    return _listing(bad, 8) if bad else ""


def _first_line(exc: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()   # torch colours some messages
    return lines[0] if lines else "no message"


def _pickled_objects(path: Path, exc: Exception) -> str:
    """The classes and functions a refused checkpoint would unpickle, for the message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, or an older torch: fall back on torch's own first line
        names = []
    return ", ".join(names[:5]) if names else f"objects other than tensors ({_first_line(exc)})"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a download or export that was interrupted or never "
                              "written. Delete it and download or export it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a plain tensor state dict: it pickles {_pickled_objects(path, exc)}, which "
            "torch.load(weights_only=True) refuses. terrafm never unpickles arbitrary objects; if you trust "
            "the file, load it yourself with torch.load(weights_only=False) and save its "
            "state_dict() with torch.save."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {_first_line(exc)}); "
            "delete it and download or export it again"
        ) from exc
    except Exception as exc:  # torch's weights-only unpickler fails on arbitrary bytes with any error type
        raise CheckpointError(
            f"{path} is not a checkpoint torch can read ({type(exc).__name__}: {_first_line(exc)}); pass a "
            ".pth state dict saved with torch.save(model.state_dict(), path)"
        ) from exc
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors "
                              f"(got {type(obj).__name__}); save model.state_dict()")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{path} holds non-finite parameters: {bad}. A model loaded from it gives NaN "
                              "embeddings; training diverged or the file was damaged: export an earlier checkpoint "
                              "(python -m pretrain.export) or download the weights again")
    return state


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(model: nn.Module, source: str | os.PathLike) -> LoadResult:
    """Load a checkpoint into a TerraFM model, strictly.

    Every model parameter must be in the checkpoint with the same shape. The fusion parameters
    (``patch_embed.fusion.*``) are the one exception, as a whole: the public release has none,
    and then the fusion is set to the masked mean of the valid modalities' values (see
    :meth:`~terrafm.model.fusion.CrossAttentionFusion.set_masked_mean`): a single modality gives
    exactly the release's output, several give the mean of their projected values. A checkpoint
    with only some of them is refused. ``model.fusion_mode`` becomes ``"trained"`` or
    ``"mean"``. A ``module.`` prefix (DDP) is stripped. The file's sha256 is recorded on
    ``model.checkpoint_sha256`` for provenance.

    Parameters
    ----------
    model : TerraFM
    source : path or "hf"
        A ``.pth`` state dict, or ``"hf"`` for the model's published checkpoint (see
        :func:`resolve_weights`).

    Returns
    -------
    LoadResult

    Raises
    ------
    CheckpointError
        Empty, corrupt or truncated file, non-tensor pickle, NaN or infinite values, unexpected
        keys, missing keys, part of the fusion parameters, or shape mismatches (all listed).

    Examples
    --------
    >>> import tempfile, torch
    >>> from terrafm.model import create_model
    >>> model = create_model("terrafm_tiny")
    >>> path = tempfile.mktemp(suffix=".pth"); torch.save(model.state_dict(), path)
    >>> load_weights(create_model("terrafm_tiny"), path).fusion_mode
    'trained'
    >>> release = {k: v for k, v in model.state_dict().items() if not k.startswith("patch_embed.fusion.")}
    >>> torch.save(release, path)
    >>> model = create_model("terrafm_tiny")
    >>> load_weights(model, path).fusion_mode, model.fusion_mode
    ('mean', 'mean')
    """
    config = getattr(model, "config", None)
    name = getattr(config, "name", "terrafm_base")
    path = resolve_weights(source, config if isinstance(config, ModelConfig) else name)
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    missing_fusion = [k for k in missing if k.startswith(FUSION_PREFIX)]
    missing_other = [k for k in missing if not k.startswith(FUSION_PREFIX)]
    present_fusion = [k for k in expected if k.startswith(FUSION_PREFIX) and k in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing_other or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched, 6)}")
        if missing_other:
            problems.append(f"{len(missing_other)} missing keys: {_listing(missing_other)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        hint = ""
        if "cls_token" in state and state["cls_token"].shape[-1] != model.embed_dim:
            width = state["cls_token"].shape[-1]
            guess = {768: "terrafm_base", 1024: "terrafm_large", 64: "terrafm_tiny"}.get(width)
            hint = (f" The checkpoint has width {width}, the model {model.embed_dim}"
                    + (f": build the model with create_model({guess!r})." if guess else "."))
        raise CheckpointError(f"checkpoint {path} does not fit {name}: " + "; ".join(problems)
                              + "." + hint)
    if missing_fusion and present_fusion:
        raise CheckpointError(
            f"checkpoint {path} holds part of the fusion: present {_listing(present_fusion)}; missing "
            f"{_listing(missing_fusion)}. A fusion is loaded whole or not at all: export all "
            f"{FUSION_PREFIX}* parameters (pretrain.export does), or remove every {FUSION_PREFIX}* key "
            "to use the masked-mean fusion of the public release")
    model.load_state_dict(state, strict=False)
    if missing_fusion:
        model.patch_embed.fusion.set_masked_mean()
    sha = _sha256(path)
    model.checkpoint_sha256 = sha
    model.checkpoint_path = str(path)
    result = LoadResult(str(path), sha, len(state), missing_fusion)
    model.fusion_mode = result.fusion_mode
    if missing_fusion:
        logger.info("%s has no fusion parameters (the public TerraFM release has none): the fusion is "
                    "the masked mean of the valid modalities' projected values (fusion_mode='mean'); "
                    "single-modality embeddings are exactly the release's", path.name)
    logger.info("loaded %s (%d tensors, sha256 %s, fusion %s)", path, len(state), sha[:12], result.fusion_mode)
    return result
