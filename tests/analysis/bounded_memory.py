"""Run a Python snippet in a subprocess whose memory is capped, to prove that work streams.

The child imports the analysis stack, starts dask's thread pool and BLAS (whose first call maps a
32 MB buffer per library that RLIMIT_DATA counts; pyarrow, used by pandas' string dtype, is set
to the system allocator instead of reserving 1 GB; glibc serves blocks of 64 kB and more with mmap
so freed arrays leave the data segment), measures its own data segment
(``VmData``: heap + private writable mappings) and only then sets ``RLIMIT_DATA`` to that baseline
plus ``budget_mb``. So the cap is "``budget_mb`` MB more than an idle analyst session", independent
of how heavy the imports are; an allocation past it raises ``MemoryError``.

Use it with the ``large_store`` fixture (tests/analysis/conftest.py), a store several times larger
than :data:`BUDGET_MB`::

    run = run_bounded(f"emb = terrafm.open_embedding({str(path)!r}); result = float(emb.mean())")
    # several steps in one child (imports cost ~5-15 s per child on a busy machine):
    runs = run_bounded_steps({"mean": "...", "control": "..."})
    assert run.ok, run.error                       # streamed within the cap
    control = run_bounded(f"emb = terrafm.open_embedding({str(path)!r}); result = emb.values.sum()")
    assert control.memory_error                     # loading it whole does not fit: the cap is real

The snippet runs with ``numpy as np``, ``xarray as xr``, ``dask``, ``terrafm`` and
``terrafm.analysis`` imported; it sets ``result`` to something JSON-serialisable (numbers, lists,
dicts, strings) that comes back as :attr:`BoundedRun.result`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

BUDGET_MB = 160
"""Default memory above the idle baseline. On 2 MiB chunks with 2 dask threads, change, similarity +
top_k and to_rgb peak at 50-75 MB of RSS above the baseline, but the data segment the cap counts
(freed-but-kept heap, thread stacks) reaches 70-110 MB after a few steps: 160 leaves a margin. The
``large_store`` (403 MB, 2.5x this) does not fit."""

CHUNK_SIZE = "2MiB"
"""dask's ``array.chunk-size`` in the child, so ``open_embedding(chunks="auto")`` picks chunks that fit."""

_MARKER = "@@bounded-run@@"

_PRELUDE = """
import json, os, resource, sys, threading, time, traceback
threading.stack_size(2 * 2**20)  # RLIMIT_DATA counts thread stacks: 2 MB, not 8 MB, per thread started later
import numpy as np
import xarray as xr
import dask
import dask.array
import terrafm
import terrafm.analysis
import sklearn.decomposition, geopandas, pyproj, rasterio.features  # noqa: F401  (imported by the analysis)
dask.config.set({{"scheduler": "threads", "num_workers": 2, "array.chunk-size": {chunk_size!r}}})
import zarr
zarr.config.set({{"threading.max_workers": 2}})  # zarr's I/O pool: a fixed 2 threads, started in the warm-up
import scipy.linalg


def _warm_up():  # BLAS maps a 32 MB buffer per library and thread on first use: count it in the baseline
    square = np.ones((64, 64))
    return float((square @ square).sum() + scipy.linalg.svd(square)[1].sum())


_warm_up()
import pandas
pandas.Index(["r", "g", "b"])  # pandas' string dtype starts pyarrow (its allocator is set to malloc below)
dask.compute(*[dask.delayed(_warm_up)() for _ in range(16)])  # also starts dask's thread pool
import tempfile

with tempfile.TemporaryDirectory() as _tmp:  # zarr starts its event-loop and I/O threads on first use
    xr.Dataset({{"v": ("x", np.arange(4.0))}}).chunk(2).to_zarr(_tmp + "/w.zarr", consolidated=False)
    xr.open_zarr(_tmp + "/w.zarr", consolidated=False).compute()


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])


baseline_kb = _status_kb("VmData")
resource.setrlimit(resource.RLIMIT_DATA, (baseline_kb * 1024 + {budget} * 2**20, resource.RLIM_INFINITY))
namespace = {{"np": np, "xr": xr, "dask": dask, "terrafm": terrafm, "status_kb": _status_kb, "baseline_kb": baseline_kb}}
for name, code in {steps!r}.items():
    with open("/proc/self/clear_refs", "w") as refs:  # restart the peak-RSS count for this step
        refs.write("5")
    report = {{"baseline_rss_mb": _status_kb("VmRSS") / 1024, "error": None, "memory_error": False, "result": None}}
    namespace.pop("result", None)
    started = time.perf_counter()
    try:
        exec(compile(code, "<bounded step " + name + ">", "exec"), namespace)
        report["result"] = namespace.get("result")
    except MemoryError as exc:
        report["memory_error"] = True
        report["error"] = "MemoryError: " + str(exc)
    except BaseException as exc:
        report["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        report["memory_error"] = "memory" in report["error"].lower() or "allocate" in report["error"].lower()
    report["peak_rss_mb"] = _status_kb("VmHWM") / 1024
    report["seconds"] = time.perf_counter() - started
    sys.stdout.write({marker!r} + json.dumps([name, report], default=float) + "\\n")
    sys.stdout.flush()
os._exit(0)
"""


@dataclass
class BoundedRun:
    """Outcome of :func:`run_bounded`."""

    ok: bool
    result: object
    error: str | None
    memory_error: bool
    peak_rss_mb: float
    baseline_rss_mb: float
    stderr: str
    seconds: float = float("nan")


def run_bounded(code: str, budget_mb: int = BUDGET_MB, timeout: float = 900.0,
                chunk_size: str = CHUNK_SIZE) -> BoundedRun:
    """Run ``code`` in a child limited to ``budget_mb`` MB above its idle baseline.

    Returns a :class:`BoundedRun`: ``ok`` when the snippet finished, ``memory_error`` when an
    allocation hit the cap, ``peak_rss_mb`` (whole process, baseline included), ``seconds``.
    ``timeout`` is generous: a busy shared machine runs the child 5-10x slower than an idle one.
    """
    return run_bounded_steps({"code": code}, budget_mb, timeout, chunk_size)["code"]


def run_bounded_steps(steps: dict[str, str], budget_mb: int = BUDGET_MB, timeout: float = 900.0,
                      chunk_size: str = CHUNK_SIZE) -> dict[str, BoundedRun]:
    """Run several snippets one after the other in ONE capped child (one import: ~5-15 s saved per step).

    Steps share a namespace (a later step sees an earlier one's variables); each gets its own
    :class:`BoundedRun` with the peak RSS of that step alone. A step that fails does not stop the
    next; a child killed mid-way reports the missing steps as failed.
    """
    script = _PRELUDE.format(steps={name: textwrap.dedent(code) for name, code in steps.items()},
                             budget=int(budget_mb), chunk_size=chunk_size, marker=_MARKER)
    env = dict(os.environ, MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_="65536", ARROW_DEFAULT_MEMORY_POOL="system", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    runs = {}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARKER):
            name, report = json.loads(line[len(_MARKER):])
            runs[name] = BoundedRun(report["error"] is None, report["result"], report["error"],
                                    report["memory_error"], report["peak_rss_mb"], report["baseline_rss_mb"],
                                    proc.stderr, report["seconds"])
    crashed = "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower()
    for name in steps:  # killed or crashed before reporting (e.g. abort on a failed allocation in C)
        runs.setdefault(name, BoundedRun(False, None, f"child exited with {proc.returncode}: {proc.stderr[-2000:]}",
                                         crashed, float("nan"), float("nan"), proc.stderr))
    return runs
