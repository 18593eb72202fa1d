"""The dense backend: SPEC.md's definition computed with dense masks over every (query, key) pair, from each
token's logical position (:class:`PositionLayout`), for calls of few queries (a decoding step).

It reads no index table and no value on the host: a decoding step is then one graph of plain tensor operations,
which torch.compile fuses and CUDA graphs capture, and keys may lie in any order (a static cache's ring as it is
in memory). Work and memory grow as ``queries * keys``, which is why the kernels serve everything else.

Each (query, key) pair counts once per branch that lets the query see the key (the softmax over the multiset union
of the branches' keys), so the mixed softmax is ``count * exp(s - m) / sum(count * exp(s - m))``, with the row's
largest score ``m`` kept apart: exact at any logit scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dilated_attention_pattern import (
    DilatedPattern,
    PositionLayout,
    SelectedKeys,
    lse_from_max_and_sum,
    statistics_dtype,
)

__all__ = ["dilated_attention_dense", "selected_keys_attention", "visible_counts"]


def visible_counts(pattern: DilatedPattern, layout: PositionLayout, num_heads: int, causal: bool, dtype) -> torch.Tensor:
    """``(B, H, N_q, N_k)``: in how many branches each query sees each key (SPEC.md, "Which keys a query sees")."""
    key_pos, query_pos = layout.key_positions, layout.query_positions
    counts = None
    for branch, (w, r) in enumerate(pattern.branches):
        offsets = torch.tensor(pattern.head_offsets(branch, num_heads), device=key_pos.device)[None, :, None]
        key_in = (((key_pos % w) % r)[:, None, :] == offsets) & layout.key_real[:, None, :]  # (B, H, N_k)
        query_in = (((query_pos % w) % r)[:, None, :] == offsets) & layout.query_real[:, None, :]  # (B, H, N_q)
        sees = (query_pos[:, :, None] // w) == (key_pos[:, None, :] // w)  # same segment, (B, N_q, N_k)
        if causal:
            sees = sees & (key_pos[:, None, :] <= query_pos[:, :, None])
        seen = (query_in[..., None] & key_in[:, :, None, :] & sees[:, None]).to(dtype)
        counts = seen if counts is None else counts + seen
    return counts


def dilated_attention_dense(
    q, k, v, pattern: DilatedPattern, layout: PositionLayout, *, causal: bool, softmax_scale: float, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, N_q, H, D) in q's dtype, lse (B, N_q, H))``, float32 arithmetic for 16-bit inputs."""
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    compute = statistics_dtype(q.dtype)
    # query head h reads key/value head h // group: queries grouped by their key head, (B, H_kv, group * N_q, D)
    grouped_q = q.to(compute).view(batch, num_queries, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    grouped_q = grouped_q.reshape(batch, num_kv_heads, group * num_queries, head_dim)
    scores = grouped_q @ k.to(compute).permute(0, 2, 3, 1)  # (B, H_kv, group * N_q, N_k)
    scores = scores.view(batch, num_heads, num_queries, num_keys) * softmax_scale
    probs, lse = _counted_softmax(scores, visible_counts(pattern, layout, num_heads, causal, compute), dropout_p)
    out = probs.view(batch, num_kv_heads, group * num_queries, num_keys) @ v.to(compute).transpose(1, 2)
    out = out.view(batch, num_kv_heads, group, num_queries, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, num_queries, num_heads, head_dim).to(q.dtype), lse.squeeze(-1).transpose(1, 2)


def selected_keys_attention(
    q, k, v, layout: SelectedKeys, *, softmax_scale: float, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row against candidate keys the pattern chose already (:class:`SelectedKeys`): a softmax over
    the valid ones, 0 where there is none. ``(out (B, 1, H, D), lse (B, 1, H))``."""
    compute = statistics_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * softmax_scale  # (B, H, 1, N_k)
    probs, lse = _counted_softmax(scores, layout.valid[:, :, None, :].to(compute), dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute))
    return out.to(q.dtype), lse.squeeze(-1).transpose(1, 2)


def _counted_softmax(scores, counts, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, lse (..., 1))`` of the softmax in which each entry counts ``counts`` times (0: not seen)."""
    masked = torch.where(counts > 0, scores, float("-inf"))
    row_max = masked.amax(-1, keepdim=True).detach()  # any shift gives the same softmax; this one cannot overflow
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = counts * torch.exp(masked - row_max)
    row_sum = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(row_sum > 0, row_sum, 1.0)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs, lse_from_max_and_sum(row_max, row_sum)
