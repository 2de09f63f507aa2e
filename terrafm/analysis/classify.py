"""Few-shot classification of embeddings from points, polygons or a label raster."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr

from ._checks import require_int, require_positive
from ._grid import EMBEDDING_DIM, check_embedding, map_valid_blocks
from .cluster import gather_vectors, require_some_valid, valid_flags
from .labels import labels_to_grid

logger = logging.getLogger(__name__)


@dataclass
class Classifier:
    """A fitted embedding classifier. ``predict(emb)`` gives class and probability maps."""

    method: str
    classes: list
    train_vectors: np.ndarray
    train_targets: np.ndarray
    model: Any = None
    k: int = 10
    temperature: float = 0.07
    report: dict = field(default_factory=dict)

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """(n, n_classes) class probabilities for raw vectors.

        Examples
        --------
        >>> clf.predict_proba(emb.values[5, 5][None])   # one vector: (1, n_classes)  # doctest: +SKIP
        """
        vectors = np.asarray(vectors)
        depth = self.train_vectors.shape[1]
        if vectors.ndim != 2:
            raise ValueError(f"predict_proba takes vectors of shape (n, {depth}), got shape {vectors.shape}; "
                             "for one vector pass vector[None]")
        if vectors.shape[1] != depth:
            raise ValueError(
                f"classifier was trained on {self.train_vectors.shape[1]}-dim embeddings, got {vectors.shape[1]}; "
                "embed with the same model"
            )
        if self.method == "knn":
            from ..evaluate import knn_scores

            return knn_scores(self.train_vectors, self.train_targets, vectors, self.k, self.temperature,
                              n_classes=len(self.classes))
        return self.model.predict_proba(vectors)

    def predict(self, emb: xr.DataArray) -> xr.Dataset:
        """Class map (index into ``classes``), its probability and per-class probabilities.

        Works chunk by chunk: a dask-backed ``emb`` (:func:`terrafm.open_embedding`) gives a lazy
        Dataset (compute it, or stream it with :func:`to_cog`), equal to the in-memory result.
        Invalid positions are NaN in every variable.

        Examples
        --------
        >>> out = clf.predict(emb)                     # doctest: +SKIP
        >>> out["class"].plot(); out.attrs["classes"]  # doctest: +SKIP
        """
        check_embedding(emb)
        depth = self.train_vectors.shape[1]
        if emb.sizes[EMBEDDING_DIM] != depth:
            raise ValueError(
                f"classifier was trained on {depth}-dim embeddings, got {emb.sizes[EMBEDDING_DIM]}; "
                "embed with the same model"
            )
        require_some_valid(emb)
        names = [str(c) for c in self.classes]

        def scores(vectors: np.ndarray) -> np.ndarray:
            proba = self.predict_proba(vectors)
            return np.concatenate([proba.argmax(1)[:, None], proba.max(1)[:, None], proba], axis=1).astype(np.float32)

        stacked = map_valid_blocks(emb, scores, "scores", band=("score", ["class", "probability", *names]))
        ds = xr.Dataset(
            {
                "class": stacked.isel(score=0, drop=True).rename("class"),
                "probability": stacked.isel(score=1, drop=True).rename("probability"),
                "probabilities": stacked.isel(score=slice(2, None)).rename(score="class_name")
                .assign_coords(class_name=names).rename("probabilities"),
            }
        )
        ds = ds.rio.write_crs(emb.rio.crs)
        ds.attrs.update({"classes": names, "method": self.method})
        return ds


def _make_model(method: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))


def _fit(method, vectors, targets, n_classes, k, temperature, seed) -> Classifier:
    clf = Classifier(method, list(range(n_classes)), vectors, targets, k=min(k, len(vectors)), temperature=temperature)
    if method == "linear":
        clf.model = _make_model(method, seed).fit(vectors, targets)
        # sklearn only knows the classes it saw; expand to all classes
        if len(clf.model.classes_) != n_classes:
            seen = clf.model.classes_

            base = clf.model

            class _Expand:
                def predict_proba(self, x):
                    out = np.zeros((len(x), n_classes))
                    out[:, seen] = base.predict_proba(x)
                    return out

            clf.model = _Expand()
    return clf


def spatial_blocks(rows: np.ndarray, cols: np.ndarray, block_size: int) -> np.ndarray:
    """Group id of each position: square blocks of ``block_size`` cells (spatially blocked CV)."""
    return (rows // block_size) * 1_000_003 + (cols // block_size)


def fit_classifier(
    emb: xr.DataArray,
    labels,
    column: str = "class",
    method: Literal["knn", "linear"] = "knn",
    k: int = 10,
    temperature: float = 0.07,
    block_size: int = 8,
    n_folds: int = 5,
    seed: int = 0,
) -> Classifier:
    """Train a classifier from labels on the embedding grid, with a spatially blocked CV report.

    Parameters
    ----------
    emb : xr.DataArray
        Single-date embeddings (y, x, embedding) with a CRS, in memory or dask-backed: only the
        labelled positions are read (a vectorised point read), never the whole array.
    labels : GeoDataFrame or xr.DataArray
        Points/polygons with a ``column`` of classes (any CRS, reprojected), or a label raster such
        as ESA WorldCover (resampled to the grid with mode when finer, nearest when coarser).
    column : str
        The GeoDataFrame column holding the classes. -1 and missing values are unlabelled
        (ignored); see :func:`labels_to_grid` for what else is refused.
    method : {"knn", "linear"}
        DINO-weighted cosine kNN (paper protocol) or a standardised logistic-regression probe.
    k : int
        Neighbours for ``method="knn"``: at most the number of labelled positions (an error
        otherwise); a cross-validation fold with fewer training positions uses them all.
    temperature : float
        kNN vote temperature (> 0; the DINO protocol uses 0.07).
    block_size : int
        CV blocks are ``block_size``×``block_size`` grid cells, so train and test folds are spatially
        separated (neighbouring cells are strongly correlated).
    n_folds : int
        Cross-validation folds (>= 2; fewer when there are fewer blocks).
    seed : int
        Seed of the linear probe.

    Returns
    -------
    Classifier
        ``.predict(emb)``; ``.classes``; ``.report`` with ``accuracy``, ``macro_f1``,
        ``per_class_f1``, ``n_train``, ``n_folds``.

    Examples
    --------
    >>> clf = fit_classifier(emb, fields_gdf, column="crop", method="linear")  # doctest: +SKIP
    >>> clf.report["macro_f1"], clf.predict(emb)["class"]                      # doctest: +SKIP
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import GroupKFold

    if method not in ("knn", "linear"):
        raise ValueError(f"method must be 'knn' or 'linear', got {method!r}")
    k = require_int("k", k, fix="e.g. k=10 (the number of nearest labelled positions that vote)")
    require_positive("temperature", temperature, fix="the DINO kNN protocol uses temperature=0.07")
    block_size = require_int("block_size", block_size, fix="cross-validation blocks are block_size x block_size cells, e.g. 8")
    n_folds = require_int("n_folds", n_folds, minimum=2, fix="cross-validation needs at least 2 folds, e.g. 5")
    check_embedding(emb)
    if "time" in emb.dims:
        if emb.sizes["time"] != 1:
            raise ValueError("fit_classifier needs one date; select it with emb.isel(time=i)")
        emb = emb.isel(time=0)
    grid, classes = labels_to_grid(emb, labels, column)
    rows, cols = np.nonzero(grid >= 0)
    vectors = gather_vectors(emb, (rows, cols))          # the labelled positions only, never the whole array
    usable = np.isfinite(vectors).all(1)
    flags = valid_flags(emb)
    if flags is not None:
        usable &= flags[rows, cols]
    if not usable.any():
        raise ValueError(
            "no label falls on a valid embedding position; check the labels overlap the area (CRS, extent)"
        )
    rows, cols, vectors = rows[usable], cols[usable], vectors[usable].astype(np.float32, copy=False)
    targets = grid[rows, cols]
    present = np.unique(targets)
    if len(present) < 2:
        raise ValueError(
            f"labels contain a single class ({classes[present[0]]!r}) on valid positions; a classifier needs "
            "at least two — add examples of other classes (e.g. a 'background' class)"
        )
    if method == "knn" and k > len(targets):
        raise ValueError(
            f"k={k} neighbours but only {len(targets)} labelled positions fall on valid embedding cells; lower k "
            f"(at most {len(targets)}) or add labels")

    groups = spatial_blocks(rows, cols, block_size)
    n_splits = int(min(n_folds, len(np.unique(groups))))
    predictions = np.full(len(targets), -1)
    if n_splits >= 2:
        for train_idx, test_idx in GroupKFold(n_splits=n_splits).split(vectors, targets, groups):
            if len(np.unique(targets[train_idx])) < 2:
                continue
            fold = _fit(method, vectors[train_idx], targets[train_idx], len(classes), k, temperature, seed)
            predictions[test_idx] = fold.predict_proba(vectors[test_idx]).argmax(1)
    scored = predictions >= 0
    report: dict = {"n_train": int(len(targets)), "n_folds": n_splits, "block_size": block_size,
                    "classes": [str(c) for c in classes]}
    if scored.any():
        report["accuracy"] = float(accuracy_score(targets[scored], predictions[scored]))
        report["macro_f1"] = float(f1_score(targets[scored], predictions[scored], average="macro",
                                            labels=present, zero_division=0))
        per_class = f1_score(targets[scored], predictions[scored], average=None, labels=present, zero_division=0)
        report["per_class_f1"] = {str(classes[c]): float(f) for c, f in zip(present, per_class)}
    else:
        logger.warning("too few spatial blocks for cross-validation; report has no accuracy")
    clf = _fit(method, vectors, targets, len(classes), k, temperature, seed)
    clf.classes = classes
    clf.report = report
    logger.info("fit %s classifier on %d labelled positions: %s", method, len(targets), report.get("accuracy"))
    return clf
