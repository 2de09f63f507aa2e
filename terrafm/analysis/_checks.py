"""Argument checks shared by the analysis functions: the problem and the fix, before any work."""

from __future__ import annotations

import numbers

import numpy as np


def require_int(name: str, value, minimum: int = 1, fix: str = "") -> int:
    """``value`` as an int, or a ValueError naming ``name``, the rule and ``fix``.

    Bools and non-integral numbers are refused (``k=2.5`` is a typo, not a request for 2).

    Examples
    --------
    >>> require_int("k", 3)
    3
    >>> require_int("k", 0, fix="e.g. k=10")
    Traceback (most recent call last):
    ...
    ValueError: k=0: k must be a positive integer; e.g. k=10
    """
    integral = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not integral or value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r}: {name} must be {rule}" + (f"; {fix}" if fix else ""))
    return int(value)


def require_positive(name: str, value, fix: str = "") -> float:
    """``value`` as a finite float > 0, or a ValueError naming ``name`` and ``fix``.

    Examples
    --------
    >>> require_positive("temperature", 0.07)
    0.07
    """
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not number or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: {name} must be a finite number > 0" + (f"; {fix}" if fix else ""))
    return float(value)
