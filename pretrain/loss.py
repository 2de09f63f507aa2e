"""DINO cross-entropy with dual centering (TerraFM §3.2), or plain DINO centering."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DualCenteringDINOLoss", "CENTERINGS"]

CENTERINGS = ("dual", "dino")
"""Teacher centering modes: ``"dual"`` (TerraFM: c and the frequent-class center c_h mixed by
alpha) and ``"dino"`` (DINO: c alone)."""


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class DualCenteringDINOLoss(nn.Module):
    """DINO loss whose teacher logits are centered by ``alpha * c + (1 - alpha) * c_h``.

    ``c`` is the usual EMA of the mean teacher output; ``c_h`` is the same EMA restricted to
    samples of frequent land-cover classes, so that frequent classes do not dominate the
    centering. Both centers are all-reduced across ranks.

    The centering rule: dual centering needs frequent-class statistics. The teacher is centred
    by the mix only once ``c_h`` holds some, i.e. with ``centering="dual"`` after the first
    frequent-class sample (on any rank) has updated it. Otherwise - ``centering="dino"`` (no
    frequent classes configured), or no frequent sample seen yet - the teacher is centred by
    ``c`` exactly, plain DINO centering: never by ``alpha * c`` against an empty ``c_h``, which
    would under-center by ``1 - alpha``. :attr:`dual_active` tells which applies.

    Parameters
    ----------
    out_dim : int
        Head output size K.
    n_crops : int
        Student views per sample (2 global + J local).
    teacher_temp : numpy array
        Teacher temperature per iteration.
    student_temp, center_momentum, alpha : float
        0.1, 0.9 and 0.8 in the paper (``alpha`` only matters for ``centering="dual"``).
    n_global : int
        Teacher (global) views per sample.
    centering : {"dual", "dino"}
        See :data:`CENTERINGS`.

    Examples
    --------
    >>> import numpy as np
    >>> loss = DualCenteringDINOLoss(8, n_crops=3, teacher_temp=np.full(10, 0.04))
    >>> value = loss(torch.randn(6, 8), torch.randn(4, 8), 0, torch.tensor([True, False]))
    >>> value.ndim, loss.dual_active
    (0, True)
    >>> plain = DualCenteringDINOLoss(8, n_crops=3, teacher_temp=np.full(10, 0.04), centering="dino")
    >>> value = plain(torch.randn(6, 8), torch.randn(4, 8), 0)
    >>> plain.dual_active
    False
    """

    def __init__(self, out_dim: int, n_crops: int, teacher_temp: np.ndarray,
                 student_temp: float = 0.1, center_momentum: float = 0.9, alpha: float = 0.8,
                 n_global: int = 2, centering: str = "dual") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering={centering!r} must be one of {CENTERINGS}: 'dual' needs frequent "
                             "land-cover classes, 'dino' centers the teacher by c alone")
        self.n_crops, self.n_global, self.centering = n_crops, n_global, centering
        self.student_temp, self.center_momentum, self.alpha = student_temp, center_momentum, alpha
        self.teacher_temp = np.asarray(teacher_temp, dtype=np.float64)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_frequent", torch.zeros(1, out_dim))
        # teacher rows (over all ranks and steps) that have fed c_h; 0: c_h holds no statistics
        self.register_buffer("frequent_rows_seen", torch.zeros((), dtype=torch.long))
        self.last_teacher_entropy = float("nan")

    @property
    def dual_active(self) -> bool:
        """Whether the teacher is centred by the dual mix (else by ``c`` alone); reads the device."""
        return self.centering == "dual" and bool(self.frequent_rows_seen > 0)

    def teacher_center(self) -> torch.Tensor:
        """The (1, K) vector subtracted from the teacher logits (see the class docstring)."""
        if self.centering == "dino":
            return self.center
        mix = self.alpha * self.center + (1.0 - self.alpha) * self.center_frequent
        return torch.where(self.frequent_rows_seen > 0, mix, self.center)  # no host sync

    def teacher_probs(self, teacher_out: torch.Tensor, iteration: int) -> torch.Tensor:
        """Softmax of centered, sharpened teacher logits (no gradient)."""
        temp = float(self.teacher_temp[min(iteration, len(self.teacher_temp) - 1)])
        return F.softmax((teacher_out.detach().float() - self.teacher_center()) / temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, iteration: int,
                frequent: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over teacher-global x student-view pairs, skipping identical views.

        ``student_out`` is (n_crops * B, K) view-major, ``teacher_out`` (n_global * B, K),
        ``frequent`` a bool (B,) telling which samples have a frequent land-cover class
        (required for ``centering="dual"``, ignored for ``"dino"``).
        """
        if frequent is None and self.centering == "dual":
            raise ValueError("dual centering needs the per-sample `frequent` mask; pass it, or build the "
                             "loss with centering='dino'")
        probs = self.teacher_probs(teacher_out, iteration)
        self.last_teacher_entropy = float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean())
        teacher_chunks = probs.chunk(self.n_global)
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(self.n_crops)
        total, n_terms = student_out.new_zeros((), dtype=torch.float32), 0
        for iq, q in enumerate(teacher_chunks):
            for v, logp in enumerate(student_logp):
                if v == iq:
                    continue
                total = total + (-q * logp).sum(dim=-1).mean()
                n_terms += 1
        self.update_centers(teacher_out, frequent)
        return total / n_terms

    @torch.no_grad()
    def update_centers(self, teacher_out: torch.Tensor, frequent: torch.Tensor | None = None) -> None:
        """EMA updates of c (all samples) and, for dual centering, c_h (frequent-class samples
        only), across ranks."""
        teacher_out = teacher_out.detach().float()
        dual = self.centering == "dual"
        stats = torch.zeros(2 if dual else 1, teacher_out.shape[1] + 1, device=teacher_out.device)
        stats[0, :-1] = teacher_out.sum(0)
        stats[0, -1] = teacher_out.shape[0]
        if dual:
            rows = frequent.to(teacher_out.device).bool().repeat(self.n_global)
            stats[1, :-1] = teacher_out[rows].sum(0)
            stats[1, -1] = rows.sum()
        _all_reduce(stats)
        m = self.center_momentum
        self.center.mul_(m).add_(stats[0:1, :-1] / stats[0, -1], alpha=1 - m)
        if dual:
            # no frequent sample anywhere in the global batch: c_h unchanged (no host sync)
            n = stats[1, -1]
            update = m * self.center_frequent + (1 - m) * stats[1:2, :-1] / n.clamp_min(1)
            self.center_frequent.copy_(torch.where(n > 0, update, self.center_frequent))
            self.frequent_rows_seen.add_(n.round().long())
