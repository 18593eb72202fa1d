"""Dilated attention on flash-attn's variable-length kernels (optional backend: ``pip install flash-attn``).

Each branch is gathered into one packed variable-length batch, one sequence per (segment, head) of the branch
(its participating rows, in order), run through ``flash_attn``'s varlen forward, and mixed into the output by
its log-sum-exp. The backward is exact: flash-attn's varlen backward computes ``dS = P * (dP - rowsum(dO * O))``
with ``P = exp(s - LSE)`` from whatever ``O`` and ``LSE`` it is handed, so handing it the *mixed* O and LSE
gives the gradient of the mixture, branch by branch. A gradient on the returned LSE enters through one extra
head-dim column (``v`` = 0, ``O`` = 1, ``dO`` = -dLSE), which shifts ``rowsum(dO * O)`` by exactly -dLSE.

Unlike the Triton backend this one copies the gathered rows (the way other implementations work); it is here
for machines where flash-attn is installed and Triton is not, and as a second opinion on GPUs.
"""

from __future__ import annotations

import torch

from .dilated_attention_pattern import DilatedPattern, TokenLayout, _branch_tables, merge_partial, statistics_dtype

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# A module-level guarded import: transformers' remote-code loader demands every package imported outside a
# try block, even inside a function, so an import in a function body would make flash-attn mandatory there.
try:
    from flash_attn import flash_attn_interface as _flash_attn_interface
except ImportError:
    _flash_attn_interface = None


def _interface():
    if _flash_attn_interface is None:
        raise ImportError("flash-attn is not installed: pip install flash-attn")
    return _flash_attn_interface


def is_available() -> bool:
    try:
        _interface()
    except ImportError:
        return False
    return torch.cuda.is_available()


def _unsupported_reason(q: torch.Tensor, dropout_p: float) -> str | None:
    if not q.is_cuda:
        return f"backend='flash' runs on CUDA tensors, `q` is on {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"backend='flash' takes float16 or bfloat16 `q`/`k`/`v`, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
        return f"backend='flash' needs head_dim a multiple of 8 and at most {MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


def supports(q: torch.Tensor, pattern: DilatedPattern, layout: TokenLayout, dropout_p: float) -> bool:
    return _unsupported_reason(q, dropout_p) is None


def check_supported(q: torch.Tensor, pattern: DilatedPattern, layout: TokenLayout, dropout_p: float) -> None:
    reason = _unsupported_reason(q, dropout_p)
    if reason is not None:
        raise ValueError(reason)


def _packed_tables(layout: TokenLayout, w: int, r: int, offsets, num_heads: int, num_kv_heads: int, device):
    """One varlen batch per branch: the valid rows of the torch backend's (segment, head, j) tables, packed."""
    key = ("flash", w, r, tuple(offsets), num_heads, num_kv_heads, str(device))
    if key not in layout.cache:
        tables = _branch_tables(layout, w, r, offsets, num_heads, num_kv_heads, device)
        q_count = tables.q_valid.sum(-1).flatten()
        k_count = tables.k_valid.sum(-1).flatten()
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        layout.cache[key] = dict(
            q_rows=tables.q_index[tables.q_valid],
            k_rows=tables.k_index[tables.k_valid],
            cu_seqlens_q=torch.cat([zero, q_count.cumsum(0).to(torch.int32)]),
            cu_seqlens_k=torch.cat([zero, k_count.cumsum(0).to(torch.int32)]),
            max_seqlen_q=int(q_count.max()) if q_count.numel() else 0,
            max_seqlen_k=int(k_count.max()) if k_count.numel() else 0,
        )
    return layout.cache[key]


def _branches(pattern, layout, num_heads, num_kv_heads, device):
    for branch, (w, r) in enumerate(pattern.branches):
        packed = _packed_tables(layout, w, r, pattern.head_offsets(branch, num_heads), num_heads, num_kv_heads, device)
        if packed["q_rows"].numel():
            yield branch, packed


