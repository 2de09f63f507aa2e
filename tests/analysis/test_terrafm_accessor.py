"""``da.terrafm`` carries the analysis methods as thin wrappers over the free functions."""

from __future__ import annotations

import numpy as np
import xarray as xr

import terrafm  # noqa: F401  (registers the accessors)
from terrafm.analysis import cluster, similarity, to_rgb


def test_terrafm_accessor_equals_free_functions(random_emb):
    xr.testing.assert_identical(random_emb.terrafm.rgb(method="pca", seed=0),
                                to_rgb(random_emb, method="pca", seed=0))
    vector = np.asarray(random_emb.isel(y=1, x=2).values)
    xr.testing.assert_identical(random_emb.terrafm.similar(vector), similarity(random_emb, vector))
    xr.testing.assert_identical(random_emb.terrafm.cluster(3, seed=0), cluster(random_emb, 3, seed=0))
