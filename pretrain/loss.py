"""DINO cross-entropy with dual centering (TerraFM §3.2)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DualCenteringDINOLoss"]


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class DualCenteringDINOLoss(nn.Module):
    """DINO loss whose teacher logits are centered with ``alpha * c + (1 - alpha) * c_h``.

    ``c`` is the usual EMA of the mean teacher output; ``c_h`` is the same EMA restricted to
    samples of frequent land-cover classes, so that frequent classes do not dominate the
    centering. Both centers are all-reduced across ranks.

    Parameters
    ----------
    out_dim : int
        Head output size K.
    n_crops : int
        Student views per sample (2 global + J local).
    teacher_temp : numpy array
        Teacher temperature per iteration.
    student_temp, center_momentum, alpha : float
        0.1, 0.9 and 0.8 in the paper.

    Examples
    --------
    >>> import numpy as np
    >>> loss = DualCenteringDINOLoss(8, n_crops=3, teacher_temp=np.full(10, 0.04))
    >>> value = loss(torch.randn(6, 8), torch.randn(4, 8), 0, torch.tensor([True, False]))
    >>> value.ndim
    0
    """

    def __init__(self, out_dim: int, n_crops: int, teacher_temp: np.ndarray,
                 student_temp: float = 0.1, center_momentum: float = 0.9, alpha: float = 0.8,
                 n_global: int = 2) -> None:
        super().__init__()
        self.n_crops, self.n_global = n_crops, n_global
        self.student_temp, self.center_momentum, self.alpha = student_temp, center_momentum, alpha
        self.teacher_temp = np.asarray(teacher_temp, dtype=np.float64)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_frequent", torch.zeros(1, out_dim))
        self.last_teacher_entropy = float("nan")

    def teacher_probs(self, teacher_out: torch.Tensor, iteration: int) -> torch.Tensor:
        """Softmax of centered, sharpened teacher logits (no gradient)."""
        temp = float(self.teacher_temp[min(iteration, len(self.teacher_temp) - 1)])
        center = self.alpha * self.center + (1.0 - self.alpha) * self.center_frequent
        return F.softmax((teacher_out.detach().float() - center) / temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, iteration: int,
                frequent: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over teacher-global x student-view pairs, skipping identical views.

        ``student_out`` is (n_crops * B, K) view-major, ``teacher_out`` (n_global * B, K),
        ``frequent`` a bool (B,) telling which samples have a frequent land-cover class.
        """
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
    def update_centers(self, teacher_out: torch.Tensor, frequent: torch.Tensor) -> None:
        """EMA updates of c (all samples) and c_h (frequent-class samples only), across ranks."""
        teacher_out = teacher_out.detach().float()
        stats = torch.zeros(2, teacher_out.shape[1] + 1, device=teacher_out.device)
        stats[0, :-1] = teacher_out.sum(0)
        stats[0, -1] = teacher_out.shape[0]
        rows = frequent.to(teacher_out.device).bool().repeat(self.n_global)
        stats[1, :-1] = teacher_out[rows].sum(0)
        stats[1, -1] = rows.sum()
        _all_reduce(stats)
        m = self.center_momentum
        self.center.mul_(m).add_(stats[0:1, :-1] / stats[0, -1], alpha=1 - m)
        if stats[1, -1] > 0:  # no frequent sample anywhere in the global batch: c_h unchanged
            self.center_frequent.mul_(m).add_(stats[1:2, :-1] / stats[1, -1], alpha=1 - m)
