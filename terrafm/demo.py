"""``terrafm demo``: the whole pipeline on the packaged real Sentinel-2 L1C sample.

Examples
--------
>>> run_demo(weights="random", out="demo-out")  # doctest: +SKIP
0
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "load_demo"]

logger = logging.getLogger(__name__)
DEMO_FILE = Path(__file__).with_name("data") / "s2_l1c_demo.tif"


def _save_picture(sample, rgb, path: Path) -> None:
    """True colour of the sample beside the PCA colouring of its embedding, same extent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sensors import MODALITIES

    l1c = MODALITIES["s2_l1c"]
    true_colour = np.stack([sample[l1c.variable(b)].values for b in ("B04", "B03", "B02")], axis=-1).astype("float32")
    lo, hi = np.percentile(true_colour, (2, 98))
    true_colour = np.clip((true_colour - lo) / (hi - lo), 0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), constrained_layout=True)
    axes[0].imshow(true_colour)
    axes[0].set_title("Sentinel-2 L1C true colour (10 m)")
    axes[1].imshow(np.nan_to_num(rgb.values), interpolation="nearest")
    axes[1].set_title("TerraFM embedding, first 3 PCs (160 m)")
    for ax in axes:
        ax.set_axis_off()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_demo():
    """The packaged 448x448 px 10 m Sentinel-2 L1C sample as a terrafm Dataset (y, x).

    Examples
    --------
    >>> ds = load_demo()  # doctest: +SKIP
    >>> ds.attrs["terrafm_modalities"]  # doctest: +SKIP
    ['s2_l1c']
    """
    import rioxarray
    import xarray as xr

    from .sensors import MODALITIES

    l1c = MODALITIES["s2_l1c"]
    da = rioxarray.open_rasterio(DEMO_FILE)
    ds = xr.Dataset({name: da.isel(band=i, drop=True) for i, name in enumerate(l1c.variables)})
    for name in l1c.variables:
        ds[name].attrs = {"modality": l1c.key}
    ds.attrs["terrafm_modalities"] = [l1c.key]
    return ds


def run_demo(weights: str = "hf", out: str = "terrafm-demo", device: str = "auto") -> int:
    """Embed the sample, write ``embeddings.zarr`` and ``pca.png`` into ``out``; return an exit code.

    Examples
    --------
    >>> run_demo(weights="random", out="demo-out")  # doctest: +SKIP
    0
    """
    from .embed import embed
    from .model import create_model

    model = create_model("terrafm_base")
    if weights != "random":
        from .model import load_weights

        try:
            load_weights(model, weights)
        except Exception as exc:  # offline, no cache, bad or refused file
            hint = (" Offline? `terrafm demo --weights random` tries the pipeline with an UNTRAINED model, "
                    "or pass --weights PATH to a downloaded TerraFM-B.pth." if weights == "hf" else "")
            logger.error("could not load TerraFM weights %r: %s%s", weights, " ".join(str(exc).split()), hint)
            return 2
    else:
        logger.warning("--weights random: running an UNTRAINED model; the picture shows structure only")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    from .analysis import to_rgb

    sample = load_demo()
    emb = embed(sample, model=model, chip_size=224, device=device,
                out=outdir / "embeddings.zarr", batch_size=4)
    _save_picture(sample, to_rgb(emb, method="pca", seed=0), outdir / "pca.png")
    logger.info("wrote %s and %s", outdir / "embeddings.zarr", outdir / "pca.png")
    return 0
