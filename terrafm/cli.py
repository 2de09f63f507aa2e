"""``terrafm`` command line: ``terrafm embed`` (STAC area -> zarr), ``rgb | similar | change | classify |
export`` (a store -> COG / GeoParquet / zarr) and ``terrafm demo``.

Errors are one line on stderr, ``terrafm <command>: error: <problem and fix>``: exit code 2
for bad arguments and every error raised by terrafm itself (the input must change), 1 for an
unexpected error inside a library (a bug to report: rerun with ``--debug``), 130 on Ctrl-C.
``--debug`` prints the traceback as well. Everything that can be checked without the network
(dates, bbox, output path, model, weights file, device, catalog, chip size, overlap, cloud limit, ...)
is checked before the search; the store commands check their stores, options and outputs before
any compute.

Examples
--------
>>> from terrafm.cli import build_parser
>>> build_parser().parse_args(["embed", "--bbox", "13.3", "52.4", "13.5", "52.6", "--start",
...     "2024-06-01", "--end", "2024-06-30", "--out", "x.zarr"]).level
'patch'
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

_OWN_PACKAGES = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("terrafm", "pretrain"))
_DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


class CommandError(ValueError):
    """A command-line value that cannot work (the message names the option and the fix)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``prog: error: message (see prog --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``terrafm`` command.

    Examples
    --------
    >>> build_parser().prog
    'terrafm'
    """
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    parser = _Parser(prog="terrafm", description="TerraFM embeddings of Sentinel-1/2 imagery")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    emb = sub.add_parser("embed", parents=[debug], help="embed a bbox from a STAC catalog into a zarr store",
                         epilog=_epilog("embed"), formatter_class=argparse.RawDescriptionHelpFormatter)
    emb.add_argument("--bbox", nargs=4, type=float, required=True, metavar=("W", "S", "E", "N"),
                     help="lon/lat degrees: west south east north")
    emb.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    emb.add_argument("--end", required=True, help="last date, YYYY-MM-DD")
    emb.add_argument("--out", required=True, help="zarr store to write (rerun to resume)")
    emb.add_argument("--overwrite", action="store_true",
                     help="rebuild an existing store of another run (the old one stays until the new one is complete)")
    emb.add_argument("--level", choices=("patch", "chip"), default="patch")
    emb.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    emb.add_argument("--catalog", default=None,
                     help="catalog name (planetary-computer, earth-search) or STAC API URL (default: Planetary Computer)")
    emb.add_argument("--weights", default="hf", help="hf, random or a checkpoint path")
    emb.add_argument("--model", default="terrafm_base")
    emb.add_argument("--collections", nargs="+", default=None, metavar="ID",
                     help="STAC collection ids (default: sentinel-2-l2a sentinel-1-rtc)")
    emb.add_argument("--max-cloud", type=float, default=None, metavar="PCT",
                     help="keep optical scenes with cloud cover below this percentage (0-100)")
    emb.add_argument("--composite", default=None, metavar="PERIOD",
                     help="embed median composites per period: monthly or seasonal (DJF/MAM/JJA/SON) "
                          "instead of every acquisition")
    emb.add_argument("--chip-size", type=int, default=224, metavar="PX", help="chip side in pixels, a multiple of 16")
    emb.add_argument("--overlap", default=None, metavar="PX|fast",
                     help="pixels of each chip border discarded (a multiple of 16) or 'fast' (no overlap); "
                          "default: 16 px")
    emb.add_argument("--batch-size", type=int, default=16, metavar="N", help="chips per forward pass")
    emb.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    emb.add_argument("--modalities", nargs="+", default=None, metavar="KEY",
                     help="embed only these modalities (e.g. s2_l2a s1; default: all present)")
    _add_store_commands(sub, debug)
    demo = sub.add_parser("demo", parents=[debug], help="run the whole pipeline on the packaged Sentinel-2 sample",
                          epilog=_epilog("demo"), formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--weights", default="hf", help="hf, random or a checkpoint path")
    demo.add_argument("--out", default="terrafm-demo", help="folder for embeddings.zarr and pca.png")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser


_EXAMPLES = {
    "embed": """\
  terrafm embed --bbox 13.30 52.45 13.40 52.52 --start 2024-06-01 --end 2024-08-31 --out berlin.zarr \\
      --max-cloud 30 --composite monthly --chip-size 224 --overlap fast --precision fp32
  terrafm embed --bbox 11.50 48.10 11.56 48.14 --start 2023-06-01 --end 2023-06-30 --out munich.zarr \\
      --collections sentinel-2-l2a --modalities s2_l2a --catalog earth-search --device cuda""",
    "rgb": """\
  terrafm rgb berlin.zarr --out berlin_rgb.tif
  terrafm rgb series.zarr --time 2 --method umap --out march_rgb.tif --overwrite""",
    "similar": """\
  terrafm similar berlin.zarr --point 13.37 52.51 --out sim.tif --top-k 20 --top-out best.parquet
  terrafm similar berlin.zarr --vector-file query.npy --out sim.tif   # (D,) or (n, D) float array""",
    "change": """\
  terrafm change june.zarr august.zarr --out change.tif                 # bands: distance, changed
  terrafm change series.zarr --out steps.tif --threshold 0.2            # consecutive dates
  terrafm change series.zarr --out steps.tif --first-change first.tif --min-steps 2""",
    "classify": """\
  terrafm classify berlin.zarr --labels fields.gpkg --column crop --out crops.tif   # bands: class, probability
  terrafm classify berlin.zarr --labels points.parquet --method logreg --out classes.tif""",
    "export": """\
  terrafm export berlin.zarr --to cog --out berlin_vectors.tif    # one band per embedding dimension
  terrafm export berlin.zarr --to geoparquet --out berlin.parquet
  terrafm export series.zarr --to zarr --out copy.zarr --overwrite""",
    "demo": """\
  terrafm demo --out terrafm-demo
  terrafm demo --weights random --device cpu      # offline: an UNTRAINED model, to try the pipeline""",
}


