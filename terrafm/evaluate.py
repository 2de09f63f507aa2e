"""kNN evaluation protocol of the TerraFM paper (as in DINO): cosine similarity, temperature-weighted votes.

Features come from the model (e.g. the concatenated CLS of the last 4 blocks); k is chosen on the
validation split from {3, 5, 7, 10, 15, 20, 30, 50, 100} and the chosen k is reported on test.
"""

from __future__ import annotations

import logging
import numbers
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

PAPER_KS: tuple[int, ...] = (3, 5, 7, 10, 15, 20, 30, 50, 100)
DINO_TEMPERATURE = 0.07


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}: {name} must be a positive integer")
    return int(value)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real) \
            or not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: the vote weight is exp(similarity / temperature), so the "
                         f"temperature must be a finite number > 0; the DINO protocol uses {DINO_TEMPERATURE}")
    return float(temperature)


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, dim), got shape {x.shape}; "
                         "reshape with x.reshape(len(x), -1) or stack the vectors")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN/inf; drop invalid positions (emb.valid) before kNN")
    return x


def _same_dim(features: np.ndarray, name: str, train: np.ndarray) -> None:
    if features.shape[1] != train.shape[1]:
        raise ValueError(f"{name} have {features.shape[1]} dims but train_features have {train.shape[1]}; "
                         "extract both with the same model and layers")


