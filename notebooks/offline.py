"""Run the notebooks offline: local stand-ins for Planetary Computer and an untrained tiny model.

From the repository checkout (the stand-ins live in ``tests/support``; PostgreSQL + PostGIS from
``apt-get install postgresql-15-postgis-3``)::

    python notebooks/offline.py run 01_quickstart.ipynb --out executed/   # execute, save the outputs
    python notebooks/offline.py voila 04_similarity_search.ipynb          # serve one notebook as an app
    python notebooks/offline.py lab                                       # JupyterLab on every notebook

What it does:

1. starts the test suite's stand-ins: a blob server with HTTP Range reads and a SAS token endpoint
   over real Sentinel COGs (``tests/support/storage_server.py``) and a pgstac STAC API holding
   Planetary-Computer-shaped items (``tests/support/pgstac_server.py``);
2. writes copies of the notebooks whose settings cell (the first code cell, tagged ``parameters``,
   papermill style) is rewritten: ``CATALOG_URL`` = the local API, ``MODEL``/``WEIGHTS`` =
   ``terrafm_tiny``/``"random"``, ``BBOX`` and dates inside the test scene, ``TOOLBAR = False``
   (leafmap's toolbar needs ipyevents from a CDN) and, for 06, a small Major-TOM-format dataset
   built from the real BigEarthNet example patches. Every other cell is the notebook's own;
3. starts the kernel (nbclient, Voila or JupyterLab) with the environment that routes the blob
   hosts to the local server (``http_proxy``, ``no_proxy``) and points Planetary Computer signing
   at its SAS endpoint (``PC_SDK_SAS_URL``). Only that child process gets this environment;
4. stops everything it started, also when a step fails part-way or on Ctrl-C.

The same from Python (the notebook tests do this)::

    with OfflineStack() as stack:
        nb = offline_notebook(NOTEBOOKS / "01_quickstart.ipynb", stack)
        execute(nb, stack)
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import nbformat

logger = logging.getLogger("terrafm.notebooks.offline")

NOTEBOOKS = Path(__file__).resolve().parent
REPO = NOTEBOOKS.parent
TESTS = REPO / "tests"
PARAMETERS_TAG = "parameters"
SWITCH = "CATALOG_URL"  # every settings cell has it: the one visible offline switch
HEADER = ("# Offline settings written by notebooks/offline.py: a local STAC API over real test imagery and an\n"
          "# untrained model, so the pictures show the pipeline working, not TerraFM's quality.\n")
# routed to the storage server / kept direct; the kernel gets them, this process never does
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "PC_SDK_SAS_URL")


def _support():
    """``tests/support`` of this checkout, imported as the test suite does."""
    if not (TESTS / "support" / "scene.py").exists():
        raise RuntimeError(f"{TESTS / 'support'} not found: the offline stand-ins come with the terrafm repository "
                           "checkout; run this script from it (an installed wheel has no tests/)")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import support.pgstac_server
    import support.stac_items
    import support.storage_server

    return support


class OfflineStack:
    """The local stand-ins for Planetary Computer and the settings that point a notebook at them.

    Parameters
    ----------
    workdir : path, optional
        Where notebook copies, the Major-TOM set and runs go; default a temporary directory,
        removed by :meth:`stop`.

    Examples
    --------
    >>> with OfflineStack() as stack:                                  # doctest: +SKIP
    ...     stack.catalog_url, stack.environment()["PC_SDK_SAS_URL"]
    """

    def __init__(self, workdir: str | os.PathLike | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="terrafm-offline-"))
        self.scene = None
        self.storage = None   # support.storage_server.StorageServer
        self.catalog = None   # support.pgstac_server.PgstacServer
        self._majortom: Path | None = None

    def start(self) -> "OfflineStack":
        """Start the blob server, then the STAC API; on any failure stop what already runs and re-raise."""
        try:
            support = _support()
            self.scene = support.scene.get_scene()
            self.storage = support.storage_server.StorageServer(root=self.scene.root)
            self.storage.start()
            self.catalog = support.pgstac_server.PgstacServer(
                support.stac_items.collections(self.scene), support.stac_items.all_items(self.scene, self.storage.url))
            self.catalog.start()
        except BaseException:
            self.stop()
            raise
        logger.info("local STAC API %s, blob server %s, work directory %s", self.catalog_url, self.storage.url,
                    self.workdir)
        return self

    def stop(self) -> None:
        """Stop the servers that were started (each one even if another fails to stop) and remove the workdir."""
        for name in ("catalog", "storage"):
            server = getattr(self, name)
            if server is not None:
                try:
                    server.stop()
                except Exception:  # keep stopping the others
                    logger.exception("could not stop the %s server", name)
                setattr(self, name, None)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "OfflineStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def catalog_url(self) -> str:
        if self.catalog is None:
            raise RuntimeError("the offline stack is not running: call start() or use it as a context manager")
        return self.catalog.url

    def environment(self, base: dict | None = None, **extra: str) -> dict:
        """Environment for a child process (kernel, Voila, Jupyter): ``base`` (default ``os.environ``)
        with the blob hosts routed to the local server and signing pointed at its SAS endpoint."""
        if self.storage is None:
            raise RuntimeError("the offline stack is not running: call start() or use it as a context manager")
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in PROXY_VARIABLES}
        env.update(http_proxy=self.storage.url, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
                   PC_SDK_SAS_URL=self.storage.sas_url, **extra)
        return env

    def settings(self, names: Iterable[str]) -> dict[str, tuple[Any, str]]:
        """Offline value and reason for each settings name this launcher knows, among ``names``."""
        names = set(names)
        url = self.catalog_url  # raises when the stack is not running
        first, last = sorted(self.scene.s2_dates)[0], sorted(self.scene.s2_dates)[-1]

        def window(day: dt.datetime) -> str:  # +-3 days: one S2 date and the S1 pass paired with it
            return f"{(day - dt.timedelta(days=3)).date()}/{(day + dt.timedelta(days=3)).date()}"

        # a ~2.5 km square in the middle of the test scene: 16 x 16 cells of 160 m, seconds on a CPU
        west, south, east, north = self.scene.aoi_bbox
        cx, cy, hx, hy = (west + east) / 2, (south + north) / 2, (east - west) / 4, (north - south) / 4
        bbox = tuple(round(v, 5) for v in (cx - hx, cy - hy, cx + hx, cy + hy))
        values = {
            "CATALOG_URL": (url, "the local pgstac STAC API (Planetary-Computer-shaped items)"),
            "MODEL": ("terrafm_tiny", "a tiny TerraFM, fast on a CPU"),
            "WEIGHTS": ("random", "untrained: no download"),
            "BBOX": (bbox, "inside the test scene (real Sentinel-2 L1C pixels, Virginia, EPSG:32618)"),
            "DATES": (window(first), "the first test date"),
            "BEFORE": (window(first), "the first test date"),
            "AFTER": (window(last), "the last test date"),
            "SERIES": (f"{(first - dt.timedelta(days=1)).date()}/{(last + dt.timedelta(days=1)).date()}",
                       "every test date"),
            "TOOLBAR": (False, "leafmap's toolbar needs ipyevents from a CDN"),
            "MODALITIES": (["s2_l2a", "s1"], "the set below has both"),
            "EPOCHS": (5, "5 x 3 iterations, seconds"),
            "EPOCH_SAMPLES": (24, "3 batches of 8"),
        }
        if "MAJORTOM_ROOT" in names:
            values["MAJORTOM_ROOT"] = (self.majortom_root(), "Major-TOM format, built from BigEarthNet patches")
        if "RUN_DIR" in names:
            values["RUN_DIR"] = (self.workdir / "notebook06_run", "inside the launcher's work directory")
        return {k: v for k, v in values.items() if k in names}

    def majortom_root(self) -> Path:
        """A tiny Major-TOM Core dataset (S2L2A + S1RTC shards, cell_stats.csv) from the real BigEarthNet
        example patches, built once per stack by the pretraining tests' builder."""
        if self._majortom is None:
            _support()
            if str(TESTS / "pretrain") not in sys.path:
                sys.path.insert(0, str(TESTS / "pretrain"))
            from pretrain_majortom_builder import write_bigearthnet_majortom

            root = self.workdir / "majortom"
            info = write_bigearthnet_majortom(root)
            logger.info("built a Major-TOM-format dataset of %d BigEarthNet cells in %s", len(info["cells"]), root)
            self._majortom = root
        return self._majortom