def _epilog(command: str) -> str:
    return "Examples:\n" + _EXAMPLES[command]


def _store_parser(sub, debug, name: str, help_text: str, out_help: str):
    cmd = sub.add_parser(name, parents=[debug], help=help_text, description=help_text, epilog=_epilog(name),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("store", help="embedding zarr store (terrafm embed --out, or analysis.to_zarr)")
    cmd.add_argument("--out", required=True, help=out_help)
    cmd.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return cmd


def _add_time(cmd) -> None:
    cmd.add_argument("--time", type=int, default=None, metavar="I",
                     help="date index of a time-series store (required for a series)")


def _add_store_commands(sub, debug) -> None:
    """``rgb``, ``similar``, ``change``, ``classify`` and ``export``: lazy stores in, COG / GeoParquet / zarr out."""
    rgb = _store_parser(sub, debug, "rgb", "false-colour RGB COG of a store (3 components, stretched to 0-1)",
                        "GeoTIFF (COG) to write")
    rgb.add_argument("--method", choices=("pca", "umap"), default="pca")
    _add_time(rgb)
    sim = _store_parser(sub, debug, "similar", "similarity map of a store to a point or a query vector",
                        "GeoTIFF (COG) of the similarity to write")
    query = sim.add_mutually_exclusive_group(required=True)
    query.add_argument("--point", nargs=2, type=float, metavar=("LON", "LAT"), help="query position, lon/lat degrees")
    query.add_argument("--vector-file", metavar="NPY", help=".npy file of a (D,) vector or (n, D) vectors")
    sim.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    sim.add_argument("--top-k", type=int, default=None, metavar="K", help="also rank the K most similar positions")
    sim.add_argument("--top-out", default=None, metavar="PARQUET",
                     help="GeoParquet of the top K points (rank, row, col, similarity; default K: 10)")
    _add_time(sim)
    chg = sub.add_parser("change", parents=[debug], help="change between two stores, or consecutive dates of one",
                         description="change between two stores, or consecutive dates of one",
                         epilog=_epilog("change"), formatter_class=argparse.RawDescriptionHelpFormatter)
    chg.add_argument("store", help="embedding zarr store (the earlier date, or a time series)")
    chg.add_argument("store_b", nargs="?", default=None, help="the later store (omit for a series)")
    chg.add_argument("--out", required=True,
                     help="GeoTIFF (COG): bands distance, changed (a series: distance_<date>... then changed_<date>... of "
                          "each later date); the band names are in its 'bands' tag")
    chg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    chg.add_argument("--threshold", default="otsu", help="cosine distance counted as change, or 'otsu' (default)")
    chg.add_argument("--first-change", default=None, metavar="TIF",
                     help="series only: COG of the index of the first date of a persistent change (-1: none)")
    chg.add_argument("--min-steps", type=int, default=2, metavar="N",
                     help="dates in a row a persistent change lasts (with --first-change)")
    cls = _store_parser(sub, debug, "classify", "train a classifier on labels and map classes over a store",
                        "GeoTIFF (COG): bands class (index into the classes tag), probability")
    cls.add_argument("--labels", required=True, metavar="FILE", help="points/polygons: .gpkg, .geojson, .shp or .parquet")
    cls.add_argument("--column", default="class", help="the labels' class column")
    cls.add_argument("--method", choices=("knn", "logreg"), default="knn",
                     help="cosine kNN (paper protocol) or a logistic-regression probe")
    cls.add_argument("--k", type=int, default=10, help="neighbours of --method knn")
    _add_time(cls)
    exp = _store_parser(sub, debug, "export", "copy a store to a COG, GeoParquet or zarr",
                        "file or store to write")
    exp.add_argument("--to", required=True, choices=("cog", "geoparquet", "zarr"))
    _add_time(exp)


# ---------------------------------------------------------------------- checks before any work
def _check_device(device: str) -> None:
    from .model import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as exc:
        known = not str(exc).startswith("Expected one of")    # torch's list of every backend it was built with
        reason = _one_line(exc) if known else "not a device type torch knows"
        raise CommandError(f"--device {device!r} cannot be used ({reason}); use one of {', '.join(_DEVICES)}") from None


def _check_store_path(out: str) -> Path:
    """``--out`` of ``embed``: a new path, or an existing zarr store (resumed), in a writable place."""
    from . import store

    path = Path(out).expanduser()
    if path.is_file():
        raise CommandError(f"--out {out} is an existing file, not a zarr store; pass a new path (e.g. {path.stem}.zarr)")
    if store.is_zarr_store(path) or (path.is_dir() and not any(path.iterdir())):
        path = path / "._probe"     # an earlier run's store (embed resumes it or refuses a mismatch), or empty
    try:
        store.check_output_path(path, what="embedding store")
    except (OSError, ValueError) as exc:
        raise CommandError(f"--out {out}: {exc}") from None
    return Path(out)


def _check_folder_path(out: str) -> Path:
    """``--out`` of ``demo``: a folder (existing or not) in a writable place."""
    from . import store

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CommandError(f"--out {out} is an existing file; pass a new path or a folder for the demo's outputs")
    try:
        store.check_output_path(path / "._probe", what="demo output")
    except (OSError, ValueError) as exc:
        raise CommandError(f"--out {out}: {exc}") from None
    return path


def _check_model(name: str, weights: str) -> None:
    from .model import list_models

    if name not in list_models():
        raise CommandError(f"--model {name!r} is not a registered model; use one of {list_models()}")
    if weights not in ("hf", "random"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CommandError(f"--weights: checkpoint {str(path)!r} does not exist; pass the path of a .pth "
                               "file, --weights hf for the published weights or --weights random (untrained)")


def _catalog_kwargs(catalog: str | None) -> dict:
    from . import catalogs

    if not catalog:
        return {}
    if catalog.startswith(("http://", "https://")):
        return {"url": catalog}
    catalogs.get_catalog(catalog)
    return {"catalog": catalog}


# ---------------------------------------------------------------------- commands
def _cmd_embed(args) -> int:
    from . import stac
    from .embed import embed
    from .model import create_model

    stac._stac_datetime((args.start, args.end))
    stac.aoi_geometry(tuple(args.bbox))
    _check_store_path(args.out)
    _check_model(args.model, args.weights)
    _check_device(args.device)
    options = _check_embed_options(args)
    kwargs = _catalog_kwargs(args.catalog)
    if args.collections is not None:
        kwargs["collections"] = tuple(args.collections)
    if args.max_cloud is not None:
        kwargs["max_cloud"] = args.max_cloud
    if args.weights == "random":
        logger.warning("--weights random: embedding with an UNTRAINED model; the vectors are not meaningful")
        model = create_model(args.model)
    else:
        try:    # the download or the file read happens before the search
            model = create_model(args.model, weights=args.weights)
        except Exception as exc:
            if not (_raised_by_terrafm(exc) or isinstance(exc, OSError)):
                raise
            raise CommandError(f"--weights {args.weights}: {_one_line(exc)} (--weights random runs an untrained "
                               "model, for trying the pipeline only)") from exc
    ds = stac.open_sentinel(tuple(args.bbox), args.start, args.end, **kwargs)
    if args.composite is not None:
        from .prepare import composite

        ds = composite(ds, _PERIODS[args.composite])
    embed(ds, model=model, level=args.level, device=args.device, out=args.out, overwrite=args.overwrite, **options)
    logger.info("wrote %s", args.out)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    from .model import resolve_weights

    _check_folder_path(args.out)
    _check_device(args.device)
    if args.weights != "random":
        try:
            resolve_weights(args.weights, "terrafm_base")   # the file, or the download, before any compute
        except Exception as exc:
            if not (_raised_by_terrafm(exc) or isinstance(exc, OSError)):
                raise
            hint = (" Offline? `terrafm demo --weights random` tries the pipeline with an UNTRAINED model, or pass "
                    "--weights PATH to a downloaded TerraFM-B.pth." if args.weights == "hf" else "")
            raise CommandError(f"could not load TerraFM weights {args.weights!r}: {_one_line(exc)}{hint}") from exc
    return run_demo(weights=args.weights, out=args.out, device=args.device)


_PERIODS = {"monthly": "month", "month": "month", "seasonal": "season", "season": "season"}


def _check_embed_options(args) -> dict:
    """The embed options of this command as ``embed`` keyword arguments, each checked by its owner's rule."""
    from .sensors import get_modality
    from .tiling import ChipGrid, resolve_margin

    if args.max_cloud is not None and not 0 <= args.max_cloud <= 100:
        raise CommandError(f"--max-cloud {args.max_cloud:g}: cloud cover is a percentage in [0, 100], e.g. 30")
    if args.collections is not None and not all(c.strip() for c in args.collections):
        raise CommandError("--collections has an empty id; pass ids such as sentinel-2-l2a sentinel-1-rtc")
    if args.composite is not None and args.composite not in _PERIODS:
        raise CommandError(f"--composite {args.composite!r} is not a period; use monthly or seasonal")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size}: chips per forward pass must be >= 1, e.g. 16")
    overlap = args.overlap
    if overlap is not None and overlap.lstrip("-").isdigit():
        overlap = int(overlap)
    try:
        ChipGrid(None, args.chip_size, resolve_margin(args.chip_size, overlap))
    except (TypeError, ValueError) as exc:
        raise CommandError(f"--chip-size {args.chip_size} / --overlap {args.overlap}: {_one_line(exc)}") from None
    if args.modalities is not None:
        for key in args.modalities:
            try:
                get_modality(key)
            except KeyError as exc:
                raise CommandError(f"--modalities: {exc.args[0]}") from None
    return {"chip_size": args.chip_size, "overlap": overlap, "batch_size": args.batch_size,
            "precision": args.precision,
            "modalities": [get_modality(k).key for k in args.modalities] if args.modalities else None}


def _open_store(path: str, option: str = "STORE"):
    """A store given on the command line, opened lazily (dask-backed)."""
    from .store import open_embedding

    if not Path(path).expanduser().exists():
        raise CommandError(f"{option} {path}: no such zarr store; write one with `terrafm embed --out {path}`")
    try:
        return open_embedding(Path(path).expanduser())
    except ValueError as exc:
        raise CommandError(f"{option} {path}: {_one_line(exc)}") from None


def _check_output(out: str, overwrite: bool, option: str = "--out", reads=()) -> Path:
    """An output path: new (or replaced with ``--overwrite``), in a writable place, not read from."""
    from . import store

    try:
        return store.check_output_path(Path(out).expanduser(), overwrite=overwrite, reads=reads)
    except FileExistsError:
        raise CommandError(f"{option} {out} exists; pass --overwrite to replace it, or another path") from None
    except (OSError, ValueError) as exc:
        raise CommandError(f"{option} {out}: {_one_line(exc)}") from None


def _one_date(emb, time: int | None, command: str):
    """A single-date view of ``emb``: ``--time I`` of a series (required there), refused for a single date."""
    if "time" not in emb.dims:
        if time not in (None, 0):
            raise CommandError(f"--time {time}: the store has a single date (no time dimension); drop --time")
        return emb
    n = emb.sizes["time"]
    if time is None:
        if n == 1:
            return emb.isel(time=0)
        raise CommandError(f"the store is a series of {n} dates; pick one with --time I (0 to {n - 1}) "
                           f"for terrafm {command}")
    if not -n <= time < n:
        raise CommandError(f"--time {time} is outside the series of {n} dates; use 0 to {n - 1}")
    return emb.isel(time=time)


def _threshold_value(text: str) -> float | str:
    if text == "otsu":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 2:
        raise CommandError(f"--threshold {text!r}: pass a cosine distance in [0, 2] (e.g. 0.2) or otsu")
    return value


def _cmd_rgb(args) -> int:
    from .analysis import to_cog, to_rgb

    emb = _open_store(args.store)
    emb = _one_date(emb, args.time, "rgb")
    _check_output(args.out, args.overwrite, reads=_reads(emb))
    to_cog(to_rgb(emb, method=args.method), args.out, overwrite=args.overwrite)
    logger.info("wrote %s", args.out)
    return 0


def _reads(obj) -> set:
    from .store import sources_of

    return sources_of(obj)


def _cmd_similar(args) -> int:
    import numpy as np

    from .analysis import similarity, to_cog, top_k

    emb = _one_date(_open_store(args.store), args.time, "similar")
    if args.top_k is not None and args.top_k < 1:
        raise CommandError(f"--top-k {args.top_k}: the number of best positions must be >= 1, e.g. 10")
    if args.top_k is not None and args.top_out is None:
        raise CommandError("--top-k ranks positions into --top-out FILE.parquet; pass --top-out too")
    _check_output(args.out, args.overwrite, reads=_reads(emb))
    if args.top_out is not None:
        _check_output(args.top_out, args.overwrite, "--top-out")
        if Path(args.top_out).expanduser().resolve() == Path(args.out).expanduser().resolve():
            raise CommandError("--top-out and --out are the same file; pass two paths")
    if args.point is not None:
        lon, lat = args.point
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise CommandError(f"--point {lon:g} {lat:g} is not lon/lat degrees (lon in [-180, 180], lat in "
                               "[-90, 90]); give longitude first")
        query = (lon, lat)
    else:
        path = Path(args.vector_file).expanduser()
        if not path.is_file():
            raise CommandError(f"--vector-file {args.vector_file}: no such file; save the vector with numpy.save")
        try:
            query = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--vector-file {args.vector_file}: not a .npy array ({_one_line(exc)}); "
                               "save the vector with numpy.save") from None
        if query.ndim not in (1, 2) or query.shape[-1] != emb.sizes["embedding"] or not np.isfinite(query).all():
            raise CommandError(f"--vector-file {args.vector_file} holds an array of shape {query.shape}; the store's "
                               f"vectors have {emb.sizes['embedding']} dimensions: pass ({emb.sizes['embedding']},) "
                               f"or (n, {emb.sizes['embedding']}) finite values")
    sim = similarity(emb, query, metric=args.metric)
    if args.top_out is not None:
        sim = sim.load()
    to_cog(sim, args.out, overwrite=args.overwrite)
    if args.top_out is not None:
        from .store import atomic_output

        best = top_k(sim, k=args.top_k or 10)
        with atomic_output(Path(args.top_out).expanduser(), overwrite=args.overwrite) as tmp:
            best.to_parquet(tmp)
        logger.info("wrote %s (%d positions)", args.top_out, len(best))
    logger.info("wrote %s", args.out)
    return 0


