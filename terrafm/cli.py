"""``terrafm`` command line: ``terrafm embed`` (STAC area -> zarr) and ``terrafm demo``.

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

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``terrafm`` command.

    Examples
    --------
    >>> build_parser().prog
    'terrafm'
    """
    parser = argparse.ArgumentParser(prog="terrafm", description="TerraFM embeddings of Sentinel-1/2 imagery")
    sub = parser.add_subparsers(dest="command", required=True)
    emb = sub.add_parser("embed", help="embed a bbox from a STAC catalog into a zarr store")
    emb.add_argument("--bbox", nargs=4, type=float, required=True, metavar=("W", "S", "E", "N"))
    emb.add_argument("--start", required=True)
    emb.add_argument("--end", required=True)
    emb.add_argument("--out", required=True)
    emb.add_argument("--level", choices=("patch", "chip"), default="patch")
    emb.add_argument("--device", default="auto")
    emb.add_argument("--catalog", default=None, help="STAC API URL (default: Planetary Computer)")
    emb.add_argument("--weights", default="hf", help="hf, random or a checkpoint path")
    emb.add_argument("--model", default="terrafm_base")
    demo = sub.add_parser("demo", help="run the whole pipeline on the packaged Sentinel-2 sample")
    demo.add_argument("--weights", default="hf", help="hf, random or a checkpoint path")
    demo.add_argument("--out", default="terrafm-demo")
    demo.add_argument("--device", default="auto")
    return parser


def _cmd_embed(args) -> int:
    from .embed import embed

    try:
        from . import stac
    except ImportError:
        logger.error("terrafm.stac is not available in this installation")
        return 2
    kwargs = {}
    if args.catalog:
        if args.catalog.startswith("http"):
            kwargs["url"] = args.catalog
        else:
            kwargs["catalog"] = args.catalog
    ds = stac.open_sentinel(tuple(args.bbox), args.start, args.end, **kwargs)
    embed(ds, model=args.model, weights=args.weights, level=args.level, device=args.device, out=args.out)
    logger.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``terrafm`` console script.

    Examples
    --------
    >>> main(["demo", "--help"])  # doctest: +SKIP
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "embed":
        return _cmd_embed(args)
    from .demo import run_demo

    return run_demo(weights=args.weights, out=args.out, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