def _literal(value: Any) -> str:
    if isinstance(value, Path):
        return f"Path({str(value)!r})"
    text = repr(value)
    if ast.literal_eval(text) != value:
        raise TypeError(f"{value!r} has no Python literal")
    return text


def settings_cell(notebook) -> Any:
    """The notebook's settings cell: the code cell tagged ``parameters``."""
    cells = [c for c in notebook.cells if c.cell_type == "code" and PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected one code cell tagged {PARAMETERS_TAG!r}, found {len(cells)}: regenerate the "
                         "notebooks with `python notebooks/make_notebooks.py`")
    return cells[0]


def rewrite_settings(source: str, values: dict[str, tuple[Any, str]]) -> str:
    """``source`` with each top-level ``NAME = ...`` of ``values`` replaced by the offline value.

    Examples
    --------
    >>> print(rewrite_settings('CATALOG_URL = None  # PC\\nMODEL = "b"', {"CATALOG_URL": ("http://x", "local")}))
    # Offline settings written by notebooks/offline.py: a local STAC API over real test imagery and an
    # untrained model, so the pictures show the pipeline working, not TerraFM's quality.
    CATALOG_URL = 'http://x'  # offline: local
    MODEL = "b"
    """
    lines = source.splitlines()
    replaced = set()
    for node in reversed(ast.parse(source).body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in values:
                value, why = values[name]
                lines[node.lineno - 1:node.end_lineno] = [f"{name} = {_literal(value)}  # offline: {why}"]
                replaced.add(name)
    if SWITCH not in replaced:
        raise ValueError(f"the settings cell has no `{SWITCH} = ...`: it is the notebooks' offline switch")
    return HEADER + "\n".join(lines)


def offline_notebook(path: str | os.PathLike, stack: OfflineStack):
    """The notebook at ``path`` with its settings cell rewritten for ``stack`` (the file is not changed)."""
    nb = nbformat.read(path, as_version=4)
    cell = settings_cell(nb)
    names = [n.targets[0].id for n in ast.parse(cell.source).body
             if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)]
    cell.source = rewrite_settings(cell.source, stack.settings(names))
    return nb


