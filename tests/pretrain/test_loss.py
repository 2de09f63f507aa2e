"""DINO loss with dual centering against float64 hand computations of its formulas."""

import numpy as np
import pytest
import torch

from pretrain.loss import DualCenteringDINOLoss


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_loss_matches_float64_hand_computation():
    rng = np.random.default_rng(0)
    batch, k, n_crops = 3, 5, 4
    student = rng.normal(size=(n_crops * batch, k))
    teacher = rng.normal(size=(2 * batch, k))
    c, c_h = rng.normal(size=(1, k)) * 0.1, rng.normal(size=(1, k)) * 0.1
    temps = np.linspace(0.04, 0.06, 10)
    loss = DualCenteringDINOLoss(k, n_crops, temps, student_temp=0.1, alpha=0.8)
    loss.center.copy_(torch.tensor(c, dtype=torch.float32))
    loss.center_frequent.copy_(torch.tensor(c_h, dtype=torch.float32))
    value = loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32),
                 4, torch.tensor([True, False, True]))

    q = _softmax((teacher - (0.8 * c + 0.2 * c_h)) / temps[4])
    logp = _log_softmax(student / 0.1)
    terms = []
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue  # same view: skipped
            qs = q[iq * batch:(iq + 1) * batch]
            ls = logp[v * batch:(v + 1) * batch]
            terms.append(np.mean(-(qs * ls).sum(-1)))
    assert len(terms) == 2 * n_crops - 2
    assert value.item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_center_updates_follow_their_formulas():
    rng = np.random.default_rng(1)
    batch, k = 4, 6
    teacher = rng.normal(size=(2 * batch, k))
    frequent = np.array([True, False, False, True])
    loss = DualCenteringDINOLoss(k, 2, np.full(3, 0.04), center_momentum=0.9)
    c0, ch0 = rng.normal(size=(1, k)), rng.normal(size=(1, k))
    loss.center.copy_(torch.tensor(c0))
    loss.center_frequent.copy_(torch.tensor(ch0))
    loss.update_centers(torch.tensor(teacher, dtype=torch.float32), torch.tensor(frequent))
    rows = np.tile(frequent, 2)  # both global views of each sample
    expected_c = 0.9 * c0 + 0.1 * teacher.mean(0, keepdims=True)
    expected_ch = 0.9 * ch0 + 0.1 * teacher[rows].mean(0, keepdims=True)
    np.testing.assert_allclose(loss.center.numpy(), expected_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss.center_frequent.numpy(), expected_ch, rtol=1e-5, atol=1e-6)
    # no frequent sample: c_h stays, c still moves
    before = loss.center_frequent.clone()
    loss.update_centers(torch.tensor(teacher, dtype=torch.float32), torch.zeros(batch, dtype=torch.bool))
    assert torch.equal(loss.center_frequent, before)


def test_dual_center_mix_is_used_for_teacher_probabilities():
    k = 4
    loss = DualCenteringDINOLoss(k, 2, np.full(2, 0.05), alpha=0.8)
    loss.center.fill_(1.0)
    loss.center_frequent.fill_(-1.0)
    loss.center[0, 0] = 3.0
    logits = torch.zeros(2, k)
    probs = loss.teacher_probs(logits, 0).double().numpy()
    mix = 0.8 * loss.center.double().numpy() + 0.2 * loss.center_frequent.double().numpy()
    np.testing.assert_allclose(probs, _softmax(np.repeat(-mix / 0.05, 2, 0)), rtol=1e-6)
