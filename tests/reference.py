"""Brute-force dilated attention, written from SPEC.md alone: dense masks, float64, autograd for gradients.

Deliberately shares no code with the package: every backend is checked against this.
"""

from __future__ import annotations

import math

import torch


def logical_positions(batch, num_keys, attention_mask=None, cu_seqlens=None, position_offset=None):
    """(document id, logical position) of every key; document -1 marks padding."""
    doc = torch.zeros(batch, num_keys, dtype=torch.long)
    pos = torch.zeros(batch, num_keys, dtype=torch.long)
    if cu_seqlens is not None:
        cu = [int(c) for c in cu_seqlens]
        for d in range(len(cu) - 1):
            for p in range(cu[d], cu[d + 1]):
                doc[0, p] = d
                pos[0, p] = p - cu[d]
        return doc, pos
    offset = [0] * batch
    if position_offset is not None:
        offset = [int(o) for o in torch.as_tensor(position_offset).expand(batch)]
    for b in range(batch):
        t = offset[b]
        for p in range(num_keys):
            if attention_mask is None or attention_mask[b, p]:
                pos[b, p] = t
                t += 1
            else:
                doc[b, p] = -1
    return doc, pos


def head_offset(h, r, num_heads, mode):
    if mode == "interleaved":
        return h % r
    return h // math.ceil(num_heads / r)


def allowed_mask(segment_lengths, dilation_rates, num_heads, num_queries, doc, pos, causal, offsets):
    """(branches, B, H, N_q, N_k) bool: which key each query sees in each branch."""
    batch, num_keys = doc.shape
    q_doc, q_pos = doc[:, num_keys - num_queries :], pos[:, num_keys - num_queries :]
    masks = []
    for w, r in zip(segment_lengths, dilation_rates):
        per_head = []
        for h in range(num_heads):
            o = head_offset(h, r, num_heads, offsets)
            k_in = ((pos % w) % r == o) & (doc >= 0)
            q_in = ((q_pos % w) % r == o) & (q_doc >= 0)
            m = q_in[:, :, None] & k_in[:, None, :]
            m &= q_doc[:, :, None] == doc[:, None, :]
            m &= (q_pos[:, :, None] // w) == (pos[:, None, :] // w)
            if causal:
                m &= pos[:, None, :] <= q_pos[:, :, None]
            per_head.append(m)
        masks.append(torch.stack(per_head, dim=1))
    return torch.stack(masks)


def reference_dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, causal=False, softmax_scale=None, offsets="interleaved",
    attention_mask=None, cu_seqlens=None, position_offset=None, return_lse=False,
):
    """Softmax over the multiset union of the branches' keys, computed densely; with ``return_lse``, also its
    log-sum-exp (B, N_q, H), -inf where a query sees nothing."""
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    doc, pos = logical_positions(batch, num_keys, attention_mask, cu_seqlens, position_offset)
    allowed = allowed_mask(segment_lengths, dilation_rates, num_heads, num_queries, doc, pos, causal, offsets)
    allowed = allowed.permute(1, 2, 3, 0, 4).reshape(batch, num_heads, num_queries, -1)  # keys of all branches
    group = num_heads // num_kv_heads
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)  # (B, H, N_k, D)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    branches = len(segment_lengths)
    scores = (q.transpose(1, 2) @ kh.transpose(-1, -2) * scale).repeat(1, 1, 1, branches)
    any_key = allowed.any(-1, keepdim=True)
    # rows that see nothing get finite fillers, so that neither the value nor the gradient turns into NaN
    filled = torch.where(allowed, scores, torch.where(any_key, float("-inf"), 0.0))
    # exp(s - max) over its sum: exact at any logit scale (exp(s - logsumexp) is not: the rounding of a large
    # log-sum-exp comes back as a factor on every entry)
    largest = filled.amax(-1, keepdim=True).detach().nan_to_num(neginf=0.0)
    unnormalised = torch.where(allowed, torch.exp(filled - largest), 0.0)
    total = unnormalised.sum(-1, keepdim=True)
    probs = unnormalised / torch.where(total > 0, total, 1.0)
    lse = largest + torch.log(torch.where(total > 0, total, 1.0))
    out = (probs @ vh.repeat(1, 1, branches, 1)).transpose(1, 2)
    if not return_lse:
        return out
    return out, torch.where(any_key, lse, float("-inf")).squeeze(-1).transpose(1, 2)