def _labels(labels, name: str, n_rows: int, features_name: str) -> np.ndarray:
    """Validated labels: (n,) class indices >= 0 as int64, or (n, C) multi-hot 0/1 as float32."""
    raw = np.asarray(labels)
    if raw.ndim not in (1, 2):
        raise ValueError(f"{name} must be (n,) class indices or (n, C) multi-hot rows, got shape {raw.shape}")
    if len(raw) != n_rows:
        raise ValueError(f"{name} has {len(raw)} rows but {features_name} has {n_rows}; pass one label per "
                         "feature row")
    if raw.dtype.kind in "USO":
        kinds = sorted({type(v).__name__ for v in raw.ravel()[:1000]}) if raw.dtype.kind == "O" else ["str"]
        raise ValueError(
            f"{name} are {'/'.join(kinds)}, not integer class indices; encode the labels of all splits together, "
            "e.g. names, codes = np.unique(np.r_[train, val, test], return_inverse=True), then split codes")
    if raw.dtype.kind == "b":
        raw = raw.astype(np.int64)
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise ValueError(f"{name} contain NaN/inf; drop unlabelled samples before kNN (keep = np.isfinite(labels))")
        if (raw != np.round(raw)).any():
            raise ValueError(f"{name} are not whole numbers (e.g. {raw[raw != np.round(raw)][0]}); kNN labels are "
                             "class indices 0..C-1 or multi-hot 0/1 rows")
    if raw.ndim == 2:
        values = np.unique(raw)
        if not set(values.tolist()) <= {0, 1}:
            raise ValueError(f"multi-hot {name} must hold 0/1 only, found {[int(v) for v in values[:10]]}; "
                             "pass one 0/1 column per class")
        return raw.astype(np.float32)
    negative = np.unique(raw[raw < 0])
    if negative.size:
        raise ValueError(f"{name} contain negative values {[int(v) for v in negative[:5]]}; kNN labels are class "
                         "indices 0..C-1. Drop unlabelled samples first (keep = labels >= 0; "
                         "features[keep], labels[keep])")
    return raw.astype(np.int64)


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

    ``train_targets`` is (n,) integer classes 0..C-1 or (n, C) multi-hot. Each of the ``k``
    most cosine-similar training samples votes with weight ``exp(sim / temperature)`` (DINO);
    ``1 <= k <= n`` (an error otherwise) and ``temperature > 0``.

    Examples
    --------
    >>> tr = np.array([[1, 0], [0.9, 0.1], [0, 1.0]]); y = np.array([0, 0, 1])
    >>> knn_scores(tr, y, np.array([[1.0, 0.05]]), k=2).round(3)
    array([[1., 0.]])
    """
    train = _features(train_features, "train_features")
    query = _features(query_features, "query_features")
    _same_dim(query, "query_features", train)
    targets = _labels(train_targets, "train_labels", len(train), "train_features")
    k = _positive_int("k", k)
    if k > len(train):
        raise ValueError(f"k={k} exceeds the {len(train)} training samples; a vote cannot use more neighbours than "
                         f"there are: pass k <= {len(train)}")
    temperature = _check_temperature(temperature)
    batch_size = _positive_int("batch_size", batch_size)
    train, query = _unit(train), _unit(query)
    if targets.ndim == 1:
        needed = int(targets.max()) + 1
        if n_classes is not None and n_classes < needed:
            raise ValueError(f"n_classes={n_classes} but the labels go up to {needed - 1}; pass n_classes >= "
                             f"{needed} or None")
        onehot = np.zeros((len(targets), int(n_classes or needed)), dtype=np.float32)
        onehot[np.arange(len(targets)), targets] = 1
    else:
        onehot = targets
    out = np.empty((len(query), onehot.shape[1]), dtype=np.float64)
    for start in range(0, len(query), batch_size):
        sims = query[start : start + batch_size] @ train.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, idx, axis=1).astype(np.float64)
        weights = np.exp((top_sims - top_sims.max(1, keepdims=True)) / temperature)  # stable; ratio unchanged
        votes = np.einsum("qk,qkc->qc", weights, onehot[idx])
        out[start : start + len(sims)] = votes / weights.sum(1, keepdims=True)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


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
        Class indices 0..C-1 (whole-number floats are accepted), one per feature row; -1 or
        other negative "unlabelled" markers, strings and fractions are errors that say how to
        filter or encode them. Multi-hot 0/1 labels switch to multi-label mode (class score
        > 0.5 ⇒ predicted) and F1.
    ks : sequence of int
        Candidate k (paper: 3, 5, 7, 10, 15, 20, 30, 50, 100); each at most the number of
        training samples (an error names the usable ones).
    temperature : float
        DINO vote temperature T (> 0; 0.07).
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
    train = _features(train_features, "train_features")
    train_y = _labels(train_labels, "train_labels", len(train), "train_features")
    val = _features(val_features, "val_features")
    _same_dim(val, "val_features", train)
    val_y = _labels(val_labels, "val_labels", len(val), "val_features")
    test = test_y = None
    if test_features is not None:
        if test_labels is None:
            raise ValueError("test_features given without test_labels; pass both or neither")
        test = _features(test_features, "test_features")
        _same_dim(test, "test_features", train)
        test_y = _labels(test_labels, "test_labels", len(test), "test_features")
    elif test_labels is not None:
        raise ValueError("test_labels given without test_features; pass both or neither")
    for name, labels in (("val_labels", val_y), ("test_labels", test_y)):
        if labels is not None and labels.ndim != train_y.ndim:
            raise ValueError(
                f"{'multi-hot train_labels' if train_y.ndim == 2 else 'train_labels'} of shape {train_y.shape} but "
                f"{name} of shape {labels.shape}: all splits need the same kind of labels ((n,) class indices or "
                "(n, C) multi-hot)")
        if labels is not None and labels.ndim == 2 and labels.shape[1] != train_y.shape[1]:
            raise ValueError(f"multi-hot train_labels have {train_y.shape[1]} classes but {name} have "
                             f"{labels.shape[1]}; use one column per class in every split")
    if average not in ("micro", "macro", "weighted", "samples"):
        raise ValueError(f"average={average!r}: multi-label F1 averages are 'micro', 'macro', 'weighted' or "
                         "'samples' (GEO-Bench m-BigEarthNet uses 'micro')")
    if multilabel is None:
        multilabel = train_y.ndim == 2
    elif multilabel != (train_y.ndim == 2):
        raise ValueError(f"multilabel={multilabel} but the labels are {'multi-hot' if train_y.ndim == 2 else 'class indices'}; "
                         "leave multilabel=None (it follows the labels' shape)")
    if not multilabel and len(np.unique(train_y)) < 2:
        raise ValueError(f"train labels contain one class ({np.unique(train_y)}); kNN accuracy needs at least two")
    temperature = _check_temperature(temperature)
    ks = list(ks)
    if not ks:
        raise ValueError(f"ks is empty; pass the k to try, e.g. ks=PAPER_KS {PAPER_KS}")
    bad = [k for k in ks if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1]
    if bad:
        raise ValueError(f"ks {bad} are not positive integers; ks must be positive integers, e.g. {PAPER_KS}")
    too_large = [int(k) for k in ks if k > len(train)]
    if too_large:
        usable = tuple(int(k) for k in ks if k <= len(train))
        raise ValueError(f"ks {too_large} exceed the {len(train)} training samples (a vote cannot use more neighbours "
                         f"than there are); pass ks={usable}" if usable else
                         f"ks {too_large} exceed the {len(train)} training samples; pass ks of at most {len(train)}")
    n_classes = None if multilabel else int(max(train_y.max(), val_y.max()) + 1)

    def score(features, labels, k):
        probs = knn_scores(train, train_y, features, k, temperature, n_classes)
        if multilabel:
            return _f1(labels.astype(int), (probs > 0.5).astype(int), average)
        return float((probs.argmax(1) == labels).mean())

    val_scores = {int(k): score(val, val_y, k) for k in ks}
    best_k = max(val_scores, key=lambda k: (val_scores[k], -k))
    test_score = None if test is None else score(test, test_y, best_k)
    logger.info("kNN sweep %s -> best k=%d (val %.4f, test %s)", val_scores, best_k, val_scores[best_k], test_score)
    return {"metric": "f1" if multilabel else "top1", "val": val_scores, "best_k": best_k,
            "val_best": val_scores[best_k], "test": test_score}
