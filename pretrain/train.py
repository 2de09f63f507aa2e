"""TerraFM DINO pretraining: ``torchrun --nproc_per_node=N -m pretrain.train --config vitb_paper``.

Reads top to bottom like facebookresearch/dino: data -> student/teacher -> loss -> optimizer ->
schedules -> resume -> loop (forward, loss, backward, clip, freeze last layer, step, EMA) ->
checkpoints, metrics and the kNN monitor. Every sample's augmentation is seeded by
(seed, epoch, position in the global batch), so 1 rank and N ranks with the same global batch
see the same views, and a resumed run sees the views the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import pickle
import pickletools
import random
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .augment import MultiCropAugmentation, select_modalities
from .config import ConfigError, PretrainConfig, load_config
from .data import GeoTIFFFolder, MajorTOMCore, frequent_classes, read_cell_stats
from .head import build_student_teacher, ema_update
from .loss import DualCenteringDINOLoss
from .schedules import build_schedules

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"


# ----------------------------------------------------------------------------- distributed
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group (NCCL on GPU, Gloo on CPU); (rank, world) = (0, 1) alone."""
    from terrafm.model.device import process_group_backend

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU (not cuda:0) from the start
        dist.init_process_group(process_group_backend(device),
                                **({"device_id": device} if device.type == "cuda" else {}))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_device(device: str | int | torch.device = "auto") -> tuple[torch.device, int, int]:
    """This process's device, rank and world size: ``cuda:LOCAL_RANK`` under torchrun on a GPU node.

    The device comes from :func:`terrafm.model.device.device_for_rank` (one GPU per local rank),
    is made the current CUDA device before the process group starts (NCCL on CUDA, Gloo on CPU).

    Examples
    --------
    >>> setup_device("cpu")   # alone: no process group
    (device(type='cpu'), 0, 1)
    """
    from terrafm.model.device import device_for_rank

    device = device_for_rank(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(device)
    if world > 1:
        logger.info("rank %d of %d (local rank %s) on %s", rank, world, os.environ.get("LOCAL_RANK", "0"), device)
    return device, rank, world


def _all_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# ----------------------------------------------------------------------------- data
class AugmentedTiles(torch.utils.data.Dataset):
    """Wraps a tile dataset; item ``(index, epoch, position)`` -> views and modality selections."""

    def __init__(self, tiles, augmentation: MultiCropAugmentation, threshold: float, seed: int):
        self.tiles, self.augmentation, self.threshold, self.seed = tiles, augmentation, threshold, seed

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, epoch, position = key
        rng = np.random.default_rng([self.seed, epoch, position])
        sample = self.tiles[index]
        views = self.augmentation(sample["images"], sample["masks"], rng)
        available = list(sample["images"])
        return {"views": views, "landcover": sample["landcover"],
                "student": [select_modalities(available, rng, self.threshold) for _ in views],
                "teacher": [select_modalities(available, rng, self.threshold) for _ in range(2)]}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of each global batch as ``(index, epoch, position)`` keys.

    Tiles are drawn with replacement by their prior weights from a per-epoch generator, so the
    global batch is the same whatever the number of ranks; ``start_iter`` resumes mid-epoch.
    """

    def __init__(self, weights: np.ndarray, global_batch: int, iters_per_epoch: int,
                 total_iters: int, seed: int, rank: int = 0, world: int = 1, start_iter: int = 0):
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.global_batch, self.iters_per_epoch = global_batch, iters_per_epoch
        self.total_iters, self.seed, self.rank, self.world = total_iters, seed, rank, world
        self.start_iter = start_iter
        self.local_batch = global_batch // world

    def __len__(self) -> int:
        return self.total_iters - self.start_iter

    def __iter__(self):
        epoch, draws = None, None
        for it in range(self.start_iter, self.total_iters):
            if it // self.iters_per_epoch != epoch:
                epoch = it // self.iters_per_epoch
                rng = np.random.default_rng([self.seed, epoch, 7919])
                draws = rng.choice(len(self.weights), size=self.iters_per_epoch * self.global_batch,
                                   p=self.weights)
            first = (it % self.iters_per_epoch) * self.global_batch + self.rank * self.local_batch
            yield [(int(draws[p]), epoch, p) for p in range(first, first + self.local_batch)]


def _stack_group(samples: list[dict], view_ids: Sequence[int], role: str, slot_of: dict[int, int]):
    keys = list(samples[0]["views"][0].images)
    inputs, masks = {}, {}
    for key in keys:
        chosen = torch.tensor([key in s[role][slot_of[v]] for v in view_ids for s in samples])
        if not chosen.any():
            continue  # nobody selected this modality in this group: do not run its stem
        inputs[key] = torch.stack([s["views"][v].images[key] for v in view_ids for s in samples])
        data_mask = torch.stack([s["views"][v].masks[key] for v in view_ids for s in samples])
        masks[key] = data_mask & chosen[:, None, None]
    return inputs, masks


def collate(samples: list[dict]) -> dict:
    """Stack views view-major (DINO order) into student global/local and teacher groups; masks
    carry both nodata and the per-sample modality selection."""
    n_views = len(samples[0]["views"])
    student_slots = {v: v for v in range(n_views)}
    batch = {"student": [_stack_group(samples, [0, 1], "student", student_slots)],
             "teacher": [_stack_group(samples, [0, 1], "teacher", {0: 0, 1: 1})],
             "landcover": torch.tensor([s["landcover"] for s in samples])}
    if n_views > 2:
        batch["student"].append(_stack_group(samples, list(range(2, n_views)), "student", student_slots))
    return batch


def build_tiles(cfg: PretrainConfig):
    """The tile dataset named by ``cfg.data`` and the frequent land-cover classes
    (:func:`centering_classes`)."""
    d = cfg.data
    if d.root is None:
        raise ConfigError("data.root is not set; pass --set data.root=/path/to/majortom (or a folder "
                          "of <sample>/<modality>.tif with data.kind=folder)")
    stats = read_cell_stats(d.cell_stats)
    if d.kind == "majortom":
        tiles = MajorTOMCore(d.root, d.modalities, d.tile_size, cell_stats=stats, s2_offset=d.s2_offset)
    else:
        tiles = GeoTIFFFolder(d.root, d.modalities)
    return tiles, centering_classes(cfg, tiles)


def centering_classes(cfg: PretrainConfig, tiles) -> list[int]:
    """The land-cover classes whose samples feed the dual center c_h (``[]`` for DINO centering).

    The rule: ``optim.centering: dual`` needs to know which samples are of a frequent class, so
    it needs each sample's land cover (Major-TOM: the ``worldcover`` column of ``data.cell_stats``;
    a folder: the ``landcover`` column of its ``labels.csv``) and the frequent classes
    (``data.frequent_classes``, else the ``data.n_frequent`` most common ones of that land cover).
    Without them the run stops here with a :class:`ConfigError` naming the fix, instead of
    centering by ``alpha * c`` against a c_h that never learns; ``optim.centering: dino`` is plain
    DINO centering (the teacher centred by c alone). Inside the loss the same rule holds until
    the first frequent sample arrives (:class:`~pretrain.loss.DualCenteringDINOLoss`).
    """
    o, d = cfg.optim, cfg.data
    if o.centering == "dino":
        logger.info("teacher centering: dino (the teacher is centred by c alone; optim.centering=dino)")
        return []
    table = tiles.landcover_table()
    if table is None:
        if d.kind == "majortom":
            where = ("the 'worldcover' column of data.cell_stats, "
                     + ("which is not set" if d.cell_stats is None else f"which {d.cell_stats} lacks"))
            fix = "--set data.cell_stats=<CSV/parquet with grid_cell, worldcover>"
        else:
            where = f"the 'landcover' column of {d.root}/labels.csv, which is absent"
            fix = "a 'landcover' column in labels.csv"
        raise ConfigError(f"optim.centering=dual needs each sample's land cover, read from {where}; "
                          f"provide it ({fix}), or set optim.centering=dino for plain DINO centering")
    frequent = (list(d.frequent_classes) if d.frequent_classes is not None
                else frequent_classes(table, d.n_frequent))
    if not frequent:
        raise ConfigError("optim.centering=dual found no frequent land-cover class (the land-cover table is "
                          "empty); list them in data.frequent_classes or set optim.centering=dino")
    logger.info("teacher centering: dual, alpha %.3g, c_h fed by land-cover classes %s (plain DINO "
                "centering until the first such sample)", o.alpha, frequent)
    return frequent


def centering_record(loss_fn: DualCenteringDINOLoss, frequent: Sequence[int]) -> dict:
    """The run's teacher centering as saved in its checkpoints: configured and in effect.

    Examples
    --------
    >>> loss = DualCenteringDINOLoss(4, 2, np.full(2, 0.04))
    >>> centering_record(loss, [10, 30])["in_effect"]          # no frequent sample seen yet
    'dino'
    """
    return {"configured": loss_fn.centering, "in_effect": "dual" if loss_fn.dual_active else "dino",
            "alpha": loss_fn.alpha, "frequent_classes": [int(c) for c in frequent],
            "frequent_rows_seen": int(loss_fn.frequent_rows_seen)}


def _to_device(group, device):
    inputs, masks = group
    return ({k: v.to(device, non_blocking=True) for k, v in inputs.items()},
            {k: v.to(device, non_blocking=True) for k, v in masks.items()})


# ----------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: weight decay on weights, none on biases and norm parameters (DINO)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, **kwargs) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused into one kernel per step where PyTorch has one
    (CPU and CUDA; ~4x faster than the per-parameter loop on CPU for TerraFM-B).

    Examples
    --------
    >>> build_optimizer(torch.nn.Linear(4, 2), lr=1e-3).defaults["fused"]
    True
    """
    groups = param_groups(model)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def clip_gradients(model: torch.nn.Module, clip: float) -> None:
    """Clip every parameter's gradient norm to ``clip`` separately (DINO's per-parameter clip).

    The norms are one multi-tensor op and the parameters over the limit are found with a
    single host sync (not one per parameter); only those gradients are scaled.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    factors = clip / (torch.stack(torch._foreach_norm(grads, 2)).float() + 1e-6)
    over = (factors < 1).nonzero().flatten().tolist()
    if over:
        torch._foreach_mul_([grads[i] for i in over], [factors[i].to(grads[i].dtype) for i in over])


def cancel_last_layer_gradients(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


# ----------------------------------------------------------------------------- checkpoints
# Checkpoints hold only what torch.load(weights_only=True) reads (tensors, dicts, lists, tuples,
# numbers, strings, None), so no checkpoint is ever unpickled with code. Older runs wrote numpy
# scalars (the learning rate) and numpy RNG arrays; upgrade_checkpoint converts them.
RESUME_FIX = ("Resume from the checkpoint.pth that pretrain.train wrote in run.output_dir, or start afresh "
              "with resume=None (--resume none).")
RESUME_KEYS = ("student", "teacher", "optimizer", "scaler", "loss", "iteration", "fingerprint")
_PLAIN_LEAVES = (torch.Tensor, int, float, str, bool, type(None))
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_OLDER_NUMPY_GLOBALS = {  # what an older pretrain.train pickled; no code runs by constructing them
    f"numpy.{core}.multiarray.{name}": getattr(_MULTIARRAY, name)
    for core in ("_core", "core") for name in ("scalar", "_reconstruct")}
_OLDER_NUMPY_GLOBALS.update({"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray})
_NUMERIC_DTYPE_CLASSES = [type(np.dtype(code)) for code in "?bhilqBHILQefd"]  # never the object dtype


def _non_plain(value, where: str = "state") -> str | None:
    """The first place in ``value`` holding something weights_only=True would refuse, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = None if isinstance(key, (str, int)) else f"{where} key {key!r}"
            found = found or _non_plain(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((f for i, item in enumerate(value) if (f := _non_plain(item, f"{where}[{i}]"))), None)
    if type(value) in _PLAIN_LEAVES or isinstance(value, torch.Tensor):
        return None
    return f"{where} ({type(value).__module__}.{type(value).__qualname__})"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary sibling and a rename (atomic).

    ``state`` may hold only tensors, dicts, lists, tuples, numbers, strings and None, what
    :func:`read_checkpoint` (``torch.load(weights_only=True)``) reads back.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "state.pth"
    >>> save_checkpoint(path, {"iteration": 3, "w": torch.zeros(2)})
    >>> save_checkpoint(path, {"lr": np.float64(0.1)})
    Traceback (most recent call last):
    ...
    TypeError: a checkpoint holds only tensors, dicts, lists, numbers and strings (torch.load(weights_only=True) reads nothing else); state['lr'] (numpy.float64) is not one: convert it (float(), int(), torch.as_tensor())
    """
    found = _non_plain(state)
    if found:
        raise TypeError("a checkpoint holds only tensors, dicts, lists, numbers and strings (torch.load("
                        f"weights_only=True) reads nothing else); {found} is not one: convert it (float(), "
                        "int(), torch.as_tensor())")
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _pickled_globals(path: Path) -> list[str] | None:
    """Classes and functions a checkpoint's pickle names, read without unpickling: torch's scan
    of a zip checkpoint, else the opcodes of a raw pickle. None when it is neither."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: a raw pickle, or not a pickle at all
        pass
    names, strings, memo = [], [], {}
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                    strings.append(memo[arg])
                elif op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "a class or function")
                elif op.name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE") and not names:
                    names.append("an object")
    except Exception:  # not a pickle
        return None
    return sorted(set(names))


