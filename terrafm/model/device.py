"""Device and precision choices for inference and training."""

from __future__ import annotations

import contextlib
import logging

import torch

__all__ = ["resolve_device", "autocast", "autocast_dtype"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Pick a torch device: ``"auto"`` tries CUDA, then Apple MPS, then CPU.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return resolved


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Reduced-precision dtype for ``precision`` on ``device`` (None means full fp32).

    ``"auto"`` is bf16 on CUDA GPUs that support it, else fp16 on CUDA and MPS, and fp32 on
    CPU (CPU autocast is slower than fp32 on most machines).

    Examples
    --------
    >>> autocast_dtype(torch.device("cpu")) is None, autocast_dtype(torch.device("cpu"), "bf16")
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
    return None


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