def _cmd_change(args) -> int:
    import xarray as xr

    from .analysis import change, first_persistent_change, to_cog

    threshold = _threshold_value(args.threshold)
    emb_a = _open_store(args.store)
    emb_b = _open_store(args.store_b, "STORE_B") if args.store_b is not None else None
    series = emb_b is None
    if series and ("time" not in emb_a.dims or emb_a.sizes["time"] < 2):
        raise CommandError(f"{args.store} holds a single date; pass a second store (terrafm change A B) or a "
                           "time-series store")
    if not series:
        for option, path, emb in (("STORE", args.store, emb_a), ("STORE_B", args.store_b, emb_b)):
            if emb.sizes.get("time", 1) > 1:
                raise CommandError(f"{option} {path} is a series of {emb.sizes['time']} dates; compare two "
                                   "single-date stores, or pass the series alone (consecutive dates)")
        emb_a = _one_date(emb_a, None, "change")
        emb_b = _one_date(emb_b, None, "change")
    if args.first_change is not None and not series:
        raise CommandError("--first-change needs one time-series store (the first date of a change that lasts); "
                           "drop the second store")
    if args.min_steps < 1:
        raise CommandError(f"--min-steps {args.min_steps}: dates in a row must be >= 1, e.g. 2")
    reads = _reads([emb_a] + ([emb_b] if emb_b is not None else []))
    _check_output(args.out, args.overwrite, reads=reads)
    if args.first_change is not None:
        _check_output(args.first_change, args.overwrite, "--first-change", reads=reads)
        if args.min_steps > emb_a.sizes["time"] - 1:
            raise CommandError(f"--min-steps {args.min_steps} is longer than the {emb_a.sizes['time'] - 1} dates "
                               "after the baseline (the first date)")
    ds = change(emb_a, emb_b, threshold=threshold)
    bands = xr.concat([ds["distance"], ds["changed"]], dim="band")
    if series:
        dates = [str(d)[:10] for d in ds["time"].values]
        bands = bands.stack(pair=("band", "time")).transpose("pair", "y", "x")
        names = [f"{v}_{d}" for v in ("distance", "changed") for d in dates]
        bands = bands.drop_vars(["pair", "band", "time"]).assign_coords(pair=names).rename(pair="band")
    else:
        bands = bands.assign_coords(band=["distance", "changed"])
    bands = bands.rio.write_crs(ds.rio.crs)
    bands.attrs = {"bands": [str(b) for b in bands["band"].values], "threshold": ds.attrs["threshold"],
                   "threshold_method": ds.attrs["threshold_method"]}
    to_cog(bands.transpose("band", "y", "x"), args.out, overwrite=args.overwrite)
    logger.info("wrote %s (threshold %.4f)", args.out, ds.attrs["threshold"])
    if args.first_change is not None:
        first = first_persistent_change(emb_a, threshold=threshold, min_steps=args.min_steps)
        index = first["first_change_index"]
        index.attrs = {"dates": [str(d)[:10] for d in emb_a["time"].values], "threshold": first.attrs["threshold"],
                       "min_steps": args.min_steps, "none": -1}
        to_cog(index, args.first_change, overwrite=args.overwrite)
        logger.info("wrote %s", args.first_change)
    return 0


