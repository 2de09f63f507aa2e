"""Schedule arrays at known epochs (paper recipe), computed by hand."""

import math

import numpy as np
import pytest

from pretrain.config import load_config
from pretrain.schedules import build_schedules, cosine_schedule


def test_paper_schedules_at_known_epochs():
    cfg = load_config("vitb_paper")
    o = cfg.optim
    ipe = 10  # iterations per epoch (a small stand-in: the values depend on epoch fractions)
    s = build_schedules(o, o.epochs, ipe, o.batch_size)
    peak = 1e-4 * 1024 / 256
    assert all(len(v) == 150 * ipe for v in s.values())
    assert s["lr"][0] == 0.0
    assert s["lr"][15 * ipe] == pytest.approx(peak / 2)           # half-way through warm-up
    assert s["lr"][30 * ipe] == pytest.approx(peak)               # end of warm-up: the peak
    mid = 30 * ipe + (120 * ipe) // 2                              # half-way through the cosine
    assert s["lr"][mid] == pytest.approx((peak + 1e-6) / 2)
    assert s["lr"][-1] == pytest.approx(1e-6, abs=1e-7)
    assert s["wd"][0] == pytest.approx(0.04)
    assert s["wd"][75 * ipe] == pytest.approx(0.22)                # (0.04 + 0.4) / 2
    assert s["momentum"][0] == pytest.approx(0.996)
    assert s["momentum"][75 * ipe] == pytest.approx(0.998)
    assert s["momentum"][-1] == pytest.approx(1.0, abs=1e-8)
    assert s["teacher_temp"][0] == pytest.approx(0.04)
    assert s["teacher_temp"][25 * ipe] == pytest.approx(0.05)
    assert s["teacher_temp"][50 * ipe] == pytest.approx(0.06)
    assert s["teacher_temp"][-1] == pytest.approx(0.06)


def test_cosine_formula_at_arbitrary_iteration():
    s = cosine_schedule(2.0, 0.5, epochs=7, iters_per_epoch=3, warmup_epochs=2)
    i = 6 + 4  # 4 iterations into the 15-iteration cosine
    assert s[i] == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi * 4 / 15)))
    assert np.all(np.diff(s[:6]) > 0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.0, epochs=3, iters_per_epoch=1, warmup_epochs=5)