def write_offline_copies(stack: OfflineStack, names: Iterable[str], dest: str | os.PathLike) -> list[Path]:
    """Write offline copies of the notebooks ``names`` (files in ``notebooks/``) into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = dest / Path(name).name
        nbformat.write(offline_notebook(NOTEBOOKS / Path(name).name, stack), path)
        written.append(path)
    return written


def execute(nb, stack: OfflineStack, cwd: str | os.PathLike | None = None, timeout: int = 240, **env: str):
    """Run ``nb`` in a fresh kernel whose environment is ``stack.environment(**env)``; returns ``nb``."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(cwd or stack.workdir)}})
    client.execute(env=stack.environment(**env))  # passed on to the kernel manager's start_kernel
    return nb


def _run_child(cmd: list[str], stack: OfflineStack, cwd: Path) -> int:
    """Run ``cmd`` with the stack's environment until it exits or this process is interrupted; then stop it."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=stack.environment())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks (nbclient) and save them with their outputs")
    run.add_argument("notebooks", nargs="+", help="file names in notebooks/")
    run.add_argument("--out", default="executed", help="folder for the executed notebooks (default: executed)")
    voila = sub.add_parser("voila", help="serve one notebook with Voila")
    voila.add_argument("notebook")
    voila.add_argument("--port", type=int, default=8866)
    lab = sub.add_parser("lab", help="JupyterLab on offline copies of every notebook")
    lab.add_argument("--dir", default=None, help="keep the copies here (default: a temporary folder, removed on exit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # `kill PID` as well as Ctrl-C unwinds through the `with` below, which stops the servers
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    with OfflineStack() as stack:
        if args.command == "run":
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for name in args.notebooks:
                logger.info("running %s", name)
                nb = execute(offline_notebook(NOTEBOOKS / Path(name).name, stack), stack)
                nbformat.write(nb, out / Path(name).name)
                logger.info("wrote %s", out / Path(name).name)
            return 0
        if args.command == "voila":
            [path] = write_offline_copies(stack, [args.notebook], stack.workdir / "notebooks")
            return _run_child([sys.executable, "-m", "voila", "--no-browser", f"--port={args.port}", path.name],
                              stack, path.parent)
        folder = Path(args.dir) if args.dir else stack.workdir / "notebooks"
        write_offline_copies(stack, sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")), folder)
        logger.info("offline copies in %s", folder)
        return _run_child([sys.executable, "-m", "jupyter", "lab", "--no-browser"], stack, folder)


if __name__ == "__main__":
    sys.exit(main())
