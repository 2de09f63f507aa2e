"""Per-iteration schedules as numpy arrays (DINO style): index with the global iteration."""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule", "linear_warmup_then_constant", "build_schedules"]


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then a half cosine from ``base`` to ``final``.

    Returns an array of ``epochs * iters_per_epoch`` values, one per iteration.

    Examples
    --------
    >>> s = cosine_schedule(1.0, 0.0, epochs=10, iters_per_epoch=2, warmup_epochs=2)
    >>> len(s), float(s[0]), float(s[4])
    (20, 0.0, 1.0)
    """
    if epochs <= 0 or iters_per_epoch <= 0:
        raise ValueError(f"epochs ({epochs}) and iters_per_epoch ({iters_per_epoch}) must be positive")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs {warmup_epochs} must lie in [0, epochs={epochs}]")
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False) if warmup_iters else np.array([])
    steps = np.arange(epochs * iters_per_epoch - warmup_iters)
    span = max(len(steps), 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / span))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, warmup_epochs: int, epochs: int,
                                iters_per_epoch: int) -> np.ndarray:
    """Linear from ``start`` to ``end`` over ``warmup_epochs``, then ``end`` (teacher temperature).

    Examples
    --------
    >>> s = linear_warmup_then_constant(0.04, 0.06, 50, 100, 1)
    >>> round(float(s[25]), 4), float(s[60])
    (0.05, 0.06)
    """
    warmup_iters = min(warmup_epochs, epochs) * iters_per_epoch
    total = epochs * iters_per_epoch
    ramp = np.linspace(start, end, warmup_epochs * iters_per_epoch, endpoint=False)[:warmup_iters]
    return np.concatenate([ramp, np.full(total - warmup_iters, end)]).astype(np.float64)


def build_schedules(optim, epochs: int, iters_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """All training schedules from an :class:`pretrain.config.OptimConfig`.

    lr peaks at ``base_lr * global_batch / 256`` after ``warmup_epochs``; weight decay and
    teacher momentum follow cosines without warm-up; teacher temperature ramps linearly.

    Examples
    --------
    >>> from pretrain.config import OptimSection
    >>> s = build_schedules(OptimSection(), epochs=150, iters_per_epoch=10, global_batch=1024)
    >>> s["lr"].shape, round(float(s["lr"].max()), 6)           # 1e-4 * 1024 / 256
    ((1500,), 0.0004)
    >>> round(float(s["wd"][0]), 3), round(float(s["wd"][-1]), 3), float(s["teacher_temp"][50 * 10])
    (0.04, 0.4, 0.06)
    """
    peak = optim.base_lr * global_batch / 256.0
    return {
        "lr": cosine_schedule(peak, optim.min_lr, epochs, iters_per_epoch, optim.warmup_epochs),
        "wd": cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, iters_per_epoch),
        "momentum": cosine_schedule(optim.momentum_teacher, 1.0, epochs, iters_per_epoch),
        "teacher_temp": linear_warmup_then_constant(optim.warmup_teacher_temp, optim.teacher_temp,
                                                    optim.warmup_teacher_temp_epochs, epochs,
                                                    iters_per_epoch),
    }
