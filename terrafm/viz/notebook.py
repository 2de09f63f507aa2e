"""Settings shared by the notebooks: Planetary Computer by default, a local stand-in for CI.

One environment variable switches every notebook::

    TERRAFM_NOTEBOOK_MODE=local   # local STAC API + real test imagery + untrained terrafm_tiny

In local mode the STAC API URL comes from ``TERRAFM_STAC_URL`` when set (CI starts one server
for all notebooks); otherwise the stand-in in the repository's ``tests/support`` (pgstac on
PostgreSQL, a Range/SAS blob server over real Sentinel COGs) is started in the kernel.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODE_VARIABLE = "TERRAFM_NOTEBOOK_MODE"
STAC_URL_VARIABLE = "TERRAFM_STAC_URL"
MAJORTOM_VARIABLE = "TERRAFM_MAJORTOM_ROOT"
MAJORTOM_DOWNLOAD = (
    "download a few Major-TOM Core shards from Hugging Face, e.g. "
    "`huggingface-cli download Major-TOM/Core-S2L2A --repo-type dataset --include 'images/part_00001.parquet' "
    "--local-dir data/majortom/Core-S2L2A`, and point {var} at data/majortom"
)
_LOCAL_SERVERS: list = []

# Default (real) areas: small enough for a laptop CPU with terrafm_base.
REAL_AREA = (11.53, 48.10, 11.61, 48.15)          # Munich west: city, parks, fields, lakes
REAL_SEASONS = (("2023-06-01", "2023-06-30"), ("2023-09-01", "2023-09-30"))


@dataclass
class NotebookSetup:
    """What a notebook needs to run in the chosen mode.

    Examples
    --------
    >>> cfg = open_notebook_area()                                  # doctest: +SKIP
    >>> ds = terrafm.open_sentinel(cfg.bbox, cfg.start, cfg.end, **cfg.stac)  # doctest: +SKIP
    >>> emb = terrafm.embed(ds, **cfg.embed)                        # doctest: +SKIP
    """

    mode: str
    bbox: tuple[float, float, float, float]
    start: str
    end: str
    seasons: tuple[tuple[str, str], tuple[str, str]]
    stac: dict = field(default_factory=dict)
    embed: dict = field(default_factory=dict)
    toolbar: bool = True
    umap_sample: int = 20_000

    @property
    def local(self) -> bool:
        return self.mode == "local"


def notebook_mode() -> str:
    """``"local"`` or ``"planetary-computer"`` (the default), from ``TERRAFM_NOTEBOOK_MODE``.

    Examples
    --------
    >>> notebook_mode()  # with TERRAFM_NOTEBOOK_MODE unset  # doctest: +SKIP
    'planetary-computer'
    """
    mode = os.environ.get(MODE_VARIABLE, "planetary-computer").strip().lower() or "planetary-computer"
    if mode not in ("local", "planetary-computer"):
        raise ValueError(f"{MODE_VARIABLE}={mode!r}; use 'local' (offline stand-in) or unset it (Planetary Computer)")
    return mode


def _repo_tests_dir() -> Path:
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]):
        candidate = base / "tests" / "support" / "scene.py"
        if candidate.exists():
            return candidate.parents[1]
    raise RuntimeError(
        f"{MODE_VARIABLE}=local needs the terrafm repository checkout (tests/support) next to the notebooks; "
        "run the notebooks from the repository, or unset the variable to use Planetary Computer"
    )


def _local_scene():
    tests = _repo_tests_dir()
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from support.scene import get_scene

    return get_scene()


def _start_local_stack(scene) -> str:
    """Start the blob server and the pgstac STAC API of tests/support; return the API URL."""
    from support import stac_items
    from support.pgstac_server import PgstacServer
    from support.storage_server import StorageServer

    storage = StorageServer(root=scene.root).start()
    os.environ["http_proxy"] = storage.url
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["PC_SDK_SAS_URL"] = storage.sas_url
    api = PgstacServer(stac_items.collections(scene), stac_items.all_items(scene, storage.url)).start()
    _LOCAL_SERVERS.extend([api, storage])
    atexit.register(lambda: [server.stop() for server in _LOCAL_SERVERS])
    return api.url


def open_notebook_area(purpose: str = "quickstart") -> NotebookSetup:
    """Area, dates, catalogue and model settings for a notebook, in the current mode.

    Parameters
    ----------
    purpose : str
        Notebook name; only changes how many dates the local mode keeps small.

    Returns
    -------
    NotebookSetup
        ``bbox``, ``start``/``end`` (one season), ``seasons`` (two, for change), ``stac``
        (kwargs for :func:`terrafm.open_sentinel`), ``embed`` (kwargs for :func:`terrafm.embed`),
        ``toolbar`` (leafmap toolbar; off offline) and ``umap_sample``.

    Examples
    --------
    >>> cfg = open_notebook_area("change")                          # doctest: +SKIP
    >>> cfg.mode, cfg.bbox                                          # doctest: +SKIP
    """
    if notebook_mode() == "planetary-computer":
        return NotebookSetup(
            mode="planetary-computer", bbox=REAL_AREA, start=REAL_SEASONS[0][0], end=REAL_SEASONS[0][1],
            seasons=REAL_SEASONS, stac={"catalog": "planetary-computer", "max_cloud": 40},
            embed={"model": "terrafm_base", "weights": "hf"}, toolbar=True, umap_sample=20_000,
        )
    scene = _local_scene()
    url = os.environ.get(STAC_URL_VARIABLE) or _start_local_stack(scene)
    # a ~2.5 km square in the middle of the test scene: 16 x 16 cells at 160 m, seconds on a CPU
    west, south, east, north = scene.aoi_bbox
    cx, cy = (west + east) / 2, (south + north) / 2
    half_x, half_y = (east - west) / 4, (north - south) / 4
    import datetime as dt

    dates = sorted(scene.s2_dates)

    def window(day) -> tuple[str, str]:  # +-3 days: one S2 date and its paired S1 date
        return ((day - dt.timedelta(days=3)).date().isoformat(), (day + dt.timedelta(days=3)).date().isoformat())

    first, last = window(dates[0]), window(dates[-1])
    return NotebookSetup(
        mode="local", bbox=(cx - half_x, cy - half_y, cx + half_x, cy + half_y),
        start=first[0], end=first[1], seasons=(first, last), stac={"url": url},
        embed={"model": "terrafm_tiny", "weights": "random", "chip_size": 128, "batch_size": 4,
               "device": "cpu", "progress": False},
        toolbar=False, umap_sample=2_000,
    )


def first_date(ds: Any, mask: str = "mask_s2_l2a"):
    """The least cloudy date of ``ds`` (the one with most valid S2 pixels), as a 1-date Dataset.

    Examples
    --------
    >>> ds = first_date(terrafm.open_sentinel(bbox, start, end))     # doctest: +SKIP
    """
    if "time" not in ds.dims:
        return ds
    if mask in ds:
        best = int(ds[mask].mean(("y", "x")).argmax("time").compute())
    else:
        best = 0
    return ds.isel(time=[best])


@dataclass
class PretrainSetup:
    """Where the pretraining notebook reads Major-TOM and writes its run.

    ``config`` and ``overrides`` go to ``pretrain.config.load_config``.

    Examples
    --------
    >>> setup = open_pretraining_data()                                   # doctest: +SKIP
    >>> cfg = pretrain.config.load_config(setup.config, setup.overrides)  # doctest: +SKIP
    """

    mode: str
    root: Path
    output_dir: Path
    config: str
    overrides: list[str] = field(default_factory=list)


def open_pretraining_data(output_dir: str | os.PathLike | None = None) -> PretrainSetup:
    """Major-TOM data and a small run configuration for the pretraining notebook.

    Default mode: the Major-TOM Core download named by ``TERRAFM_MAJORTOM_ROOT`` (default
    ``data/majortom``; layout ``Core-S2L2A/images/part_*.parquet``, optional ``cell_stats.csv``),
    trained with the ``tiny_cpu`` recipe on Sentinel-2 L2A for 160 iterations. Local mode: a tiny
    Major-TOM-format dataset built in a temporary directory from the real BigEarthNet S1 + S2
    example patches (the pretraining tests' builder), 15 iterations of ``tiny_cpu``.

    Parameters
    ----------
    output_dir : path, optional
        Run directory (checkpoint, metrics.csv); default ``runs/notebook06`` (local mode: inside
        the temporary directory).

    Returns
    -------
    PretrainSetup

    Raises
    ------
    FileNotFoundError
        No Major-TOM data at the root (default mode); the message says where to download it.

    Examples
    --------
    >>> setup = open_pretraining_data()                 # doctest: +SKIP
    >>> setup.mode, setup.config                        # doctest: +SKIP
    ('local', 'tiny_cpu')
    """
    if notebook_mode() == "local":
        import tempfile

        tests = _repo_tests_dir()
        builder_dir = str(tests / "pretrain")
        if builder_dir not in sys.path:
            sys.path.insert(0, builder_dir)
        from pretrain_majortom_builder import write_bigearthnet_majortom

        import shutil

        root = Path(tempfile.mkdtemp(prefix="terrafm_majortom_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)  # removed when the kernel exits
        info = write_bigearthnet_majortom(root)
        logger.info("built a Major-TOM-format dataset of %d BigEarthNet cells in %s", len(info["cells"]), root)
        out = Path(output_dir) if output_dir is not None else root / "run"
        return PretrainSetup(mode="local", root=root, output_dir=out, config="tiny_cpu", overrides=[
            f"data.root={root}", f"data.cell_stats={root / 'cell_stats.csv'}", f"run.output_dir={out}",
            "optim.epochs=5", "data.num_workers=0"])
    root = Path(os.environ.get(MAJORTOM_VARIABLE, "data/majortom"))
    if not any(root.glob("*S2L2A/images/*.parquet")):
        raise FileNotFoundError(f"no Major-TOM Core-S2L2A parquet under {root.resolve()}; "
                                + MAJORTOM_DOWNLOAD.format(var=MAJORTOM_VARIABLE))
    out = Path(output_dir) if output_dir is not None else Path("runs/notebook06")
    overrides = [f"data.root={root}", f"run.output_dir={out}", "data.modalities=[s2_l2a]",
                 "optim.epochs=10", "optim.epoch_samples=128", "data.num_workers=2"]
    stats = [p for p in (root / "cell_stats.csv", root / "cell_stats.parquet") if p.exists()]
    if stats:
        overrides.append(f"data.cell_stats={stats[0]}")
    return PretrainSetup(mode="planetary-computer", root=root, output_dir=out, config="tiny_cpu", overrides=overrides)
