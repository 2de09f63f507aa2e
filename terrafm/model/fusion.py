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

    def combine(self, values: torch.Tensor, logits: torch.Tensor, index: torch.Tensor | None,
                valid: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Fuse modality values computed only on the (modality, batch row) pairs that need them.

        Parameters
        ----------
        values : Tensor (R, N, D)
            Values ``W_v Z`` of ``R`` packed rows, modality-major (all rows of the first
            modality, then the next...), ``N`` positions each.
        logits : Tensor (R, N, H * N_q)
            ``F.linear(Z, *self.token_queries())`` of the same rows.
        index : long Tensor (R,), optional
            ``m * batch + b`` for the packed row of modality ``m`` and batch row ``b``; None when
            the rows are every modality on every batch row, in order (``R = M * batch``).
        valid : bool Tensor (M, batch, N), optional
            Key-padding mask, True where the modality is usable; False wherever a (modality,
            row) pair is not packed. None: every modality valid everywhere.
        batch : int

        Returns
        -------
        Tensor (batch, N, D)
            Positions with one valid modality hold its value exactly; none valid, zero.
        """
        n_rows, n_pos, dim = values.shape
        n_mod = valid.shape[0] if valid is not None else n_rows // batch
        if n_mod == 1 and valid is None:
            return values
        heads, n_q, dtype = self.num_heads, self.num_queries, values.dtype

        def modality_major(x):  # (R, ...) -> (M, batch, ...), zero where a pair is not packed
            if index is not None:
                x = x.new_zeros((n_mod * batch,) + x.shape[1:]).index_copy(0, index, x)
            return x.view((n_mod, batch) + x.shape[1:])

        logit = modality_major(logits.to(dtype)).view(n_mod, batch, n_pos, heads, n_q)
        head_scores = modality_major(values @ self._score_map(dtype))          # (M, batch, N, H)
        if valid is not None:
            # an invalid modality is ignored where another one is valid; where none is, all
            # are attended (finite) and the output is zeroed below
            ignored = ~valid & valid.any(dim=0)
            logit = logit.masked_fill(ignored[..., None, None], float("-inf"))
        attn = logit.softmax(dim=0)                                           # (M, batch, N, H, N_q)
        # z'_j . p_r, summed over modalities first: an ignored modality adds exact zeros
        query_logit = (attn * head_scores.unsqueeze(-1)).sum(dim=0).sum(dim=2)  # (batch, N, N_q)
        coef = (attn * query_logit.softmax(dim=-1)[:, :, None, :]).sum(dim=-1)  # (M, batch, N, H)
        if valid is not None:
            one_or_none = valid.sum(dim=0) <= 1
            coef = torch.where(one_or_none[..., None], valid[..., None].to(dtype), coef)
        coef = coef.reshape(n_mod * batch, n_pos, heads)
        if index is not None:
            coef = coef.index_select(0, index)
        weighted = (values.view(n_rows, n_pos, heads, dim // heads) * coef.unsqueeze(-1)).view(n_rows, n_pos, dim)
        if index is None:
            return weighted.view(n_mod, batch, n_pos, dim).sum(dim=0)
        # rows added in packed (modality) order, like the sum above
        return weighted.new_zeros((batch, n_pos, dim)).index_add(0, index % batch, weighted)

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
        logits = F.linear(tokens, *self.token_queries(tokens.dtype))
        fused = self.combine(values.transpose(0, 1).contiguous(), logits.transpose(0, 1).contiguous(), None,
                             None if valid is None else valid.T[:, None], 1)
        return fused[0]
