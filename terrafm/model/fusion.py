"""Cross-attention fusion of modality tokens at every patch position (TerraFM paper, Sec. 3.1).

For ``M`` modality tokens ``Z_n`` at position ``n`` and ``N_q`` shared learned queries ``q``::

    Q = W_q q,  K_n = W_k Z_n,  V_n = W_v Z_n            (W_v = proj1 then norm_input)
    z'_n = MultiHead(Q, K_n, V_n)                        (N_q x D, no output projection)
    w = softmax_j(z'_n[j] . p_r)
    fused_n = sum_j w_j z'_n[j]

computed for all ``B * N`` positions at once, with a key-padding mask for missing modalities.
"""

from __future__ import annotations

import math

import torch
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

    def forward(self, keys: torch.Tensor, values: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse per-position modality tokens.

        Parameters
        ----------
        keys : Tensor (P, M, D)
            Key projections ``W_k Z`` of the modality tokens ``Z`` (patch embedding + modality
            embedding) at ``P`` positions; ``key_proj`` is this module's ``W_k``.
        values : Tensor (P, M, D)
            Their value projections ``W_v Z``.
        valid : bool Tensor (P, M), optional
            Key-padding mask, True where the modality is usable. Positions without any valid
            modality get a zero token.

        Returns
        -------
        Tensor (P, D)
        """
        if valid is not None:
            count = valid.sum(dim=1)
            multi = count > 1
            if not bool(multi.all()):
                # attention only where two or more modalities are valid: elsewhere the output is
                # the single valid value (exactly) or zero, whatever the attention would give
                single = (values * valid.unsqueeze(-1).to(values.dtype)).sum(dim=1)
                out = torch.where((count == 1).unsqueeze(-1), single, torch.zeros_like(single))
                if bool(multi.any()):
                    rows = multi.nonzero().squeeze(1)
                    out = out.index_copy(0, rows, self.forward(keys[rows], values[rows], valid[rows]).to(out.dtype))
                return out
        positions, n_mod, dim = values.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        queries = self.query_proj(self.queries)                          # (Nq, D)
        q = queries.view(self.num_queries, heads, head_dim).transpose(0, 1)  # (H, Nq, hd)
        k = keys.view(positions, n_mod, heads, head_dim).transpose(1, 2)  # (P, H, M, hd)
        v = values.view(positions, n_mod, heads, head_dim).transpose(1, 2)
        mask = None
        if valid is not None:
            any_valid = valid.any(dim=1, keepdim=True)
            # rows with no valid key attend to everything (finite) and are zeroed below
            safe = valid | ~any_valid
            mask = safe.view(positions, 1, 1, n_mod)
        # attention over M <= 3 keys written out: a fused attention kernel's per-(position, head)
        # set-up costs more than these few products at B*N positions (forward and backward)
        scores = torch.einsum("hqd,phmd->phqm", q, k) * head_dim ** -0.5  # (P, H, Nq, M)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attended = scores.softmax(dim=-1).to(v.dtype) @ v                # (P, H, Nq, hd)
        attended = attended.transpose(1, 2).reshape(positions, self.num_queries, dim)
        weights = torch.softmax(attended @ self.score.to(attended.dtype), dim=-1)  # (P, Nq)
        fused = torch.einsum("pq,pqd->pd", weights, attended)

        if valid is None:
            if n_mod == 1:
                return values[:, 0]
            return fused
        count = valid.sum(dim=1)
        single = (values * valid.unsqueeze(-1).to(values.dtype)).sum(dim=1)
        fused = torch.where((count == 1).unsqueeze(-1), single, fused)
        return torch.where((count == 0).unsqueeze(-1), torch.zeros_like(fused), fused)
