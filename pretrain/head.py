"""DINO projection head and the student / EMA-teacher pair around a TerraFM backbone."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "DINONetwork", "build_student_teacher", "ema_update"]


class DINOHead(nn.Module):
    """MLP (``n_layers`` linear, GELU, no batch norm) -> bottleneck -> L2 norm -> weight-normed last layer.

    Examples
    --------
    >>> head = DINOHead(64, out_dim=128, hidden_dim=32, bottleneck_dim=16)
    >>> head(torch.randn(4, 64)).shape
    torch.Size([4, 128])
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, n_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer  # DINO: a fixed-norm last layer is more stable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DINONetwork(nn.Module):
    """A TerraFM backbone followed by a :class:`DINOHead` on the CLS token."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs, masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Head outputs for one batch ``(inputs, masks)``, or for a list of ``(inputs, masks)``
        groups (e.g. global and local crops, which differ in size) concatenated along the batch,
        in one call so that DDP sees a single forward."""
        if isinstance(inputs, (list, tuple)):
            # the fusion's query map depends on the parameters only: built once for all groups
            with self.backbone.reuse_fusion_queries():
                return torch.cat([self.head(self.backbone(i, m).cls) for i, m in inputs])
        return self.head(self.backbone(inputs, masks).cls)


def build_student_teacher(model_name: str, head_kwargs: dict, drop_path_rate: float = 0.1,
                          **model_overrides) -> tuple[DINONetwork, DINONetwork]:
    """Student (with drop path) and teacher (same architecture, no drop path, no gradients).

    The teacher starts as an exact copy of the student. Both backbones initialise from the
    global torch RNG (``create_model(seed=None)``), so the run's seed decides the start. Both
    run the exact layer-by-layer stem (``fold_for_inference`` stays off): the teacher's weights
    change at every EMA step, so a folded stem would be refolded at every step. Run the teacher
    under ``torch.no_grad()``.

    Examples
    --------
    >>> s, t = build_student_teacher("terrafm_tiny", dict(out_dim=32, hidden_dim=16, bottleneck_dim=8))
    >>> any(p.requires_grad for p in t.parameters())
    False
    """
    from terrafm.model import create_model

    student_backbone = create_model(model_name, seed=None, drop_path_rate=drop_path_rate, **model_overrides)
    teacher_backbone = create_model(model_name, seed=None, drop_path_rate=0.0, **model_overrides)
    student = DINONetwork(student_backbone, DINOHead(student_backbone.embed_dim, **head_kwargs))
    teacher = DINONetwork(teacher_backbone, copy.deepcopy(student.head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (one
    multi-tensor lerp over all parameters).

    Examples
    --------
    >>> teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = teacher.weight.fill_(1.0), student.weight.fill_(0.0)
    >>> ema_update(teacher, student, 0.996)
    >>> round(teacher.weight.item(), 6)
    0.996
    """
    targets = list(teacher.parameters())
    sources = [s.detach().to(t.dtype) for t, s in zip(targets, student.parameters())]
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)  # one pass: t + (1 - m) (s - t)