def _read_labels(path: str, column: str):
    import geopandas as gpd

    file = Path(path).expanduser()
    if not file.exists():
        raise CommandError(f"--labels {path}: no such file; pass a .gpkg, .geojson, .shp or .parquet of points or "
                           "polygons")
    try:
        labels = gpd.read_parquet(file) if file.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(file)
    except (OSError, ValueError, RuntimeError) as exc:   # pyogrio / pyarrow: not vector data
        raise CommandError(f"--labels {path}: cannot read it as points/polygons ({_one_line(exc)})") from None
    if column not in labels.columns:
        found = [c for c in labels.columns if c != labels.geometry.name]
        raise CommandError(f"--labels {path} has no column {column!r} (it has {found}); pass --column NAME")
    return labels


def _cmd_classify(args) -> int:
    import xarray as xr

    from .analysis import fit_classifier, to_cog

    emb = _one_date(_open_store(args.store), args.time, "classify")
    labels = _read_labels(args.labels, args.column)
    if args.k < 1:
        raise CommandError(f"--k {args.k}: neighbours must be >= 1, e.g. 10")
    _check_output(args.out, args.overwrite, reads=_reads(emb))
    clf = fit_classifier(emb, labels, column=args.column, method="linear" if args.method == "logreg" else "knn",
                         k=args.k)
    pred = clf.predict(emb)
    bands = xr.concat([pred["class"], pred["probability"]], dim="band").assign_coords(band=["class", "probability"])
    bands = bands.rio.write_crs(pred.rio.crs)
    bands.attrs = {"bands": ["class", "probability"], "classes": [str(c) for c in clf.classes], "method": clf.method,
                   **{k: v for k, v in clf.report.items() if k in ("accuracy", "macro_f1", "n_train")}}
    to_cog(bands.transpose("band", "y", "x"), args.out, overwrite=args.overwrite)
    logger.info("wrote %s (classes %s; cross-validated accuracy %s)", args.out, bands.attrs["classes"],
                clf.report.get("accuracy"))
    return 0


