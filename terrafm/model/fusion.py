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

import contextlib
import math
from typing import Iterator

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
        self._reused_queries: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reusing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.score, std=1.0 / math.sqrt(self.dim))
        for linear in (self.query_proj, self.key_proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    @torch.no_grad()
    def set_masked_mean(self) -> "CrossAttentionFusion":
        """Set the parameters so that the fusion is the mean of the valid modalities' values.

        Zero queries and query projection give ``Q = 0`` and zero key projection ``K = 0``, so
        every attention logit is 0 whatever the tokens and each query attends uniformly to the
        valid modalities: ``z'_n[j] = mean_m V_m`` for every ``j``. A zero score vector makes
        the query weights ``softmax(0) = 1/N_q`` without reading the values. Hence
        ``fused_n = mean over valid m of V_m``, to float rounding (a few ulp); one valid
        modality: exactly its value; none: zero. Used for checkpoints without fusion parameters
        (the public release).

        All-zero queries and keys are a fixed point of gradient descent (each one's gradient is
        proportional to the other): to train a fusion, start from :meth:`reset_parameters`.

        Examples
        --------
        >>> fusion = CrossAttentionFusion(dim=8, num_queries=5, num_heads=2).set_masked_mean()
        >>> values = torch.tensor([[[1.0] * 8, [3.0] * 8, [100.0] * 8]])
        >>> fusion(torch.randn(1, 3, 8), values, torch.tensor([[True, True, False]]))[0, :3].tolist()
        [2.0, 2.0, 2.0]
        """
        for tensor in (self.queries, self.score, self.query_proj.weight, self.query_proj.bias,
                       self.key_proj.weight, self.key_proj.bias):
            tensor.zero_()
        return self

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
        if not self._reusing or dtype is not None:
            return self._token_queries(dtype)
        if self._reused_queries is None:
            self._reused_queries = self._token_queries(None)
        return self._reused_queries

    def _token_queries(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        heads, head_dim = self.num_heads, self.dim // self.num_heads

        def cast(t):
            return t if dtype is None else t.to(dtype)

        q = F.linear(cast(self.queries), cast(self.query_proj.weight), cast(self.query_proj.bias))
        q = q.view(self.num_queries, heads, head_dim).transpose(0, 1) * head_dim ** -0.5  # (H, Nq, hd)
        weight = torch.matmul(q, cast(self.key_proj.weight).view(heads, head_dim, self.dim))
        bias = torch.matmul(q, cast(self.key_proj.bias).view(heads, head_dim, 1))
        return weight.reshape(heads * self.num_queries, self.dim), bias.reshape(-1)

    @contextlib.contextmanager
    def reuse_token_queries(self) -> Iterator[None]:
        """Compute :meth:`token_queries` once for the whole block and reuse it.

        For several forward passes with the same parameters, e.g. the global and the local
        crops of one training step (``pretrain.head.DINONetwork``): the map is built once and
        its gradient accumulates from every use. Do not change the parameters inside the block.

        Examples
        --------
        >>> fusion = CrossAttentionFusion(dim=32, num_queries=5, num_heads=4)
        >>> with fusion.reuse_token_queries():
        ...     fusion.token_queries()[0] is fusion.token_queries()[0]
        True
        """
        if self._reusing:   # nested: the outer block owns the map
            yield
            return
        self._reusing = True
        try:
            yield
        finally:
            self._reusing, self._reused_queries = False, None

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
        n_mod = valid.shape[0] if valid is not None else values.shape[0] // batch
        if n_mod == 1 and valid is None:
            return values
        return _FusePositions.apply(values, logits, self.score, index, valid, batch,
                                    self.num_heads, self.num_queries)

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


class _FusePositions(torch.autograd.Function):
    """The fusion after the linear maps, with a hand-written backward.

    Per position, modality ``m``, head ``h`` and query ``j`` (``L`` the logits, ``V`` the
    values, ``p`` the score vector)::

        a[m,h,j] = softmax_m L[m,h,j]            (invalid modalities masked)
        s[m,h]   = V[m,h] . p_h
        t[j]     = sum_{m,h} a[m,h,j] s[m,h]     (= z'_j . p)
        w        = softmax_j t
        c[m,h]   = sum_j w[j] a[m,h,j]
        fused_h  = sum_m c[m,h] V[m,h]

    The attention arrays are laid out (M, H, N_q, positions): with the positions innermost
    every product and reduction runs over long contiguous rows (with (.., H, N_q) innermost
    they run over rows of 4-5 elements, several times slower). The backward runs the steps in
    reverse on the same arrays, in fewer operations than autograd would record.
    """

    @staticmethod
    def forward(ctx, values, logits, score, index, valid, batch, heads, n_q):
        n_rows, n_pos, dim = values.shape
        n_mod = valid.shape[0] if valid is not None else n_rows // batch
        dtype, hq, positions = values.dtype, heads * n_q, batch * n_pos
        per_head = values.view(n_rows, n_pos, heads, dim // heads)
        score_h = score.to(dtype).view(heads, dim // heads)
        packed = torch.cat([logits.to(dtype), (per_head * score_h).sum(-1)], dim=-1)   # (R, N, HQ + H)
        dense = _to_dense(packed, index, n_mod * batch).view(n_mod, positions, hq + heads)
        dense = dense.transpose(1, 2).contiguous()                           # (M, HQ + H, P)
        logit, head_score = dense[:, :hq].view(n_mod, heads, n_q, positions), dense[:, hq:]
        fixed = None
        if valid is not None:
            valid = valid.view(n_mod, positions)
            # an invalid modality is ignored where another one is valid; where none is, all
            # are attended (finite) and the output is zeroed below
            logit = logit.masked_fill((~valid & valid.any(dim=0))[:, None, None], float("-inf"))
            fixed = valid.sum(dim=0) <= 1                                      # (P,)
        attn = logit.softmax(dim=0)                                          # (M, H, N_q, P)
        weight = (attn * head_score[:, :, None]).sum(dim=(0, 1)).softmax(dim=0)  # (N_q, P)
        coef = (attn * weight).sum(dim=2)                                    # (M, H, P)
        if fixed is not None:   # one valid modality: exactly its value; none: zero
            coef = torch.where(fixed, valid[:, None].to(dtype), coef)
        coef_rows = _to_rows(coef.transpose(1, 2).reshape(n_mod * batch, n_pos, heads), index)
        weighted = (per_head * coef_rows[..., None]).view(n_rows, n_pos, dim)
        batch_rows = None if index is None else index % batch
        if index is None:
            fused = weighted.view(n_mod, batch, n_pos, dim).sum(dim=0)
        else:   # rows added in packed (modality) order, like the sum above
            fused = weighted.new_zeros((batch, n_pos, dim)).index_add_(0, batch_rows, weighted)
        ctx.save_for_backward(values, score_h, attn, weight, head_score, coef_rows, index, batch_rows, fixed)
        ctx.shape = (n_mod, batch, heads, n_q, logits.dtype, score.dtype)
        return fused

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        values, score_h, attn, weight, head_score, coef_rows, index, batch_rows, fixed = ctx.saved_tensors
        n_mod, batch, heads, n_q, logits_dtype, score_dtype = ctx.shape
        n_rows, n_pos, dim = values.shape
        hq, positions = heads * n_q, batch * n_pos
        per_head = values.view(n_rows, n_pos, heads, dim // heads)
        grad = grad.to(values.dtype)
        if index is None:
            grad_rows = grad.unsqueeze(0).expand(n_mod, batch, n_pos, dim).reshape(n_rows, n_pos, dim)
        else:
            grad_rows = grad.index_select(0, batch_rows)
        grad_rows = grad_rows.view(n_rows, n_pos, heads, dim // heads)
        grad_values = grad_rows * coef_rows[..., None]                        # through fused = c V
        grad_coef = _to_dense((grad_rows * per_head).sum(-1), index, n_mod * batch)
        grad_coef = grad_coef.view(n_mod, positions, heads).transpose(1, 2)   # (M, H, P)
        if fixed is not None:
            grad_coef = grad_coef.masked_fill(fixed, 0.0)
        grad_coef = grad_coef[:, :, None]
        grad_weight = (grad_coef * attn).sum(dim=(0, 1))                     # (N_q, P)
        grad_t = weight * (grad_weight - (weight * grad_weight).sum(dim=0, keepdim=True))
        grad_attn = grad_coef * weight + grad_t * head_score[:, :, None]      # (M, H, N_q, P)
        grad_score_h = (grad_t * attn).sum(dim=2)                             # (M, H, P)
        grad_logit = attn * (grad_attn - (attn * grad_attn).sum(dim=0, keepdim=True))
        packed = torch.cat([grad_logit.view(n_mod, hq, positions), grad_score_h], dim=1)
        packed = _to_rows(packed.transpose(1, 2).reshape(n_mod * batch, n_pos, hq + heads), index)
        grad_logits, grad_s = packed[..., :hq], packed[..., hq:]
        grad_values = grad_values + grad_s[..., None] * score_h
        grad_score = (grad_s[..., None] * per_head).sum(dim=(0, 1)).reshape(dim)
        return (grad_values.view(n_rows, n_pos, dim), grad_logits.to(logits_dtype),
                grad_score.to(score_dtype), None, None, None, None, None)


def _to_dense(rows: torch.Tensor, index: torch.Tensor | None, n_dense: int) -> torch.Tensor:
    """(R, ...) packed rows -> (n_dense, ...), zero where a (modality, batch row) pair is not packed."""
    if index is None:
        return rows
    return rows.new_zeros((n_dense,) + rows.shape[1:]).index_copy_(0, index, rows)


def _to_rows(dense: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return dense if index is None else dense.index_select(0, index)
