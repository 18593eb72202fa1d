"""Sequence parallelism for dilated attention: LongNet's distributed algorithm on ``torch.distributed``.

The ranks of a sequence-parallel group each hold one contiguous chunk of every sequence: rank p holds the
``C`` tokens at logical positions ``[p * C, (p + 1) * C)``. For each branch (w, r) of the pattern:

* ``w`` divides ``C``: every segment lies inside one chunk, and the rank computes the branch alone, with the
  core placed at its logical position (``position_offset = p * C``).
* ``w`` is a multiple of ``C`` (or covers the whole sequence): a segment spans the ``w / C`` ranks that hold
  it. In head h only the positions with ``(t mod w) mod r == o(h)`` take part, so each rank sends those
  *sparsified* keys and values (for each head, that head's own rows: about ``C / r`` per head) to the other
  ranks of its segment, and, when causal, only to the ranks after it, whose queries can see them. The exchange
  is an all-gather among the segment's ranks, run as one ``all_to_all_single`` over the group (empty messages
  to ranks of other segments, so no sub-group has to be created); its backward sends the key and value
  gradients back to their owners and sums them (a reduce-scatter). A rank receives about ``w / r`` rows per
  head whatever the sequence length: the traffic depends on the pattern and the chunk length, not on ``N``.
  The rank's queries then attend the gathered rows: per head, a dense attention over the segment's
  participating keys, which the core computes as a one-branch problem with one head per batch row.

Each part returns its output and its differentiable log-sum-exp; the parts mix exactly as in SPEC.md,
``O = sum_j exp(lse_j - LSE) O_j``. The gradient is the exact gradient of the single-device function.

A model runs under sequence parallelism, unchanged, with three calls (docs/sequence_parallel.md):
``apply_sequence_parallel(model, mesh["sp"])`` once, then per batch ``shard_batch(batch, mesh["sp"])`` and
``sequence_parallel_loss(model(**chunk).loss, mesh["sp"])``, with DDP or FSDP over all the ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dilated_attention import BACKENDS, _check_qkv, dilated_attention
from .dilated_attention_pattern import DilatedPattern, TokenLayout, statistics_dtype

__all__ = [
    "apply_sequence_parallel",
    "compatible_chunk_length",
    "sequence_parallel_dilated_attention",
    "sequence_parallel_loss",
    "shard_batch",
]


# ----------------------------------------------------------------------------------------------------------
# Which branches cross chunk boundaries, and the chunk lengths a pattern can take
# ----------------------------------------------------------------------------------------------------------


def _branch_is_local(segment_length: int, chunk_length: int, world_size: int) -> bool:
    return world_size == 1 or chunk_length % segment_length == 0


def _chunk_fits(segment_length: int, chunk_length: int, world_size: int) -> bool:
    """A chunk lies inside one segment of this branch, or the branch's segments lie inside chunks."""
    return (
        world_size == 1
        or chunk_length % segment_length == 0
        or segment_length % chunk_length == 0
        or segment_length >= chunk_length * world_size
    )


