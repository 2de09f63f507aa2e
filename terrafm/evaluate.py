"""kNN evaluation protocol of the TerraFM paper (as in DINO): cosine similarity, temperature-weighted votes.

Features come from the model (e.g. the concatenated CLS of the last 4 blocks); k is chosen on the
validation split from {3, 5, 7, 10, 15, 20, 30, 50, 100} and the chosen k is reported on test.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

PAPER_KS: tuple[int, ...] = (3, 5, 7, 10, 15, 20, 30, 50, 100)
DINO_TEMPERATURE = 0.07


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n_samples, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN/inf; drop invalid positions (emb.valid) before kNN")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def knn_scores(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    query_features: np.ndarray,
    k: int,
    temperature: float = DINO_TEMPERATURE,
    n_classes: int | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Temperature-weighted kNN class scores (n_query, n_classes), rows summing to 1.

    ``train_targets`` is (n,) integer classes or (n, C) multi-hot. Each of the ``k`` most cosine-
    similar training samples votes with weight ``exp(sim / temperature)`` (DINO).

    Examples
    --------
    >>> tr = np.array([[1, 0], [0.9, 0.1], [0, 1.0]]); y = np.array([0, 0, 1])
    >>> knn_scores(tr, y, np.array([[1.0, 0.05]]), k=2).round(3)
    array([[1., 0.]])
    """
    train = _normalize(train_features)
    query = _normalize(query_features)
    targets = np.asarray(train_targets)
    if targets.ndim == 1:
        n_classes = int(n_classes or targets.max() + 1)
        onehot = np.zeros((len(targets), n_classes), dtype=np.float32)
        onehot[np.arange(len(targets)), targets.astype(int)] = 1
    else:
        onehot = targets.astype(np.float32)
    k = int(min(k, len(train)))
    out = np.empty((len(query), onehot.shape[1]), dtype=np.float64)
    for start in range(0, len(query), batch_size):
        sims = query[start : start + batch_size] @ train.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, idx, axis=1).astype(np.float64)
        weights = np.exp((top_sims - top_sims.max(1, keepdims=True)) / temperature)  # stable; ratio unchanged
        votes = np.einsum("qk,qkc->qc", weights, onehot[idx])
        out[start : start + len(sims)] = votes / weights.sum(1, keepdims=True)
    return out


def _f1(true: np.ndarray, pred: np.ndarray, average: str) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(true, pred, average=average, zero_division=0))


def knn(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    test_features: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    ks: Sequence[int] = PAPER_KS,
    temperature: float = DINO_TEMPERATURE,
    multilabel: bool | None = None,
    average: str = "micro",
) -> dict:
    """The paper's kNN protocol: sweep k on validation, report the best k on test.

    Parameters
    ----------
    train_features, val_features, test_features : (n, D) arrays
        Frozen features (e.g. CLS of the last 4 blocks, concatenated).
    train_labels, val_labels, test_labels : (n,) int classes or (n, C) multi-hot
        Multi-hot labels switch to multi-label mode (class score > 0.5 ⇒ predicted) and F1.
    ks : sequence of int
        Candidate k (paper: 3, 5, 7, 10, 15, 20, 30, 50, 100).
    temperature : float
        DINO vote temperature T (0.07).
    average : str
        F1 averaging for multi-label ("micro" as GEO-Bench m-BigEarthNet).

    Returns
    -------
    dict
        ``metric`` ("top1" or "f1"), ``val`` {k: score}, ``best_k``, ``val_best`` and ``test``
        (score at best_k, None without test data). Scores are fractions in [0, 1].

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (50, 8)) + 4, rng.normal(0, 1, (50, 8)) - 4]; y = np.r_[[0] * 50, [1] * 50]
    >>> knn(x[::2], y[::2], x[1::2], y[1::2], ks=(3, 5))["val_best"]
    1.0
    """
    train_labels = np.asarray(train_labels)
    if multilabel is None:
        multilabel = train_labels.ndim == 2
    classes_seen = np.unique(train_labels) if not multilabel else None
    if not multilabel and len(classes_seen) < 2:
        raise ValueError(f"train labels contain one class ({classes_seen}); kNN accuracy needs at least two")
    n_classes = None if multilabel else int(max(train_labels.max(), np.max(val_labels)) + 1)

    def score(features, labels, k):
        probs = knn_scores(train_features, train_labels, features, k, temperature, n_classes)
        labels = np.asarray(labels)
        if multilabel:
            return _f1(labels.astype(int), (probs > 0.5).astype(int), average)
        return float((probs.argmax(1) == labels).mean())

    val_scores = {int(k): score(val_features, val_labels, k) for k in ks}
    best_k = max(val_scores, key=lambda k: (val_scores[k], -k))
    test = None
    if test_features is not None:
        if test_labels is None:
            raise ValueError("test_features given without test_labels")
        test = score(test_features, test_labels, best_k)
    logger.info("kNN sweep %s -> best k=%d (val %.4f, test %s)", val_scores, best_k, val_scores[best_k], test)
    return {"metric": "f1" if multilabel else "top1", "val": val_scores, "best_k": best_k,
            "val_best": val_scores[best_k], "test": test}
