"""Fixtures for the embedding tests: a tiny model (helpers in embed_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from terrafm.model import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    return create_model("terrafm_tiny").eval()