def compatible_chunk_length(segment_lengths: Sequence[int], world_size: int, chunk_length: int = 1) -> int:
    """The smallest chunk length >= ``chunk_length`` that sequence parallelism over ``world_size`` ranks can take.

    Each segment length must divide the chunk length, be a multiple of it, or cover the whole sequence
    (``world_size * chunk_length`` tokens), so that no segment is cut off inside a rank. The sequence length to
    use is ``world_size`` times the returned value (pad the sequences up to it).
    """
    pattern = DilatedPattern(segment_lengths, [1] * len(segment_lengths))
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}")
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, int) or chunk_length <= 0:
        raise ValueError(f"`chunk_length` must be a positive int, got {chunk_length!r}")
    if world_size == 1:
        return chunk_length
    lengths = sorted(set(pattern.segment_lengths))
    candidate = chunk_length
    while candidate <= lengths[-1]:
        # every segment length below a fitting chunk length divides it, so jump to the next common multiple
        shorter = [w for w in lengths if w < candidate]
        step = math.lcm(*shorter) if shorter else 1
        candidate = -(-candidate // step) * step
        if candidate > lengths[-1]:
            break
        if all(_chunk_fits(w, candidate, world_size) for w in lengths):
            return candidate
        candidate += step
    every = math.lcm(*lengths)  # longer than every segment: a multiple of them all
    return -(-candidate // every) * every


def _check_chunk_length(pattern: DilatedPattern, chunk_length: int, world_size: int) -> None:
    for i, w in enumerate(pattern.segment_lengths):
        if not _chunk_fits(w, chunk_length, world_size):
            fix = compatible_chunk_length(pattern.segment_lengths, world_size, chunk_length)
            raise ValueError(
                f"sequence parallelism over {world_size} ranks gives each rank a chunk of {chunk_length} tokens "
                f"(the length of `q`), which cuts segments of segment_lengths[{i}] = {w} inside a rank: every "
                f"segment length must divide the chunk length, be a multiple of it, or cover the whole sequence "
                f"({world_size * chunk_length} tokens). Pad the sequence to {world_size * fix} tokens (chunks of "
                f"{fix}; `compatible_chunk_length` computes this) or change `segment_lengths`."
            )


# ----------------------------------------------------------------------------------------------------------
# The plan of the branches that cross chunks: who sends what, and the problems each rank then solves
# ----------------------------------------------------------------------------------------------------------


def _participating_rows(rank: int, chunk_length: int, w: int, r: int, offset: int) -> tuple[int, int]:
    """(first local row, count) of rank ``rank``'s positions with ``(t mod w) mod r == offset``; stride ``r``.

    The chunk lies inside one segment, so ``t mod w`` runs over ``base, base + 1, ...`` with no wrap.
    """
    base = (rank * chunk_length) % w
    first = (offset - base) % r
    count = max(0, -(-(chunk_length - first) // r))
    return first, count


@dataclass
class _BranchProblem:
    """The rank's queries of one branch whose segments span several ranks, as a one-branch problem of the core.

    One query head per batch row ``b * H + h``, ``num_keys`` keys per row, left-padded: the received rows of
    the head's (key/value head, offset) pair in rank order, then the rank's own; the last ``num_queries`` slots
    are queries. A row's own queries are its last ones; the slots before them (a head with fewer participating
    rows than another) are computed and dropped.
    """

    query_source: torch.Tensor  # (B*H*Q,) rows of q.view(B*C*H, D)
    received_source: torch.Tensor  # rows of received.view(R*2*B, D) holding keys; values are B rows further
    received_target: torch.Tensor  # their slots in the (B*H*L) key rows of the problem
    own_source: torch.Tensor  # rows of k.view(B*C*H_kv, D)
    own_target: torch.Tensor
    output_slots: torch.Tensor  # (M,) real query slots of the problem's (B*H*Q) outputs
    layout: TokenLayout
    num_queries: int
    num_keys: int


@dataclass
class _ExchangePlan:
    """What one rank sends and receives for all the branches whose segments span several ranks, and the
    problems it then solves. Everything goes in one all-to-all: to each rank, the rows of every branch in which
    that rank needs them, as ``send_index`` into ``k.view(B, C * H_kv, D)`` (and ``v``); from each rank (in rank
    order), its rows of every branch in which this rank needs them, as ``(R, 2, B, D)`` (keys, values)."""

    send_index: torch.Tensor
    send_splits: list[int]
    receive_splits: list[int]
    problems: list[_BranchProblem]
    merged_rows: torch.Tensor  # the sorted union of the rank's queries that the problems answer
    merged_slots: tuple[torch.Tensor, ...]  # per problem: where its outputs go in merged_rows


def _flat(parts: list[torch.Tensor], device) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([p.reshape(-1) for p in parts]).to(device)


@functools.lru_cache(maxsize=8)
def _exchange_plan(
    world_size: int,
    rank: int,
    chunk_length: int,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    pattern: DilatedPattern,
    causal: bool,
    device: torch.device,
) -> _ExchangePlan:
    """Built once per shape and rank (on the CPU, then moved), and reused by every layer and step."""
    group_size = num_heads // num_kv_heads
    batch_index = torch.arange(batch).view(-1, 1)
    branches = [i for i, w in enumerate(pattern.segment_lengths) if not _branch_is_local(w, chunk_length, world_size)]

    # per branch: the (key/value head, offset) pairs in use, and every rank's participating rows of each
    pairs, pair_of_head, rows, senders, receivers = {}, {}, {}, {}, {}
    for b in branches:
        w, r = pattern.branches[b]
        head_offsets = pattern.head_offsets(b, num_heads)
        pairs[b] = sorted({(h // group_size, head_offsets[h]) for h in range(num_heads)})
        pair_of_head[b] = [pairs[b].index((h // group_size, head_offsets[h])) for h in range(num_heads)]
        rows[b] = [[_participating_rows(q, chunk_length, w, r, o) for (_, o) in pairs[b]] for q in range(world_size)]
        segment = rank * chunk_length // w
        members = [q for q in range(world_size) if q * chunk_length // w == segment]
        # causal: a rank's keys are seen only by the queries of later ranks
        senders[b] = [q for q in members if q != rank and (q < rank or not causal)]
        receivers[b] = [q for q in members if q != rank and (q > rank or not causal)]

    def rows_sent(q: int, b: int) -> int:
        return sum(count for _, count in rows[b][q])

    send_index, send_splits = [], []
    for q in range(world_size):
        to_q = [b for b in branches if q in receivers[b]]
        for b in to_q:
            r = pattern.dilation_rates[b]
            send_index += [
                (first + r * torch.arange(count)) * num_kv_heads + kv_head
                for (kv_head, _), (first, count) in zip(pairs[b], rows[b][rank])
            ]
        send_splits.append(sum(rows_sent(rank, b) for b in to_q))
    receive_splits = [sum(rows_sent(q, b) for b in branches if q in senders[b]) for q in range(world_size)]

    # where each sender's rows of each branch and pair start in the received buffer
    received_start = {}
    position = 0
    for q in range(world_size):
        for b in branches:
            if q in senders[b]:
                for u, (_, count) in enumerate(rows[b][q]):
                    received_start[q, b, u] = position
                    position += count

    problems, problem_queries = [], []  # problem_queries: the outputs' rows of the rank's (B*C*H) queries
    for b in branches:
        r = pattern.dilation_rates[b]
        remote_count = [sum(rows[b][q][u][1] for q in senders[b]) for u in range(len(pairs[b]))]
        own_count = [count for _, count in rows[b][rank]]
        num_keys = max(remote_count[u] + own_count[u] for u in pair_of_head[b])
        if num_keys == 0:  # no head of this call takes part in the branch (heads of one tensor-parallel rank)
            continue
        num_queries = max(own_count[u] for u in pair_of_head[b])
        received_source, received_target, own_source, own_target, output_slots, output_index = [], [], [], [], [], []
        query_source = torch.zeros(batch, num_heads, num_queries, dtype=torch.long)
        attention_mask = torch.zeros(batch, num_heads, num_keys, dtype=torch.long)
        for h in range(num_heads):
            u = pair_of_head[b][h]
            kv_head = pairs[b][u][0]
            first, count = rows[b][rank][u]
            row_start = (batch_index * num_heads + h) * num_keys  # (B, 1): first key slot of the row
            slot = num_keys - remote_count[u] - count
            attention_mask[:, h, slot:] = 1
            for q in senders[b]:
                n = rows[b][q][u][1]
                received = received_start[q, b, u] + torch.arange(n)
                received_source.append((received * 2 * batch).view(1, -1) + batch_index)
                received_target.append(row_start + slot + torch.arange(n))
                slot += n
            local_rows = first + r * torch.arange(count)
            own_source.append((batch_index * chunk_length + local_rows) * num_kv_heads + kv_head)
            own_target.append(row_start + slot + torch.arange(count))
            # the head's queries are the last `count` of the `num_queries` query slots; the others read row 0
            query_source[:, h, num_queries - count :] = (batch_index * chunk_length + local_rows) * num_heads + h
            query_start = (batch_index * num_heads + h) * num_queries
            output_slots.append(query_start + num_queries - count + torch.arange(count))
            output_index.append((batch_index * chunk_length + local_rows) * num_heads + h)
        layout = TokenLayout.build(
            batch * num_heads, num_keys, num_queries, attention_mask=attention_mask.view(batch * num_heads, num_keys)
        )
        problems.append(
            _BranchProblem(
                query_source=query_source.view(-1).to(device),
                received_source=_flat(received_source, device),
                received_target=_flat(received_target, device),
                own_source=_flat(own_source, device),
                own_target=_flat(own_target, device),
                output_slots=_flat(output_slots, device),
                layout=layout,
                num_queries=num_queries,
                num_keys=num_keys,
            )
        )
        problem_queries.append(_flat(output_index, "cpu"))
    merged_rows = torch.unique(torch.cat(problem_queries)) if problems else torch.zeros(0, dtype=torch.long)
    merged_slots = tuple(torch.searchsorted(merged_rows, queries).to(device) for queries in problem_queries)
    return _ExchangePlan(
        _flat(send_index, device), send_splits, receive_splits, problems, merged_rows.to(device), merged_slots
    )


# ----------------------------------------------------------------------------------------------------------
# Communication
# ----------------------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the way the rows came.

    With the rows a rank sends to each segment partner, the forward is the all-gather of a segment's sparsified
    keys and values, and the backward (through the index_select that picked the rows) its reduce-scatter.
    """

    @staticmethod
    def forward(ctx, rows, send_splits, receive_splits, group):
        received = rows.new_empty(sum(receive_splits), *rows.shape[1:])
        dist.all_to_all_single(received, rows.contiguous(), receive_splits, send_splits, group=group)
        ctx.send_splits, ctx.receive_splits, ctx.group = send_splits, receive_splits, group
        return received

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_received):
        grad_rows = grad_received.new_empty(sum(ctx.send_splits), *grad_received.shape[1:])
        dist.all_to_all_single(
            grad_rows, grad_received.contiguous(), ctx.send_splits, ctx.receive_splits, group=ctx.group
        )
        return grad_rows, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Mixing partial results
# ----------------------------------------------------------------------------------------------------------


class _MergePartials(torch.autograd.Function):
    """``O = sum_j w_j O_j``, ``w_j = exp(lse_j - LSE)``, of a dense part (every query) and sparse parts (some
    queries), the weights computed as ``exp(lse_j - M) / sum_k exp(lse_k - M)`` so that they add up to one.

    Sparse part j holds the ``(M_j, D)`` outputs and ``(M_j,)`` LSEs of the queries ``rows[slots_j]`` of the
    flattened ``(B * C * H)`` queries, ``rows`` being the sorted union of the parts' queries. Elsewhere the dense
    part is the result, so only those rows are mixed (a branch of dilation rate r touches 1/r of them), and only
    they are kept for the backward, which is written out: ``dO_j = w_j dO``,
    ``d lse_j = w_j (rowsum(dO * (O_j - O)) + dLSE)``, with the weights ``w_j = exp(lse_j - LSE)``.
    """

    @staticmethod
    def forward(ctx, dense_out, dense_lse, received, rows, slots, *sparse):
        # `received` only ties the exchange into the graph (see `sequence_parallel_dilated_attention`)
        ctx.received_shape = received.shape
        head_dim = dense_out.shape[-1]
        part_outs, part_lses = sparse[0::2], sparse[1::2]
        dense_rows = dense_out.reshape(-1, head_dim).index_select(0, rows)
        dense_row_lse = dense_lse.reshape(-1).index_select(0, rows)

        # Weights exp(lse_j - M) over their sum, M the largest of the row's LSEs: they add up to one at any logit
        # scale (exp(lse_j - LSE) against a separately rounded LSE does not), so the output stays convex.
        largest = dense_row_lse.clone()
        for slot, part_lse in zip(slots, part_lses):
            largest[slot] = torch.maximum(largest[slot], part_lse)
        finite = largest.nan_to_num(neginf=0.0)  # a query that no part covers keeps LSE = -inf and output 0
        raw = [torch.exp(dense_row_lse - finite)]
        raw += [torch.exp(part_lse - finite[slot]) for slot, part_lse in zip(slots, part_lses)]
        total = raw[0].clone()
        for slot, weight in zip(slots, raw[1:]):
            total.index_add_(0, slot, weight)
        safe_total = torch.where(total > 0, total, 1.0)
        lse = torch.where(total > 0, largest + torch.log(safe_total), largest)
        weights = [raw[0] / safe_total] + [weight / safe_total[slot] for slot, weight in zip(slots, raw[1:])]
        mixed = dense_rows * weights[0].unsqueeze(-1)  # in the LSE's (float32 or float64) precision
        for slot, part_out, weight in zip(slots, part_outs, weights[1:]):
            mixed.index_add_(0, slot, part_out * weight.unsqueeze(-1))
        mixed = mixed.to(dense_out.dtype)
        result = dense_out.clone()
        result.view(-1, head_dim).index_copy_(0, rows, mixed)
        merged_lse = dense_lse.clone()
        merged_lse.view(-1).index_copy_(0, rows, lse)

        ctx.save_for_backward(rows, dense_rows, mixed, *part_outs, *weights)
        ctx.slots, ctx.out_shape = slots, dense_out.shape
        ctx.set_materialize_grads(False)
        return result, merged_lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        rows, dense_rows, mixed, *saved = ctx.saved_tensors
        part_outs, weights = saved[: len(ctx.slots)], saved[len(ctx.slots) :]
        compute = weights[0].dtype  # of the LSE: float32, or float64 for float64 inputs
        head_dim = dense_rows.shape[-1]
        if grad_out is None:  # only the LSE was used
            grad_out = dense_rows.new_zeros(ctx.out_shape)
        # Outside `rows` the dense part is the output: its gradients pass through unchanged.
        grad_dense_out = grad_out.clone()
        grad_dense_lse = grad_lse.clone() if grad_lse is not None else weights[0].new_zeros(ctx.out_shape[:-1])
        g = grad_out.reshape(-1, head_dim).index_select(0, rows).to(compute)
        g_lse = None if grad_lse is None else grad_lse.reshape(-1).index_select(0, rows).to(compute)
        mixed = mixed.to(compute)

        def lse_gradient(weight, part, part_g, part_mixed, part_g_lse):
            d_lse = (part_g * (part.to(compute) - part_mixed)).sum(-1)
            return weight * (d_lse if part_g_lse is None else d_lse + part_g_lse)

        grad_dense_out.view(-1, head_dim).index_copy_(0, rows, (weights[0].unsqueeze(-1) * g).to(grad_dense_out.dtype))
        grad_dense_lse.view(-1).index_copy_(0, rows, lse_gradient(weights[0], dense_rows, g, mixed, g_lse))
        grad_parts = []
        for slot, part_out, weight in zip(ctx.slots, part_outs, weights[1:]):
            part_g = g[slot]
            part_g_lse = None if g_lse is None else g_lse[slot]
            grad_parts += [
                (weight.unsqueeze(-1) * part_g).to(part_out.dtype),
                lse_gradient(weight, part_out, part_g, mixed[slot], part_g_lse),
            ]
        grad_received = dense_rows.new_zeros(ctx.received_shape)
        return (grad_dense_out, grad_dense_lse, grad_received, None, None, *grad_parts)


# ----------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------


def _group_rank_and_size(group) -> tuple[int, int]:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"`group` must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sequence parallelism needs an initialized process group: call torch.distributed.init_process_group "
            "(torchrun and accelerate launch set up the environment for it)"
        )
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of `group`")
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange(k, v, plan: _ExchangePlan, group) -> torch.Tensor:
    """Sends this rank's sparsified keys and values to the ranks that need them; returns ``(R, 2, B, D)``."""
    batch, chunk_length, num_kv_heads, head_dim = k.shape
    k_rows = k.reshape(batch, chunk_length * num_kv_heads, head_dim).index_select(1, plan.send_index)
    v_rows = v.reshape(batch, chunk_length * num_kv_heads, head_dim).index_select(1, plan.send_index)
    sent = torch.stack((k_rows, v_rows)).permute(2, 0, 1, 3)  # (rows, k/v, B, D): rows first, to split by rank
    return _AllToAll.apply(sent, plan.send_splits, plan.receive_splits, group)


def _solve_problem(q, k, v, received, problem: _BranchProblem, *, causal, softmax_scale, dropout_p, backend):
    """One branch's outputs ``(M, D)`` and LSE ``(M,)`` for the rank's queries it answers, in the plan's order."""
    batch, _, num_heads, head_dim = q.shape
    received = received.view(-1, head_dim)

    def problem_keys(local: torch.Tensor, value_shift: int) -> torch.Tensor:
        keys = local.new_zeros(batch * num_heads * problem.num_keys, head_dim)
        keys = keys.index_copy(
            0, problem.received_target, received.index_select(0, problem.received_source + value_shift)
        )
        keys = keys.index_copy(0, problem.own_target, local.reshape(-1, head_dim).index_select(0, problem.own_source))
        return keys.view(batch * num_heads, problem.num_keys, 1, head_dim)

    if problem.num_queries == 0:  # this rank answers none of the branch's queries (a query always sees itself)
        lse_dtype = statistics_dtype(q.dtype)
        return q.reshape(-1, head_dim)[:0] * 0, q.new_zeros(0, dtype=lse_dtype)  # empty, still in the graph
    problem_q = q.reshape(-1, head_dim).index_select(0, problem.query_source)
    out, lse = dilated_attention(
        problem_q.view(batch * num_heads, problem.num_queries, 1, head_dim),
        problem_keys(k, 0),
        problem_keys(v, batch),
        max(problem.num_keys, 1),
        1,
        causal=causal,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        backend=backend,
        token_layout=problem.layout,
        return_lse=True,
    )
    out = out.reshape(-1, head_dim).index_select(0, problem.output_slots)
    return out, lse.reshape(-1).index_select(0, problem.output_slots)


def sequence_parallel_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: int | Sequence[int],
    dilation_rates: int | Sequence[int],
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    offsets: str = "interleaved",
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_lse: bool = False,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`~modeling_longnet.dilated_attention.dilated_attention` of a sequence split over the ranks of ``group``.

    Every rank of ``group`` calls it with its own chunk, in rank order: rank p's ``q``, ``k``, ``v`` are the
    tokens at positions ``[p * C, (p + 1) * C)`` of the sequences, all ranks with the same shapes. The result is
    the rank's chunk of the single-device output (and of its LSE), with the exact gradient; the key and value
    gradients that other ranks' queries produce come back to their owner.

    Args:
        q: ``(B, C, H, D)`` the rank's queries.
        k, v: ``(B, C, H_kv, D)`` the rank's keys and values (``H`` a multiple of ``H_kv``).
        segment_lengths, dilation_rates: the branches, as in ``dilated_attention``. Each segment length must
            divide the chunk length ``C``, be a multiple of it, or be at least the sequence length ``N = C *
            world size`` (see :func:`compatible_chunk_length`).
        group: the sequence-parallel process group (default: the whole world).
        causal, softmax_scale, offsets, dropout_p, backend, return_lse, heads: as in ``dilated_attention``
            (``heads``: the call's heads are heads ``first ..`` of a layer of ``total``, under tensor parallelism).

    Returns:
        ``(B, C, H, D)``, and the ``(B, C, H)`` LSE if ``return_lse``.
    """
    _check_qkv(q, k, v)
    pattern = DilatedPattern(segment_lengths, dilation_rates, offsets, heads)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"`q` and `k` must hold the same chunk of the sequence (no KV cache under sequence parallelism), got "
            f"{q.shape[1]} and {k.shape[1]} positions"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"`causal` must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"`return_lse` must be a bool, got {return_lse!r}")
    rank, world_size = _group_rank_and_size(group)
    batch, chunk_length, num_heads, head_dim = q.shape
    _check_chunk_length(pattern, chunk_length, world_size)
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    common = {"causal": causal, "softmax_scale": softmax_scale, "dropout_p": dropout_p, "backend": backend}

    local = [i for i, w in enumerate(pattern.segment_lengths) if _branch_is_local(w, chunk_length, world_size)]
    exchanged = [i for i in range(len(pattern.branches)) if i not in local]
    if local:
        dense_out, dense_lse = dilated_attention(
            q,
            k,
            v,
            [pattern.segment_lengths[i] for i in local],
            [pattern.dilation_rates[i] for i in local],
            offsets=offsets,
            heads=heads,
            # one layout per shape and rank, shared process-wide: its index tables are built once, not per layer
            token_layout=TokenLayout.build(batch, chunk_length, chunk_length, position_offset=rank * chunk_length),
            return_lse=True,
            **common,
        )
        if not exchanged:
            return (dense_out, dense_lse) if return_lse else dense_out
    else:
        dense_out = q.new_zeros(q.shape)
        lse_dtype = statistics_dtype(q.dtype)  # the core's LSE dtype
        dense_lse = torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype, device=q.device)

    plan = _exchange_plan(world_size, rank, chunk_length, batch, num_heads, k.shape[2], pattern, causal, q.device)
    received = _exchange(k, v, plan, group)
    sparse = []
    for problem in plan.problems:
        sparse += _solve_problem(q, k, v, received, problem, **common)
    # Every rank must run the exchange's backward (a collective) even if none of its queries read the received
    # rows (a rank whose chunk holds no participating query): the merge takes them as an input so that the
    # backward always reaches the exchange.
    out, lse = _MergePartials.apply(dense_out, dense_lse, received, plan.merged_rows, plan.merged_slots, *sparse)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------
# A model under sequence parallelism
# ----------------------------------------------------------------------------------------------------------
#
# The model is not edited: apply_sequence_parallel registers an attention function bound to the group in the
# model's ALL_DILATED_ATTENTION_FUNCTIONS and switches the model to it. Everything else a layer does (projections,
# rotary positions, norms, MLP) is per token and runs on the rank's chunk as it is; the positions come from
# shard_batch.

# (group, backend) -> the name its attention function is registered under; holding the group keeps it alive
_registered_functions: dict[tuple[dist.ProcessGroup | None, str], str] = {}


def _as_process_group(sp_group):
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(sp_group, DeviceMesh):
        if sp_group.ndim != 1:
            raise ValueError(
                f"`sp_group` must be a 1-D device mesh (e.g. mesh['sp']), got one of dimensions {sp_group.mesh_dim_names}"
            )
        return sp_group.get_group()
    if sp_group is not None and not isinstance(sp_group, dist.ProcessGroup):
        raise TypeError(
            f"`sp_group` must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None (the whole world), got "
            f"{type(sp_group).__name__}"
        )
    return sp_group


def _check_whole_chunks(token_layout: TokenLayout) -> None:
    """Sequence parallelism takes whole sequences of real tokens: no padding, packing or KV cache."""
    if not token_layout.is_whole_rows():
        raise ValueError(
            "sequence parallelism takes batches of whole sequences, every token real: no `attention_mask` with "
            "padding, no packed documents (`position_ids` restarting at 0) and no KV cache (pass use_cache=False). "
            "Pack the training data into full-length rows and let `shard_batch` split them"
        )


def _sequence_parallel_attention_function(group, backend: str):
    def attention(module, query, key, value, token_layout, *, scaling, dropout=0.0, heads=None, **kwargs):
        _check_whole_chunks(token_layout)
        attn_output = sequence_parallel_dilated_attention(
            query,
            key,
            value,
            module.segment_lengths,
            module.dilation_rates,
            group=group,
            causal=module.is_causal,
            softmax_scale=scaling,
            offsets=module.offsets,
            dropout_p=dropout,
            backend=backend,
            heads=heads,  # a tensor-parallel rank's heads keep the offsets of their global index
        )
        return attn_output, None

    return attention


def apply_sequence_parallel(model, sp_group=None):
    """Makes ``model`` (a LongNet model of this package) compute its attention over the ranks of ``sp_group``.

    Every rank of the group then runs the model on its own chunk of each sequence (see :func:`shard_batch`); the
    attention of each layer exchanges the sparsified keys and values of the segments that cross chunks, and every
    other part of a layer is per token. Outputs and gradients equal those of one process on the whole sequence.
    Call it on every rank, before wrapping the model for data parallelism (DDP or FSDP over all the
    ``dp x sp`` ranks, as ``accelerate`` does). The model keeps its attention backend (``"auto"``, ``"torch"``,
    ``"triton"``, ``"cudnn"`` or ``"flash"``) for the pieces each rank computes.

    Args:
        model: a ``LongNetPreTrainedModel`` (``LongNetForCausalLM``, ``LongNetModel``, ...).
        sp_group: the sequence-parallel ``ProcessGroup``, a 1-D ``DeviceMesh`` (``mesh["sp"]`` of
            ``init_device_mesh(device, (dp, sp), mesh_dim_names=("dp", "sp"))``), or None for the whole world.

    Returns:
        ``model``, changed in place.
    """
    from .modeling_longnet import ALL_DILATED_ATTENTION_FUNCTIONS, LongNetPreTrainedModel

    group = _as_process_group(sp_group)
    if not isinstance(model, LongNetPreTrainedModel):
        raise TypeError(
            f"`model` must be a LongNet model of this package, got {type(model).__name__}: apply sequence "
            "parallelism before wrapping the model for data parallelism"
        )
    config = model.config
    if config.position_encoding == "xpos":
        raise ValueError(
            "position_encoding='xpos' scales queries and keys about the middle of each call's positions, which "
            "differs from rank to rank, so the ranks' scores would not match: use position_encoding='rope' (or "
            "'none') under sequence parallelism"
        )
    backend = config._attn_implementation
    previous = next((key for key, name in _registered_functions.items() if name == backend), None)
    if previous is not None:  # applied before: keep the backend it ran on
        backend = previous[1]
    if backend not in BACKENDS:
        raise ValueError(
            f"attn_implementation={backend!r} cannot be split over ranks: sequence parallelism runs the core "
            f"backends {BACKENDS}; load the model with one of them"
        )
    _group_rank_and_size(group)
    key = (group, backend)
    if key not in _registered_functions:
        name = f"sequence_parallel_{backend}_{len(_registered_functions)}"
        ALL_DILATED_ATTENTION_FUNCTIONS.register(name, _sequence_parallel_attention_function(group, backend))
        _registered_functions[key] = name
    model.set_attn_implementation(_registered_functions[key])
    return model


def shard_batch(batch, sp_group=None, *, ignore_index: int = -100) -> dict:
    """This rank's chunk of a batch of whole sequences, ready for ``model(**chunk)``.

    Every rank of ``sp_group`` must receive the same ``batch`` (a data loader sharded over the data-parallel
    ranks only). Rank p keeps positions ``[p * C, (p + 1) * C)`` of ``input_ids`` (or ``inputs_embeds``),
    ``position_ids`` (made as ``0..N-1`` if absent) and ``labels``. The causal-LM targets are shifted before the
    split (``shift_labels``), so that a chunk's last token predicts the next chunk's first; ``num_items_in_batch``,
    the number of targets in the whole batch, makes each rank's loss its share of the batch's mean, which
    :func:`sequence_parallel_loss` adds up. An ``attention_mask`` must be all ones (it is dropped); other keys
    pass through unchanged.

    Args:
        batch: a mapping with ``input_ids`` or ``inputs_embeds`` of N positions, and optionally ``labels``,
            ``position_ids``, ``attention_mask``.
        sp_group: as in :func:`apply_sequence_parallel`.
        ignore_index: the label of positions without a loss.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"`batch` must be a mapping such as a dict, got {type(batch).__name__}")
    rank, world_size = _group_rank_and_size(_as_process_group(sp_group))
    tokens_key = "input_ids" if batch.get("input_ids") is not None else "inputs_embeds"
    tokens = batch.get(tokens_key)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        raise ValueError("`batch` needs `input_ids` (batch, seq) or `inputs_embeds` (batch, seq, hidden) tensors")
    batch_size, length = tokens.shape[:2]
    if length % world_size != 0:
        multiple = -(-length // world_size) * world_size
        raise ValueError(
            f"batch[{tokens_key!r}] has {length} positions, which {world_size} sequence-parallel ranks cannot split "
            f"evenly: pad or cut the sequences to a multiple of {world_size} (e.g. {multiple}); each segment length "
            "must also fit the chunks (see `compatible_chunk_length`)"
        )
    chunk_length = length // world_size
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask != 0).all()):
        raise ValueError(
            "batch['attention_mask'] marks padding, which sequence parallelism does not take: pack the data into "
            "full-length rows"
        )
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=tokens.device).expand(batch_size, length)
    elif bool((position_ids[..., 1:] == 0).any()):
        raise ValueError(
            "batch['position_ids'] restart at 0 inside a row (packed documents), which sequence parallelism does "
            "not take: give each row one sequence"
        )

    def chunk(t: torch.Tensor) -> torch.Tensor:
        # contiguous: transformers' loss views the labels flat
        return t.narrow(1, rank * chunk_length, chunk_length).contiguous()

    sharded = {key: value for key, value in batch.items() if key not in ("attention_mask", "labels", "shift_labels")}
    sharded[tokens_key] = chunk(tokens)
    sharded["position_ids"] = chunk(position_ids)
    labels, shift_labels = batch.get("labels"), batch.get("shift_labels")
    if labels is not None or shift_labels is not None:
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        sharded["labels"] = chunk(labels if labels is not None else shift_labels)
        sharded["shift_labels"] = chunk(shift_labels)
        sharded["num_items_in_batch"] = (shift_labels != ignore_index).sum()
    return sharded


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, group):
        total = value.clone()
        dist.all_reduce(total, group=group)
        ctx.group = group
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # the adjoint of a sum over ranks: each rank's share receives the sum of every rank's upstream gradient
        grad = grad_total.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sequence_parallel_loss(loss: torch.Tensor, sp_group=None) -> torch.Tensor:
    """The whole batch's loss from each rank's share (the ``loss`` of a model fed by :func:`shard_batch`).

    Returns the same value on every rank of ``sp_group``. Its backward gives each rank's share the sum of the
    ranks' upstream gradients, ``sp`` times the usual one, so that a data-parallel wrapper that averages
    gradients over all ``dp x sp`` ranks (DDP, FSDP, accelerate) yields the gradient of the mean loss, averaged
    over the data-parallel replicas.
    """
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"`loss` must be a scalar tensor, got {loss!r:.80}")
    group = _as_process_group(sp_group)
    _group_rank_and_size(group)
    return _AllReduceSum.apply(loss, group)
