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
    loss.frequent_rows_seen.fill_(1)  # c_h holds frequent-class statistics
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
    assert int(loss.frequent_rows_seen) == 2 * frequent.sum()
    # no frequent sample: c_h and its count stay, c still moves
    before, c_before = loss.center_frequent.clone(), loss.center.clone()
    loss.update_centers(torch.tensor(teacher, dtype=torch.float32), torch.zeros(batch, dtype=torch.bool))
    assert torch.equal(loss.center_frequent, before) and int(loss.frequent_rows_seen) == 4
    assert not torch.equal(loss.center, c_before)


def test_dual_center_mix_is_used_for_teacher_probabilities():
    k = 4
    loss = DualCenteringDINOLoss(k, 2, np.full(2, 0.05), alpha=0.8)
    loss.center.fill_(1.0)
    loss.center_frequent.fill_(-1.0)
    loss.center[0, 0] = 3.0
    loss.frequent_rows_seen.fill_(4)
    logits = torch.zeros(2, k)
    probs = loss.teacher_probs(logits, 0).double().numpy()
    mix = 0.8 * loss.center.double().numpy() + 0.2 * loss.center_frequent.double().numpy()
    np.testing.assert_allclose(probs, _softmax(np.repeat(-mix / 0.05, 2, 0)), rtol=1e-6)


def _centering_case(seed=2, batch=3, k=6, n_crops=4):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(n_crops * batch, k))
    teacher = 0.1 * rng.normal(size=(2 * batch, k))
    c = 0.25 * rng.normal(size=(1, k))  # (c - 0.8 c) / temp ~ 1 logit: 0.8 c is far from c
    return student, teacher, c


def _expected_loss(student, teacher, center, temp, batch, n_crops):
    q = _softmax((teacher - center) / temp)
    logp = _log_softmax(student / 0.1)
    terms = [np.mean(-(q[iq * batch:(iq + 1) * batch] * logp[v * batch:(v + 1) * batch]).sum(-1))
             for iq in range(2) for v in range(n_crops) if v != iq]
    return q, np.mean(terms)


@pytest.mark.parametrize("how", ["dino", "dual_without_frequent_statistics"])
def test_without_frequent_classes_the_teacher_is_centred_by_c_exactly(how):
    """Plain DINO centering: softmax((t - c) / temp), not the 0.8 c that dual centering would
    give against an empty c_h."""
    batch, k, n_crops = 3, 6, 4
    student, teacher, c = _centering_case(batch=batch, k=k, n_crops=n_crops)
    temps = np.full(5, 0.05)
    loss = DualCenteringDINOLoss(k, n_crops, temps, alpha=0.8, centering="dino" if how == "dino" else "dual")
    loss.center.copy_(torch.tensor(c, dtype=torch.float32))
    c32 = loss.center.double().numpy()
    probs = loss.teacher_probs(torch.tensor(teacher, dtype=torch.float32), 0).double().numpy()
    expected, expected_loss = _expected_loss(student, teacher, c32, 0.05, batch, n_crops)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    under_centred = _softmax((teacher - 0.8 * c32) / 0.05)
    assert np.abs(probs - under_centred).max() > 0.1  # the test tells c from 0.8 c
    assert not loss.dual_active
    frequent = None if how == "dino" else torch.zeros(batch, dtype=torch.bool)
    value = loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32), 0, frequent)
    assert value.item() == pytest.approx(expected_loss, rel=1e-5)
    assert torch.equal(loss.center_frequent, torch.zeros(1, k)) and int(loss.frequent_rows_seen) == 0


def test_dual_centering_starts_once_a_frequent_sample_was_seen():
    batch, k = 2, 5
    _, teacher, c = _centering_case(seed=3, batch=batch, k=k)
    loss = DualCenteringDINOLoss(k, 2, np.full(3, 0.05), alpha=0.8, center_momentum=0.9)
    loss.center.copy_(torch.tensor(c, dtype=torch.float32))
    t = torch.tensor(teacher, dtype=torch.float32)
    loss.update_centers(t, torch.tensor([False, True]))
    assert loss.dual_active and int(loss.frequent_rows_seen) == 2
    c_now, ch_now = loss.center.double().numpy(), loss.center_frequent.double().numpy()
    np.testing.assert_allclose(ch_now, 0.1 * teacher[[1, 3]].mean(0, keepdims=True), rtol=1e-5, atol=1e-6)
    probs = loss.teacher_probs(t, 0).double().numpy()
    np.testing.assert_allclose(probs, _softmax((teacher - (0.8 * c_now + 0.2 * ch_now)) / 0.05), rtol=1e-5, atol=1e-7)


def test_centering_mode_is_checked_and_dual_needs_the_frequent_mask():
    with pytest.raises(ValueError, match="centering='none' must be one of \\('dual', 'dino'\\)"):
        DualCenteringDINOLoss(4, 2, np.full(2, 0.04), centering="none")
    loss = DualCenteringDINOLoss(4, 2, np.full(2, 0.04))
    with pytest.raises(ValueError, match="per-sample `frequent` mask"):
        loss(torch.zeros(4, 4), torch.zeros(4, 4), 0)
    state = loss.state_dict()
    assert set(state) == {"center", "center_frequent", "frequent_rows_seen"}  # checkpointed with the run
