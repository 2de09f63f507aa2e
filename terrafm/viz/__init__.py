"""Maps and interactive apps for embeddings on leafmap (ipyleaflet) in Jupyter and Voila.

Nothing heavy is imported here: leafmap, ipyleaflet, ipywidgets, bqplot and umap load inside the
functions and apps that use them.

Examples
--------
>>> import terrafm.viz as viz
>>> m = viz.new_map(emb, toolbar=False)                           # doctest: +SKIP
>>> viz.add_embedding_layer(m, terrafm.to_rgb(emb), "PCA")         # doctest: +SKIP
>>> viz.SimilarityExplorer(emb)                                    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "add_embedding_layer": "terrafm.viz.layers",
    "remove_embedding_layer": "terrafm.viz.layers",
    "get_layer": "terrafm.viz.layers",
    "new_map": "terrafm.viz.layers",
    "EmbeddingLayer": "terrafm.viz.layers",
    "render_overlay": "terrafm.viz.render",
    "Overlay": "terrafm.viz.render",
    "SimilarityExplorer": "terrafm.viz.similarity_app",
    "ChangeExplorer": "terrafm.viz.change_app",
    "LabelTool": "terrafm.viz.label_app",
    "UmapLink": "terrafm.viz.umap_app",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'terrafm.viz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
