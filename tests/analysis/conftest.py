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