def read_checkpoint(path: str | Path, required: Sequence[str] = RESUME_KEYS, fix: str = "") -> dict:
    """Read a file written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Never unpickles code: a file whose pickle names Python classes or functions is refused
    (:class:`terrafm.model.CheckpointError`), as are empty, truncated and foreign files and dicts
    lacking any key of ``required``; each error says what to do (``fix`` is appended). A file
    written by an older pretrain.train (numpy values) is refused with the command converting it,
    :func:`upgrade_checkpoint`.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "checkpoint.pth"
    >>> save_checkpoint(path, {"teacher": {"w": torch.ones(1)}, "iteration": 2})
    >>> read_checkpoint(path, required=("teacher",))["iteration"]
    2
    >>> read_checkpoint(path, required=("teacher", "optimizer"), fix="Resume from another run.")
    Traceback (most recent call last):
    ...
    terrafm.model.weights.CheckpointError: .../checkpoint.pth is not a pretrain.train checkpoint (no 'optimizer'). Resume from another run.
    """
    from terrafm.model import CheckpointError

    path = Path(path)
    fix = f" {fix}" if fix else ""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the checkpoint file in it, e.g. {path / CHECKPOINT_NAME}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.{fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint written completely by pretrain.train.{fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _pickled_globals(path)
        if not found:
            raise CheckpointError(f"{path} is corrupt or truncated (not a torch checkpoint: "
                                  f"{str(exc).splitlines()[-1]}): not a checkpoint written completely by "
                                  f"pretrain.train.{fix}") from exc
        if set(found) <= set(_OLDER_NUMPY_GLOBALS):
            run = path.parent
            raise CheckpointError(
                f"{path} was written by an older pretrain.train (numpy values in its pickle, which torch.load("
                f"weights_only=True) refuses). Convert the run once with `python -m pretrain.train "
                f"--upgrade-checkpoint {run}` (it reads only numpy arrays and scalars, runs no code and keeps the "
                "old files as *.old-format), then run again") from exc
        raise CheckpointError(
            f"{path} is not a checkpoint pretrain.train wrote: its pickle holds Python objects ({', '.join(found)}) that "
            "torch.load(weights_only=True) refuses, and pretrain never unpickles code. Use the checkpoint.pth "
            f"written by pretrain.train in run.output_dir; delete a file from a source you do not trust.{fix}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
            f"not a checkpoint written completely by pretrain.train.{fix}") from exc
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pretrain.train checkpoint (no {', '.join(map(repr, sorted(missing)))})."
                              f"{fix}")
    return state


def _plain_rng(state: dict) -> dict:
    """RNG states as tensors, lists and numbers (numpy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    plain = {"torch": state["torch"],
             "numpy": {"bit_generator": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "internal": [int(v) for v in internal],
                        "gauss_next": None if gauss_next is None else float(gauss_next)}}
    if "cuda" in state:
        plain["cuda"] = list(state["cuda"])
    return plain


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _plain_rng(state)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain_values(value):
    """numpy scalars -> Python numbers, numpy arrays -> tensors, containers rebuilt."""
    if isinstance(value, dict):
        return type(value)((k, _plain_values(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_values(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def upgrade_checkpoint(run_dir: str | Path) -> list[Path]:
    """Convert a run written by an older pretrain.train to the plain checkpoint format.

    Older versions pickled numpy scalars (the learning rate in the optimizer state) and numpy
    RNG arrays, which ``torch.load(weights_only=True)`` refuses. This reads them allowing only
    numpy's array, dtype and scalar constructors (no code runs), writes each converted file
    through a temporary sibling and keeps the original as ``<name>.old-format``. Files already
    in the plain format are left alone; anything else is refused. Returns the converted files.

    Examples
    --------
    >>> upgrade_checkpoint("runs/tiny")              # doctest: +SKIP
    [PosixPath('runs/tiny/checkpoint.pth'), PosixPath('runs/tiny/rng_rank0.pth')]
    """
    from terrafm.model import CheckpointError

    run_dir = Path(run_dir)
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    files = [f for f in [run_dir / CHECKPOINT_NAME, *sorted(run_dir.glob("rng_rank*.pth"))] if f.is_file()]
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no {CHECKPOINT_NAME} or rng_rank*.pth to upgrade; pass the "
                                "run.output_dir of the run")
    converted = []
    for path in files:
        try:
            read_checkpoint(path, required=())
            continue
        except CheckpointError as exc:
            if "older pretrain.train" not in str(exc):
                raise
        allowed = [(obj, name) for name, obj in _OLDER_NUMPY_GLOBALS.items()] + _NUMERIC_DTYPE_CLASSES
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = _plain_rng(state) if path.name.startswith("rng_rank") else _plain_values(state)
        backup = path.with_name(path.name + ".old-format")
        if backup.exists():
            raise FileExistsError(f"{backup} exists: an earlier upgrade kept it; move it away to upgrade {path} again")
        shutil.copy2(path, backup)
        save_checkpoint(path, state)
        converted.append(path)
        logger.info("upgraded %s (the original is kept as %s)", path, backup)
    return converted


# ----------------------------------------------------------------------------- kNN monitor
@torch.no_grad()
def knn_monitor(backbone: torch.nn.Module, dataset, size: int, device: torch.device,
                k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out weighted kNN top-1 (DINO's voting) on CLS features of a labelled set."""
    import torch.nn.functional as F

    backbone.eval()
    features, labels = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        inputs = {key: F.interpolate(x[None], size=(size, size), mode="bilinear",
                                     align_corners=False, antialias=True).to(device)
                  for key, x in sample["images"].items()}
        features.append(F.normalize(backbone(inputs).cls.float(), dim=-1).cpu())
        labels.append(sample["label"])
    features, labels = torch.cat(features), torch.tensor(labels)
    if (labels < 0).any():
        raise ValueError("kNN monitor set has unlabelled samples; add them to labels.csv")
    similarity = features @ features.T
    similarity.fill_diagonal_(-float("inf"))
    k = min(k, len(labels) - 1)
    top, idx = similarity.topk(k, dim=1)
    votes = torch.zeros(len(labels), int(labels.max()) + 1)
    votes.scatter_add_(1, labels[idx], (top / temperature).exp())
    return float((votes.argmax(1) == labels).float().mean())


class MetricsWriter:
    """Appends metrics to ``metrics.csv`` (always) and TensorBoard (when enabled and installed)."""

    def __init__(self, output_dir: Path, tensorboard: bool) -> None:
        self.path = output_dir / "metrics.csv"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; writing metrics.csv only")

    def write(self, iteration: int, metrics: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["iteration", "name", "value"])
            for name, value in metrics.items():
                writer.writerow([iteration, name, value])
        if self.tb is not None:
            for name, value in metrics.items():
                self.tb.add_scalar(name, value, iteration)
            self.tb.flush()


# ----------------------------------------------------------------------------- training
def train(cfg: PretrainConfig, resume: str | None = "auto", stop_after: int | None = None,
          device: str = "auto") -> list[float]:
    """Run (or continue) pretraining; returns the per-iteration losses computed in this call.

    ``resume``: ``"auto"`` continues from ``output_dir/checkpoint.pth`` when present, a path
    continues from that file, None starts fresh. ``stop_after`` ends the call after that global
    iteration (checkpointing first), e.g. to split a run across jobs. ``device``: ``"auto"`` (or
    ``"cuda"``) gives each torchrun process its own GPU, ``cuda:LOCAL_RANK`` (see :func:`setup_device`).
    """
    device, rank, world = setup_device(device)
    cfg.validate(world)
    output_dir = Path(cfg.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    o, a, m = cfg.optim, cfg.augment, cfg.model

    # the files to resume from are read first: a bad one fails before any data or model work
    path = output_dir / CHECKPOINT_NAME if resume == "auto" else (Path(resume) if resume else None)
    state, saved_rng = None, None
    if path is not None and (path.exists() or resume != "auto"):
        state = read_checkpoint(path, fix=RESUME_FIX)
        if state["fingerprint"] != cfg.fingerprint():
            raise ConfigError(f"{path} was written by a run with another config (fingerprint "
                              f"{state['fingerprint']}, this config {cfg.fingerprint()}); use a new "
                              "run.output_dir or the original config to continue that run")
        rng_file = output_dir / f"rng_rank{rank}.pth"
        if state["iteration"] and rng_file.exists():
            saved_rng = read_checkpoint(rng_file, required=("torch", "numpy", "python"), fix=RESUME_FIX)

    # data
    tiles, frequent = build_tiles(cfg)
    augmentation = MultiCropAugmentation(a.global_size, a.local_size, a.n_local,
                                         tuple(a.global_scale), tuple(a.local_scale))
    dataset = AugmentedTiles(tiles, augmentation, a.modality_threshold, cfg.run.seed)
    frequent_set = torch.tensor(sorted(frequent) or [-1])

    # student and teacher
    torch.manual_seed(cfg.run.seed)
    head_kwargs = dict(out_dim=m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim,
                       n_layers=m.head_layers, norm_last_layer=m.norm_last_layer)
    student, teacher = build_student_teacher(m.name, head_kwargs, m.drop_path_rate)
    student, teacher = student.to(device), teacher.to(device)
    teacher.eval()
    student_ddp = student
    if world > 1:
        student_ddp = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None,
            output_device=device.index if device.type == "cuda" else None,
            find_unused_parameters=True)

    # loss, optimizer, schedules
    schedules = build_schedules(o, o.epochs, cfg.iters_per_epoch, o.batch_size)
    loss_fn = DualCenteringDINOLoss(m.out_dim, 2 + a.n_local, schedules["teacher_temp"],
                                    o.student_temp, o.center_momentum, o.alpha,
                                    centering=o.centering).to(device)
    optimizer = build_optimizer(student)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[cfg.run.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    # resume: apply what was read before the data and models were built
    start_iter = 0
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["loss"])
        start_iter = state["iteration"]
        logger.info("resumed %s at iteration %d", path, start_iter)

    sampler = GlobalBatchSampler(tiles.tile_weights(cfg.data.ocean_keep), o.batch_size,
                                 cfg.iters_per_epoch, cfg.total_iters, cfg.run.seed, rank, world,
                                 start_iter)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.data.num_workers > 0)
    writer = MetricsWriter(output_dir, cfg.run.tensorboard) if rank == 0 else None
    knn_set = GeoTIFFFolder(cfg.data.knn_root, cfg.data.modalities) if cfg.data.knn_root else None

    fallback_logged: list[int] = []

    def checkpoint(next_iter: int) -> None:
        save_checkpoint(output_dir / f"rng_rank{rank}.pth", rng_state())
        centering = centering_record(loss_fn, frequent)
        if centering["configured"] != centering["in_effect"] and not fallback_logged:
            fallback_logged.append(next_iter)  # logged once per call
            logger.warning("no sample of the frequent classes %s in %d iterations: the teacher has been "
                           "centred by c alone (plain DINO centering) so far", frequent, next_iter)
        if rank == 0:
            save_checkpoint(output_dir / CHECKPOINT_NAME, {
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "loss": loss_fn.state_dict(), "iteration": next_iter, "config": cfg.to_dict(),
                "centering": centering,
                "fingerprint": cfg.fingerprint(), "model_name": m.name, "world_size": world})
        if dist.is_initialized():
            dist.barrier()

    from tqdm.auto import tqdm

    losses: list[float] = []
    end = cfg.total_iters if stop_after is None else min(cfg.total_iters, stop_after)
    progress = tqdm(total=end - start_iter, disable=rank != 0, desc="pretrain")
    it = start_iter
    batches = iter(loader)  # creating the iterator draws from the torch RNG: do it before seeding
    if saved_rng is not None:
        set_rng_state(saved_rng)
    else:
        torch.manual_seed(cfg.run.seed + 1000 * rank)  # drop path differs per rank, like DINO
    started = time.perf_counter()
    for batch in batches:
        if it >= end:
            break
        epoch = it // cfg.iters_per_epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(schedules["lr"][it])  # Python floats: the checkpoint stays plain
            if i == 0:
                group["weight_decay"] = float(schedules["wd"][it])
        teacher_groups = [_to_device(g, device) for g in batch["teacher"]]
        student_groups = [_to_device(g, device) for g in batch["student"]]
        frequent_mask = torch.isin(batch["landcover"], frequent_set).to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad():   # the teacher learns by EMA only
                teacher_out = teacher(teacher_groups)
            student_out = student_ddp(student_groups)
        loss = loss_fn(student_out.float(), teacher_out.float(), it, frequent_mask)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}; lower optim.base_lr "
                                     "or use run.amp=bf16 instead of fp16")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_gradients(student, o.clip_grad)
        if epoch < o.freeze_last_layer_epochs:
            cancel_last_layer_gradients(student)
        scaler.step(optimizer)
        scaler.update()
        ema_update(teacher, student, float(schedules["momentum"][it]))

        mean_loss = float(_all_mean(loss.detach()))
        losses.append(mean_loss)
        it += 1
        progress.update(1)
        metrics = {"loss": mean_loss, "lr": float(schedules["lr"][it - 1]),
                   "wd": float(schedules["wd"][it - 1]), "momentum": float(schedules["momentum"][it - 1]),
                   "teacher_temp": float(schedules["teacher_temp"][it - 1]),
                   "teacher_entropy": loss_fn.last_teacher_entropy}
        if knn_set is not None and cfg.run.knn_every and (it % cfg.run.knn_every == 0 or it == end):
            if rank == 0:
                metrics["knn_top1"] = knn_monitor(teacher.backbone, knn_set, a.global_size, device,
                                                  cfg.run.knn_k)
            if dist.is_initialized():
                dist.barrier()
        if writer is not None and (it % cfg.run.log_every == 0 or it == end or "knn_top1" in metrics):
            writer.write(it, metrics)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
        if it % cfg.run.checkpoint_every == 0 or it == end:
            checkpoint(it)
        if it >= end:
            break
    progress.close()
    logger.info("%d iterations in %.1f s", it - start_iter, time.perf_counter() - started)
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file or a name in pretrain/configs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/data/majortom")
    parser.add_argument("--resume", default="auto", help="'auto', 'none' or a checkpoint path")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this iteration")
    parser.add_argument("--device", default="auto",
                        help="auto (each torchrun process takes cuda:LOCAL_RANK, else MPS or CPU), cpu, cuda or cuda:N")
    parser.add_argument("--losses-out", default=None, help="write this call's losses (one per line)")
    parser.add_argument("--upgrade-checkpoint", metavar="RUN_DIR", default=None,
                        help="convert the checkpoints of a run written by an older pretrain.train, then exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (ValueError, RuntimeError, OSError) as exc:   # ours name the fix; --debug for where it came from
        if args.debug:
            raise
        parser.exit(2, f"pretrain.train: error: {' '.join(str(exc).split())}\n")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.upgrade_checkpoint:
        upgrade_checkpoint(args.upgrade_checkpoint)   # CheckpointError is a RuntimeError: one line in main
        return 0
    if not args.config:
        parser.error("--config is required (a YAML file or a name in pretrain/configs)")
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "2"))))
    cfg = load_config(args.config, args.set)
    losses = train(cfg, None if args.resume == "none" else args.resume, args.stop_after, args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.losses_out and rank == 0:
        Path(args.losses_out).write_text("".join(f"{v!r}\n" for v in losses))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
