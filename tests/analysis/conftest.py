"""Fixtures for the analysis tests."""

import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

sys.path.insert(0, str(Path(__file__).parent))

from analysis_helpers import make_embedding


@pytest.fixture(scope="session")
def random_emb() -> xr.DataArray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(20, 24, 16)).astype(np.float32)
    values[0, :3] = np.nan  # a cloudy strip
    return make_embedding(values)


@pytest.fixture(scope="session")
def large_store(tmp_path_factory):
    """Path of an embedding zarr store (open it with ``terrafm.open_embedding``) 2.5x larger than the memory
    budget of ``bounded_memory.run_bounded``: (time 2, y 768, x 1024, embedding 64) float32 = 403 MB,
    uncompressed 2 MiB chunks, EPSG:32633 160 m grid, rows 64-95 of the first date NaN with valid=False,
    the box analysis_helpers.LARGE_CHANGED changes class between the dates (see analysis_helpers.large_*).
    Written once per session (~5 s on an idle 2-core machine)."""

    from analysis_helpers import write_large_store

    return write_large_store(tmp_path_factory.mktemp("large") / "large.zarr")
