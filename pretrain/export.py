"""Export the teacher backbone of a pretraining checkpoint as an inference checkpoint.

``python -m pretrain.export runs/x/checkpoint.pth terrafm_pretrained.pth`` writes a flat float32
state dict in the release layout plus all ``patch_embed.fusion.*`` parameters, which
``terrafm.model.load_weights`` loads strictly with the trained fusion (``fusion_mode ==
"trained"``). The checkpoint is read with ``torch.load(weights_only=True)`` (no code is ever
unpickled). The output is written to a temporary sibling, checked by loading it that way, and
only then renamed into place; it is never the training checkpoint itself, and an existing file
is replaced only with ``overwrite=True`` (``--overwrite``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["export_teacher", "main"]

EXPORT_FIX = "Export the checkpoint.pth written in run.output_dir by pretrain.train."


def _check_output(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """Refuse, before reading anything, an output that would destroy data or cannot be written."""
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a directory; give a file path, e.g. {out / 'terrafm_pretrained.pth'}")
    if out.exists() and checkpoint.exists() and os.path.samefile(out, checkpoint):
        raise FileExistsError(
            f"output {out} is the pretraining checkpoint itself ({checkpoint}): writing the export over it would "
            f"destroy the training state, with or without --overwrite. Write the export to another path, e.g. "
            f"{checkpoint.with_name('terrafm_pretrained.pth')}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it, or choose another path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {parent} is not writable; choose another output path")


def export_teacher(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the teacher backbone of ``checkpoint`` to ``out``; returns ``out``.

    The output is written to a temporary sibling, verified by a strict
    :func:`terrafm.model.load_weights` into the checkpoint's model, then renamed to ``out``: a
    file that would not load with its trained fusion is never left behind. ``out`` may not be
    the checkpoint itself (under any spelling, symlink or hard link); an existing ``out`` is
    replaced only with ``overwrite=True``.

    Raises
    ------
    FileExistsError
        ``out`` is the checkpoint, or exists and ``overwrite`` is False.
    terrafm.model.CheckpointError
        ``checkpoint`` is not a complete pretrain.train checkpoint, or holds pickled code.

    Examples
    --------
    >>> export_teacher("runs/tiny/checkpoint.pth", "tiny.pth")  # doctest: +SKIP
    PosixPath('tiny.pth')
    >>> export_teacher("runs/tiny/checkpoint.pth", "runs/tiny/checkpoint.pth")  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    FileExistsError: output runs/tiny/checkpoint.pth is the pretraining checkpoint itself ...
    """
    from .train import read_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise FileNotFoundError(f"pretraining checkpoint {checkpoint} does not exist. {EXPORT_FIX}")
    _check_output(checkpoint, out, overwrite)
    state = read_checkpoint(checkpoint, required=("teacher",), fix=EXPORT_FIX)
    prefix = "backbone."
    backbone = {k[len(prefix):]: v.float().contiguous() for k, v in state["teacher"].items()
                if k.startswith(prefix)}
    if not any(k.startswith("patch_embed.fusion.") for k in backbone):
        raise ValueError(f"{checkpoint}: teacher has no patch_embed.fusion parameters; {EXPORT_FIX}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(backbone, tmp)
        model_name = state.get("model_name")
        if model_name:
            _verify(tmp, model_name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported %d tensors of %s (iteration %s) to %s", len(backbone),
                state.get("model_name"), state.get("iteration"), out)
    return out


def _verify(path: Path, model_name: str) -> None:
    """Load ``path`` strictly into ``model_name`` (a partial fusion is refused there too)."""
    from terrafm.model import create_model, load_weights

    load_weights(create_model(model_name), path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pretrain.export checkpoint.pth out.pth [--overwrite]``.

    Errors are one line on stderr with exit code 2; ``--debug`` shows the traceback.

    Examples
    --------
    >>> main(["runs/terrafm/checkpoint.pth", "terrafm_pretrained.pth"])       # doctest: +SKIP
    0
    """
    from terrafm.model import CheckpointError

    parser = argparse.ArgumentParser(description="Export a TerraFM teacher backbone for inference")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        export_teacher(args.checkpoint, args.out, overwrite=args.overwrite)
    except (CheckpointError, OSError, ValueError) as exc:
        if args.debug:
            raise
        parser.exit(2, f"pretrain.export: error: {' '.join(str(exc).split())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
