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

    from .sensors import S2_BANDS

    da = rioxarray.open_rasterio(DEMO_FILE).squeeze(drop=True) if False else rioxarray.open_rasterio(DEMO_FILE)
    ds = xr.Dataset({b: da.isel(band=i, drop=True) for i, b in enumerate(S2_BANDS)})
    for b in S2_BANDS:
        ds[b].attrs = {"modality": "s2_l1c"}
    ds.attrs["terrafm_modalities"] = ["s2_l1c"]
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
        except Exception as exc:  # offline, no cache, bad path
            logger.error("could not load TerraFM weights %r: %s\nNo network and no cached weights? "
                         "Run `terrafm demo --weights random` to try the pipeline with an UNTRAINED "
                         "model, or pass --weights PATH to a downloaded TerraFM-B.pth.", weights, exc)
            return 2
    else:
        logger.warning("--weights random: running an UNTRAINED model; the picture shows structure only")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    emb = embed(load_demo(), model=model, chip_size=224, overlap=48, device=device,
                out=outdir / "embeddings.zarr", batch_size=4)
    vec = emb.values.reshape(-1, emb.shape[-1])
    ok = np.isfinite(vec).all(1)
    centered = vec[ok] - vec[ok].mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    pcs = np.full((vec.shape[0], 3), np.nan)
    pcs[ok] = centered @ vt[:3].T
    lo, hi = np.nanpercentile(pcs, 2, axis=0), np.nanpercentile(pcs, 98, axis=0)
    rgb = np.clip((pcs - lo) / (hi - lo + 1e-12), 0, 1).reshape(emb.shape[:-1] + (3,))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(outdir / "pca.png", np.nan_to_num(rgb))
    logger.info("wrote %s and %s", outdir / "embeddings.zarr", outdir / "pca.png")
    return 0
