"""``terrafm`` command line: ``terrafm embed`` (STAC area -> zarr) and ``terrafm demo``.

Errors are one line on stderr, ``terrafm <command>: error: <problem and fix>``: exit code 2
for bad arguments and every error raised by terrafm itself (the input must change), 1 for an
unexpected error inside a library (a bug to report: rerun with ``--debug``), 130 on Ctrl-C.
``--debug`` prints the traceback as well. Everything that can be checked without the network
(dates, bbox, output path, model, weights file, device, catalog) is checked before the search.

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
    emb = sub.add_parser("embed", parents=[debug], help="embed a bbox from a STAC catalog into a zarr store")
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
    demo = sub.add_parser("demo", parents=[debug], help="run the whole pipeline on the packaged Sentinel-2 sample")
    demo.add_argument("--weights", default="hf", help="hf, random or a checkpoint path")
    demo.add_argument("--out", default="terrafm-demo", help="folder for embeddings.zarr and pca.png")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return parser


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
    kwargs = _catalog_kwargs(args.catalog)
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
    embed(ds, model=model, level=args.level, device=args.device, out=args.out, overwrite=args.overwrite)
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


_COMMANDS = {"embed": _cmd_embed, "demo": _cmd_demo}


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
