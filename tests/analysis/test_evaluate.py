import math

import numpy as np
import pytest

from analysis_helpers import bigearthnet_features
from terrafm.evaluate import PAPER_KS, knn, knn_scores


def test_hand_computed_votes():
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    classes = np.array([0, 1, 1, 0])
    # query (2, 0): cosine sims 1, 0.8, 0, 0.6 -> k=3 neighbours are rows 0, 1, 3
    probs = knn_scores(train, classes, np.array([[2.0, 0.0]]), k=3, temperature=0.07)
    w = [math.exp(1 / 0.07), math.exp(0.8 / 0.07), math.exp(0.6 / 0.07)]
    assert probs[0, 0] == pytest.approx((w[0] + w[2]) / sum(w), rel=1e-6)
    assert probs[0, 1] == pytest.approx(w[1] / sum(w), rel=1e-6)
    # with T = 1 the far neighbour matters much more
    probs_t1 = knn_scores(train, classes, np.array([[2.0, 0.0]]), k=3, temperature=1.0)
    w1 = [math.e ** 1, math.e ** 0.8, math.e ** 0.6]
    assert probs_t1[0, 1] == pytest.approx(w1[1] / sum(w1), rel=1e-6)


def test_matches_sklearn_neighbours_for_uniform_weights():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 12))
    labels = rng.integers(0, 4, 300)
    query = rng.normal(size=(80, 12))
    for k in (3, 10, 30):
        ours = knn_scores(train, labels, query, k=k, temperature=1e9, batch_size=17)
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train, labels)
        np.testing.assert_allclose(ours, ref.predict_proba(query), atol=1e-6)


def test_sweep_picks_best_k_on_validation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6))
    y = (x[:, 0] + 0.8 * rng.normal(size=400) > 0).astype(int)  # noisy labels: larger k helps
    result = knn(x[:200], y[:200], x[200:300], y[200:300], x[300:], y[300:])
    assert set(result["val"]) == set(PAPER_KS)
    manual = {k: float((knn_scores(x[:200], y[:200], x[200:300], k).argmax(1) == y[200:300]).mean()) for k in PAPER_KS}
    assert result["val"] == pytest.approx(manual)
    assert result["val_best"] == max(manual.values()) and manual[result["best_k"]] == result["val_best"]
    assert result["test"] == pytest.approx(
        float((knn_scores(x[:200], y[:200], x[300:], result["best_k"]).argmax(1) == y[300:]).mean()))
    assert result["metric"] == "top1"


def test_multilabel_f1_on_bigearthnet_patches():
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier

    feats, _, labels = bigearthnet_features()
    vocab = sorted({c for patch in labels for c in patch})
    multi_hot = np.array([[c in patch for c in vocab] for patch in labels], dtype=int)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    split = ((rows // 2 + cols // 2) % 2).ravel()  # 2x2-block checkerboard
    x = feats.reshape(len(labels), 64, -1)
    y = np.repeat(multi_hot[:, None], 64, 1)
    train = (x[:, split == 0].reshape(-1, 8), y[:, split == 0].reshape(-1, len(vocab)))
    val = (x[:, split == 1].reshape(-1, 8), y[:, split == 1].reshape(-1, len(vocab)))
    result = knn(*train, *val, ks=(3, 5, 10))
    assert result["metric"] == "f1"
    ref = KNeighborsClassifier(n_neighbors=result["best_k"], metric="cosine").fit(*train).predict(val[0])
    ref_f1 = f1_score(val[1], ref, average="micro")
    assert result["val_best"] > 0.8 and abs(result["val_best"] - ref_f1) < 0.05
    shuffled = np.random.default_rng(0).permutation(len(train[1]))
    assert knn(train[0], train[1][shuffled], *val, ks=(10,))["val_best"] < result["val_best"] - 0.2


def test_bad_input():
    with pytest.raises(ValueError, match="one class"):
        knn(np.ones((5, 3)), np.zeros(5, int), np.ones((2, 3)), np.zeros(2, int))
    with pytest.raises(ValueError, match="NaN"):
        knn_scores(np.full((3, 2), np.nan), np.array([0, 1, 1]), np.ones((1, 2)), k=2)
