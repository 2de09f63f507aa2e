"""Cross-attention fusion of modality tokens at every patch position (TerraFM paper, Sec. 3.1).

For ``M`` modality tokens ``Z_n`` at position ``n`` and ``N_q`` shared learned queries ``q``::

    Q = W_q q,  K_n = W_k Z_n,  V_n = W_v Z_n            (W_v = proj1 then norm_input)
    z'_n = MultiHead(Q, K_n, V_n)                        (N_q x D, no output projection)
    w = softmax_j(z'_n[j] . p_r)
    fused_n = sum_j w_j z'_n[j]

computed for all positions at once, with a key-padding mask for missing modalities.

Two identities keep this cheap. The keys only ever meet the queries, and
``Q_hj . (W_k z + b_k)_h = (W_k,h^T Q_hj) . z + Q_hj . b_k,h``: the attention logits of every
head ``h`` and query ``j`` are one ``(H N_q x D)`` map of the token (:meth:`token_queries`)
instead of a ``(D x D)`` key projection of every token. And ``z'_n[j]`` is, per head, a
weighted mean of the values, so ``fused_n`` is too: per head and modality one coefficient
``sum_j w_j a_hjm`` (with ``z'_n[j] . p_r`` computed from the per-head products ``V_m,h . p_r,h``),
and the ``N_q x D`` attended tokens are never formed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttentionFusion"]


class CrossAttentionFusion(nn.Module):
    """Fuse a variable set of modality tokens into one token per position.

    Parameters
    ----------
    dim : int
        Token width (``attn_dim``).
    num_queries : int
        Number of learned queries ``N_q``.
    num_heads : int
        Attention heads; must divide ``dim``.

    Notes
    -----
    With exactly one valid modality at a position, every query attends to it with weight 1,
    so the fused token *is* that modality's value; it is returned exactly (not as a sum of
    weights that add up to 1 only up to rounding), which keeps single-modality outputs
    bit-identical to the released single-modality path.

    Examples
    --------
    >>> fusion = CrossAttentionFusion(dim=32, num_queries=5, num_heads=4)
    >>> tokens, values = torch.randn(10, 3, 32), torch.randn(10, 3, 32)
    >>> valid = torch.ones(10, 3, dtype=torch.bool)
    >>> valid[0, 1:] = False  # position 0: one valid modality -> its value, exactly
    >>> fused = fusion(tokens, values, valid)
    >>> fused.shape, torch.equal(fused[0], values[0, 0])
    (torch.Size([10, 32]), True)
    """

    def __init__(self, dim: int, num_queries: int = 5, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_queries, self.num_heads = dim, num_queries, num_heads
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim)
        self.score = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.score, std=1.0 / math.sqrt(self.dim))
        for linear in (self.query_proj, self.key_proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def token_queries(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected queries moved through ``key_proj`` into token space.

        ``F.linear(z, weight, bias)[..., h * N_q + j]`` is the scaled attention logit
        ``Q_hj . (W_k z + b_k)_h / sqrt(head_dim)`` of head ``h`` and query ``j`` for a modality
        token ``z`` (patch embedding + modality embedding).

        Parameters
        ----------
        dtype : torch.dtype, optional
            Compute in this dtype (e.g. float64 to fold the map into a stem).

        Returns
        -------
        weight : Tensor (H * N_q, D)
        bias : Tensor (H * N_q,)
        """
        heads, head_dim = self.num_heads, self.dim // self.num_heads

        def cast(t):
            return t if dtype is None else t.to(dtype)

        q = F.linear(cast(self.queries), cast(self.query_proj.weight), cast(self.query_proj.bias))
        q = q.view(self.num_queries, heads, head_dim).transpose(0, 1) * head_dim ** -0.5  # (H, Nq, hd)
        weight = torch.matmul(q, cast(self.key_proj.weight).view(heads, head_dim, self.dim))
        bias = torch.matmul(q, cast(self.key_proj.bias).view(heads, head_dim, 1))
        return weight.reshape(heads * self.num_queries, self.dim), bias.reshape(-1)

    def _score_map(self, dtype: torch.dtype) -> torch.Tensor:
        """(D, H) block-diagonal map: ``v @ map`` gives the per-head products ``v_h . p_r,h``."""
        heads = self.num_heads
        eye = torch.eye(heads, dtype=dtype, device=self.score.device)
        return (self.score.to(dtype).view(heads, -1, 1) * eye.view(heads, 1, heads)).reshape(self.dim, heads)

    def combine(self, values: Sequence[torch.Tensor], logits: Sequence[torch.Tensor],
                rows: Sequence[torch.Tensor | None], valid: torch.Tensor | None,
                batch: int) -> torch.Tensor:
        """Fuse per-modality values that were computed only on the rows holding each modality.

        Parameters
        ----------
        values : sequence of Tensor (n_m, N, D)
            Values ``W_v Z`` of modality ``m`` on its ``n_m`` rows.
        logits : sequence of Tensor (n_m, N, H * N_q)
            ``F.linear(Z, *self.token_queries())`` on the same rows.
        rows : sequence of (long Tensor (n_m,) or None)
            The batch rows of each modality; None for all ``batch`` rows.
        valid : bool Tensor (batch, N, M), optional
            Key-padding mask, True where the modality is usable; a modality's rows outside
            ``rows[m]`` must be False. None: every modality valid everywhere.
        batch : int

        Returns
        -------
        Tensor (batch, N, D)
            Positions with one valid modality hold its value exactly; none valid, zero.
        """
        n_mod = len(values)
        if n_mod == 1 and valid is None and rows[0] is None:
            return values[0]
        n_pos, dim = values[0].shape[1], values[0].shape[2]
        heads, n_q, dtype = self.num_heads, self.num_queries, values[0].dtype
        score_map = self._score_map(dtype)
        # (batch, N, H, N_q, M) attention logits and (batch, N, H, M) value . p_r per head
        logit = torch.stack([_put_rows(x, r, batch) for x, r in zip(logits, rows)], dim=-1)
        logit = logit.to(dtype).view(batch, n_pos, heads, n_q, n_mod)
        head_scores = torch.stack([_put_rows(v @ score_map, r, batch) for v, r in zip(values, rows)], dim=-1)
        if valid is not None:
            # positions without a valid modality attend to all (finite) and are zeroed below
            usable = valid | ~valid.any(dim=-1, keepdim=True)
            logit = logit.masked_fill(~usable[:, :, None, None, :], float("-inf"))
        attn = logit.softmax(dim=-1)
        # z'_j . p_r, summed over modalities first: a masked modality adds exact zeros
        query_logit = (attn * head_scores.unsqueeze(3)).sum(dim=-1).sum(dim=2)      # (batch, N, N_q)
        weights = query_logit.softmax(dim=-1)
        coef = (attn * weights[:, :, None, :, None]).sum(dim=3)                      # (batch, N, H, M)
        if valid is not None:
            count = valid.sum(dim=-1)
            coef = torch.where((count <= 1)[:, :, None, None], valid[:, :, None, :].to(dtype), coef)
        elif n_mod == 1:
            coef = torch.ones_like(coef)
        fused = None
        for m, (v, r) in enumerate(zip(values, rows)):
            c = coef[..., m] if r is None else coef[..., m].index_select(0, r)       # (n_m, N, H)
            part = (v.view(v.shape[0], n_pos, heads, dim // heads) * c.unsqueeze(-1)).view(v.shape[0], n_pos, dim)
            if r is None:
                fused = part if fused is None else fused + part
            else:
                base = part.new_zeros((batch, n_pos, dim)) if fused is None else fused
                fused = base.index_add(0, r, part)
        return fused

    def forward(self, tokens: torch.Tensor, values: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse per-position modality tokens.

        Parameters
        ----------
        tokens : Tensor (P, M, D)
            Modality tokens ``Z`` (patch embedding + modality embedding) at ``P`` positions;
            the keys are this module's ``key_proj`` of them.
        values : Tensor (P, M, D)
            Their value projections ``W_v Z``.
        valid : bool Tensor (P, M), optional
            Key-padding mask, True where the modality is usable. Positions without any valid
            modality get a zero token.

        Returns
        -------
        Tensor (P, D)
        """
        n_mod = values.shape[1]
        logits = F.linear(tokens, *self.token_queries(tokens.dtype))
        fused = self.combine([values[None, :, m] for m in range(n_mod)], [logits[None, :, m] for m in range(n_mod)],
                             [None] * n_mod, None if valid is None else valid[None], 1)
        return fused[0]


def _put_rows(rows_tensor: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Place the ``rows`` of a ``batch``-row tensor (zero elsewhere); ``rows`` None: all rows."""
    if rows is None:
        return rows_tensor
    full = rows_tensor.new_zeros((batch,) + tuple(rows_tensor.shape[1:]))
    return full.index_copy(0, rows, rows_tensor)
