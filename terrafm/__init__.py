"""terrafm: TerraFM foundation-model embeddings of Sentinel-1/2 imagery, from STAC to maps.

Importing terrafm is cheap (xarray, numpy and the ``ds.terrafm`` / ``da.terrafm`` accessors):
torch, timm, rioxarray, dask.array, scikit-learn, umap and leafmap load only inside the functions
that need them (tests/test_packaging.py holds it to 1.5x ``import xarray``). Public functions
are reached lazily from the top level, e.g. ``terrafm.create_model``.

Examples
--------
>>> import terrafm
>>> list(terrafm.sensors.MODALITIES)
['s2_l2a', 's2_l1c', 's1']
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from . import accessor, sensors

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# public name -> module that defines it; imported on first access
_LAZY: dict[str, str] = {
    "open_sentinel": "terrafm.stac",
    "create_model": "terrafm.model",
    "load_weights": "terrafm.model",
    "list_models": "terrafm.model",
    "resolve_device": "terrafm.model",
    "to_rgb": "terrafm.analysis",
    "similarity": "terrafm.analysis",
    "change": "terrafm.analysis",
    "cluster": "terrafm.analysis",
    "fit_classifier": "terrafm.analysis",
    "knn": "terrafm.evaluate",
    "embed": "terrafm.embed",
    "open_embedding": "terrafm.store",
    "add_embedding_layer": "terrafm.viz",
}

_SUBMODULES = {"model", "stac", "prepare", "tiling", "engine", "analysis", "viz", "evaluate", "cli", "store"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"terrafm.{name}")
    raise AttributeError(f"module 'terrafm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = ["sensors", "__version__", *_LAZY]
