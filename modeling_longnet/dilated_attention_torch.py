"""The PyTorch backend of dilated attention: the readable one, and the reference the fused kernels are held to.

It gathers every (segment, head) of a branch into a short dense problem, in chunks, so its memory grows
linearly with the sequence length, and it has an exact backward built like a flash-attention backward. It runs
on any device and dtype; the entry point ``dilated_attention`` has checked its arguments.
"""

from __future__ import annotations

import torch

from .dilated_attention_pattern import (
    DilatedPattern,
    TokenLayout,
    _branch_tables,
    _BranchTables,
    lse_from_max_and_sum,
    merge_partial_max_sum,
    softmax_entries,
    statistics_dtype,
)


# For one branch (w, r), every (segment, head) holds the positions t = s*w + o(h) + j*r, j = 0, 1, ...; the
# queries of that (segment, head) attend exactly those keys (causally: the ones with j not larger). Gathering
# them gives a small dense attention per (segment, head). We build, once per layout and branch, the flat row
# index of every gathered query and key, run the dense problems a chunk at a time, and merge each branch into
# the running output with its log-sum-exp, as a flash-attention kernel merges key blocks.

# Elements of one chunk's score matrix. Peak memory is a few of these (scores, probabilities, masks) on top of
# the inputs, outputs and the per-branch gathered keys and values.
_CHUNK_ELEMENTS = 1 << 23


def _chunks(tables: _BranchTables):
    """(segment slice, query-row slice) pairs whose score matrices hold about _CHUNK_ELEMENTS elements."""
    num_segments, num_heads, q_len = tables.q_index.shape
    k_len = tables.k_index.shape[2]
    per_row = max(1, num_heads * k_len)
    rows = max(1, _CHUNK_ELEMENTS // per_row)
    if rows >= q_len:
        segments = max(1, rows // max(q_len, 1))
        for s in range(0, num_segments, segments):
            yield slice(s, min(s + segments, num_segments)), slice(0, q_len)
    else:
        for s in range(num_segments):
            for j in range(0, q_len, rows):
                yield slice(s, s + 1), slice(j, min(j + rows, q_len))


def _dropout_keep(shape, seed: int, branch: int, chunk: int, dropout_p: float, device) -> torch.Tensor:
    # One generator per (branch, chunk), so that the backward pass redraws the same mask without replaying
    # the forward's order.
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + branch * 65_537 + chunk) % (1 << 63))
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _gather(x_flat, index):
    return x_flat.index_select(0, index.reshape(-1)).view(*index.shape, x_flat.shape[-1])


_SCORE_BIAS_BYTES = 1 << 28  # cached score biases per branch and forward pass, at most (256 MB)