def _cmd_export(args) -> int:
    from .analysis import to_cog, to_geoparquet, to_zarr

    emb = _open_store(args.store)
    if args.to == "cog":
        emb = _one_date(emb, args.time, "export --to cog")
    elif args.time is not None:
        emb = _one_date(emb, args.time, "export")
    reads = _reads(emb)
    _check_output(args.out, args.overwrite, reads=reads)
    if args.to == "cog":
        to_cog(emb, args.out, overwrite=args.overwrite)
    elif args.to == "geoparquet":
        to_geoparquet(emb, args.out, overwrite=args.overwrite)
    else:
        to_zarr(emb, args.out, overwrite=args.overwrite)
    logger.info("wrote %s", args.out)
    return 0


_COMMANDS = {"embed": _cmd_embed, "demo": _cmd_demo, "rgb": _cmd_rgb, "similar": _cmd_similar,
             "change": _cmd_change, "classify": _cmd_classify, "export": _cmd_export}


def _raised_by_terrafm(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is terrafm's (or pretrain's) own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_OWN_PACKAGES)


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = repr(exc.args[0])
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``terrafm`` console script; returns the exit code.

    Examples
    --------
    >>> main(["embed", "--bbox", "1", "2", "3"])  # doctest: +SKIP
    terrafm embed: error: argument --bbox: expected 4 arguments (see 'terrafm embed --help')
    2
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:      # --help (0) or a bad argument (2, its one line already printed)
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prog = f"terrafm {args.command}"
    debug = getattr(args, "debug", False)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if _raised_by_terrafm(exc):
            sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
            return 2
        sys.stderr.write(f"{prog}: unexpected {type(exc).__name__}: {_one_line(exc)} (an error inside a library, "
                         f"not a message of terrafm's: rerun with --debug and report the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
