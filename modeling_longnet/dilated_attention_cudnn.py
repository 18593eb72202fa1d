"""Dilated attention on cuDNN's fused attention kernels (PyTorch's ``_scaled_dot_product_cudnn_attention``).

A branch (w, r) is a batch of small dense attentions: in each segment, head h attends among its participating
rows ``o_h, o_h + r, o_h + 2r, ...``. Each such batch is one call of a dense kernel that returns its output and
log-sum-exp, and the branches mix into the output by those (SPEC.md, mixing). Two ways to hand the kernel its rows:

* **Whole rows** (no padding, no packed documents, as many queries as keys: training and prefill). The rows of
  the heads that share an offset are a strided *view* of q, k, v (rows ``r * H * D`` elements apart, heads
  ``r * D`` apart), so the kernel reads them in place: a branch costs one call per offset and no copy. The mixing
  works on the same views of the output, in one pass once every part's LSE is known.
* **Any other layout**: the torch backend's tables, gathered (copied) and grouped by row count so that each group
  is one dense batch. Where a group has fewer queries than keys (a KV cache), its queries are padded at the front
  with zero rows: their outputs are dropped, and in the backward they carry dO = O = 0, so they add nothing.

The backward is exact the way flash-attn's is: the kernel computes ``dS = P * (dP - rowsum(dO * O))`` with
``P = exp(s - LSE)`` from whatever ``O`` and ``LSE`` it is handed, so handing it the *mixed* O and LSE gives the
gradient of the mixture, branch by branch. A gradient on the LSE enters through 8 more head-dim columns (``v`` =
0, ``O`` = 1, ``dO`` = -dLSE in the first), which shift ``rowsum(dO * O)`` by exactly -dLSE. Gradients add up
across branches in their own dtype, and so does the output (the Triton backend sums gradients so: one rounding
per branch that touches a row). Long calls only: at 128K and below the small operations around the kernels
cost more than the kernels (docs/benchmarks.md, "The cuDNN backend").

The kernels are a pair of functions (``_Kernels``), so that the gathering, mixing and backward are tested on the
CPU with PyTorch's CPU flash-attention kernels, which have the same contract (tests/test_cudnn.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .dilated_attention_pattern import DilatedPattern, TokenLayout, _branch_tables, merge_partial, statistics_dtype

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
LSE_COLUMNS = 8  # the head-dim columns that carry a gradient on the LSE (cuDNN wants multiples of 8)


@dataclass(frozen=True)
class _Kernels:
    """A dense attention kernel pair over ``(G, H', L, D)`` tensors (any strides with the last dim contiguous).

    ``forward(q, k, v, causal, scale) -> (out, lse (G, H', L) float32, state)``;
    ``backward(grad_out, q, k, v, out, lse, state, causal, scale) -> (dq, dk, dv)``, from the ``out`` and ``lse``
    it is handed. ``causal`` is aligned to the top left (the queries and keys of a call are the same rows)."""

    forward: Callable
    backward: Callable


def _cudnn_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    return out, lse.reshape(q.shape[:3]), (seed, offset, cum_q, cum_k, max_q, max_k)


def _cudnn_backward(grad_out, q, k, v, out, lse, state, causal, scale):
    seed, offset, cum_q, cum_k, max_q, max_k = state
    # The kernel recomputes P = exp(s - LSE) from an LSE rounded to float32: at logits of 1e9 a row's largest s may
    # exceed it by an ulp (64), and e^64 overflows 16-bit gradients. Raised by 8 ulps, P stays at most 1; the
    # gradients shrink by e^-(8 ulps), within the error the rounded LSE already brings (README, Limits).
    lse = lse + lse.abs() * 2.0**-21
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k,
        0.0, causal, scale=scale,
    )


CUDNN_KERNELS = _Kernels(_cudnn_forward, _cudnn_backward)
_kernels = CUDNN_KERNELS  # what the backend calls (tests put the CPU flash kernels here)


def is_available() -> bool:
    if not (torch.cuda.is_available() and torch.backends.cudnn.is_available()):
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def _unsupported_reason(q: torch.Tensor, dropout_p: float) -> str | None:
    if not q.is_cuda:
        return f"backend='cudnn' runs on CUDA tensors, `q` is on {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"backend='cudnn' takes float16 or bfloat16 `q`/`k`/`v`, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
        return f"backend='cudnn' needs head_dim a multiple of 8 and at most {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if dropout_p > 0:
        return f"backend='cudnn' runs without attention dropout, got dropout_p={dropout_p}: use backend='triton' or 'torch'"
    return None


def supports(q: torch.Tensor, pattern: DilatedPattern, layout: TokenLayout, dropout_p: float) -> bool:
    return _unsupported_reason(q, dropout_p) is None


def reads_in_place(pattern: DilatedPattern, layout: TokenLayout, num_heads: int) -> bool:
    """Whether a call takes the strided views (whole rows), the fast path; other layouts copy their rows."""
    return _views_if_whole_rows(pattern, layout, num_heads) is not None


def _views_if_whole_rows(pattern: DilatedPattern, layout: TokenLayout, num_heads: int):
    return _view_plan(pattern, layout, num_heads) if layout.is_whole_rows() else None


def check_supported(q: torch.Tensor, pattern: DilatedPattern, layout: TokenLayout, dropout_p: float) -> None:
    reason = _unsupported_reason(q, dropout_p)
    if reason is not None:
        raise ValueError(reason)


# ----------------------------------------------------------------------------------------------------------
# Whole rows: each (branch, offset, run of segments) is a strided view
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SegmentView:
    """Rows ``start + s * length + offset + j * r`` (s < count, j < rows) of heads ``heads`` of batch rows
    ``batch``, as a ``(batch * count, heads, rows, ...)`` view of a ``(B, N, H, ...)`` tensor."""

    batch: slice
    start: int
    length: int
    count: int
    offset: int
    r: int
    heads: slice

    def of(self, x: torch.Tensor) -> torch.Tensor:
        y = x[self.batch, self.start : self.start + self.count * self.length].unflatten(1, (self.count, self.length))
        y = y[:, :, self.offset :: self.r, self.heads]  # (B, count, rows, heads, ...)
        merged = y.flatten(0, 1)  # a view: the planner gives each batch row its own view unless they merge
        return merged.transpose(1, 2)


def _head_slices(offsets: list[int]) -> list[tuple[int, slice]]:
    """The heads of each offset as a slice (an arithmetic progression), or None where some are not."""
    groups: dict[int, list[int]] = {}
    for head, offset in enumerate(offsets):
        groups.setdefault(offset, []).append(head)
    slices = []
    for offset, heads in sorted(groups.items()):
        step = heads[1] - heads[0] if len(heads) > 1 else 1
        if any(b - a != step for a, b in zip(heads, heads[1:])):
            return None
        slices.append((offset, slice(heads[0], heads[-1] + 1, step)))
    return slices


def _view_plan(pattern: DilatedPattern, layout: TokenLayout, num_heads: int):
    """Per branch (r = 1 first), its views; None if some branch's heads of one offset are not a progression."""
    key = ("cudnn", "views", pattern.segment_lengths, pattern.dilation_rates, pattern.offsets, pattern.head_range, num_heads)
    if key in layout.cache:
        return layout.cache[key]
    batch, n = layout.batch_size, layout.num_keys
    plan = []
    for branch, (w, r) in enumerate(pattern.branches):
        heads = _head_slices(pattern.head_offsets(branch, num_heads))
        if heads is None:
            plan = None
            break
        full, rest = divmod(n, w)
        runs = [(0, w, full)] if full else []
        if rest:
            runs.append((full * w, rest, 1))
        views = []
        for start, length, count in runs:
            # batch rows merge with the segments only if the run spans the whole sequence
            rows = [slice(None)] if batch == 1 or count * length == n else [slice(b, b + 1) for b in range(batch)]
            for offset, head_slice in heads:
                if offset < length:
                    views += [_SegmentView(row, start, length, count, offset, r, head_slice) for row in rows]
        plan.append((r, views))
    if plan is not None:
        plan.sort(key=lambda entry: entry[0] != 1)  # a branch with r = 1 covers every row: it writes, not mixes
    layout.cache[key] = plan
    return plan


def _whole_tensor(part: torch.Tensor, plan, shape) -> torch.Tensor | None:
    """The first branch's only part as a ``shape`` tensor, where it covers every row (r = 1, one view of all the
    segments) and the kernel laid it out as ``(B, N, H, D)``: then it is the buffer the others add into."""
    r, views = plan[0]
    if r != 1 or len(views) != 1 or views[0].count * views[0].length != shape[1]:
        return None
    whole = part.transpose(1, 2)  # (B * segments, w, H, ...)
    return whole.view(shape) if whole.is_contiguous() else None


def _forward_views(kernels, q, k, v, plan, causal, scale):
    """Every part first, then the mixture in one pass: ``O = sum_p O_p exp(lse_p - M) / S`` with ``M`` the largest
    and ``S = sum_p exp(lse_p - M)`` over the parts that cover a (row, head), formed from the parts' LSEs alone
    (small tensors). The weights of a row add up to one whatever the scale of its logits, and each output element
    is written once per part that covers it, in the output's dtype (one rounding per branch, as the gradients)."""
    parts = []
    for r, views in plan:
        for view in views:
            part_out, part_lse, state = kernels.forward(view.of(q), view.of(k), view.of(v), causal, scale)
            parts.append((view, part_out, part_lse, state))
    stats = statistics_dtype(q.dtype)
    largest = torch.full(q.shape[:3], float("-inf"), dtype=stats, device=q.device)
    for view, _, part_lse, _ in parts:
        target = view.of(largest)
        target.copy_(torch.maximum(target, part_lse))
    finite = largest.nan_to_num(neginf=0.0)  # (row, head) pairs no part covers: weight 0, output 0
    total = torch.zeros_like(largest)
    weights = []
    for view, _, part_lse, _ in parts:
        weight = torch.exp(part_lse - view.of(finite))
        view.of(total).add_(weight)
        weights.append(weight)
    covered = total > 0
    safe_total = torch.where(covered, total, 1.0)
    lse = torch.where(covered, finite + torch.log(safe_total), float("-inf"))
    out = None
    for index, ((view, part_out, _, _), weight) in enumerate(zip(parts, weights)):
        weight = (weight / view.of(safe_total)).unsqueeze(-1)
        if index == 0 and (out := _whole_tensor(part_out, plan, q.shape)) is not None:
            part_out.mul_(weight)  # the r = 1 branch's output becomes the output, in place
            continue
        if out is None:
            out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        view.of(out).addcmul_(part_out, weight)
    if out is None:  # nothing covered at all
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    return out, lse, [state for *_, state in parts]


def _backward_views(kernels, grad_out, q, k, v, out, lse, plan, states, causal, scale):
    grads = None
    states = iter(states)
    for r, views in plan:
        for view in views:
            parts = kernels.backward(
                view.of(grad_out), view.of(q), view.of(k), view.of(v), view.of(out), view.of(lse).contiguous(), next(states),
                causal, scale,
            )
            if grads is None:
                adopted = [_whole_tensor(part, plan, t.shape) for part, t in zip(parts, (q, k, v))]
                if all(t is not None for t in adopted):  # the r = 1 branch's gradients become the gradients
                    grads = adopted
                    continue
                grads = [torch.zeros_like(t) for t in (q, k, v)]
            for grad, part in zip(grads, parts):
                view.of(grad).add_(part)
    if grads is None:
        grads = [torch.zeros_like(t) for t in (q, k, v)]
    return grads


# ----------------------------------------------------------------------------------------------------------
# Any layout: the torch backend's tables, gathered, one dense batch per row count
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """(segment, head) items of one branch with ``num_queries`` query and ``num_keys`` key rows each: flat row
    indices ``q_rows`` (G, num_keys; the first ``num_keys - num_queries`` point at a zero row) and ``k_rows``."""

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    num_queries: int


def _gather_plan(pattern: DilatedPattern, layout: TokenLayout, num_heads: int, num_kv_heads: int, device):
    key = ("cudnn", "groups", pattern.segment_lengths, pattern.dilation_rates, pattern.offsets, pattern.head_range,
           num_heads, num_kv_heads, str(device))
    if key in layout.cache:
        return layout.cache[key]
    zero_row = layout.batch_size * layout.num_queries * num_heads  # one past the last query row
    groups = []
    for branch, (w, r) in enumerate(pattern.branches):
        tables = _branch_tables(layout, w, r, pattern.head_offsets(branch, num_heads), num_heads, num_kv_heads, device)
        q_index, k_index = tables.q_index.flatten(0, 1), tables.k_index.flatten(0, 1)  # (S * H, L)
        q_count = tables.q_valid.flatten(0, 1).sum(-1).cpu()
        k_count = tables.k_valid.flatten(0, 1).sum(-1).cpu()
        counts = torch.stack([q_count, k_count], dim=1)
        for nq, nk in torch.unique(counts[q_count > 0], dim=0).tolist():
            items = torch.nonzero((q_count == nq) & (k_count == nk)).flatten().to(device)
            # valid rows come first in the tables; the queries are the last of the keys' rows
            pad = torch.full((len(items), nk - nq), zero_row, dtype=q_index.dtype, device=device)
            q_rows = torch.cat([pad, q_index[items, :nq]], dim=1)
            groups.append(_Group(q_rows, k_index[items, :nk], nq))
    layout.cache[key] = groups
    return groups


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]) if x.dim() == 4 else x.reshape(-1)
    return torch.cat([flat, flat.new_zeros((1,) + flat.shape[1:])])


def _rows(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(G, L) rows of a flat (rows, ...) tensor as a (G, 1, L, ...) batch of one head."""
    return flat[index].unsqueeze(1)


def _forward_gathered(kernels, q, k, v, groups, causal, scale):
    head_dim = q.shape[-1]
    accumulate = statistics_dtype(q.dtype)
    q_flat, k_flat, v_flat = _with_zero_row(q), k.reshape(-1, head_dim), v.reshape(-1, head_dim)
    out = torch.zeros(q_flat.shape, dtype=accumulate, device=q.device)
    lse = torch.full(q_flat.shape[:1], float("-inf"), dtype=accumulate, device=q.device)
    states = []
    for group in groups:
        part_out, part_lse, state = kernels.forward(
            _rows(q_flat, group.q_rows), _rows(k_flat, group.k_rows), _rows(v_flat, group.k_rows), causal, scale
        )
        states.append(state)
        real = slice(group.q_rows.shape[1] - group.num_queries, None)
        rows = group.q_rows[:, real].flatten()
        merge_partial(out, lse, rows, part_out[:, 0, real].reshape(-1, head_dim).to(accumulate), part_lse[:, 0, real].flatten())
    return out[:-1].view(q.shape), lse[:-1].view(q.shape[:3]), states


def _backward_gathered(kernels, grad_out, q, k, v, out, lse, groups, states, causal, scale):
    head_dim = q.shape[-1]
    q_flat, do_flat, o_flat = (_with_zero_row(t) for t in (q, grad_out, out))
    lse_flat = _with_zero_row(lse)
    k_flat, v_flat = k.reshape(-1, head_dim), v.reshape(-1, head_dim)
    accumulate = statistics_dtype(q.dtype)
    dq = torch.zeros(q_flat.shape, dtype=accumulate, device=q.device)
    dk = torch.zeros(k_flat.shape, dtype=accumulate, device=q.device)
    dv = torch.zeros_like(dk)
    for group, state in zip(groups, states):
        q_rows, k_rows = group.q_rows, group.k_rows
        part_dq, part_dk, part_dv = kernels.backward(
            _rows(do_flat, q_rows), _rows(q_flat, q_rows), _rows(k_flat, k_rows), _rows(v_flat, k_rows),
            _rows(o_flat, q_rows), _rows(lse_flat, q_rows), state, causal, scale,
        )
        dq.index_add_(0, q_rows.flatten(), part_dq.reshape(-1, head_dim).to(accumulate))
        dk.index_add_(0, k_rows.flatten(), part_dk.reshape(-1, head_dim).to(accumulate))
        dv.index_add_(0, k_rows.flatten(), part_dv.reshape(-1, head_dim).to(accumulate))
    return dq[:-1].view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------------------


def _expand_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Grouped-query key/value heads repeated to one per query head (the views need a head per query head)."""
    return t if t.shape[2] == num_heads else t.repeat_interleave(num_heads // t.shape[2], dim=2)


def _fold_heads(grad: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    batch, n, num_heads, head_dim = grad.shape
    return grad if num_heads == num_kv_heads else grad.view(batch, n, num_kv_heads, -1, head_dim).sum(3)


def _with_lse_columns(q, k, v, out, grad_out, grad_lse):
    """The 8 more head-dim columns through which a gradient on the LSE enters: v = 0, O = 1, dO = -dLSE."""
    pad = lambda t: torch.nn.functional.pad(t, (0, LSE_COLUMNS))  # noqa: E731
    ones = torch.nn.functional.pad(torch.ones_like(out[..., :1]), (0, LSE_COLUMNS - 1))
    minus_dlse = torch.nn.functional.pad((-grad_lse).unsqueeze(-1).to(grad_out.dtype), (0, LSE_COLUMNS - 1))
    return pad(q), pad(k), pad(v), torch.cat([out, ones], -1), torch.cat([grad_out, minus_dlse], -1)


class _CudnnDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, layout, causal, scale):
        num_heads, num_kv_heads = q.shape[2], k.shape[2]
        kernels = ctx.kernels = _kernels  # the backward runs the same kernels, wherever it is called from
        plan = _views_if_whole_rows(pattern, layout, num_heads)
        ctx.by_views = plan is not None
        if ctx.by_views:
            out, lse, states = _forward_views(kernels, q, _expand_heads(k, num_heads), _expand_heads(v, num_heads), plan, causal, scale)
        else:
            plan = _gather_plan(pattern, layout, num_heads, num_kv_heads, q.device)
            out, lse, states = _forward_gathered(kernels, q, k, v, plan, causal, scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.states, ctx.causal, ctx.scale = plan, states, causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        head_dim, num_heads, num_kv_heads = q.shape[-1], q.shape[2], k.shape[2]
        grad_out = torch.zeros_like(q) if grad_out is None else grad_out.to(q.dtype)
        lse = lse.nan_to_num(neginf=0.0)  # rows that saw nothing: no kernel reads them, but keep them finite
        by_views = ctx.by_views
        if by_views:
            k, v = _expand_heads(k, num_heads), _expand_heads(v, num_heads)
        if grad_lse is not None:
            if ctx.kernels is CUDNN_KERNELS and head_dim + LSE_COLUMNS > MAX_HEAD_DIM:
                raise ValueError(
                    f"backend='cudnn' takes a gradient on the LSE (return_lse=True) only for head_dim <= "
                    f"{MAX_HEAD_DIM - LSE_COLUMNS}, got {head_dim}: use backend='triton' or 'torch'"
                )
            q, k, v, out, grad_out = _with_lse_columns(q, k, v, out, grad_out, grad_lse)
        run = _backward_views if by_views else _backward_gathered
        dq, dk, dv = run(ctx.kernels, grad_out, q, k, v, out, lse, ctx.plan, ctx.states, ctx.causal, ctx.scale)
        dq, dk, dv = dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
        if by_views:
            dk, dv = _fold_heads(dk, num_kv_heads), _fold_heads(dv, num_kv_heads)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), None, None, None, None


def dilated_attention_cudnn(q, k, v, pattern: DilatedPattern, layout: TokenLayout, *, causal: bool, softmax_scale: float, dropout_p: float):
    """The cuDNN backend of :func:`~modeling_longnet.dilated_attention.dilated_attention`: ``(out, lse)``."""
    return _CudnnDilatedAttention.apply(q, k, v, pattern, layout, causal, softmax_scale)
