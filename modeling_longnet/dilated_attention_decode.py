"""A decoding step against a LongNetStaticCache's ring in one fused Triton kernel.

One new token per row: in branch (w, r) head h's query at position t sees the positions
``p = t // w * w + o_h + r * j <= t`` of its segment (when ``(t % w) % r == o_h``), at most ``ceil(w / r)`` of
them, and the real token of position p lies in ring slot ``p % slots``. The softmax mixed over the branches by their
denominators is the one softmax over the multiset union of every branch's keys (SPEC.md), so one online softmax
runs over all of them. The model's other path gathers those candidates into new tensors and applies xPos to them
(``cache_longnet.ring_candidates``); at 4K context that took 1.5 ms of a 4.1 ms step on an H100 (the gathers
alone at 0.58 TB/s) and 1.2 ms of casts and xPos (docs/benchmarks.md, run 14). This kernel reads each candidate row
of k and v where it lies, once, and applies xPos in registers: a score is ``sum_d q_d k_d 2^((t' - p) rho_d)``
with ``rho`` xPos's per-dimension decay rates in log2 (``t'`` the query's xPos position), the product of xPos's query and
key factors at any centre, and never above 1 for a key behind its query.

Split over the keys (flash-decoding): a program owns a block of ``BLOCK_N`` consecutive j of one branch for one
(row, head), keeps its largest product q.k (unscaled) and its sum of ``exp2((q.k - max) * scale * log2 e)`` apart,
as the prefill kernels do, and a second launch mixes the blocks of each (row, head) with weights that add up to one.
Blocks past the query (and heads outside a branch) load nothing. Nothing is read on the host: the launches run
inside a CUDA graph (the op is a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` keeps it whole).

Inference only (no gradient): the model takes it for steps without autograd. On a machine without a GPU the kernels
run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set (for tests).
"""

from __future__ import annotations

import math

import torch

from .dilated_attention_pattern import head_offsets
from .triton_support import LOG2E, cdiv, interpreting, tl, triton