def _score_bias(tables: _BranchTables, segs: slice, rows: slice, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(s, H, lq, Lk) of one chunk: 0 where the query may see the key (both real, and causal order), else -inf."""
    key = (causal, segs.start, segs.stop, rows.start, rows.stop, dtype)
    bias = tables.score_bias.get(key)
    if bias is not None:
        return bias
    allowed = tables.k_valid[segs].unsqueeze(-2) & tables.q_valid[segs, :, rows].unsqueeze(-1)
    if causal:
        allowed = allowed & (tables.k_position[segs].unsqueeze(-2) <= tables.q_position[segs, :, rows].unsqueeze(-1))
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    size = bias.numel() * bias.element_size()
    if tables.score_bias_bytes + size <= _SCORE_BIAS_BYTES:
        tables.score_bias[key] = bias
        tables.score_bias_bytes += size
    return bias


def _scores(q_rows, k_rows, tables, segs, rows, causal, scale):
    """Scores (s, H, lq, Lk) of one chunk, -inf where the query may not see the key: ``scale q k^T + bias`` in one
    batched product."""
    bias = _score_bias(tables, segs, rows, causal, q_rows.dtype)
    s, h, lq, d = q_rows.shape
    lk = k_rows.shape[2]
    scores = torch.baddbmm(
        bias.reshape(s * h, lq, lk), q_rows.reshape(s * h, lq, d), k_rows.reshape(s * h, lk, d).transpose(1, 2), alpha=scale
    )
    return scores.view(s, h, lq, lk)


class _TorchDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, layout, causal, scale, dropout_p):
        batch, num_queries, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[2]
        compute = statistics_dtype(q.dtype)
        q_flat = q.reshape(-1, head_dim)
        k_flat = k.reshape(-1, head_dim)
        v_flat = v.reshape(-1, head_dim)
        rows_total = q_flat.shape[0]
        # one spare row at the end receives the writes of padding entries of the gather tables
        out = torch.zeros(rows_total + 1, head_dim, dtype=compute, device=q.device)
        row_max = torch.full((rows_total + 1,), float("-inf"), dtype=compute, device=q.device)
        row_sum = torch.zeros(rows_total + 1, dtype=compute, device=q.device)
        seed = int(torch.randint(0, 1 << 62, (1,))) if dropout_p > 0 else 0

        for branch, (w, r) in enumerate(pattern.branches):
            tables = _branch_tables(layout, w, r, pattern.head_offsets(branch, num_heads), num_heads, num_kv_heads, q.device)
            if tables.q_index.numel() == 0:
                continue
            for chunk, (segs, rows) in enumerate(_chunks(tables)):
                q_rows = _gather(q_flat, tables.q_index[segs, :, rows]).to(compute)
                k_rows = _gather(k_flat, tables.k_index[segs]).to(compute)
                v_rows = _gather(v_flat, tables.k_index[segs]).to(compute)
                scores = _scores(q_rows, k_rows, tables, segs, rows, causal, scale)
                # a chunk's largest score and its sum of exp(score - largest): normalised by the sum, so that the
                # weights add up to one at any logit scale
                chunk_max = scores.amax(-1)
                probs = torch.exp(scores - chunk_max.nan_to_num(neginf=0.0).unsqueeze(-1))
                chunk_sum = probs.sum(-1)
                if dropout_p > 0:
                    keep = _dropout_keep(probs.shape, seed, branch, chunk, dropout_p, q.device)
                    probs = probs * (keep.to(compute) / (1.0 - dropout_p))  # the backward's factor, to the last bit
                # divided by the sum after the product: a row's scale commutes with it and costs lq x D, not lq x Lk
                chunk_out = torch.matmul(probs, v_rows) / torch.where(chunk_sum > 0, chunk_sum, 1.0).unsqueeze(-1)
                target = torch.where(tables.q_valid[segs, :, rows], tables.q_index[segs, :, rows], rows_total)
                merge_partial_max_sum(
                    out, row_max, row_sum, target.reshape(-1), chunk_out.reshape(-1, head_dim),
                    chunk_max.reshape(-1), chunk_sum.reshape(-1),
                )

        out, row_max, row_sum = out[:rows_total], row_max[:rows_total], row_sum[:rows_total]
        lse = lse_from_max_and_sum(row_max, row_sum)
        result = out.to(q.dtype).view(batch, num_queries, num_heads, head_dim)
        ctx.save_for_backward(q, k, v, out, row_max, row_sum)
        ctx.pattern, ctx.layout, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = pattern, layout, causal, scale, dropout_p, seed
        ctx.set_materialize_grads(False)
        return result, lse.view(batch, num_queries, num_heads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, row_max, row_sum = ctx.saved_tensors
        pattern, layout, causal, scale, dropout_p = ctx.pattern, ctx.layout, ctx.causal, ctx.scale, ctx.dropout_p
        head_dim = q.shape[-1]
        num_heads, num_kv_heads = q.shape[2], k.shape[2]
        compute = out.dtype
        q_flat = q.reshape(-1, head_dim)
        k_flat = k.reshape(-1, head_dim)
        v_flat = v.reshape(-1, head_dim)
        if grad_out is None:
            grad_out = torch.zeros(q.shape, dtype=compute, device=q.device)
        do_flat = grad_out.reshape(-1, head_dim).to(compute)
        # rowsum(dO * O): the softmax-Jacobian term shared by every branch. A gradient on the LSE enters the same
        # way with the opposite sign, since d LSE / d s = P.
        delta = (do_flat * out).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.reshape(-1).to(compute)
        dq = torch.zeros(q_flat.shape, dtype=compute, device=q.device)
        dk = torch.zeros(k_flat.shape, dtype=compute, device=q.device)
        dv = torch.zeros(v_flat.shape, dtype=compute, device=q.device)
        finite_max = row_max.nan_to_num(neginf=0.0)
        safe_sum = torch.where(row_sum > 0, row_sum, 1.0)

        for branch, (w, r) in enumerate(pattern.branches):
            tables = _branch_tables(layout, w, r, pattern.head_offsets(branch, num_heads), num_heads, num_kv_heads, q.device)
            if tables.q_index.numel() == 0:
                continue
            for chunk, (segs, rows) in enumerate(_chunks(tables)):
                q_idx = tables.q_index[segs, :, rows]
                k_idx = tables.k_index[segs]
                q_rows = _gather(q_flat, q_idx).to(compute)
                k_rows = _gather(k_flat, k_idx).to(compute)
                v_rows = _gather(v_flat, k_idx).to(compute)
                do_rows = _gather(do_flat, q_idx)
                scores = _scores(q_rows, k_rows, tables, segs, rows, causal, scale)
                # The mixed softmax's entries are exp(s - max) / sum, exact at any logit scale (see
                # merge_partial_max_sum), and 0 where the bias is -inf (so d_scores needs no mask). The row factor
                # 1 / sum (at most 1) and the softmax scale go onto the small operands (do, q) and the small
                # results (dq): a row's scale commutes with the products and costs lq x D instead of lq x Lk.
                probs = softmax_entries(scores, finite_max[q_idx].unsqueeze(-1))
                row_scale = (1.0 / safe_sum[q_idx]).unsqueeze(-1)
                d_probs = torch.matmul(do_rows, v_rows.transpose(-1, -2))
                if dropout_p > 0:
                    keep = _dropout_keep(probs.shape, ctx.seed, branch, chunk, dropout_p, q.device).to(compute) / (1.0 - dropout_p)
                    dv_rows = torch.matmul((probs * keep).transpose(-1, -2), do_rows * row_scale)
                    d_probs = d_probs * keep
                else:
                    dv_rows = torch.matmul(probs.transpose(-1, -2), do_rows * row_scale)
                d_scores = d_probs.sub_(delta[q_idx].unsqueeze(-1)).mul_(probs)  # times scale / sum, applied below
                grad_scale = row_scale * scale
                dq.index_add_(0, q_idx.reshape(-1), (torch.matmul(d_scores, k_rows) * grad_scale).reshape(-1, head_dim))
                dk.index_add_(0, k_idx.reshape(-1), torch.matmul(d_scores.transpose(-1, -2), q_rows * grad_scale).reshape(-1, head_dim))
                dv.index_add_(0, k_idx.reshape(-1), dv_rows.reshape(-1, head_dim))

        return dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype), None, None, None, None, None


def dilated_attention_torch(q, k, v, pattern: DilatedPattern, layout: TokenLayout, *, causal: bool, softmax_scale: float, dropout_p: float):
    return _TorchDilatedAttention.apply(q, k, v, pattern, layout, causal, softmax_scale, dropout_p)
