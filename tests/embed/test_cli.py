"""terrafm demo on the packaged real sample. (The offline/no-weights message, in a real process:
tests/bad_inputs/test_cli.py::test_demo_offline_without_weights_is_one_line.)"""

from __future__ import annotations

import numpy as np
import xarray as xr


def test_demo_random_weights_writes_embeddings_and_png(tmp_path):
    from terrafm.cli import main

    assert main(["demo", "--weights", "random", "--out", str(tmp_path), "--device", "cpu"]) == 0
    store = xr.open_zarr(tmp_path / "embeddings.zarr", consolidated=False)
    assert store["embedding_vectors"].shape == (28, 28, 768)
    assert np.isfinite(store["embedding_vectors"].values).all()
    assert (tmp_path / "pca.png").stat().st_size > 1000