__all__ = ["ring_decode_attention", "supports"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Keys per program: 64 rows of k and v (16 KB at D = 64 in 16 bits) leave the paper's pattern about 180 blocks per
# (row, head), enough programs to fill a GPU with one row of 12 heads.
_BLOCK_N = 64
_COMBINE_BLOCK = 256  # blocks the mix reads at once: every block of the paper's pattern (182) in one step


def supports(q: torch.Tensor) -> bool:
    """Whether the fused kernel takes a step whose query is ``q`` ``(batch, 1, heads, head_dim)``: Triton on a CUDA
    GPU of compute capability 8.0 or newer (or its interpreter), a 16- or 32-bit float, ``head_dim`` at most 256,
    and no gradient asked for."""
    if triton is None or q.dtype not in SUPPORTED_DTYPES or q.shape[-1] > MAX_HEAD_DIM or q.shape[1] != 1:
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    if q.is_cuda:
        return torch.cuda.get_device_capability(q.device)[0] >= 8
    return interpreting()


# ----------------------------------------------------------------------------------------------------------
# The pattern as the kernel's compile-time constants
# ----------------------------------------------------------------------------------------------------------


def _pattern_constants(segment_lengths, dilation_rates, offsets: str, num_heads: int, block: int) -> dict:
    """The branches, where each branch's blocks start in the grid's first dimension (one more entry: the end),
    and each branch's head offsets, as tuples: compile-time constants of the kernel (one compiled kernel per
    pattern), so that a launch needs no table in device memory (one allocated during a CUDA graph's capture or
    warm-up would belong to the graph's private pool)."""
    first_blocks = [0]
    for w, r in zip(segment_lengths, dilation_rates):
        first_blocks.append(first_blocks[-1] + cdiv(cdiv(w, r), block))  # ceil(w / r) candidates, in blocks
    return dict(
        SEGMENTS=tuple(segment_lengths),
        RATES=tuple(dilation_rates),
        FIRST_BLOCKS=tuple(first_blocks),
        HEAD_OFFSETS=tuple(tuple(head_offsets(r, num_heads, offsets)) for r in dilation_rates),
        NUM_BRANCHES=len(segment_lengths),
        NUM_HEADS=num_heads,
    )


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ring_decode_block_kernel(
        Q, K, V, QueryPosition, QueryReal, DecayPosition, DecayRates, BlockOut, BlockMax, BlockSum,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        heads_per_kv, slots, num_blocks, scale_log2,
        SEGMENTS: tl.constexpr, RATES: tl.constexpr, FIRST_BLOCKS: tl.constexpr, HEAD_OFFSETS: tl.constexpr,
        NUM_BRANCHES: tl.constexpr, NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DECAY: tl.constexpr,
    ):
        block = tl.program_id(0)
        row_head = tl.program_id(1)
        row = row_head // NUM_HEADS
        head = row_head % NUM_HEADS
        # this block's branch (w, r), its first j, and the head's offset in the branch, from the constants
        w = tl.full((), 1, tl.int64)
        r = tl.full((), 1, tl.int64)
        first_j = tl.full((), 0, tl.int64)
        offset = tl.full((), 0, tl.int64)
        for i in tl.static_range(NUM_BRANCHES):
            inside = (block >= FIRST_BLOCKS[i]) & (block < FIRST_BLOCKS[i + 1])
            w = tl.where(inside, SEGMENTS[i], w)
            r = tl.where(inside, RATES[i], r)
            first_j = tl.where(inside, (block - FIRST_BLOCKS[i]) * BLOCK_N, first_j)
            for h in tl.static_range(NUM_HEADS):
                offset = tl.where(inside & (head == h), HEAD_OFFSETS[i][h], offset)
        t = tl.load(QueryPosition + row).to(tl.int64)
        real = tl.load(QueryReal + row) != 0
        within = t % w
        # the head takes part in this branch iff the query's own row is one of its rows; then it sees j <= last_j
        last_j = tl.where(real & (within % r == offset), (within - offset) // r, -1)
        part = row_head.to(tl.int64) * num_blocks + block
        if first_j <= last_j:
            j = first_j + tl.arange(0, BLOCK_N)
            valid = j <= last_j
            position = t - within + offset + j * r
            slot = position % slots
            d = tl.arange(0, BLOCK_D)
            in_dim = d < HEAD_DIM
            kv_head = (head // heads_per_kv).to(tl.int64)
            tile_mask = valid[:, None] & in_dim[None, :]
            k = tl.load(
                K + row.to(tl.int64) * stride_kb + kv_head * stride_kh + slot[:, None] * stride_ks + d[None, :],
                mask=tile_mask, other=0.0,
            ).to(tl.float32)
            q = tl.load(Q + row.to(tl.int64) * stride_qb + head * stride_qh + d, mask=in_dim, other=0.0).to(tl.float32)
            if DECAY:  # xPos: the key decays by exp(distance * rates_d) per dimension (distance >= 0: causal keys)
                distance = tl.where(valid, tl.load(DecayPosition + row).to(tl.int64) - position, 0).to(tl.float32)
                rates = tl.load(DecayRates + d, mask=in_dim, other=0.0) * 1.4426950408889634  # log2 e
                k = k * tl.exp2(distance[:, None] * rates[None, :])
            products = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
            block_max = tl.max(products, axis=0)  # finite: the block holds at least one key the query sees
            weights = tl.where(valid, tl.exp2((products - block_max) * scale_log2), 0.0)
            v = tl.load(
                V + row.to(tl.int64) * stride_vb + kv_head * stride_vh + slot[:, None] * stride_vs + d[None, :],
                mask=tile_mask, other=0.0,
            ).to(tl.float32)
            tl.store(BlockOut + part * BLOCK_D + d, tl.sum(weights[:, None] * v, axis=0))
            tl.store(BlockMax + part, block_max)
            tl.store(BlockSum + part, tl.sum(weights, axis=0))
        else:  # nothing to read (past the query, or the head is not in this branch): the mix skips the block
            tl.store(BlockMax + part, float("-inf"))

    @triton.jit
    def _ring_decode_mix_kernel(
        BlockOut, BlockMax, BlockSum, Out, stride_ob, stride_oh, num_heads, num_blocks, scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        row_head = tl.program_id(0)
        first = row_head.to(tl.int64) * num_blocks
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        largest = tl.full((), float("-inf"), tl.float32)
        for start in range(0, num_blocks, BLOCK_C):
            maxima = tl.load(BlockMax + first + start + c, mask=start + c < num_blocks, other=float("-inf"))
            largest = tl.maximum(largest, tl.max(maxima, axis=0))
        largest = tl.where(largest == float("-inf"), 0.0, largest)  # no key seen: every weight is 0 below
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, num_blocks, BLOCK_C):
            inside = start + c < num_blocks
            maxima = tl.load(BlockMax + first + start + c, mask=inside, other=float("-inf"))
            factor = tl.where(maxima == float("-inf"), 0.0, tl.exp2((maxima - largest) * scale_log2))
            live = inside & (maxima != float("-inf"))  # an empty block wrote neither its sum nor its output
            total += tl.sum(factor * tl.load(BlockSum + first + start + c, mask=live, other=0.0), axis=0)
            parts = tl.load(BlockOut + (first + start + c)[:, None] * BLOCK_D + d[None, :], mask=live[:, None], other=0.0)
            acc += tl.sum(factor[:, None] * parts, axis=0)
        out = acc / tl.where(total > 0, total, 1.0)
        row = row_head // num_heads
        head = row_head % num_heads
        tl.store(Out + row.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


def _launch(q, key_ring, value_ring, query_positions, query_real, decay_positions, decay_rates,
            segment_lengths, dilation_rates, offsets, softmax_scale):
    batch, _, num_heads, head_dim = q.shape
    slots = key_ring.shape[2] - 1
    constants = _pattern_constants(segment_lengths, dilation_rates, offsets, num_heads, _BLOCK_N)
    num_blocks = constants["FIRST_BLOCKS"][-1]
    block_d = triton.next_power_of_2(head_dim)
    block_out = torch.empty(batch * num_heads * num_blocks, block_d, dtype=torch.float32, device=q.device)
    block_max = torch.empty(batch * num_heads * num_blocks, dtype=torch.float32, device=q.device)
    block_sum = torch.empty_like(block_max)
    decay = decay_rates is not None
    scale_log2 = softmax_scale * LOG2E
    _ring_decode_block_kernel[(num_blocks, batch * num_heads)](
        q, key_ring, value_ring, query_positions, query_real,
        decay_positions if decay else query_positions, decay_rates if decay else block_max,
        block_out, block_max, block_sum,
        q.stride(0), q.stride(2), key_ring.stride(0), key_ring.stride(1), key_ring.stride(2),
        value_ring.stride(0), value_ring.stride(1), value_ring.stride(2),
        num_heads // key_ring.shape[1], slots, num_blocks, scale_log2, **constants,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=_BLOCK_N, DECAY=decay, num_warps=4,
    )
    out = torch.empty_like(q)
    _ring_decode_mix_kernel[(batch * num_heads,)](
        block_out, block_max, block_sum, out, out.stride(0), out.stride(2), num_heads, num_blocks, scale_log2,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_C=min(_COMBINE_BLOCK, triton.next_power_of_2(num_blocks)), num_warps=8,
    )
    return out


@torch.library.custom_op("modeling_longnet::ring_decode_attention", mutates_args=())
def _ring_decode_op(
    q: torch.Tensor,
    key_ring: torch.Tensor,
    value_ring: torch.Tensor,
    query_positions: torch.Tensor,
    query_real: torch.Tensor,
    decay_positions: torch.Tensor | None,
    decay_rates: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    offsets: str,
    softmax_scale: float,
) -> torch.Tensor:
    return _launch(q, key_ring, value_ring, query_positions, query_real, decay_positions, decay_rates,
                   segment_lengths, dilation_rates, offsets, softmax_scale)


@_ring_decode_op.register_fake
def _(q, *args):
    return torch.empty_like(q)


def ring_decode_attention(
    q: torch.Tensor,
    key_ring: torch.Tensor,
    value_ring: torch.Tensor,
    query_positions: torch.Tensor,
    query_real: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    offsets: str = "interleaved",
    softmax_scale: float | None = None,
    decay_rates: torch.Tensor | None = None,
    decay_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal dilated attention of one query per row against a ring of keys: ``(batch, 1, heads, head_dim)``.

    ``q`` ``(batch, 1, heads, head_dim)``; ``key_ring``, ``value_ring`` ``(batch, kv_heads, slots + 1, head_dim)``
    (a :class:`~modeling_longnet.cache_longnet.LongNetStaticCache` layer's buffers, ``slots >=
    max(segment_lengths)``) holding the real token of logical position p in slot ``p % slots`` for every position
    the query may see, itself included; ``query_positions`` ``(batch,)`` the queries' logical positions,
    ``query_real`` ``(batch,)`` which are real (a padding query gets 0). With ``decay_rates`` ``(head_dim,)``
    float32, a key at position p scores ``sum_d q_d k_d exp((decay_positions - p) * decay_rates_d)`` (xPos;
    ``decay_positions`` ``(batch,)``, default ``query_positions``).
    """
    batch, num_queries, num_heads, head_dim = q.shape
    if num_queries != 1 or key_ring.dim() != 4 or key_ring.shape[0] != batch or key_ring.shape[-1] != head_dim or (
        value_ring.shape != key_ring.shape or num_heads % key_ring.shape[1]
    ):
        raise ValueError(
            "ring_decode_attention takes q (batch, 1, heads, head_dim) and rings (batch, kv_heads, slots + 1, "
            f"head_dim) with heads a multiple of kv_heads; got q {tuple(q.shape)}, key_ring {tuple(key_ring.shape)}, "
            f"value_ring {tuple(value_ring.shape)}"
        )
    if key_ring.shape[2] - 1 < max(segment_lengths):
        raise ValueError(
            f"the ring holds {key_ring.shape[2] - 1} slots but a segment spans {max(segment_lengths)} positions: "
            "a ring needs at least max(segment_lengths) slots"
        )
    if key_ring.stride(-1) != 1 or value_ring.stride(-1) != 1:
        raise ValueError("the rings' last dimension (head_dim) must be contiguous")
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"`softmax_scale` must be a positive finite number, got {softmax_scale!r}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if decay_rates is not None:
        decay_rates = decay_rates.to(device=q.device, dtype=torch.float32).contiguous()
        decay_positions = (query_positions if decay_positions is None else decay_positions).reshape(batch).contiguous()
    return _ring_decode_op(
        q, key_ring, value_ring, query_positions.reshape(batch).contiguous(), query_real.reshape(batch).contiguous(),
        decay_positions, decay_rates, [int(w) for w in segment_lengths], [int(r) for r in dilation_rates], offsets, scale,
    )
