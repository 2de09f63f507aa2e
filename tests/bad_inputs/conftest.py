"""Shared by the bad-input tables: the tiny model, a forward-call counter, the helper modules' paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "embed", HERE.parent / "analysis"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture(scope="module")
def model():
    """terrafm_tiny, untrained and seeded (create_model's default seed)."""
    import torch

    from terrafm.model import create_model

    torch.set_num_threads(2)
    return create_model("terrafm_tiny").eval()


@pytest.fixture
def counted(model):
    """The tiny model with a counter of forward calls (the checks must run before any)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    yield model, calls
    handle.remove()