class _FlashDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, layout, causal, scale, dropout_p):
        flash = _interface()
        batch, num_queries, num_heads, head_dim = q.shape
        q_flat, k_flat, v_flat = (t.reshape(-1, 1, head_dim) for t in (q, k, v))
        accumulate = statistics_dtype(q.dtype)
        out = torch.zeros(q_flat.shape[0], head_dim, dtype=accumulate, device=q.device)
        lse = torch.full((q_flat.shape[0],), float("-inf"), dtype=accumulate, device=q.device)
        rng_states = {}
        for branch, packed in _branches(pattern, layout, num_heads, k.shape[2], q.device):
            part_out, part_lse, _, rng_states[branch] = flash._flash_attn_varlen_forward(
                q_flat[packed["q_rows"]],
                k_flat[packed["k_rows"]],
                v_flat[packed["k_rows"]],
                packed["cu_seqlens_q"],
                packed["cu_seqlens_k"],
                packed["max_seqlen_q"],
                packed["max_seqlen_k"],
                dropout_p,
                scale,
                causal,
            )
            merge_partial(out, lse, packed["q_rows"], part_out[:, 0].to(accumulate), part_lse[0].to(accumulate))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.layout, ctx.causal, ctx.scale, ctx.dropout_p, ctx.rng_states = (
            pattern, layout, causal, scale, dropout_p, rng_states,
        )
        ctx.set_materialize_grads(False)
        return out.to(q.dtype).view(q.shape), lse.view(batch, num_queries, num_heads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        flash = _interface()
        q, k, v, out, lse = ctx.saved_tensors
        head_dim = q.shape[-1]
        num_heads, num_kv_heads = q.shape[2], k.shape[2]
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        q_flat, k_flat, v_flat, do_flat = (t.reshape(-1, 1, head_dim) for t in (q, k, v, grad_out.to(q.dtype)))
        o_flat = out.to(q.dtype).view(-1, 1, head_dim)
        lse_flat = lse.nan_to_num(neginf=0.0)
        extra = 0
        if grad_lse is not None:
            # one more head-dim column, padded to flash-attn's multiple of 8: v = 0, O = 1, dO = -dLSE
            extra = 8
            pad = lambda t, fill=0.0: torch.nn.functional.pad(t, (0, extra), value=fill)  # noqa: E731
            q_flat, k_flat, v_flat = pad(q_flat), pad(k_flat), pad(v_flat)
            o_flat = torch.cat([o_flat, torch.ones_like(o_flat[..., :1]), torch.zeros_like(o_flat[..., : extra - 1])], -1)
            minus_dlse = (-grad_lse).reshape(-1, 1, 1).to(q.dtype)
            do_flat = torch.cat([do_flat, minus_dlse, torch.zeros_like(do_flat[..., : extra - 1])], -1)
        dq = torch.zeros(q_flat.shape[0], head_dim, dtype=out.dtype, device=q.device)
        dk = torch.zeros(k_flat.shape[0], head_dim, dtype=out.dtype, device=q.device)
        dv = torch.zeros_like(dk)
        for branch, packed in _branches(ctx.pattern, ctx.layout, num_heads, num_kv_heads, q.device):
            q_rows, k_rows = packed["q_rows"], packed["k_rows"]
            part_q, part_k, part_v = q_flat[q_rows], k_flat[k_rows], v_flat[k_rows]
            part_dq, part_dk, part_dv = torch.empty_like(part_q), torch.empty_like(part_k), torch.empty_like(part_v)
            flash._flash_attn_varlen_backward(
                do_flat[q_rows],
                part_q,
                part_k,
                part_v,
                o_flat[q_rows],
                lse_flat[q_rows].unsqueeze(0).contiguous(),
                part_dq,
                part_dk,
                part_dv,
                packed["cu_seqlens_q"],
                packed["cu_seqlens_k"],
                packed["max_seqlen_q"],
                packed["max_seqlen_k"],
                ctx.dropout_p,
                ctx.scale,
                ctx.causal,
                -1,
                -1,
                0.0,
                None,
                False,
                ctx.rng_states[branch],
            )
            dq.index_add_(0, q_rows, part_dq[:, 0, :head_dim].to(dq.dtype))
            dk.index_add_(0, k_rows, part_dk[:, 0, :head_dim].to(dq.dtype))
            dv.index_add_(0, k_rows, part_dv[:, 0, :head_dim].to(dq.dtype))
        return dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype), None, None, None, None, None


def dilated_attention_flash(q, k, v, pattern: DilatedPattern, layout: TokenLayout, *, causal: bool, softmax_scale: float, dropout_p: float):
    return _FlashDilatedAttention.apply(q, k, v, pattern, layout, causal, softmax_scale, dropout_p)
