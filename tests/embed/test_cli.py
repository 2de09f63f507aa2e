"""terrafm demo on the packaged real sample, and the offline/no-weights message."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import xarray as xr


def test_demo_random_weights_writes_embeddings_and_png(tmp_path):
    from terrafm.cli import main

    assert main(["demo", "--weights", "random", "--out", str(tmp_path), "--device", "cpu"]) == 0
    store = xr.open_zarr(tmp_path / "embeddings.zarr", consolidated=False)
    assert store["embedding_vectors"].shape == (28, 28, 768)
    assert np.isfinite(store["embedding_vectors"].values).all()
    assert (tmp_path / "pca.png").stat().st_size > 1000


def test_demo_offline_without_weights_names_random(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TERRAFM_WEIGHTS": ""}
    res = subprocess.run([sys.executable, "-m", "terrafm.cli", "demo", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "--weights random" in res.stderr and "TerraFM weights" in res.stderr
    assert not (tmp_path / "o" / "embeddings.zarr").exists()
