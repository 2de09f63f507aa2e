"""Does this CPU run bfloat16 natively? The one place that decides (``precision="auto"`` asks it).

bf16 is *native* when the CPU has bf16 dot-product instructions and PyTorch has its oneDNN
kernels to use them: AVX512-BF16 or AMX-BF16 on x86 (Intel Cooper Lake / Sapphire Rapids and
later, AMD Zen 4 and later), the BF16 extension on Arm (Graviton 3, Neoverse V1/N2, Apple M2 and
later). Elsewhere PyTorch emulates bf16 by converting to fp32 around every op, which is slower than
fp32 — so ``"auto"`` must not pick it there.

Where the answer comes from, first that knows:

1. ``TERRAFM_CPU_BF16=1`` or ``=0`` in the environment (an override, e.g. for a CPU the probes
   below misread, or to keep fp32 everywhere);
2. the operating system: the ``flags`` (x86) or ``Features`` (aarch64) line of ``/proc/cpuinfo``
   on Linux, ``sysctl hw.optional.arm.FEAT_BF16`` on macOS;
3. PyTorch's own runtime query ``torch.cpu.get_capabilities()`` (public since torch 2.9; other
   systems such as Windows).

The hardware probe runs once per process (cached); the override is read on every call.

Examples
--------
>>> bf16_in_cpuinfo("flags\\t\\t: fpu sse2 avx2 avx512f avx512_bf16\\n")
True
>>> bf16_in_cpuinfo("flags\\t\\t: fpu sse2 avx2 fma\\n"), bf16_in_cpuinfo("model name : foo\\n")
(False, None)
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["ENV_VAR", "NativeBF16", "bf16_in_capabilities", "bf16_in_cpuinfo", "native_bf16"]

logger = logging.getLogger(__name__)

ENV_VAR = "TERRAFM_CPU_BF16"
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")    # /proc/cpuinfo and torch.cpu.get_capabilities() names
ARM_BF16_FLAGS = ("bf16",)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class NativeBF16(NamedTuple):
    """The answer and where it came from (``source`` is logged and shown in benchmarks)."""

    native: bool
    source: str


def bf16_in_cpuinfo(text: str) -> bool | None:
    """Whether a ``/proc/cpuinfo`` text lists a native bf16 feature (None: no feature line in it).

    x86 kernels list CPU features on ``flags`` lines, aarch64 kernels on ``Features`` lines.

    Examples
    --------
    >>> bf16_in_cpuinfo("Features\\t: fp asimd sve bf16 i8mm\\n")
    True
    """
    seen = False
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or name not in ("flags", "features"):
            continue
        seen = True
        features = set(value.split())
        if features & set(X86_BF16_FLAGS + ARM_BF16_FLAGS):
            return True
    return False if seen else None


def bf16_in_capabilities(capabilities: Mapping) -> bool | None:
    """Whether a ``torch.cpu.get_capabilities()`` mapping reports native bf16 (None: it doesn't say).

    Examples
    --------
    >>> bf16_in_capabilities({"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": True})
    True
    >>> bf16_in_capabilities({"architecture": "arm64", "neon": True})
    """
    known = [name for name in X86_BF16_FLAGS + ARM_BF16_FLAGS if name in capabilities]
    if not known:
        return None
    return any(bool(capabilities[name]) for name in known)


def _read_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _macos_feat_bf16() -> bool | None:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value == "1" if out.returncode == 0 and value in ("0", "1") else None


def _torch_capabilities() -> Mapping | None:
    import torch

    query = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if query is None:
        return None
    try:
        return query()
    except RuntimeError as err:   # a probe that fails is a probe that doesn't know
        logger.debug("torch.cpu.get_capabilities() failed: %s", err)
        return None


def _onednn_available() -> bool:
    import torch

    return bool(torch.backends.mkldnn.is_available())


@functools.lru_cache(maxsize=1)
def _hardware_bf16() -> NativeBF16:
    """The probes of the module docstring, in order, without the override (cached)."""
    hardware = None
    system = platform.system()
    if system == "Linux":
        text = _read_cpuinfo()
        if text is not None and (found := bf16_in_cpuinfo(text)) is not None:
            hardware = NativeBF16(found, "/proc/cpuinfo " + ("lists " if found else "has no ")
                                  + "/".join(X86_BF16_FLAGS + ARM_BF16_FLAGS))
    elif system == "Darwin" and platform.machine() == "arm64":
        found = _macos_feat_bf16()
        if found is not None:
            hardware = NativeBF16(found, f"sysctl hw.optional.arm.FEAT_BF16={int(found)}")
    if hardware is None:
        capabilities = _torch_capabilities()
        found = None if capabilities is None else bf16_in_capabilities(capabilities)
        hardware = (NativeBF16(False, "no probe reports the CPU's bf16 support") if found is None
                    else NativeBF16(found, f"torch.cpu.get_capabilities() bf16={found}"))
    if hardware.native and not _onednn_available():
        return NativeBF16(False, hardware.source + ", but this PyTorch build has no oneDNN (mkldnn) kernels")
    return hardware


def native_bf16() -> NativeBF16:
    """Whether this CPU runs bf16 natively (``.native``) and how that was decided (``.source``).

    ``TERRAFM_CPU_BF16=1``/``0`` overrides the hardware probe; any other value is an error.

    Examples
    --------
    >>> answer = native_bf16()
    >>> isinstance(answer.native, bool), bool(answer.source)
    (True, True)
    """
    override = os.environ.get(ENV_VAR)
    if override is not None and override.strip() != "":
        value = override.strip().lower()
        if value not in _TRUE + _FALSE:
            raise ValueError(f"{ENV_VAR}={override!r} is not understood; set it to 1 (this CPU runs bf16 natively) "
                             f"or 0 (it does not), or unset it to detect the CPU")
        return NativeBF16(value in _TRUE, f"{ENV_VAR}={override}")
    return _hardware_bf16()
