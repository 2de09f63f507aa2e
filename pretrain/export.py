"""Export the teacher backbone of a pretraining checkpoint as an inference checkpoint.

``python -m pretrain.export runs/x/checkpoint.pth terrafm_pretrained.pth`` writes a flat float32
state dict in the release layout plus all ``patch_embed.fusion.*`` parameters, which
``terrafm.model.load_weights`` loads strictly with the trained fusion (``fusion_mode ==
"trained"``). The written file is checked by loading it that way before the export returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["export_teacher", "main"]


def export_teacher(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the teacher backbone of ``checkpoint`` to ``out``; returns ``out``.

    The file is verified by a strict :func:`terrafm.model.load_weights` into the checkpoint's
    model: a file that would not load with its trained fusion is removed and the export fails.

    Examples
    --------
    >>> export_teacher("runs/tiny/checkpoint.pth", "tiny.pth")  # doctest: +SKIP
    PosixPath('tiny.pth')
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"pretraining checkpoint {checkpoint} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "teacher" not in state:
        raise ValueError(f"{checkpoint} is not a pretrain.train checkpoint (no 'teacher' entry); "
                         "export the checkpoint.pth written in run.output_dir")
    prefix = "backbone."
    backbone = {k[len(prefix):]: v.float().contiguous() for k, v in state["teacher"].items()
                if k.startswith(prefix)}
    if not any(k.startswith("patch_embed.fusion.") for k in backbone):
        raise ValueError(f"{checkpoint}: teacher has no patch_embed.fusion parameters")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone, out)
    model_name = state.get("model_name")
    if model_name:
        _verify(out, model_name)
    logger.info("exported %d tensors of %s (iteration %s) to %s", len(backbone),
                state.get("model_name"), state.get("iteration"), out)
    return out


def _verify(path: Path, model_name: str) -> None:
    """Load ``path`` strictly into ``model_name`` (a partial fusion is refused there too)."""
    from terrafm.model import CheckpointError, create_model, load_weights

    try:
        load_weights(create_model(model_name), path)
    except CheckpointError:
        path.unlink()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pretrain.export checkpoint.pth out.pth``.

    Examples
    --------
    >>> main(["runs/terrafm/checkpoint.pth", "terrafm_pretrained.pth"])       # doctest: +SKIP
    0
    """
    parser = argparse.ArgumentParser(description="Export a TerraFM teacher backbone for inference")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    export_teacher(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
