"""Strict loading of TerraFM checkpoints: the Hugging Face release, local files, our exports."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_weights", "resolve_weights", "CheckpointError", "LoadResult",
           "HF_REPO_ID", "HF_FILENAME", "FUSION_PREFIX"]

logger = logging.getLogger(__name__)

HF_REPO_ID = "MBZUAI/TerraFM"
HF_FILENAME = "TerraFM-B.pth"
FUSION_PREFIX = "patch_embed.fusion."
WEIGHTS_ENV = "TERRAFM_WEIGHTS"


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
    def fusion_trained(self) -> bool:
        return not self.missing_fusion


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights(source: str | os.PathLike, model_name: str = "terrafm_base") -> Path:
    """Turn a weights source into a local file path.

    ``"hf"`` means the published TerraFM-B checkpoint: the file named by the
    ``TERRAFM_WEIGHTS`` environment variable when set, else ``MBZUAI/TerraFM/TerraFM-B.pth``
    through huggingface_hub's cache (which honours ``HF_HUB_OFFLINE`` and ``HF_HOME``).

    Examples
    --------
    >>> resolve_weights("hf", "terrafm_tiny")
    Traceback (most recent call last):
    ...
    terrafm.model.weights.CheckpointError: no published weights for 'terrafm_tiny': only terrafm_base has a released checkpoint (MBZUAI/TerraFM TerraFM-B.pth); pass a local path or weights=None
    """
    if str(source) != "hf":
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the path of a "
                                    f".pth state dict, or weights='hf' for the released TerraFM-B")
        return path
    if model_name != "terrafm_base":
        raise CheckpointError(f"no published weights for {model_name!r}: only terrafm_base has a "
                              f"released checkpoint ({HF_REPO_ID} {HF_FILENAME}); pass a local path "
                              "or weights=None")
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_ENV}={env!r} does not point to a file; fix or unset it")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HF_REPO_ID, HF_FILENAME))
    except Exception as exc:  # offline, no cache, hub unreachable
        raise CheckpointError(
            f"could not get {HF_FILENAME} from the Hugging Face repo {HF_REPO_ID} ({type(exc).__name__}: "
            f"{exc}). Download it once where the hub is reachable "
            f"(huggingface-cli download {HF_REPO_ID} {HF_FILENAME}) and copy the cache "
            f"(HF_HOME), or set {WEIGHTS_ENV}=/path/to/{HF_FILENAME}; for an untrained model use "
            "weights=None."
        ) from exc


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it "
            f"({str(exc).splitlines()[0]}). terrafm never unpickles arbitrary objects; if you trust "
            "the file, load it yourself with torch.load(weights_only=False) and save its "
            "state_dict() with torch.save."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "delete it and download or export it again"
        ) from exc
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors "
                              f"(got {type(obj).__name__}); save model.state_dict()")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(model: nn.Module, source: str | os.PathLike) -> LoadResult:
    """Load a checkpoint into a TerraFM model, strictly.

    Every model parameter must be in the checkpoint with the same shape, except the fusion
    parameters (``patch_embed.fusion.*``), which the public release does not contain: then a
    warning says that multi-sensor fusion is untrained. A ``module.`` prefix (DDP) is stripped.
    The file's sha256 is recorded on ``model.checkpoint_sha256`` for provenance.

    Parameters
    ----------
    model : TerraFM
    source : path or "hf"
        A ``.pth`` state dict, or ``"hf"`` for the published TerraFM-B (see
        :func:`resolve_weights`).

    Returns
    -------
    LoadResult

    Raises
    ------
    CheckpointError
        Corrupt/truncated file, non-tensor pickle, unexpected keys, missing keys or shape
        mismatches (all listed).

    Examples
    --------
    >>> import tempfile, torch
    >>> from terrafm.model import create_model
    >>> model = create_model("terrafm_tiny")
    >>> path = tempfile.mktemp(suffix=".pth"); torch.save(model.state_dict(), path)
    >>> load_weights(create_model("terrafm_tiny"), path).fusion_trained
    True
    """
    name = getattr(getattr(model, "config", None), "name", "terrafm_base")
    path = resolve_weights(source, name)
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    missing_fusion = [k for k in missing if k.startswith(FUSION_PREFIX)]
    missing_other = [k for k in missing if not k.startswith(FUSION_PREFIX)]
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
    model.load_state_dict(state, strict=False)
    sha = _sha256(path)
    model.checkpoint_sha256 = sha
    model.checkpoint_path = str(path)
    model.fusion_trained = not missing_fusion
    if missing_fusion:
        warnings.warn(
            f"{path.name} has no multi-sensor fusion parameters (the public TerraFM release has "
            "none): single-modality embeddings match the release; fused S1+S2 embeddings use an "
            "untrained fusion.", UserWarning, stacklevel=2)
    logger.info("loaded %s (%d tensors, sha256 %s)", path, len(state), sha[:12])
    return LoadResult(str(path), sha, len(state), missing_fusion)
