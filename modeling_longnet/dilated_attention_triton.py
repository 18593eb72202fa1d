"""Fused Triton kernels for dilated attention: the forward pass and its exact gradient, computed in place.

The function is the one of ``dilated_attention.py`` (SPEC.md). Public implementations gather every branch into new
tensors, run a dense attention kernel per branch and scatter the result back; these kernels read the rows of q, k,
v (and o, dO) where they lie instead. For branch (w, r), head h with offset o(h), the rows of one (segment, head)
are the key positions ``segment start + o(h) + j * r``, j = 0, 1, ...: in the index j they form a short dense
attention (causal iff ``j_key <= j_query``), and the kernel reaches row j through the row stride ``r * stride``.
Each row is ``D`` contiguous elements, so every row load is coalesced.

Forward, one launch per branch: a program owns a block of query rows of one (document segment, head), runs the
online softmax over the keys of that segment, and merges its result into the running output. Each row keeps its
largest product q.k (unscaled) and its sum of exponentials ``exp2((q.k - max) * scale * log2 e)`` apart (never one
rounded log-sum-exp, which at logits of 1e9 would carry an error of e^64 into the weights), and mixes by weights
that add up to one, so the output stays a convex combination of value rows at any logit scale. A branch writes each (position, head) at most once, so the
merge needs no atomics; a branch with r = 1 covers every query and runs last, writing the final output in the
input dtype (and, where every query is a real token, the LSE: the forward is then one launch per branch and one
copy that starts the row statistics).

Backward, one launch per branch, exact (no ``no_grad`` shortcut): ``P = exp(s - max) / sum`` with the *merged*
row maximum and sum is exactly the mixed softmax's entry, so ``dS = P * (dP - delta)``, ``delta = rowsum(dO * O)
- dLSE``, as in a flash-attention backward; the kernels take exp(s - max) (at most 1, and the forward's exponent
bit for bit: the same product, less the same maximum, times the same scale) with dO and delta divided by the
row's sum, which leaves dV and dS unchanged. Programs that own a block of keys (one kv-head, all the query
heads of its group that share those key rows, so grouped-query attention needs no atomics for dK, dV) accumulate
dK, dV over the query blocks. dQ is formed one of two ways (``BackwardConfig.dq_mode``): other programs own a block of queries and
recompute S and dP to accumulate dQ over the key blocks (7 matrix products per tile pair, deterministic), or the
dK/dV programs also form dS K and add it to a float32 dQ buffer (5 products; FlashAttention-2's scheme), with TMA
reduce-adds of whole tiles on Hopper (a reduce-add may not start before its descriptor's first row, so those query
steps start at the first query row). Additions arrive in any order, so ``torch.use_deterministic_algorithms(True)``
selects recomputation. dK, dV (and a recomputed dQ) have one writer per row and launch, so the sum over branches is
a plain read-add-write between launches; the r = 1 branch runs first and, when it covers every row, stores without
reading. For 16-bit inputs that sum is kept in the gradient's own dtype (each branch's contribution is summed in
float32 first); a row touched by k branches carries k roundings instead of one (bfloat16 gradients measured within
3e-3 of float32, see docs/benchmarks.md).

Launch order: branches cannot share a launch as long as each adds into rows the others write, so each launch ends
with a tail of long programs on few SMs. Heads can: for large problems the kv heads are split into two groups, each
running its branches on its own CUDA stream in a rotated order, so that one group's programs fill the other's
tails (``ForwardConfig.head_groups``; about 4% at N = 128K, docs/triton_notes.md). For small problems the backward
runs every branch in one launch instead, adding dK and dV atomically into float32 buffers as it does dQ
(``BackwardConfig.group_branches``; on an H100 8K took 1.28 -> 1.00 ms, docs/benchmarks.md run 14). The forward
done so, each branch into a float32 slot of its own and one merge launch after, measured slower at every size.

Tiles of rows can be loaded through Hopper's tensor-memory accelerator: a (segment, head) is an arithmetic
progression of rows, which one descriptor per program and tensor describes (row stride ``r * stride``), built on
the device; Triton then needs an allocator for the descriptors' scratch, and these kernels lend torch's caching
allocator when none is set. Rows that are not 16-byte aligned fall back to pointer loads.

Any :class:`TokenLayout` works: padding, packed documents and KV-cache decoding (fewer queries than keys) become
per-branch lists of (document, segment) work items, built once per layout and kept in ``layout.cache``.

Dropout draws a Philox number per (branch, work item, head, query j, key j): the backward regenerates the same mask
from the seed, which is drawn from torch's default CPU generator (``torch.manual_seed`` makes it reproducible).

Precision: 16-bit inputs run the matrix products in their dtype with float32 accumulation; float32 inputs run them
in full float32 (``input_precision="ieee"``, not tf32), which is exact to float32 rounding but slower. float64
inputs are left to the PyTorch backend.

On a machine without a GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
this module is imported (the tests do this); that is for testing only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch

from .triton_support import LOG2E, cdiv, interpreting, tl, triton

__all__ = ["check_supported", "dilated_attention_triton", "is_available", "supports"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    """Triton is installed and can run: on a CUDA GPU, or under the interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def _unsupported_reason(q: torch.Tensor, pattern, layout, dropout_p: float) -> str | None:
    if triton is None:
        return "backend='triton' needs the `triton` package"
    if q.dtype not in SUPPORTED_DTYPES:
        return (
            f"backend='triton' supports q/k/v of dtype float16, bfloat16 or float32, got {q.dtype}; "
            "use backend='torch' (float64 is the reference precision)"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"backend='triton' supports head_dim in {SUPPORTED_HEAD_DIMS}, got head_dim={q.shape[-1]}; use backend='torch'"
    if q.is_cuda:
        major, _ = _capability(q.device)
        if major < 8:
            return f"backend='triton' needs a GPU of compute capability 8.0 or newer, got {major}.x; use backend='torch'"
    elif not interpreting():
        return f"backend='triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), got a tensor on {q.device}"
    return None


_CAPABILITIES: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, asked of the driver once per device (2-3 us a call, twice per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _CAPABILITIES.get(index)
    if capability is None:
        capability = _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return capability


def supports(q: torch.Tensor, pattern, layout, dropout_p: float) -> bool:
    """Whether these kernels take this call; ``backend="auto"`` falls back to the PyTorch path when they don't."""
    return _unsupported_reason(q, pattern, layout, dropout_p) is None


def check_supported(q: torch.Tensor, pattern, layout, dropout_p: float) -> None:
    """Raises a ValueError naming what these kernels cannot take."""
    reason = _unsupported_reason(q, pattern, layout, dropout_p)
    if reason is not None:
        raise ValueError(reason)


# ----------------------------------------------------------------------------------------------------------
# Work items: the (document, segment) pairs of a branch, computed once per layout
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _BranchPlan:
    """What one branch's launches need, built once per (layout, branch) and kept in ``layout.cache``.

    Work item i is one segment of one document that holds queries: batch row ``item_row[i]``; ``item_base[i]``,
    the physical key index of the segment's logical start (negative when a document starts mid-segment); and,
    relative to that start, where its keys begin, where its queries begin, and where both end. A head with offset
    o reads rows ``j`` with ``lo <= o + j * r < end``.
    """

    dilation_rate: int
    item_row: torch.Tensor  # int32 (items,)
    item_base: torch.Tensor  # int64 (items,)
    item_key_lo: torch.Tensor  # int32 (items,)
    item_query_lo: torch.Tensor  # int32 (items,)
    item_end: torch.Tensor  # int32 (items,)
    max_rows: int  # an upper bound on the rows j of any (item, head)
    head_offset: torch.Tensor  # int32 (H,)
    # Query heads grouped by (kv head, offset): the heads of one class read the same key rows, so one backward
    # program sums their dK/dV contributions in registers and no two programs write the same rows.
    class_kv_head: torch.Tensor  # int32 (classes,)
    class_size: torch.Tensor  # int32 (classes,)
    class_heads: torch.Tensor  # int32 (classes, group), padded with 0
    # classes are ordered by kv head: those of kv heads [a, b) are classes [kv_head_first_class[a], ...[b])
    kv_head_first_class: tuple[int, ...]

    @property
    def num_items(self) -> int:
        return int(self.item_row.numel())

    @property
    def num_classes(self) -> int:
        return int(self.class_kv_head.numel())


def _branch_plan(layout, w: int, r: int, offsets: list[int], num_heads: int, num_kv_heads: int, device) -> _BranchPlan:
    key = ("triton", w, r, tuple(offsets), num_heads, num_kv_heads, str(device))
    if key in layout.cache:
        return layout.cache[key]
    first, start, length = layout.doc_first_position, layout.doc_start, layout.doc_length
    # logical range of each document's queries: they are the last `num_queries` key positions of the row
    query_first = first + (layout.query_begin - start).clamp(min=0)
    end = first + length
    has_queries = query_first < end
    first_segment = torch.div(query_first, w, rounding_mode="floor")
    segment_count = torch.where(has_queries, torch.div(end - 1, w, rounding_mode="floor") - first_segment + 1, 0)
    doc = torch.repeat_interleave(torch.arange(len(segment_count)), segment_count)
    segment = first_segment[doc] + torch.arange(len(doc)) - torch.repeat_interleave(
        torch.cumsum(segment_count, 0) - segment_count, segment_count
    )
    segment_start = segment * w
    item_end = torch.minimum(segment_start + w, end[doc]) - segment_start
    item_key_lo = torch.clamp(first[doc] - segment_start, min=0)
    item_query_lo = torch.clamp(query_first[doc] - segment_start, min=0)
    item_base = segment_start - first[doc] + start[doc]
    max_rows = -(-int(item_end.max()) // r) if len(doc) else 0

    group = num_heads // num_kv_heads
    classes: dict[tuple[int, int], list[int]] = {}
    for h in range(num_heads):
        classes.setdefault((h // group, offsets[h]), []).append(h)
    class_heads = torch.zeros(len(classes), group, dtype=torch.int32)
    for c, heads in enumerate(classes.values()):
        class_heads[c, : len(heads)] = torch.tensor(heads, dtype=torch.int32)
    class_kv = [kv for kv, _ in classes]  # nondecreasing: heads were visited in order
    kv_head_first_class = tuple(sum(kv < j for kv in class_kv) for j in range(num_kv_heads + 1))

    def to_device(x, dtype=torch.int32):
        return x.to(dtype).to(device)

    plan = _BranchPlan(
        dilation_rate=r,
        item_row=to_device(layout.doc_row[doc]),
        item_base=to_device(item_base, torch.int64),
        item_key_lo=to_device(item_key_lo),
        item_query_lo=to_device(item_query_lo),
        item_end=to_device(item_end),
        max_rows=max_rows,
        head_offset=to_device(torch.tensor(offsets)),
        class_kv_head=to_device(torch.tensor(class_kv)),
        class_size=to_device(torch.tensor([len(h) for h in classes.values()])),
        class_heads=class_heads.to(device),
        kv_head_first_class=kv_head_first_class,
    )
    layout.cache[key] = plan
    return plan


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int  # query rows per program
    block_n: int  # key rows per step; divides block_m
    num_warps: int
    num_stages: int
    # Load K/V tiles through Hopper's tensor-memory accelerator (one descriptor per (segment, head), row stride
    # r * stride) instead of per-element pointers; used only where the tensors allow it (_descriptors_usable).
    tensor_descriptors: bool = False
    # Split the kv heads into this many groups, each running its branches on its own CUDA stream in a rotated
    # order: one group's launches fill the idle end of another's (see _head_groups).
    head_groups: int = 1
    # Keep the running output of the branches before the last in the input dtype instead of float32: half the
    # bytes of the merges, one more rounding per branch.
    merge_in_input_dtype: bool = False

    def __post_init__(self):
        if self.head_groups < 1:
            raise ValueError(f"head_groups must be at least 1, got {self.head_groups}")


DQ_MODES = ("recompute", "atomic", "tma-atomic")


@dataclass(frozen=True)
class BackwardConfig:
    block_n1: int  # key rows of a dK/dV program
    block_m1: int  # query rows per step of a dK/dV program; divides block_n1
    block_m2: int  # query rows of a dQ program (dq_mode "recompute")
    block_n2: int  # key rows per step of a dQ program; divides block_m2
    num_warps: int
    num_stages: int
    interleave_roles: bool = True  # alternate dK/dV and dQ programs in the grid instead of all dK/dV first
    tensor_descriptors: bool = False  # load Q/dO (dK/dV programs) and K/V (dQ programs) tiles through TMA
    # "recompute": separate dQ programs recompute S and dP (7 matrix products per tile pair, deterministic);
    # "atomic": the dK/dV programs also form dQ = dS K and add it to a float32 buffer with atomics (5 products);
    # "tma-atomic": the same, adding whole tiles with TMA reduce-adds (Hopper, GPU only).
    dq_mode: str = "recompute"
    head_groups: int = 1  # as ForwardConfig.head_groups
    # For small problems (at most _MAX_QUERY_ROWS_FOR_GROUPED_BRANCHES query rows): every branch in one launch, dK,
    # dV and dQ added atomically into float32 buffers, instead of one launch per branch, each ending in its own
    # tail of long programs. Not in torch's deterministic mode (atomic additions arrive in any order).
    group_branches: bool = False

    def __post_init__(self):
        if self.dq_mode not in DQ_MODES:
            raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {self.dq_mode!r}")
        if self.head_groups < 1:
            raise ValueError(f"head_groups must be at least 1, got {self.head_groups}")


def forward_config(head_dim: int, dtype: torch.dtype) -> ForwardConfig:
    """The forward launch configuration; measured choices are recorded in docs/triton_notes.md."""
    return _forward_config(head_dim, dtype, interpreting())


def backward_config(head_dim: int, dtype: torch.dtype) -> BackwardConfig:
    """The backward launch configuration; measured choices are recorded in docs/triton_notes.md."""
    return _backward_config(head_dim, dtype, interpreting())


# Built once per argument: a frozen dataclass with checks costs 3-6 us of host time to construct, at every call.
@functools.lru_cache(maxsize=None)
def _forward_config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> ForwardConfig:
    if interpreted:  # small blocks and two head groups exercise the multi-block and multi-group paths
        return ForwardConfig(16, 16, 4, 1, head_groups=2)
    if dtype == torch.float32:  # matrix products on the FMA units: small tiles, no spills
        return ForwardConfig(64, 32, 8, 2) if head_dim <= 64 else ForwardConfig(32, 16, 4, 2)
    # Two head groups on two streams where the problem is large (_head_groups); measured choices in
    # docs/triton_notes.md (v6)
    if head_dim < 64:
        return ForwardConfig(128, 64, 4, 3, head_groups=2)
    if head_dim == 64:  # 64-row blocks: 3.6% faster than 128 at 128K, 1.3% slower at 1M (H200, v6)
        return ForwardConfig(64, 64, 4, 3, tensor_descriptors=True, head_groups=2)
    if head_dim <= 128:  # 64 x 64 tiles spill less than 128 x 64; descriptors free address registers: -12% (v6)
        return ForwardConfig(64, 64, 4, 3, tensor_descriptors=True, head_groups=2)
    return ForwardConfig(64, 32, 4, 2, head_groups=2)


@functools.lru_cache(maxsize=None)
def _backward_config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> BackwardConfig:
    if interpreted:
        return BackwardConfig(32, 16, 32, 16, 4, 1, head_groups=2)
    if dtype == torch.float32:
        return BackwardConfig(32, 16, 32, 16, 4, 2) if head_dim <= 64 else BackwardConfig(16, 16, 16, 16, 4, 1)
    if head_dim < 64:
        return BackwardConfig(128, 32, 64, 64, 4, 3, head_groups=2)
    if head_dim == 64:  # TMA on Hopper; elsewhere (or deterministic) _backward drops to pointers and recomputed dQ
        return BackwardConfig(
            128, 32, 64, 64, 4, 3, tensor_descriptors=True, dq_mode="tma-atomic", head_groups=2, group_branches=True
        )
    if head_dim <= 128:  # TMA reduce-adds of dQ lose here: 21.5 against 16.5 ms at 128K (v6)
        return BackwardConfig(64, 32, 64, 32, 4, 3, head_groups=2)
    return BackwardConfig(64, 16, 64, 16, 8, 1, head_groups=2)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _cdiv_nonneg(x, r):
        """ceil(max(x, 0) / r): the first row j with o + j * r >= o + x."""
        return (tl.maximum(x, 0) + r - 1) // r

    @triton.jit
    def _lse_of(row_max, row_sum, scale_log2):
        """A row's LSE in natural units from its largest product q.k (unscaled) and its sum of exp2((q.k - max) *
        scale_log2): (max * scale_log2 + log2 sum) * ln 2; -inf where the row saw nothing (sum 0)."""
        seen = row_sum > 0.0
        lse = (row_max * scale_log2 + tl.log2(tl.where(seen, row_sum, 1.0))) * 0.6931471805599453
        return tl.where(seen, lse, float("-inf"))

    @triton.jit
    def _dropout_keep(seed, stream, item, query_rows, key_rows, dropout_p):
        """Keep-mask of shape (query_rows x key_rows): a pure function of (seed, branch/head, item, j_q, j_k)."""
        zero = (query_rows + key_rows) * 0
        c0 = (query_rows + zero).to(tl.uint32, bitcast=True)
        c1 = (key_rows + zero).to(tl.uint32, bitcast=True)
        c2 = (zero + stream).to(tl.uint32, bitcast=True)
        c3 = (zero + item).to(tl.uint32, bitcast=True)
        random, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
        return tl.uint_to_uniform_float(random) >= dropout_p

    @triton.jit
    def _rows_descriptor(rows_ptr, lo, end, row_stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        """A TMA descriptor over the rows j in [lo, end) of one (segment, head); row j is at rows_ptr + j * row_stride.

        A tile of rows starting at j is loaded at coordinate j - lo. Rows outside [lo, end), negative coordinates
        included, read as zeros and are dropped on stores: what the masks of the pointer path do. The base row is
        ``lo`` rather than 0 because row 0 may lie before the tensor (a document that starts mid-segment).
        """
        return tl.make_tensor_descriptor(
            rows_ptr + lo.to(tl.int64) * row_stride,
            shape=[tl.maximum(end - lo, 1), HEAD_DIM],
            strides=[row_stride, 1],
            block_shape=[BLOCK, HEAD_DIM],
        )

    @triton.jit
    def _forward_steps(
        acc, m_i, l_i, q, k_rows, v_rows, query_rows, lo, hi, key_lo, key_end, key_stride,
        qk_scale, seed, stream, item, dropout_p,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """Online softmax over key rows [lo, hi); MASKED steps check key bounds and causality, the others don't.

        With TMA, ``k_rows`` and ``v_rows`` are descriptors (_rows_descriptor, base row ``key_lo``). Otherwise they
        point at row j = 0, row j starting ``j * key_stride`` later; addresses are then rebuilt each step from a
        vector of row offsets: a loop-carried tile of 64-bit pointers would hold two registers per element.
        """
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            key_rows = start_n + offs_n
            if MASKED:
                key_valid = (key_rows >= key_lo) & (key_rows < key_end)
            if TMA:
                k = tl.trans(k_rows.load([start_n - key_lo, 0]))
                v = v_rows.load([start_n - key_lo, 0])
            else:
                row_offsets = key_rows.to(tl.int64) * key_stride
                k_ptrs = k_rows + row_offsets[None, :] + offs_d[:, None]
                v_ptrs = v_rows + row_offsets[:, None] + offs_d[None, :]
                if MASKED:
                    k = tl.load(k_ptrs, mask=key_valid[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=key_valid[:, None], other=0.0)
                else:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            if MASKED:
                allowed = key_valid[None, :]
                if CAUSAL:
                    allowed = allowed & (key_rows[None, :] <= query_rows[:, None])
                qk = tl.where(allowed, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                # a row with no key yet keeps m = -inf; subtract 0 instead so that nothing turns into NaN
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_shift = m_new
            # The maximum is taken over the unscaled products q.k and the exponent is (q.k - max) * scale: 0 for
            # the largest, never positive, and recomputed bit for bit by the backward from the same product. The
            # usual `q.k * scale - max` is fused into one fma by the compiler in some kernels and not in others;
            # the two then differ by up to ulp(score) / 2, a factor 2**64 on P at logits of 1e9
            # (docs/triton_notes.md, "Mixing at any logit scale").
            p = tl.math.exp2((qk - m_shift[:, None]) * qk_scale)
            alpha = tl.math.exp2((m_i - m_shift) * qk_scale)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DROPOUT:
                # the denominator counts every key; only the weights applied to V are dropped
                p = tl.where(_dropout_keep(seed, stream, item, query_rows[:, None], key_rows[None, :], dropout_p), p, 0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    # Run-time integers that differ from branch to branch would each compile a new specialization otherwise.
    @triton.jit(
        do_not_specialize=["dilation", "query_begin", "num_query_blocks", "head_begin", "seed", "stream_base"]
    )
    def _forward_kernel(
        Q, K, V, Out, Acc, RowMax, RowSum, Lse, seed,  # the call's own tensors and seed first: see _Launch
        HeadOffset, ItemRow, ItemBase, ItemKeyLo, ItemQueryLo, ItemEnd,
        stride_qb, stride_qn, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ob, stride_on, stride_oh,
        stride_lb, stride_ln,
        dilation, query_begin, num_query_blocks, head_begin,
        softmax_scale, stream_base, dropout_p,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MERGE: tl.constexpr, FINAL: tl.constexpr,
        STORE_LSE: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One branch's partial attention for the heads [head_begin, head_begin + grid dimension 1). With STORE_LSE
        (the last branch, which covers every query) it also stores the LSE of the mixture, which the epilogue
        launch would otherwise form; Lse is (B, N, H) float32 with the row statistics' strides."""
        # Formed here and in the backward kernel by the same float32 product, so that both kernels' exponents agree
        # bit for bit. (Passed in as a second argument instead, it cost the backward 40 more spilled registers and
        # 20% of its time on an H200: docs/triton_notes.md.)
        qk_scale = softmax_scale * 1.4426950408889634  # log2(e)
        pid = tl.program_id(0)
        head = head_begin + tl.program_id(1)
        item = pid // num_query_blocks
        # the last query blocks see the most keys under causality: start them first
        query_block = num_query_blocks - 1 - pid % num_query_blocks
        offset = tl.load(HeadOffset + head)
        query_lo = _cdiv_nonneg(tl.load(ItemQueryLo + item) - offset, dilation)
        end = _cdiv_nonneg(tl.load(ItemEnd + item) - offset, dilation)
        start_m = query_block * BLOCK_M
        if (start_m >= end) | (start_m + BLOCK_M <= query_lo):
            return
        key_lo = _cdiv_nonneg(tl.load(ItemKeyLo + item) - offset, dilation)
        batch = tl.load(ItemRow + item).to(tl.int64)
        base = tl.load(ItemBase + item) + offset  # physical key index of row j = 0
        kv_head = head // GROUP

        offs_d = tl.arange(0, HEAD_DIM)
        query_rows = start_m + tl.arange(0, BLOCK_M)
        query_valid = (query_rows >= query_lo) & (query_rows < end)
        query_index = base + query_rows.to(tl.int64) * dilation - query_begin
        q_ptrs = Q + batch * stride_qb + head * stride_qh + query_index[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(q_ptrs, mask=query_valid[:, None], other=0.0)

        # K is read as (D, BLOCK_N) tiles, V as (BLOCK_N, D); row j lies r rows after row j - 1
        k_rows = K + batch * stride_kb + kv_head * stride_kh + base * stride_kn
        v_rows = V + batch * stride_vb + kv_head * stride_vh + base * stride_vn
        key_stride = dilation * stride_kn
        if TMA:
            k_rows = _rows_descriptor(k_rows, key_lo, end, key_stride, BLOCK_N, HEAD_DIM)
            v_rows = _rows_descriptor(v_rows, key_lo, end, dilation * stride_vn, BLOCK_N, HEAD_DIM)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        stream = stream_base + head

        # key blocks: a leading partial block (document starting mid-segment), full blocks that need no mask,
        # then the diagonal and trailing blocks, which do
        key_stop = tl.minimum(end, start_m + BLOCK_M) if CAUSAL else end
        first_full = ((key_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        last_full = (end // BLOCK_N) * BLOCK_N
        if CAUSAL:
            last_full = tl.minimum(last_full, start_m)
        last_full = tl.maximum(last_full, first_full)
        lead_start = (key_lo // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _forward_steps(
            acc, m_i, l_i, q, k_rows, v_rows, query_rows, lead_start, tl.minimum(first_full, key_stop),
            key_lo, end, key_stride, qk_scale, seed, stream, item, dropout_p,
            BLOCK_N, HEAD_DIM, True, CAUSAL, DROPOUT, TMA, DOT_PRECISION,
        )
        acc, m_i, l_i = _forward_steps(
            acc, m_i, l_i, q, k_rows, v_rows, query_rows, first_full, last_full,
            key_lo, end, key_stride, qk_scale, seed, stream, item, dropout_p,
            BLOCK_N, HEAD_DIM, False, CAUSAL, DROPOUT, TMA, DOT_PRECISION,
        )
        acc, m_i, l_i = _forward_steps(
            acc, m_i, l_i, q, k_rows, v_rows, query_rows, last_full, key_stop,
            key_lo, end, key_stride, qk_scale, seed, stream, item, dropout_p,
            BLOCK_N, HEAD_DIM, True, CAUSAL, DROPOUT, TMA, DOT_PRECISION,
        )

        # every valid query sees at least itself, so l_i > 0 on the rows that are stored
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out / (1.0 - dropout_p)
        # A row's state is its largest product q.k (unscaled) and its sum of exp2((q.k - largest) * scale), apart:
        # folding them into one LSE would round it by ulp(largest), 64 at logits of 1e9, which would return as a
        # factor e^64 on the weights. Rows outside the block's queries are never stored; 0 keeps them finite.
        row_max = tl.where(query_valid, m_i, 0.0)
        row_sum = tl.where(query_valid, l_i, 0.0)
        max_ptrs = RowMax + batch * stride_lb + query_index * stride_ln + head
        sum_ptrs = RowSum + batch * stride_lb + query_index * stride_ln + head
        o_offsets = batch * stride_ob + head * stride_oh + query_index[:, None] * stride_on + offs_d[None, :]
        if MERGE:  # an earlier branch wrote a partial result: mix it in
            previous_max = tl.load(max_ptrs, mask=query_valid, other=float("-inf"))
            previous_sum = tl.load(sum_ptrs, mask=query_valid, other=0.0)
            has_previous = previous_sum > 0.0
            previous = tl.load(Acc + o_offsets, mask=has_previous[:, None], other=0.0).to(tl.float32)
            # weights sum * exp2(max - largest) over their total: they add up to one at any logit scale, and the
            # output stays a convex combination of value rows
            largest = tl.maximum(previous_max, row_max)
            previous_weight = previous_sum * tl.math.exp2((previous_max - largest) * qk_scale)
            weight = row_sum * tl.math.exp2((row_max - largest) * qk_scale)
            total = previous_weight + weight
            out = (previous * previous_weight[:, None] + out * weight[:, None]) / total[:, None]
            row_max = largest
            row_sum = total
        tl.store(max_ptrs, row_max, mask=query_valid)
        tl.store(sum_ptrs, row_sum, mask=query_valid)
        if STORE_LSE:
            lse_ptrs = Lse + batch * stride_lb + query_index * stride_ln + head
            tl.store(lse_ptrs, _lse_of(row_max, row_sum, qk_scale), mask=query_valid)
        if FINAL:
            tl.store(Out + o_offsets, out.to(Out.dtype.element_ty), mask=query_valid[:, None])
        else:
            tl.store(Acc + o_offsets, out.to(Acc.dtype.element_ty), mask=query_valid[:, None])

    @triton.jit(do_not_specialize=["num_rows", "num_queries"])
    def _backward_prologue_kernel(
        Output, GradOutput, RowMax, RowSum, GradLse, ScaledGradOutput, Delta, FiniteRowMax, Zeroed,
        num_rows, num_heads, num_queries, num_zeroed_rows,
        stride_ob, stride_on, stride_oh, stride_gb, stride_gn, stride_gh,
        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, ZEROED_BLOCKS: tl.constexpr,
    ):
        """What the backward kernels read, in one pass over the (batch, query, head) rows instead of nine
        elementwise ops: dO / sum (contiguous, rounded to dO's dtype), delta = rowsum(that * O) - dLSE / sum, and
        the row maxima made finite as nan_to_num does (-inf, a query no branch saw, becomes 0). A row of sum 0
        keeps dO as it is: it sees nothing. Without HAS_GRAD_LSE, GradLse is any float32 pointer, never read. It
        also zeroes the gradient buffer that the branches add into, ``Zeroed`` (``num_zeroed_rows`` contiguous rows
        of HEAD_DIM: dQ, or dQ, dK and dV in turn), ZEROED_BLOCKS blocks of BLOCK rows per program (one launch
        fewer than a memset); with ZEROED_BLOCKS = 0 it writes nothing there."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = rows < num_rows
        head = rows % num_heads
        position = (rows // num_heads) % num_queries
        batch = rows // (num_heads * num_queries)
        offs_d = tl.arange(0, HEAD_DIM)
        row_sum = tl.load(RowSum + rows, mask=valid, other=1.0)
        inverse_sum = 1.0 / tl.where(row_sum > 0, row_sum, 1.0)
        o_offsets = batch * stride_ob + position * stride_on + head * stride_oh
        do_offsets = batch * stride_gb + position * stride_gn + head * stride_gh
        o = tl.load(Output + o_offsets[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(GradOutput + do_offsets[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        # rounded as the kernels read it, so that dP - delta cancels exactly where it should (a saturated row,
        # O = v_j): from the unrounded dO / sum, one 16-bit rounding of dO.v times |k| and the scale overflowed
        # fp16 dQ at |x| ~ 3e4
        scaled = (do.to(tl.float32) * inverse_sum[:, None]).to(ScaledGradOutput.dtype.element_ty)
        tl.store(ScaledGradOutput + rows[:, None] * HEAD_DIM + offs_d[None, :], scaled, mask=valid[:, None])
        for block in tl.static_range(ZEROED_BLOCKS):
            zeroed_rows = (tl.program_id(0).to(tl.int64) * ZEROED_BLOCKS + block) * BLOCK + tl.arange(0, BLOCK)
            zeros = tl.zeros((BLOCK, HEAD_DIM), dtype=Zeroed.dtype.element_ty)
            in_buffer = zeroed_rows < num_zeroed_rows
            tl.store(Zeroed + zeroed_rows[:, None] * HEAD_DIM + offs_d[None, :], zeros, mask=in_buffer[:, None])
        delta = tl.sum(o * scaled.to(tl.float32), 1)
        if HAS_GRAD_LSE:  # d LSE / d s = P: a gradient on the LSE enters dS like -delta
            delta -= tl.load(GradLse + rows, mask=valid, other=0.0) * inverse_sum
        tl.store(Delta + rows, delta, mask=valid)
        row_max = tl.load(RowMax + rows, mask=valid, other=0.0)
        row_max = tl.where((row_max == float("-inf")) | (row_max != row_max), 0.0, row_max)  # as nan_to_num
        tl.store(FiniteRowMax + rows, tl.minimum(row_max, 3.4028234663852886e38), mask=valid)

    @triton.jit
    def _forward_epilogue_kernel(
        RowMax, RowSum, Lse, Running, Output, num_rows, lse_scale,
        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, CAST: tl.constexpr,
    ):
        """The forward's end in one launch instead of seven elementwise ops: LSE = (max * scale * log2 e + log2 sum)
        * ln 2 over the (batch, query, head) rows, -inf where no branch saw the query; with CAST, the output rows
        cast from the running rows, 0 where unseen (their running rows hold garbage). All four are contiguous."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = rows < num_rows
        row_max = tl.load(RowMax + rows, mask=valid, other=0.0)
        row_sum = tl.load(RowSum + rows, mask=valid, other=0.0)
        tl.store(Lse + rows, _lse_of(row_max, row_sum, lse_scale), mask=valid)
        if CAST:
            seen = row_sum > 0
            offsets = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
            running = tl.load(Running + offsets, mask=valid[:, None], other=0.0)
            running = tl.where(seen[:, None], running, 0.0)
            tl.store(Output + offsets, running.to(Output.dtype.element_ty), mask=valid[:, None])

    @triton.jit
    def _backward_kv_steps(
        dk, dv, k, v, q_rows, do_rows, dq_rows, max_rows_ptr, delta_rows_ptr, key_rows, lo, hi, query_lo, query_end,
        query_stride, do_stride, dq_stride, row_stride, qk_scale, softmax_scale, seed, stream, item, dropout_p,
        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
        TMA: tl.constexpr, DQ_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dK, dV of one key block from query rows [lo, hi); MASKED steps apply causality.

        Query rows outside the range load as zeros (q, dO, delta, LSE), which adds exactly nothing. With TMA,
        ``q_rows`` and ``do_rows`` are descriptors with base row ``query_lo``; otherwise pointers to row 0.
        DQ_MODE 1 and 2 also add this key block's share of dQ = dS K (scaled) to the float32 rows ``dq_rows``:
        with per-element atomics through pointers (1) or with a TMA reduce-add of the tile (2, a descriptor).
        """
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in range(lo, hi, BLOCK_M):
            query_rows = start_m + offs_m
            query_valid = (query_rows >= query_lo) & (query_rows < query_end)
            rows = query_rows.to(tl.int64)
            if TMA:
                q_t = tl.trans(q_rows.load([start_m - query_lo, 0]))  # (D, BLOCK_M)
            else:
                q_t = tl.load(
                    q_rows + (rows * query_stride)[None, :] + offs_d[:, None], mask=query_valid[None, :], other=0.0
                )
            row_max = tl.load(max_rows_ptr + rows * row_stride, mask=query_valid, other=0.0)
            # The forward's exponent (q.k - max) * scale, bit for bit: the same products (a tensor-core or FMA dot
            # sums q_i k_i in the same order whichever operand comes first), then the same two operations, so it is
            # at most 0 on every real (query, key) pair. The clamp at 0 changes none of them; it keeps P finite
            # where rows outside the bounds were loaded as 0: a key row k = 0 (exponent -max) adds its finite dS
            # times k = 0 to dQ, a query row q = 0, max = 0 has dO = 0.
            s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
            p_t = tl.math.exp2(tl.minimum((s_t - row_max[None, :]) * qk_scale, 0.0))
            if MASKED:
                p_t = tl.where(query_rows[None, :] >= key_rows[:, None], p_t, 0.0)
            if TMA:
                do = do_rows.load([start_m - query_lo, 0])  # (BLOCK_M, D)
            else:
                do = tl.load(
                    do_rows + (rows * do_stride)[:, None] + offs_d[None, :], mask=query_valid[:, None], other=0.0
                )
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, stream, item, query_rows[None, :], key_rows[:, None], dropout_p)
                scale_kept = 1.0 / (1.0 - dropout_p)
                dv = tl.dot(tl.where(keep, p_t * scale_kept, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
                dp_t = tl.where(keep, dp_t * scale_kept, 0.0)
            else:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            delta = tl.load(delta_rows_ptr + rows * row_stride, mask=query_valid, other=0.0)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
            dk = tl.dot(ds_t, tl.trans(q_t), dk, input_precision=DOT_PRECISION)
            if DQ_MODE != 0:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * softmax_scale  # (BLOCK_M, D)
                if DQ_MODE == 1:
                    dq_ptrs = dq_rows + (rows * dq_stride)[:, None] + offs_d[None, :]
                    tl.atomic_add(dq_ptrs, dq, mask=query_valid[:, None], sem="relaxed")
                else:
                    dq_rows.atomic_add([start_m - query_lo, 0], dq)
        return dk, dv

    @triton.jit
    def _backward_q_steps(
        dq, q, do, row_max, delta, k_rows, v_rows, query_rows, lo, hi, key_lo, key_end, key_stride,
        qk_scale, seed, stream, item, dropout_p,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
        DROPOUT: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dQ of one query block from key rows [lo, hi); MASKED steps check key bounds and causality.

        Keys outside the bounds load as zeros, so that their (finite) dS multiplies a zero row of K. With TMA,
        ``k_rows`` and ``v_rows`` are descriptors with base row ``key_lo``; otherwise pointers to row 0.
        """
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            key_rows = start_n + offs_n
            if TMA:
                k_t = tl.trans(k_rows.load([start_n - key_lo, 0]))  # (D, BLOCK_N)
                v_t = tl.trans(v_rows.load([start_n - key_lo, 0]))
            else:
                row_offsets = key_rows.to(tl.int64) * key_stride
                k_ptrs = k_rows + row_offsets[None, :] + offs_d[:, None]  # (D, BLOCK_N)
                v_ptrs = v_rows + row_offsets[None, :] + offs_d[:, None]
                if MASKED:
                    key_valid = (key_rows >= key_lo) & (key_rows < key_end)
                    k_t = tl.load(k_ptrs, mask=key_valid[None, :], other=0.0)
                    v_t = tl.load(v_ptrs, mask=key_valid[None, :], other=0.0)
                else:
                    k_t = tl.load(k_ptrs)
                    v_t = tl.load(v_ptrs)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
            # the forward's exponent bit for bit (at most 0); the clamp keeps keys loaded as 0 finite (see above)
            p = tl.math.exp2(tl.minimum((s - row_max[:, None]) * qk_scale, 0.0))
            if MASKED and CAUSAL:
                p = tl.where(query_rows[:, None] >= key_rows[None, :], p, 0.0)
            dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, stream, item, query_rows[:, None], key_rows[None, :], dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
        return dq

    @triton.jit(
        do_not_specialize=[
            "dilation", "query_begin", "head_begin", "num_heads", "class_begin", "num_key_blocks", "num_query_blocks",
            "num_classes", "num_kv_programs", "num_q_programs", "seed", "stream_base", "num_branches",
        ]
    )
    def _backward_kernel(
        Q, K, V, DO, DQ, DK, DV, RowMax, Delta, seed,  # the call's own tensors and seed first: see _Launch
        HeadOffset, ClassKvHead, ClassSize, ClassHeads, ItemRow, ItemBase, ItemKeyLo, ItemQueryLo, ItemEnd,
        stride_qb, stride_qn, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_dob, stride_don, stride_doh,
        stride_dqb, stride_dqn, stride_dqh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_lb, stride_ln,
        dilation, query_begin, head_begin, num_heads, class_begin, num_key_blocks, num_query_blocks, num_classes,
        num_kv_programs, num_q_programs, softmax_scale, stream_base, dropout_p, BranchTable, num_branches,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N1: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, INTERLEAVE: tl.constexpr,
        TMA: tl.constexpr, DQ_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUPED: tl.constexpr,
    ):
        """One branch's share of dQ, dK, dV; the first num_kv_programs programs do dK/dV, the rest dQ.

        The launch covers the offset classes [class_begin, class_begin + num_classes) and the query heads
        [head_begin, head_begin + num_heads): those of a group of kv heads.

        ACCUMULATE adds to what earlier branches stored; without it this branch is the first and writes every row.
        With DQ_MODE 1 or 2 there are no dQ programs: the dK/dV programs add dQ into DQ, a zeroed float32 buffer.

        GROUPED: every branch in this one launch (:func:`_grouped_launch`). Program ``pid`` belongs to the branch
        whose row of ``BranchTable`` (``_GROUPED_COLUMNS``) holds the largest program start not above it; that row
        gives the branch's scalars and where its items and classes begin in the concatenated tables. Branches then
        add into the same rows concurrently, so dK and dV are added atomically to zeroed float32 buffers, like dQ.
        """
        pid = tl.program_id(0)
        qk_scale = softmax_scale * 1.4426950408889634  # log2(e), as in the forward: the same product
        offs_d = tl.arange(0, HEAD_DIM)
        if GROUPED:
            branch = 0
            for i in range(1, num_branches):  # rows of 8 = len(_GROUPED_COLUMNS)
                branch += (pid >= tl.load(BranchTable + i * 8)).to(tl.int32)
            entry = BranchTable + branch * 8
            pid -= tl.load(entry)
            dilation = tl.load(entry + 1)
            num_key_blocks = tl.load(entry + 2)
            num_classes = tl.load(entry + 3)
            num_kv_programs = tl.load(entry + 4)
            first_item = tl.load(entry + 5)
            first_class = tl.load(entry + 6)
            stream_base = tl.load(entry + 7)
            ItemRow += first_item
            ItemBase += first_item
            ItemKeyLo += first_item
            ItemQueryLo += first_item
            ItemEnd += first_item
            ClassKvHead += first_class
            ClassSize += first_class
            ClassHeads += first_class * GROUP
            HeadOffset += branch * num_heads
        if INTERLEAVE:
            # the heaviest programs of both roles come first, side by side, instead of all dQ work trailing
            paired = 2 * tl.minimum(num_kv_programs, num_q_programs)
            if pid < paired:
                pid = tl.where(pid % 2 == 0, pid // 2, num_kv_programs + pid // 2)
            elif num_kv_programs > num_q_programs:
                pid = pid - paired + num_q_programs
            else:
                pid = pid - paired + num_kv_programs + num_kv_programs
        if pid < num_kv_programs:
            # ---- dK, dV of one key block of one (item, kv head, offset class) ----
            key_block = pid % num_key_blocks
            cls = class_begin + (pid // num_key_blocks) % num_classes
            item = pid // (num_key_blocks * num_classes)
            offset = tl.load(HeadOffset + tl.load(ClassHeads + cls * GROUP))
            end = _cdiv_nonneg(tl.load(ItemEnd + item) - offset, dilation)
            key_lo = _cdiv_nonneg(tl.load(ItemKeyLo + item) - offset, dilation)
            start_n = key_block * BLOCK_N1
            if (start_n >= end) | (start_n + BLOCK_N1 <= key_lo):
                return
            query_lo = _cdiv_nonneg(tl.load(ItemQueryLo + item) - offset, dilation)
            batch = tl.load(ItemRow + item).to(tl.int64)
            base = tl.load(ItemBase + item) + offset
            kv_head = tl.load(ClassKvHead + cls)

            key_rows = start_n + tl.arange(0, BLOCK_N1)
            key_valid = (key_rows >= key_lo) & (key_rows < end)
            key_index = base + key_rows.to(tl.int64) * dilation
            k = tl.load(
                K + batch * stride_kb + kv_head * stride_kh + key_index[:, None] * stride_kn + offs_d[None, :],
                mask=key_valid[:, None], other=0.0,
            )
            v = tl.load(
                V + batch * stride_vb + kv_head * stride_vh + key_index[:, None] * stride_vn + offs_d[None, :],
                mask=key_valid[:, None], other=0.0,
            )
            dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)

            # query blocks: those crossing the diagonal need the causal mask, the later ones don't. A TMA reduce-add
            # must not start before its descriptor's first row (a negative coordinate stops the kernel with an
            # illegal instruction, measured with compute-sanitizer), so with DQ_MODE 2 the steps start at the first
            # query row rather than at a block boundary.
            if DQ_MODE == 2:
                first = query_lo
            else:
                first = (query_lo // BLOCK_M1) * BLOCK_M1
            if CAUSAL:
                first = tl.maximum(first, start_n)
                # whole steps from `first` up to the end of the diagonal, so that the two loops never overlap
                diagonal_rows = tl.maximum(tl.minimum(start_n + BLOCK_N1, end) - first, 0)
                diagonal_end = first + tl.cdiv(diagonal_rows, BLOCK_M1) * BLOCK_M1
            else:
                diagonal_end = first
            q_row0 = base - query_begin  # physical query index of row j = 0
            query_stride, do_stride, dq_stride = dilation * stride_qn, dilation * stride_don, dilation * stride_dqn
            # a head with no query rows in this item contributes nothing (and its descriptors would be empty)
            num_members = tl.where(query_lo < end, tl.load(ClassSize + cls), 0)
            for member in range(num_members):
                head = tl.load(ClassHeads + cls * GROUP + member)
                q_rows = Q + batch * stride_qb + head * stride_qh + q_row0 * stride_qn
                do_rows = DO + batch * stride_dob + head * stride_doh + q_row0 * stride_don
                dq_rows = DQ + batch * stride_dqb + head * stride_dqh + q_row0 * stride_dqn
                max_rows_ptr = RowMax + batch * stride_lb + head + q_row0 * stride_ln
                delta_rows_ptr = Delta + batch * stride_lb + head + q_row0 * stride_ln
                if TMA:
                    q_rows = _rows_descriptor(q_rows, query_lo, end, query_stride, BLOCK_M1, HEAD_DIM)
                    do_rows = _rows_descriptor(do_rows, query_lo, end, do_stride, BLOCK_M1, HEAD_DIM)
                if DQ_MODE == 2:
                    dq_rows = _rows_descriptor(dq_rows, query_lo, end, dq_stride, BLOCK_M1, HEAD_DIM)
                dk, dv = _backward_kv_steps(
                    dk, dv, k, v, q_rows, do_rows, dq_rows, max_rows_ptr, delta_rows_ptr, key_rows, first, diagonal_end,
                    query_lo, end, query_stride, do_stride, dq_stride, dilation * stride_ln,
                    qk_scale, softmax_scale, seed, stream_base + head, item, dropout_p,
                    BLOCK_M1, HEAD_DIM, CAUSAL, DROPOUT, TMA, DQ_MODE, DOT_PRECISION,
                )
                dk, dv = _backward_kv_steps(
                    dk, dv, k, v, q_rows, do_rows, dq_rows, max_rows_ptr, delta_rows_ptr, key_rows, diagonal_end, end,
                    query_lo, end, query_stride, do_stride, dq_stride, dilation * stride_ln,
                    qk_scale, softmax_scale, seed, stream_base + head, item, dropout_p,
                    BLOCK_M1, HEAD_DIM, False, DROPOUT, TMA, DQ_MODE, DOT_PRECISION,
                )
            # one writer per row in this launch: add this branch's share to what earlier branches left
            grad_offsets = batch * stride_dkb + kv_head * stride_dkh + key_index[:, None] * stride_dkn + offs_d[None, :]
            dk = dk * softmax_scale
            if GROUPED:
                tl.atomic_add(DK + grad_offsets, dk, mask=key_valid[:, None], sem="relaxed")
                tl.atomic_add(DV + grad_offsets, dv, mask=key_valid[:, None], sem="relaxed")
            else:
                if ACCUMULATE:
                    dk += tl.load(DK + grad_offsets, mask=key_valid[:, None], other=0.0).to(tl.float32)
                    dv += tl.load(DV + grad_offsets, mask=key_valid[:, None], other=0.0).to(tl.float32)
                tl.store(DK + grad_offsets, dk.to(DK.dtype.element_ty), mask=key_valid[:, None])
                tl.store(DV + grad_offsets, dv.to(DV.dtype.element_ty), mask=key_valid[:, None])
        elif DQ_MODE == 0:
            # ---- dQ of one query block of one (item, head) ----
            pid = pid - num_kv_programs
            query_block = num_query_blocks - 1 - pid % num_query_blocks
            head = head_begin + (pid // num_query_blocks) % num_heads
            item = pid // (num_query_blocks * num_heads)
            offset = tl.load(HeadOffset + head)
            query_lo = _cdiv_nonneg(tl.load(ItemQueryLo + item) - offset, dilation)
            end = _cdiv_nonneg(tl.load(ItemEnd + item) - offset, dilation)
            start_m = query_block * BLOCK_M2
            if (start_m >= end) | (start_m + BLOCK_M2 <= query_lo):
                return
            key_lo = _cdiv_nonneg(tl.load(ItemKeyLo + item) - offset, dilation)
            batch = tl.load(ItemRow + item).to(tl.int64)
            base = tl.load(ItemBase + item) + offset
            kv_head = head // GROUP

            query_rows = start_m + tl.arange(0, BLOCK_M2)
            query_valid = (query_rows >= query_lo) & (query_rows < end)
            query_index = base + query_rows.to(tl.int64) * dilation - query_begin
            q = tl.load(
                Q + batch * stride_qb + head * stride_qh + query_index[:, None] * stride_qn + offs_d[None, :],
                mask=query_valid[:, None], other=0.0,
            )
            do = tl.load(
                DO + batch * stride_dob + head * stride_doh + query_index[:, None] * stride_don + offs_d[None, :],
                mask=query_valid[:, None], other=0.0,
            )
            row_max = tl.load(RowMax + batch * stride_lb + query_index * stride_ln + head, mask=query_valid, other=0.0)
            delta = tl.load(Delta + batch * stride_lb + query_index * stride_ln + head, mask=query_valid, other=0.0)

            k_rows = K + batch * stride_kb + kv_head * stride_kh + base * stride_kn
            v_rows = V + batch * stride_vb + kv_head * stride_vh + base * stride_vn
            key_stride = dilation * stride_kn
            if TMA:
                k_rows = _rows_descriptor(k_rows, key_lo, end, key_stride, BLOCK_N2, HEAD_DIM)
                v_rows = _rows_descriptor(v_rows, key_lo, end, dilation * stride_vn, BLOCK_N2, HEAD_DIM)
            dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
            key_stop = tl.minimum(end, start_m + BLOCK_M2) if CAUSAL else end
            first_full = ((key_lo + BLOCK_N2 - 1) // BLOCK_N2) * BLOCK_N2
            last_full = (end // BLOCK_N2) * BLOCK_N2
            if CAUSAL:
                last_full = tl.minimum(last_full, start_m)
            last_full = tl.maximum(last_full, first_full)
            stream = stream_base + head
            dq = _backward_q_steps(
                dq, q, do, row_max, delta, k_rows, v_rows, query_rows, (key_lo // BLOCK_N2) * BLOCK_N2,
                tl.minimum(first_full, key_stop), key_lo, end, key_stride, qk_scale, seed, stream, item, dropout_p,
                BLOCK_N2, HEAD_DIM, True, CAUSAL, DROPOUT, TMA, DOT_PRECISION,
            )
            dq = _backward_q_steps(
                dq, q, do, row_max, delta, k_rows, v_rows, query_rows, first_full, last_full,
                key_lo, end, key_stride, qk_scale, seed, stream, item, dropout_p,
                BLOCK_N2, HEAD_DIM, False, CAUSAL, DROPOUT, TMA, DOT_PRECISION,
            )
            dq = _backward_q_steps(
                dq, q, do, row_max, delta, k_rows, v_rows, query_rows, last_full, key_stop,
                key_lo, end, key_stride, qk_scale, seed, stream, item, dropout_p,
                BLOCK_N2, HEAD_DIM, True, CAUSAL, DROPOUT, TMA, DOT_PRECISION,
            )
            dq_ptrs = DQ + batch * stride_dqb + head * stride_dqh + query_index[:, None] * stride_dqn + offs_d[None, :]
            dq = dq * softmax_scale
            if ACCUMULATE:
                dq += tl.load(dq_ptrs, mask=query_valid[:, None], other=0.0).to(tl.float32)
            tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=query_valid[:, None])


# ----------------------------------------------------------------------------------------------------------
# Host side: launches and the autograd Function
# ----------------------------------------------------------------------------------------------------------


class _Launch:
    """One kernel launch of a call's plan (:class:`_ForwardPlan`, :class:`_BackwardPlan`): its grid, the arguments
    that every call of the plan passes alike, its constexprs and the head group whose stream runs it. Each kernel
    takes the call's own tensors (and the dropout seed) first; a launch passes those, then the kept arguments.

    Why: Triton's JIT entry point re-derives on every launch what it compiles for (a specialization per argument,
    the cache key, the options): about 0.1 ms of host time for our kernels' 40-60 arguments (docs/benchmarks.md,
    run 10), and a per-launch key of our own over the same arguments still cost 20-40 us (run 12). A plan is kept
    under a key that fixes everything Triton specializes on: the inputs' dtypes, shapes, strides and 16-byte
    alignment; the kept arguments; the buffers a call allocates (512-byte aligned, their views' offsets given by
    the shapes); the seed's width (0 without dropout, else drawn from [2^32, 2^62): an i64). So the kernel that the
    first launch compiles or finds is the kernel of every later launch of the plan, which calls the compiled
    kernel's launcher directly: what the entry point itself does after its lookup.

    The direct calls pass tensors as their addresses. For a tensor the launcher calls its ``data_ptr`` and asks the
    driver whether the address is on the GPU (``cuPointerGetAttribute``), for each of the 9-20 tensors of a launch;
    an int it takes as it is. The first launch of a plan, through the entry point, has checked those tensors; the
    kept ones are converted once, the call's own once per call (:func:`_addresses`), not once per launch.
    """

    __slots__ = ("fn", "grid", "kept", "kept_addresses", "constexprs", "group", "compiled")

    def __init__(self, fn, grid: tuple[int, ...], kept: tuple, constexprs: dict, group: int = 0):
        self.fn, self.kept, self.constexprs, self.group = fn, tuple(kept), constexprs, group
        self.kept_addresses = _addresses(self.kept)  # `kept` keeps the tensors, so the addresses stay theirs
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = None  # (run, function handle, packed metadata, constexpr values) once known

    def __call__(self, own: tuple, stream: "_GroupStream", own_addresses: tuple | None) -> None:
        """Launch with the call's own arguments ``own`` on ``stream``. ``own_addresses``: ``_addresses(own)`` where
        Triton's compiled kernels may be called without its entry point (:func:`_direct_launches`), else None."""
        compiled = self.compiled
        if compiled is None or own_addresses is None:
            with stream.context():
                kernel = self.fn[self.grid](*own, *self.kept, **self.constexprs)
            if own_addresses is not None and all(hasattr(kernel, attr) for attr in ("run", "function", "packed_metadata")):
                # the launcher takes every parameter in signature order, the constexprs too (Triton >= 3.3)
                names = self.fn.arg_names[len(own) + len(self.kept):]
                self.compiled = (kernel.run, kernel.function, kernel.packed_metadata,
                                 tuple(self.constexprs[name] for name in names))
            return
        run, function, metadata, constexpr_values = compiled
        run(*self.grid, stream.handle, function, metadata, None, None, None,
            *own_addresses, *self.kept_addresses, *constexpr_values)


def _addresses(arguments: tuple) -> tuple:
    """``arguments`` with each tensor replaced by its address (what a direct launch passes: see _Launch)."""
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments)


def _direct_launches() -> bool:
    """Whether launches may call the kept compiled kernels (see _Launch): not under the interpreter, and no launch
    hooks set (a profiler such as proton sets them; the entry point calls them)."""
    if interpreting():
        return False
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    for hook in (getattr(runtime, "launch_enter_hook", None), getattr(runtime, "launch_exit_hook", None)):
        # since Triton 3.5 each is a chain of hooks that is never None, but may be empty
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _contiguous_strides(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (what the buffers a call allocates have)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0  # Triton specializes pointers on 16-byte alignment


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 inputs ask for float32 results; tf32 would cost them three decimal digits
    return "ieee" if dtype == torch.float32 else None


def _descriptors_usable(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these tensors' rows: Triton has them, the GPU is a Hopper or newer (or
    the interpreter runs), and every base address and row, head and batch stride is a multiple of 16 bytes."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if tensors[0].is_cuda and _capability(tensors[0].device)[0] < 9:
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(stride > 0 and stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])
        for t in tensors
    )


def _tma_reduce_applies(q: torch.Tensor) -> bool:
    """Where dq_mode "tma-atomic" runs: a Hopper GPU whose descriptors can address q's rows (the interpreter has no
    TMA reductions)."""
    return q.is_cuda and _descriptors_usable(q)


# Triton asks its allocator for the TMA descriptors' scratch (about 128 bytes a program) at every launch of a
# kernel that builds them. Each stream keeps one small buffer: launches on one stream run one after another, so a
# scratch is never in use by two kernels at once, and the caching allocator is not asked 5-10 times a call. Larger
# scratches (long sequences, where a launch's GPU time dwarfs its host time) are allocated per launch, not kept.
_SCRATCH: dict[int, torch.Tensor] = {}
_KEPT_SCRATCH_BYTES = 1 << 24


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # a graph being captured keeps its own memory: a buffer kept past it could be handed to another owner
    if size > _KEPT_SCRATCH_BYTES or torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=torch.int8, device="cuda")
    kept = _SCRATCH.get(stream)
    if kept is None or kept.numel() < size:
        kept = _SCRATCH[stream] = torch.empty(max(size, 1 << 16), dtype=torch.int8, device="cuda")
    return kept


@contextlib.contextmanager
def _descriptor_scratch(needed: bool):
    """Kernels that build TMA descriptors on the device write them to a global scratch buffer, which Triton asks its
    allocator for at launch. Unless the caller installed one, lend ours (torch's caching allocator) for our launches."""
    if not needed or interpreting():
        yield
        return
    from triton.runtime import _allocation

    current = _allocation._allocator
    current = current.get() if hasattr(current, "get") else current  # a ContextVar since Triton 3.4
    if not isinstance(current, _allocation.NullAllocator):
        yield
        return
    triton.set_allocator(_torch_scratch)
    try:
        yield
    finally:
        triton.set_allocator(current)


def _plans(q, k, pattern, layout) -> list[tuple[int, _BranchPlan]]:
    """(branch index, plan) in launch order: r = 1 branches last, so the last launch can write the final output."""
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    order = sorted(range(len(pattern.branches)), key=lambda i: pattern.dilation_rates[i] == 1)
    plans = []
    for i in order:
        w, r = pattern.branches[i]
        plan = _branch_plan(layout, w, r, pattern.head_offsets(i, num_heads), num_heads, num_kv_heads, q.device)
        if plan.num_items > 0:
            plans.append((i, plan))
    return plans


@dataclass(frozen=True)
class _HeadGroup:
    """Contiguous kv heads [kv_begin, kv_end) and their query heads [head_begin, head_end)."""

    kv_begin: int
    kv_end: int
    head_begin: int
    head_end: int


# Head groups pay only where each launch outlasts the CPU's cost of issuing it (about 70 us per launch with
# Triton 3.6): on an H200 they gained 4-5% at N = 128K (H = 12), broke even at 64K and lost up to 50% at 32K and
# below, where the doubled launches leave the GPU waiting (docs/triton_notes.md, v6).
_MIN_QUERY_ROWS_FOR_HEAD_GROUPS = 1 << 20  # batch x queries x heads


def _head_groups(q: torch.Tensor, k: torch.Tensor, requested: int) -> list[_HeadGroup]:
    """Split the kv heads into up to ``requested`` contiguous groups of near-equal size.

    Why: every branch is one launch, and a launch ends with a tail in which its longest programs (the causal
    segment's first key blocks, or last query blocks) hold a few SMs while the others idle. Branches cannot share a
    launch, as each adds into rows that the others write. Groups of heads share no rows, so each group runs its own
    sequence of launches on its own stream, in a rotated branch order: the end of one group's launch overlaps the
    middle of another's. Small problems keep one group (more launches would cost more CPU time than the tails);
    the interpreter, which has no streams, always splits, so that the tests cover the groups.
    """
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    count = _head_group_count(q, k, requested)
    group = num_heads // num_kv_heads
    bounds = [round(i * num_kv_heads / count) for i in range(count + 1)]
    return [_HeadGroup(a, b, a * group, b * group) for a, b in zip(bounds, bounds[1:])]


def _head_group_count(q: torch.Tensor, k: torch.Tensor, requested: int) -> int:
    large = q.shape[0] * q.shape[1] * q.shape[2] >= _MIN_QUERY_ROWS_FOR_HEAD_GROUPS
    return max(1, min(requested, k.shape[2])) if (q.is_cuda and large) or interpreting() else 1


def _rotated(items: list, shift: int, keep_first: bool = False, keep_last: bool = False) -> list:
    """``items`` with the middle part (all but a kept first and/or last item) rotated left by ``shift``."""
    lo, hi = int(keep_first), len(items) - int(keep_last)
    middle = items[lo:hi]
    if middle:
        shift %= len(middle)
        middle = middle[shift:] + middle[:shift]
    return items[:lo] + middle + items[hi:]


@dataclass(frozen=True)
class _GroupStream:
    """The stream of one head group: the torch stream (None: the current one) and its raw CUDA handle."""

    stream: object = None
    handle: int | None = None

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


_SIDE_STREAMS: dict[int, list] = {}


@contextlib.contextmanager
def _group_streams(device: torch.device, count: int):
    """One :class:`_GroupStream` per head group: the current stream and ``count - 1`` side streams, which start
    after the work queued so far and which the current stream waits for on exit (so every tensor stays
    stream-ordered on the current stream). Without CUDA, every group runs in turn on the caller's thread."""
    if device.type != "cuda":
        yield [_GroupStream()] * count
        return
    if count == 1:
        yield [_GroupStream(None, torch._C._cuda_getCurrentRawStream(device.index))]  # what Triton's launches read
        return
    current = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.setdefault(device.index, [])
    while len(side) < count - 1:
        side.append(torch.cuda.Stream(device))
    for stream in side[: count - 1]:
        stream.wait_stream(current)
    try:
        yield [_GroupStream(None, current.cuda_stream)] + [_GroupStream(s, s.cuda_stream) for s in side[: count - 1]]
    finally:
        for stream in side[: count - 1]:
            current.wait_stream(stream)


def _every_query_is_real(layout) -> bool:
    key = ("triton", "every_query_is_real")
    if key not in layout.cache:
        queries = (layout.doc_length - (layout.query_begin - layout.doc_start).clamp(min=0)).clamp(min=0)
        layout.cache[key] = int(queries.sum()) == layout.batch_size * layout.num_queries
    return layout.cache[key]


_ROW_STATS_START: dict[torch.device, torch.Tensor] = {}


def _row_stats_start(device: torch.device) -> torch.Tensor:
    """(2, 1, 1, 1): a row's maximum and sum before any branch, -inf and 0, to broadcast in one copy kernel."""
    start = _ROW_STATS_START.get(device)
    if start is None:
        start = _ROW_STATS_START[device] = torch.tensor([float("-inf"), 0.0], device=device).view(2, 1, 1, 1)
    return start


def _plan_key(config, q, k, v, pattern, causal, softmax_scale, dropout_p) -> tuple:
    """What fixes every launch of a call but the data (see _Launch): with the launch configuration and the number
    of head groups, so that a changed configuration builds a new plan."""
    return (
        config, _head_group_count(q, k, config.head_groups), pattern, q.shape, k.shape, q.stride(), k.stride(),
        v.stride(), q.dtype, k.dtype, _aligned(q), _aligned(k), _aligned(v), causal, softmax_scale, dropout_p,
        q.device,
    )


@dataclass
class _ForwardPlan:
    """Every launch of a forward call, built at the first call of its key and kept in ``layout.cache``."""

    launches: list[_Launch]  # the branches' launches in issue order
    epilogue: _Launch | None  # None: the last launches store the LSE and the final output themselves
    num_groups: int
    tma: bool
    # the branches accumulate into `out` itself (float32), or into a separate running buffer of this dtype
    running_dtype: torch.dtype | None
    zero_out: bool  # `out` starts at 0 (float32 accumulation, or padding queries no launch writes)
    num_early: int  # the first launches, which write neither `out` nor the LSE (all of them with an epilogue)

    @property
    def late_output(self) -> bool:
        """Whether `out` may be allocated after the early launches: they do not accumulate into it, and it needs no
        zeroing kernel (one on the current stream would not be ordered before the side streams' launches)."""
        return self.running_dtype is not None and not self.zero_out


def _forward_plan(q, k, v, pattern, layout, causal: bool, softmax_scale: float, dropout_p: float) -> _ForwardPlan:
    config = forward_config(q.shape[3], q.dtype)
    key = _plan_key(config, q, k, v, pattern, causal, softmax_scale, dropout_p)
    plan = layout.cache.get(key)
    if plan is None:
        plan = layout.cache[key] = _build_forward_plan(
            config, q, k, v, pattern, layout, causal, softmax_scale, dropout_p
        )
    return plan


def _build_forward_plan(config, q, k, v, pattern, layout, causal, softmax_scale, dropout_p) -> _ForwardPlan:
    batch, num_queries, num_heads, head_dim = q.shape
    plans = _plans(q, k, pattern, layout)
    # Running output across branches, in float32 unless the configuration says otherwise. A last branch with r = 1
    # covers every real query and writes the final output itself; otherwise the running output is cast at the end.
    write_final = q.dtype != torch.float32 and bool(plans) and plans[-1][1].dilation_rate == 1
    if q.dtype == torch.float32:
        running_dtype, zero_out = None, True
    else:
        zero_out = write_final and not _every_query_is_real(layout)  # padding queries get 0
        separate = len(plans) > 1 or not write_final
        running_dtype = (q.dtype if config.merge_in_input_dtype else torch.float32) if separate else None
    # Where the last (r = 1) launch of each head group sees every query, it stores the LSE too: no epilogue launch.
    lse_in_final = write_final and _every_query_is_real(layout)
    tma = config.tensor_descriptors and _descriptors_usable(k, v)
    groups = _head_groups(q, k, config.head_groups)
    orders = [_rotated(plans, g, keep_last=write_final) for g in range(len(groups))]
    out_strides = _contiguous_strides(q.shape)[:3]  # `out` and the running output
    stats_strides = _contiguous_strides(q.shape[:3])[:2]  # row maxima and sums, (B, N, H)
    rows = batch * num_queries * num_heads
    constexprs = dict(
        GROUP=num_heads // k.shape[2], HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, DROPOUT=dropout_p > 0, TMA=tma, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    launches = []
    for position in range(len(plans)):
        for g, (group, order) in enumerate(zip(groups, orders)):
            branch, plan = order[position]
            num_query_blocks = cdiv(plan.max_rows, config.block_m)
            kept = (
                plan.head_offset, plan.item_row, plan.item_base, plan.item_key_lo, plan.item_query_lo, plan.item_end,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_strides, *stats_strides,
                plan.dilation_rate, layout.query_begin, num_query_blocks, group.head_begin,
                softmax_scale, branch << 16, dropout_p,
            )
            final = write_final and position == len(plans) - 1
            grid = (num_query_blocks * plan.num_items, group.head_end - group.head_begin)
            kind = dict(MERGE=position > 0, FINAL=final, STORE_LSE=final and lse_in_final)
            launches.append(_Launch(_forward_kernel, grid, kept, dict(constexprs, **kind), group=g))
    # positions no branch wrote hold garbage in `running` (row_sum = 0): the epilogue gives them 0 as it casts.
    # row_max holds unscaled products q.k: the LSE in natural units is (max * scale * log2 e + log2 sum) * ln 2.
    epilogue = None if lse_in_final else _Launch(
        _forward_epilogue_kernel, (cdiv(rows, 64),), (rows, softmax_scale * LOG2E),
        dict(BLOCK=64, HEAD_DIM=head_dim, CAST=not write_final and q.dtype != torch.float32),
    )
    num_early = len(launches) - (len(groups) if write_final else 0)
    return _ForwardPlan(launches, epilogue, len(groups), tma, running_dtype, zero_out, num_early)


def _forward(q, k, v, pattern, layout, causal: bool, softmax_scale: float, dropout_p: float, seed: int):
    plan = _forward_plan(q, k, v, pattern, layout, causal, softmax_scale, dropout_p)
    batch, num_queries, num_heads, _ = q.shape
    stats = torch.empty((2, batch, num_queries, num_heads), dtype=torch.float32, device=q.device)
    stats.copy_(_row_stats_start(q.device))  # -inf and 0 in one kernel (full and zeros were two)
    row_max, row_sum = stats.unbind()
    # Each allocation costs 7-15 us of host time, and before the first launch the GPU waits for them: `out` and the
    # LSE, which only the last launches (or the epilogue) write, are allocated after the early launches, while the
    # GPU runs those. The early launches get stand-ins in their places, which they never write (`running` for `out`,
    # possibly of another dtype: an unused pointer's; `row_max` for the LSE).
    out = None if plan.late_output else (torch.zeros if plan.zero_out else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    running = out if plan.running_dtype is None else torch.empty(q.shape, dtype=plan.running_dtype, device=q.device)
    direct = _direct_launches()
    with _group_streams(q.device, plan.num_groups) as streams, _descriptor_scratch(plan.tma):
        own = (q, k, v, running if out is None else out, running, row_max, row_sum, row_max, seed)
        own_addresses = _addresses(own) if direct else None
        for launch in plan.launches[: plan.num_early]:
            launch(own, streams[launch.group], own_addresses)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(row_max.shape, dtype=torch.float32, device=q.device)  # apart: a caller may keep it alone
        own = (q, k, v, out, running, row_max, row_sum, lse, seed)
        own_addresses = _addresses(own) if direct else None
        for launch in plan.launches[plan.num_early :]:
            launch(own, streams[launch.group], own_addresses)
    if plan.epilogue is not None:
        epilogue_own = (row_max, row_sum, lse, running, out)
        plan.epilogue(epilogue_own, streams[0], _addresses(epilogue_own) if direct else None)
    return out, lse, row_max, row_sum


@dataclass
class _BackwardPlan:
    """Every launch of a backward call, built at the first call of its key and kept in ``layout.cache``."""

    prologue: _Launch
    launches: list[_Launch]  # the branches' launches in issue order
    num_groups: int
    scratch: bool  # some launch builds TMA descriptors
    zero_grad_kv: bool  # no branch writes every row of dK, dV: they start at 0
    grad_q_dtype: torch.dtype
    grouped: bool = False  # one launch of every branch: dQ, dK, dV in one zeroed float32 buffer, cast at the end


# Where every branch's backward shares one launch (BackwardConfig.group_branches), measured on an H100 (run 14,
# docs/benchmarks.md; paper's branches, H = 12, D = 64, bf16, GPU time from CUDA-graph replay): 8K 1.28 -> 1.00 ms
# forward+backward, 16K 2.21 -> 2.00, 32K 3.96 -> 3.97, 64K 7.20 -> 7.58. Where launches are long, their tails
# matter less than the float32 dK, dV buffers and atomic additions cost. At 32K the GPU time is a tie, but a single
# call is not: one launch in place of five cut its host time and ended it sooner (run 21, host_timeline.py: 4.38 ->
# 4.19 ms, FA2 floor 4.11), so 32K at H = 12 is grouped too.
_MAX_QUERY_ROWS_FOR_GROUPED_BRANCHES = 1 << 19  # batch x queries x heads

# The columns of a grouped launch's branch table (int32, one row per branch, in launch order): what the kernel
# reads instead of its per-branch arguments (see _backward_kernel's GROUPED).
_GROUPED_COLUMNS = (
    "first program", "dilation", "key blocks", "classes", "programs", "first item", "first class", "stream base"
)


def _grouped_launch(plans, config: BackwardConfig, device):
    """The branch table and the concatenated item, head-offset and class tables of one launch of all ``plans``
    (branch index, plan); the branches whose programs run longest (most rows per (item, head)) first, so that the
    launch ends on short programs. Returns (kept tables, branch table, number of programs)."""
    ordered = sorted(plans, key=lambda branch_plan: -branch_plan[1].max_rows)
    rows, program, item, cls = [], 0, 0, 0
    for branch, plan in ordered:
        num_key_blocks = cdiv(plan.max_rows, config.block_n1)
        programs = num_key_blocks * plan.num_classes * plan.num_items
        rows.append([program, plan.dilation_rate, num_key_blocks, plan.num_classes, programs, item, cls, branch << 16])
        program, item, cls = program + programs, item + plan.num_items, cls + plan.num_classes
    assert len(rows[0]) == len(_GROUPED_COLUMNS)

    def concatenated(name):
        return torch.cat([getattr(plan, name) for _, plan in ordered])

    tables = tuple(concatenated(name) for name in (
        "head_offset", "class_kv_head", "class_size", "class_heads",
        "item_row", "item_base", "item_key_lo", "item_query_lo", "item_end",
    ))
    return tables, torch.tensor(rows, dtype=torch.int32, device=device), program


def _backward_form(grad_out_strides, grad_out_dtype, grad_out_aligned: bool, has_grad_lse: bool) -> tuple:
    """What a backward plan fixes beyond the forward's inputs: dO's strides, dtype and 16-byte alignment, whether an
    LSE gradient comes, and torch's deterministic mode (see _runnable_backward_config)."""
    return grad_out_strides, grad_out_dtype, grad_out_aligned, has_grad_lse, torch.are_deterministic_algorithms_enabled()


def _backward_plan(q, k, v, form, pattern, layout, causal, softmax_scale, dropout_p) -> _BackwardPlan:
    config = backward_config(q.shape[3], q.dtype)
    key = _plan_key(config, q, k, v, pattern, causal, softmax_scale, dropout_p) + form
    plan = layout.cache.get(key)
    if plan is None:
        plan = layout.cache[key] = _build_backward_plan(
            config, q, k, v, form, pattern, layout, causal, softmax_scale, dropout_p
        )
    return plan


def _build_backward_plan(config, q, k, v, form, pattern, layout, causal, softmax_scale, dropout_p) -> _BackwardPlan:
    grad_out_strides, _, _, has_grad_lse, _ = form
    batch, num_queries, num_heads, head_dim = q.shape
    # Gradients accumulate across branches in their own dtype. A branch with r = 1 runs first: when every key is a
    # real query too, it writes every row, so the gradients need no zeroing and that branch reads nothing back.
    plans = _plans(q, k, pattern, layout)[::-1]
    first_writes_all = (
        bool(plans)
        and plans[0][1].dilation_rate == 1
        and layout.num_queries == layout.num_keys
        and _every_query_is_real(layout)
    )
    config = _runnable_backward_config(config, q)
    groups = _head_groups(q, k, config.head_groups)
    rows = batch * num_queries * num_heads
    grouped = (
        config.group_branches and len(groups) == 1 and len(plans) > 1 and rows <= _MAX_QUERY_ROWS_FOR_GROUPED_BRANCHES
    )
    if grouped and config.dq_mode == "recompute":
        config = dataclasses.replace(config, dq_mode="atomic")
    dq_mode = config.dq_mode
    # dq_mode "recompute": each branch adds dQ in q's dtype, as dK and dV; otherwise every branch adds into one
    # float32 buffer, cast once at the end. The prologue zeroes what the branches add into: that dQ buffer, or
    # (grouped) the one float32 buffer of dQ, dK and dV; nothing where the first branch writes every row itself.
    grad_q_dtype = q.dtype if dq_mode == "recompute" else torch.float32
    if grouped:
        zeroed_rows = (q.numel() + 2 * k.numel()) // head_dim
    else:
        zeroed_rows = rows if dq_mode != "recompute" or not first_writes_all else 0
    num_prologue_programs = cdiv(rows, 64)
    # scaled_grad_out, which the kernels read too, is a fresh contiguous buffer: 16-byte aligned rows at every
    # supported head_dim, so descriptors address it
    tma = config.tensor_descriptors and _descriptors_usable(q, k, v)
    prologue = _Launch(
        _backward_prologue_kernel, (num_prologue_programs,),
        (rows, num_heads, num_queries, zeroed_rows, *_contiguous_strides(q.shape)[:3], *grad_out_strides[:3]),
        dict(BLOCK=64, HEAD_DIM=head_dim, HAS_GRAD_LSE=has_grad_lse,
             ZEROED_BLOCKS=cdiv(zeroed_rows, num_prologue_programs * 64)),
    )
    orders = [_rotated(plans, g, keep_first=first_writes_all) for g in range(len(groups))]
    q_strides = _contiguous_strides(q.shape)[:3]  # dO / sum and dQ
    kv_strides = _contiguous_strides(k.shape)[:3]  # dK and dV
    stats_strides = _contiguous_strides(q.shape[:3])[:2]
    constexprs = dict(
        GROUP=num_heads // k.shape[2], HEAD_DIM=head_dim,
        BLOCK_N1=config.block_n1, BLOCK_M1=config.block_m1, BLOCK_M2=config.block_m2,
        BLOCK_N2=config.block_n2, CAUSAL=causal, DROPOUT=dropout_p > 0,
        INTERLEAVE=config.interleave_roles, TMA=tma,
        DQ_MODE=DQ_MODES.index(dq_mode), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if grouped:
        tables, branch_table, num_programs = _grouped_launch(plans, config, q.device)
        kept = (
            *tables, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q_strides, *q_strides, *kv_strides,
            *stats_strides,
            1, layout.query_begin, 0, num_heads, 0, 1, 1, 1, num_programs, 0,  # the table gives the branches' own
            softmax_scale, 0, dropout_p, branch_table, len(plans),
        )
        launch = _Launch(_backward_kernel, (num_programs,), kept, dict(constexprs, ACCUMULATE=True, GROUPED=True))
        return _BackwardPlan(prologue, [launch], 1, tma or dq_mode == "tma-atomic", False, torch.float32, grouped=True)
    launches = []
    for position in range(len(plans)):
        for g, (group, order) in enumerate(zip(groups, orders)):
            branch, plan = order[position]
            class_begin = plan.kv_head_first_class[group.kv_begin]
            num_classes = plan.kv_head_first_class[group.kv_end] - class_begin
            num_group_heads = group.head_end - group.head_begin
            num_key_blocks = cdiv(plan.max_rows, config.block_n1)
            num_query_blocks = cdiv(plan.max_rows, config.block_m2)
            num_kv_programs = num_key_blocks * num_classes * plan.num_items
            num_q_programs = num_query_blocks * num_group_heads * plan.num_items if dq_mode == "recompute" else 0
            kept = (
                plan.head_offset, plan.class_kv_head, plan.class_size, plan.class_heads,
                plan.item_row, plan.item_base, plan.item_key_lo, plan.item_query_lo, plan.item_end,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q_strides, *q_strides, *kv_strides,
                *stats_strides,
                plan.dilation_rate, layout.query_begin, group.head_begin, num_group_heads, class_begin,
                num_key_blocks, num_query_blocks, num_classes, num_kv_programs, num_q_programs,
                softmax_scale, branch << 16, dropout_p, plan.head_offset, 1,  # no branch table: any int32 tensor
            )
            accumulate = position > 0 or not first_writes_all
            launches.append(_Launch(
                _backward_kernel, (num_kv_programs + num_q_programs,), kept,
                dict(constexprs, ACCUMULATE=accumulate, GROUPED=False), group=g,
            ))
    return _BackwardPlan(
        prologue, launches, len(groups), tma or dq_mode == "tma-atomic", not first_writes_all, grad_q_dtype
    )


def _expected_backward_plan(q, k, v, out, pattern, layout, causal, softmax_scale, dropout_p) -> tuple:
    """``(form, plan)`` for the dO that autograd usually passes: a fresh contiguous tensor of out's dtype (the
    caching allocator's blocks are 512-byte aligned), and no LSE gradient. The forward resolves it after its
    launches, while the GPU runs them; the backward, which runs on autograd's device thread with the GPU waiting for
    its first launch, then only compares forms (run 24: 0.23 ms from entering the backward to its first launch
    there, against 0.06 ms on the calling thread; `_backward_plan` took 40 us of it)."""
    form = _backward_form(_contiguous_strides(out.shape), out.dtype, True, False)
    return form, _backward_plan(q, k, v, form, pattern, layout, causal, softmax_scale, dropout_p)


def _backward(
    q, k, v, out, row_max, row_sum, grad_out, grad_lse, pattern, layout, causal, softmax_scale, dropout_p, seed,
    expected: tuple | None = None,
):
    """The exact gradient from the forward's row maxima and sums. With P = exp2(s - max) / sum, the kernels take
    the unnormalised exp2(s - max) and dO / sum, delta / sum in its place: dV = P^T dO and dS = P (dP - delta) are
    unchanged, and no rounded LSE enters. ``expected``: the forward's ``(form, plan)`` for the usual dO (see
    :func:`_expected_backward_plan`), used where this call has that form."""
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = _last_dim_contiguous(grad_out)
    form = _backward_form(grad_out.stride(), grad_out.dtype, _aligned(grad_out), grad_lse is not None)
    if expected is not None and expected[0] == form:
        plan = expected[1]
    else:
        plan = _backward_plan(q, k, v, form, pattern, layout, causal, softmax_scale, dropout_p)
    scaled_grad_out = torch.empty(out.shape, dtype=grad_out.dtype, device=q.device)
    # delta and the forward's row maxima made finite (unscaled products q.k), in one allocation
    delta, finite_row_max = torch.empty((2, *row_max.shape), dtype=torch.float32, device=q.device).unbind()
    sizes = (q.numel(), k.numel(), v.numel())
    if plan.grouped:  # every branch adds into one float32 buffer (zeroed by the prologue), cast once at the end
        grads = zeroed = torch.empty(sum(sizes), dtype=torch.float32, device=q.device)
    else:
        grad_q = zeroed = torch.empty(q.shape, dtype=plan.grad_q_dtype, device=q.device)  # zeroed if need be
        allocate = torch.zeros if plan.zero_grad_kv else torch.empty
        grad_k = allocate(k.shape, dtype=k.dtype, device=k.device)
        grad_v = allocate(v.shape, dtype=v.dtype, device=v.device)
    direct = _direct_launches()
    with _group_streams(q.device, plan.num_groups) as streams, _descriptor_scratch(plan.scratch):
        grad_lse_rows = delta if grad_lse is None else grad_lse.contiguous()
        if not _aligned(grad_lse_rows):  # the plan's kernels were compiled for 16-byte aligned rows: see _Launch
            grad_lse_rows = grad_lse_rows.clone()
        prologue_own = (out, grad_out, row_max, row_sum, grad_lse_rows, scaled_grad_out, delta, finite_row_max, zeroed)
        plan.prologue(prologue_own, streams[0], _addresses(prologue_own) if direct else None)
        if plan.grouped:  # split after the prologue's launch, which needs only the whole buffer
            grad_q, grad_k, grad_v = grads.split_with_sizes(sizes)  # flat: the kernels take strides of their own
        own = (q, k, v, scaled_grad_out, grad_q, grad_k, grad_v, finite_row_max, delta, seed)
        own_addresses = _addresses(own) if direct else None
        for launch in plan.launches:
            launch(own, streams[launch.group], own_addresses)
    if plan.grouped:  # one cast kernel for the three (none for float32)
        grad_q, grad_k, grad_v = grads.to(q.dtype).split_with_sizes(sizes)
        return grad_q.view(q.shape), grad_k.view(k.shape), grad_v.view(v.shape)
    if grad_q.dtype != q.dtype:
        grad_q = grad_q.to(q.dtype)
    return grad_q, grad_k, grad_v


def _runnable_backward_config(config: BackwardConfig, q: torch.Tensor) -> BackwardConfig:
    """``config``, with dQ recomputed where its atomic scheme may not run: atomic additions make the gradients
    depend on the order in which programs finish, so torch's deterministic mode gets the recomputing path, one
    launch per branch; the TMA reduce-add needs a Hopper GPU whose descriptors address q's rows."""
    if torch.are_deterministic_algorithms_enabled():
        if config.dq_mode == "recompute":
            return dataclasses.replace(config, group_branches=False)
        return dataclasses.replace(config, tensor_descriptors=False, dq_mode="recompute", group_branches=False)
    if config.dq_mode == "tma-atomic" and not _tma_reduce_applies(q):
        return dataclasses.replace(config, tensor_descriptors=False, dq_mode="recompute")
    return config


def _on_device_of(t: torch.Tensor):
    """Makes ``t``'s GPU the current device, where Triton launches, if it is not already (entering and leaving
    ``torch.cuda.device`` costs host time at every call; autograd runs a backward on its tensors' device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _forward_call(q, k, v, pattern, layout, causal, softmax_scale, dropout_p):
    """One forward: ``((q, k, v) with contiguous rows, the dropout seed, (out, lse, row_max, row_sum))``."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    # One seed per call, from torch's default generator: torch.manual_seed reproduces the dropout mask.
    seed = int(torch.randint(1 << 32, 1 << 62, (1,))) if dropout_p > 0 else 0  # an i64: see _Launch
    with _on_device_of(q):
        results = _forward(q, k, v, pattern, layout, causal, softmax_scale, dropout_p, seed)
    return (q, k, v), seed, results


class _TritonDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, layout, causal, softmax_scale, dropout_p):
        (q, k, v), seed, (out, lse, row_max, row_sum) = _forward_call(
            q, k, v, pattern, layout, causal, softmax_scale, dropout_p
        )
        ctx.save_for_backward(q, k, v, out, row_max, row_sum)
        ctx.pattern, ctx.layout, ctx.causal, ctx.softmax_scale = pattern, layout, causal, softmax_scale
        ctx.dropout_p, ctx.seed = dropout_p, seed
        with _on_device_of(q):
            ctx.expected_backward = _expected_backward_plan(
                q, k, v, out, pattern, layout, causal, softmax_scale, dropout_p
            )
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, row_max, row_sum = ctx.saved_tensors
        with _on_device_of(q):
            grads = _backward(
                q, k, v, out, row_max, row_sum, grad_out, grad_lse, ctx.pattern, ctx.layout, ctx.causal,
                ctx.softmax_scale, ctx.dropout_p, ctx.seed, ctx.expected_backward,
            )
        return *grads, None, None, None, None, None


def dilated_attention_triton(q, k, v, pattern, layout, *, causal: bool, softmax_scale: float, dropout_p: float):
    """The Triton backend of :func:`~modeling_longnet.dilated_attention.dilated_attention`: ``(out, lse)``. Like the
    other backends it takes what the dispatcher has already checked (``check_supported`` / ``supports``)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _TritonDilatedAttention.apply(q, k, v, pattern, layout, causal, softmax_scale, dropout_p)
    # No gradient to record (inference, a prefill): the Function's forward without the 15-20 us of host time that
    # Function.apply costs even then
    _, _, (out, lse, _, _) = _forward_call(q, k, v, pattern, layout, causal, softmax_scale, dropout_p)
    return out, lse
