"""Device and precision choices for inference and training."""

from __future__ import annotations

import contextlib
import logging
import operator
import os

import torch

__all__ = ["resolve_device", "parse_device", "device_for_rank", "process_group_backend", "autocast", "autocast_dtype"]

logger = logging.getLogger(__name__)


def _cuda_count(cuda_count: int | None) -> int:
    if cuda_count is not None:
        return int(cuda_count)
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_device(device: str | int | torch.device) -> torch.device:
    """``device`` as a torch device, without asking whether this process has it (a dask client
    plans devices for workers that may have GPUs it has not): a CUDA index ``1`` or ``"1"`` is
    ``cuda:1``; ``"auto"`` is not a device (see :func:`resolve_device`).

    Examples
    --------
    >>> parse_device(1), parse_device("cuda:0"), parse_device("cpu")
    (device(type='cuda', index=1), device(type='cuda', index=0), device(type='cpu'))
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        raise ValueError(f"device={device!r} is a choice, not a device: name one ('cpu', 'cuda:0', 0, 'mps')")
    if isinstance(device, bool):
        raise TypeError(f"device={device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N', a CUDA index N or 'mps'")
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    try:
        index = operator.index(device)
    except TypeError:
        raise TypeError(f"device={device!r} ({type(device).__name__}): use 'auto', 'cpu', 'cuda', 'cuda:N', "
                        "a CUDA index N or 'mps'") from None
    if index < 0:
        raise ValueError(f"device index {index} is negative; CUDA devices are numbered from 0")
    return torch.device("cuda", index)


def resolve_device(device: str | int | torch.device | None = "auto", *, cuda_count: int | None = None) -> torch.device:
    """Pick a torch device: ``"auto"`` tries CUDA, then Apple MPS, then CPU.

    ``device`` is ``"auto"``, a torch device or its name (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"``) or a CUDA index (``1`` or ``"1"`` means ``cuda:1``). A CUDA device that this
    process cannot see is refused: indices count the GPUs in ``CUDA_VISIBLE_DEVICES`` from 0.
    ``cuda_count`` is the number of CUDA devices to assume (default: ask torch); planners and
    tests pass it.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device(1, cuda_count=2)
    device(type='cuda', index=1)
    >>> resolve_device("cuda:2", cuda_count=2)
    Traceback (most recent call last):
    RuntimeError: device 'cuda:2' is CUDA device 2 but this process sees 2 (cuda:0 to cuda:1); use an index below 2 (CUDA_VISIBLE_DEVICES numbers the visible GPUs from 0)
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if _cuda_count(cuda_count) > 0:
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = parse_device(device)
    if resolved.type == "cuda":
        count = _cuda_count(cuda_count)
        if count == 0:
            raise RuntimeError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= count:
            raise RuntimeError(f"device {device!r} is CUDA device {resolved.index} but this process sees {count} "
                               f"(cuda:0 to cuda:{count - 1}); use an index below {count} "
                               "(CUDA_VISIBLE_DEVICES numbers the visible GPUs from 0)")
    return resolved


def device_for_rank(device: str | int | torch.device | None = "auto", local_rank: int | None = None,
                    local_world_size: int | None = None, *, cuda_count: int | None = None) -> torch.device:
    """The device of one process of a multi-process job: ``cuda:LOCAL_RANK`` on a GPU node.

    ``local_rank`` / ``local_world_size`` default to the ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``
    that ``torchrun`` sets (0 and 1 alone). With ``"auto"`` or ``"cuda"`` each process on a node
    takes its own GPU, ``cuda:<local_rank>``; a process that sees one GPU (one
    ``CUDA_VISIBLE_DEVICES`` entry per process) takes ``cuda:0``. More processes than GPUs are
    refused, and so is one explicit CUDA device for several processes of a node (they would all
    share it). Without CUDA, ``"auto"`` is MPS or CPU and ``"cpu"`` is CPU on every rank.

    Examples
    --------
    >>> [str(device_for_rank("auto", rank, 4, cuda_count=4)) for rank in range(4)]
    ['cuda:0', 'cuda:1', 'cuda:2', 'cuda:3']
    >>> device_for_rank("auto", 1, 2, cuda_count=0)
    device(type='cpu')
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_world_size is None:   # launchers other than torchrun may set LOCAL_RANK only
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local rank {local_rank} is outside 0..{local_world_size - 1} (LOCAL_WORLD_SIZE="
                         f"{local_world_size}); start the processes with torchrun, which sets both")
    count = _cuda_count(cuda_count)
    wants_any_gpu = device is None or device in ("auto", "cuda") or (
        isinstance(device, torch.device) and device.type == "cuda" and device.index is None)
    if not wants_any_gpu:
        resolved = resolve_device(device, cuda_count=count)
        if resolved.type == "cuda" and local_world_size > 1:
            raise ValueError(f"device {device!r} would put all {local_world_size} processes of this node on "
                             f"{resolved}; pass device='auto' or 'cuda' so each takes cuda:LOCAL_RANK")
        return resolved
    if count == 0:
        return resolve_device("auto" if device in (None, "auto") else device, cuda_count=0)
    if count == 1:
        return torch.device("cuda", 0)
    if local_world_size > count:
        raise ValueError(f"{local_world_size} processes on this node but it has {count} CUDA devices; start at "
                         f"most {count} (torchrun --nproc_per_node={count}) or give each process its own GPU "
                         "with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank)


def process_group_backend(device: torch.device) -> str:
    """torch.distributed backend for ``device``: NCCL on CUDA, Gloo otherwise.

    Examples
    --------
    >>> process_group_backend(torch.device("cpu")), process_group_backend(torch.device("cuda", 1))
    ('gloo', 'nccl')
    """
    return "nccl" if device.type == "cuda" else "gloo"


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Reduced-precision dtype for ``precision`` on ``device`` (None means full fp32).

    ``"auto"`` is bf16 on CUDA GPUs that support it, else fp16 on CUDA and MPS; on a CPU it is
    bf16 where the CPU runs bf16 natively (AVX512-BF16/AMX, Arm BF16:
    :func:`terrafm.model.cpu_features.native_bf16`, overridable with ``TERRAFM_CPU_BF16=0/1``) and
    fp32 elsewhere, where bf16 would be emulated and slower. ``"fp32"`` is bit-exact and
    deterministic on every device.

    Examples
    --------
    >>> autocast_dtype(torch.device("cpu"), "fp32") is None, autocast_dtype(torch.device("cpu"), "bf16")
    (True, torch.bfloat16)
    """
    if precision in ("fp32", "float32", None):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16"):
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    from .cpu_features import native_bf16

    answer = native_bf16()
    logger.debug("precision='auto' on %s: %s (%s)", device, "bf16" if answer.native else "fp32", answer.source)
    return torch.bfloat16 if answer.native else None


def autocast(device: torch.device, precision: str = "auto"):
    """Context manager running the model in reduced precision where that is a win.

    Examples
    --------
    >>> with autocast(torch.device("cpu")):
    ...     pass
    """
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
