"""The ground floor of dilated attention: what every backend agrees on.

* :class:`DilatedPattern`: the branches (segment length w_i, dilation rate r_i) and each head's offset in each.
* :func:`pattern_coverage`: which (position, head) pairs some branch covers, decided from residues in bounded time.
* :class:`TokenLayout`: where a batch's real tokens lie and their logical positions (padding, packed documents,
  a KV cache's offset).
* :func:`_branch_tables`: the gather tables of one branch over one layout, built once and cached on the layout.
* :func:`merge_partial` / :func:`merge_partial_max_sum`: the exact and stable mix of partial softmaxes.

The definition itself is SPEC.md, summarised in ``dilated_attention.py``. This module imports nothing of the
package: the backends that take a layout (``dilated_attention_torch``, ``_cudnn``, ``_flash``, ``_dense``,
``_decode``) import it (``_triton`` builds its plans from the layout it is handed and needs nothing else of it), the
entry point ``dilated_attention`` imports them, so arrows point down only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Sequence

import torch

OFFSET_MODES = ("interleaved", "grouped")
# Segment lengths, dilation rates and position offsets stay below this, so that logical positions, segment starts
# and their sums never overflow int64 (2**63) in any backend's index arithmetic.
MAX_BRANCH_VALUE = 1 << 48

__all__ = [
    "OFFSET_MODES",
    "MAX_BRANCH_VALUE",
    "DilatedPattern",
    "TokenLayout",
    "head_offsets",
    "PatternCoverage",
    "pattern_coverage",
    "merge_partial",
    "merge_partial_max_sum",
    "softmax_entries",
]



# ----------------------------------------------------------------------------------------------------------
# The pattern: branches and head offsets
# ----------------------------------------------------------------------------------------------------------


def branch_values(values, name: str) -> tuple[int, ...]:
    """One positive int per branch, from an int or a sequence of them (``name``: the argument, for the errors)."""
    if type(values) in (list, tuple) and values and all(type(v) is int and 0 < v <= MAX_BRANCH_VALUE for v in values):
        return tuple(values)  # the common case, without the cost of the abstract classes' checks (every call)
    if isinstance(values, Integral) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a positive int or a list of positive ints, got {values!r}")
    if len(values) == 0:
        raise ValueError(f"`{name}` is empty: give at least one branch")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"`{name}` must contain ints, got {value!r} ({type(value).__name__}) in {list(values)}")
        if value <= 0:
            raise ValueError(f"`{name}` must contain positive ints, got {value} in {list(values)}")
        if value > MAX_BRANCH_VALUE:
            raise ValueError(
                f"`{name}` must contain ints up to 2**48 (positions are computed in int64), got {value} in "
                f"{list(values)}"
                + ("; a segment longer than the sequence is one segment: use a value up to 2**48" if "segment" in name else "")
            )
    return tuple(int(v) for v in values)


def head_offsets(dilation_rate: int, num_heads: int, mode: str = "interleaved") -> list[int]:
    """The offset o(h) of each head in a branch of dilation rate ``dilation_rate``: ``h mod r`` ("interleaved",
    the paper's) or ``h // ceil(H / r)`` ("grouped", torchscale's); SPEC.md defines both."""
    if mode == "interleaved":
        return [h % dilation_rate for h in range(num_heads)]
    if mode == "grouped":
        heads_per_offset = -(-num_heads // dilation_rate)
        return [h // heads_per_offset for h in range(num_heads)]
    raise ValueError(f"`offsets` must be one of {OFFSET_MODES}, got {mode!r}")


@dataclass(frozen=True)
class DilatedPattern:
    """The branches (segment length, dilation rate) of a dilated attention, and how heads pick their offsets."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    offsets: str = "interleaved"
    # (first, total): the heads of a call are heads first .. of a layer of `total` heads (tensor parallelism);
    # offsets follow the global index. None: the call holds every head.
    head_range: tuple[int, int] | None = None

    def __init__(self, segment_lengths, dilation_rates, offsets: str = "interleaved", head_range=None):
        segment_lengths = branch_values(segment_lengths, "segment_lengths")
        dilation_rates = branch_values(dilation_rates, "dilation_rates")
        if len(segment_lengths) != len(dilation_rates):
            raise ValueError(
                f"`segment_lengths` and `dilation_rates` must have one entry per branch, got "
                f"{len(segment_lengths)} segment lengths {list(segment_lengths)} and {len(dilation_rates)} "
                f"dilation rates {list(dilation_rates)}"
            )
        if not isinstance(offsets, str) or offsets not in OFFSET_MODES:
            raise ValueError(f"`offsets` must be one of {OFFSET_MODES}, got {offsets!r}")
        object.__setattr__(self, "segment_lengths", segment_lengths)
        object.__setattr__(self, "dilation_rates", dilation_rates)
        object.__setattr__(self, "offsets", offsets)
        if head_range is not None:
            if (
                not isinstance(head_range, (tuple, list)) or len(head_range) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in head_range)
                or not 0 <= head_range[0] < head_range[1]
            ):
                raise ValueError(
                    f"`heads` must be (first head, heads of the layer) with 0 <= first < heads, got {head_range!r}"
                )
            head_range = (int(head_range[0]), int(head_range[1]))
        object.__setattr__(self, "head_range", head_range)

    @property
    def branches(self) -> list[tuple[int, int]]:
        return list(zip(self.segment_lengths, self.dilation_rates))

    def head_offsets(self, branch: int, num_heads: int) -> list[int]:
        if self.head_range is None:
            return head_offsets(self.dilation_rates[branch], num_heads, self.offsets)
        first, total = self.head_range
        if first + num_heads > total:
            raise ValueError(f"`heads` = {self.head_range} leaves no room for the {num_heads} heads of q")
        return head_offsets(self.dilation_rates[branch], total, self.offsets)[first : first + num_heads]


@dataclass(frozen=True)
class PatternCoverage:
    """Which (position, head) pairs a pattern leaves outside every branch, per period of the pattern.

    A head's output at such a pair is zero (SPEC.md). ``uncovered_positions`` counts the positions that *no* head
    covers: a token there gets zero from every head, which a model cannot recover from; ``uncovered_pairs``
    counts (position, head) pairs (``None`` where the count was too costly, see :func:`pattern_coverage`).
    """

    period: int  # the pattern repeats every `period` logical positions
    num_heads: int
    uncovered_positions: int | None  # None: some, not counted
    uncovered_pairs: int | None  # None: not counted (some_pair_uncovered says whether any exist)
    first_uncovered_position: int | None  # the smallest such position, where it was located
    first_uncovered_pair: tuple[int, int] | None  # (position, head)
    some_pair_uncovered: bool | None  # None: undecided within the bounds

    @property
    def every_position_covered(self) -> bool:
        return self.uncovered_positions == 0

    @property
    def complete(self) -> bool:
        """Every head covers every position (False also where that could not be decided)."""
        return self.some_pair_uncovered is False

    def describe(self) -> str:
        if self.complete:
            return "every head covers every position"
        if self.some_pair_uncovered is None:
            return (
                "every position is covered by some head; whether every head covers every one of the "
                f"{self.period} positions of a period was not decided"
            )
        pairs = "some" if self.uncovered_pairs is None else f"{self.uncovered_pairs}"
        text = (
            f"{pairs} of the {self.num_heads} x {self.period} (head, position mod {self.period}) pairs lie outside "
            "every branch"
        )
        if self.first_uncovered_pair is not None:
            text += f" (the first: position {self.first_uncovered_pair[0]}, head {self.first_uncovered_pair[1]})"
        text += "; their outputs are zero"
        if self.uncovered_positions != 0:
            count = "some" if self.uncovered_positions is None else str(self.uncovered_positions)
            where = "" if self.first_uncovered_position is None else f", the first at {self.first_uncovered_position}"
            text += f", and {count} positions per period are covered by no head at all{where}"
        return text


# An exact scan covers at most this many positions of one independent part of the period (below), and at most
# _PAIR_SCAN_WORK (position, head group) checks; beyond them only closed forms answer.
_COVERAGE_SCAN_LIMIT = 1 << 20
_PAIR_SCAN_WORK = 1 << 23
_COVERAGE_SCAN_CHUNK = 1 << 16


def _branch_residue_period(w: int, r: int) -> int:
    """(t mod w) mod r depends on t through t mod this: r where r divides w (then it is t mod r), else w."""
    return r if w % r == 0 else w


def _count_below(w: int, r: int, limit: int) -> int:
    """#{x in [0, w): x mod r < limit}."""
    full, rest = divmod(w, r)
    return full * min(limit, r) + min(rest, limit)


def _independent_parts(periods: list[int]) -> list[list[int]]:
    """Branches grouped so that periods of different groups are coprime: by the Chinese remainder theorem the
    residues of different groups take every combination, so each group can be analysed alone."""
    parent = list(range(len(periods)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(periods)):
        for b in range(a + 1, len(periods)):
            if math.gcd(periods[a], periods[b]) > 1:
                parent[root(a)] = root(b)
    parts: dict[int, list[int]] = {}
    for i in range(len(periods)):
        parts.setdefault(root(i), []).append(i)
    return list(parts.values())


def pattern_coverage(segment_lengths, dilation_rates, num_heads: int, offsets: str = "interleaved") -> PatternCoverage:
    """Which (position, head) pairs no branch covers: a summary in bounded time and memory, whatever the period.

    Head h covers logical position t in branch i iff ``(t mod w_i) mod r_i == o_i(h)``. That depends on t only
    through ``t mod P_i``, with ``P_i = r_i`` where ``r_i`` divides ``w_i`` and ``w_i`` otherwise, so the pattern
    repeats every ``lcm(P_i)`` positions (much less than ``lcm(w_i)``: ``[8191, 8192]`` with rates ``[2, 2]``
    repeats every 16382). Branches whose periods are coprime to each other's are independent (Chinese remainder
    theorem), so the counts are products over groups of branches, each group decided by a closed form (a branch
    that covers everything, a density bound) or an exact scan of at most 2**20 positions. A pattern that none of
    these decides raises a ValueError that says how to change it.
    """
    pattern = DilatedPattern(segment_lengths, dilation_rates, offsets)
    if isinstance(num_heads, bool) or not isinstance(num_heads, Integral) or num_heads <= 0:
        raise ValueError(f"`num_heads` must be a positive int, got {num_heads!r}")
    num_heads = int(num_heads)
    # A branch listed twice covers what it covers once.
    unique = [i for i, branch in enumerate(pattern.branches) if branch not in pattern.branches[:i]]
    branches = [pattern.branches[i] for i in unique]
    head_offsets_per_branch = [pattern.head_offsets(i, num_heads) for i in unique]
    offsets_taken = [max(o) + 1 for o in head_offsets_per_branch]  # both modes take the offsets 0 .. p_i - 1
    periods = [_branch_residue_period(w, r) for w, r in branches]
    period = math.lcm(*periods)

    def below(i: int, limit: int) -> int:
        """#{x in [0, P_i): (x mod w_i) mod r_i < limit}."""
        w, r = branches[i]
        return min(limit, r) if periods[i] == r else _count_below(w, r, limit)

    # Heads with the same offset in every branch cover the same positions.
    head_groups: dict[tuple[int, ...], list[int]] = {}
    for h in range(num_heads):
        head_groups.setdefault(tuple(o[h] for o in head_offsets_per_branch), []).append(h)

    parts = _independent_parts(periods)
    # Per part: positions no head covers, and per head group the positions it does not cover (None: unknown).
    part_positions: list[int | None] = []
    part_pairs: list[dict[tuple[int, ...], int | None]] = []
    part_first: list[tuple[int | None, dict]] = []
    for part in parts:
        part_period = math.lcm(*(periods[i] for i in part))
        # closed forms first
        if any(offsets_taken[i] >= min(branches[i]) for i in part):  # min(w, r): one branch reaches every residue
            positions = 0
        elif len(part) == 1:
            positions = periods[part[0]] - below(part[0], offsets_taken[part[0]])
        else:
            positions = None
        pairs: dict[tuple[int, ...], int | None] = {}
        for key in head_groups:
            if any(min(branches[i]) == 1 and key[i] == 0 for i in part):  # r = 1 (or w = 1): every position
                pairs[key] = 0
            elif len(part) == 1:
                i = part[0]
                pairs[key] = periods[i] - (below(i, key[i] + 1) - below(i, key[i]))
            else:
                pairs[key] = None
        first_position, first_pairs = None, {}
        scan_positions = positions is None and part_period <= _COVERAGE_SCAN_LIMIT
        open_keys = [key for key, count in pairs.items() if count is None]
        scan_pairs = (
            open_keys and part_period <= _COVERAGE_SCAN_LIMIT and len(open_keys) * part_period <= _PAIR_SCAN_WORK
        )
        if len(parts) == 1 and part_period <= _COVERAGE_SCAN_LIMIT:
            # one part: the scan also finds the first uncovered position and pair
            scan_positions = scan_positions or positions != 0
            scan_pairs = part_period * len(head_groups) <= _PAIR_SCAN_WORK
            open_keys = list(head_groups) if scan_pairs else open_keys
        if scan_positions or scan_pairs:
            found_positions = 0
            found_pairs = {key: 0 for key in open_keys}
            for begin in range(0, part_period, _COVERAGE_SCAN_CHUNK):
                t = torch.arange(begin, min(begin + _COVERAGE_SCAN_CHUNK, part_period), dtype=torch.int64, device="cpu")
                residues = {i: (t % branches[i][0]) % branches[i][1] for i in part}
                if scan_positions:
                    none = torch.ones_like(t, dtype=torch.bool)
                    for i in part:
                        none &= residues[i] >= offsets_taken[i]
                    count = int(none.sum())
                    if count and first_position is None:
                        first_position = begin + int(none.nonzero()[0, 0])
                    found_positions += count
                if scan_pairs:
                    for key in open_keys:
                        outside = torch.ones_like(t, dtype=torch.bool)
                        for i in part:
                            outside &= residues[i] != key[i]
                        count = int(outside.sum())
                        if count and key not in first_pairs:
                            first_pairs[key] = begin + int(outside.nonzero()[0, 0])
                        found_pairs[key] += count
            if scan_positions:
                positions = found_positions
            if scan_pairs:
                pairs.update(found_pairs)
        if positions is None:
            covered_share = sum(below(i, offsets_taken[i]) / periods[i] for i in part)
            if covered_share >= 1:
                raise ValueError(
                    f"cannot decide whether `segment_lengths`={list(pattern.segment_lengths)} with `dilation_rates`="
                    f"{list(pattern.dilation_rates)} leave positions that no head covers: a group of branches repeats "
                    f"every {part_period} positions, too many to scan, and no closed form applies. Use segment lengths "
                    "that are multiples of their dilation rates, at least as many heads as the largest rate, or a "
                    "branch with rate 1"
                )
            positions = -1  # some: the covered shares add up to less than 1 (a union bound), count not known
        part_positions.append(positions)
        part_pairs.append(pairs)
        part_first.append((first_position, first_pairs))

    def product(counts):
        if any(c == 0 for c in counts):
            return 0
        if any(c is None or c < 0 for c in counts):
            return None
        return math.prod(counts)

    uncovered_positions = product(part_positions)
    pair_counts = {key: product([pairs[key] for pairs in part_pairs]) for key in head_groups}
    if all(count is not None for count in pair_counts.values()):
        uncovered_pairs = sum(count * len(head_groups[key]) for key, count in pair_counts.items())
        some_pair = uncovered_pairs > 0
    else:
        uncovered_pairs = None
        known_some = any(c for c in pair_counts.values() if c is not None)
        some_pair = True if known_some or uncovered_positions != 0 else None
    first_position = first_pair = None
    if len(parts) == 1:
        first_position = part_first[0][0] if uncovered_positions else None
        candidates = [(where, head_groups[key][0]) for key, where in part_first[0][1].items()]
        first_pair = min(candidates) if candidates and some_pair else None
    return PatternCoverage(
        period=period,
        num_heads=num_heads,
        uncovered_positions=uncovered_positions,
        uncovered_pairs=uncovered_pairs,
        first_uncovered_position=first_position,
        first_uncovered_pair=first_pair,
        some_pair_uncovered=some_pair,
    )


# ----------------------------------------------------------------------------------------------------------
# Where the tokens are: documents and logical positions
# ----------------------------------------------------------------------------------------------------------


def is_tracing() -> bool:
    """Inside torch.compile or torch.export: tensor values cannot be read, so layouts are built at run time,
    inside the attention's custom op (see ``LayoutInputs``)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """The logical position of each real token of ``mask``'s rows (nonzero: real), counted from 0 over the real
    tokens; a padding token gets its predecessor's (0 before the first), as ``generate`` computes ``position_ids``.
    Only tensor operations: nothing is read on the host."""
    return ((mask != 0).long().cumsum(-1) - 1).clamp(min=0)


@dataclass(eq=False)
class PositionLayout:
    """Each key's and query's logical position and whether it is a real token, as tensors on the device: the
    layout of a few queries against keys in any order, one document per row (a decoding step that reads a static
    cache's ring as it lies in memory). Nothing of it is read on the host, so a step with it is one graph that
    CUDA graphs can capture; ``dilated_attention`` computes it densely (``dilated_attention_dense``)."""

    key_positions: torch.Tensor  # (B, N_k) long, >= 0; any value where the key is padding
    key_real: torch.Tensor  # (B, N_k) bool
    query_positions: torch.Tensor  # (B, N_q) long, >= 0
    query_real: torch.Tensor  # (B, N_q) bool

    @classmethod
    def from_mask(cls, mask: torch.Tensor, num_queries: int, position_offset: torch.Tensor | int = 0) -> "PositionLayout":
        """Keys in row order (1 = real), the queries the last ``num_queries`` of them, positions counted over the
        real keys from ``position_offset``."""
        real = mask != 0
        offset = torch.as_tensor(position_offset, device=mask.device).reshape(-1, 1)
        positions = positions_from_mask(real) + offset
        return cls(positions, real, positions[:, -num_queries:], real[:, -num_queries:])


@dataclass(eq=False)
class SelectedKeys:
    """Keys already chosen by the pattern for each query head: ``k`` and ``v`` hold, per query head (``H_kv = H``),
    the candidate keys of a single query per row, one copy for each branch that may show the key to it (so the
    softmax over them is the one over the multiset union), and ``valid`` ``(B, H, N_k)`` says which candidates the
    query does see. Made by a static cache's ring for a decoding step, from positions alone (see
    ``cache_longnet.ring_candidates``): the step then reads only those keys, not the whole ring."""

    valid: torch.Tensor  # (B, H, N_k) bool


@dataclass(eq=False)
class LayoutInputs:
    """What :meth:`TokenLayout.build` reads, kept as tensors for a traced graph: the attention's custom op
    builds (and checks) the layout when the graph runs. ``packing_position_ids`` are a model's position ids,
    from which packed documents are read (positions restarting at 0)."""

    batch_size: int
    num_keys: int
    num_queries: int
    attention_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    position_offset: torch.Tensor | int | None = None
    packing_position_ids: torch.Tensor | None = None


@dataclass(eq=False)
class TokenLayout:
    """Where the real tokens of a batch lie, and their logical positions.

    One entry per document run: batch row ``doc_row``, first key index ``doc_start``, ``doc_length`` tokens,
    the first of which has logical position ``doc_first_position``. Every key outside these runs is padding.
    The ``num_queries`` queries are the last ``num_queries`` key positions (the KV-cache convention).

    Build it with :meth:`build`; a model builds it once per forward pass and hands it to every layer. Backends
    may cache their own tables derived from it in ``cache``.

    A mask with holes (0s between 1s) has ``compaction`` set: the documents then describe each row with its real
    tokens moved, in order, to its end (:class:`Compaction`); ``dilated_attention`` moves q, k, v there, runs the
    backend and moves the output back, so that backends only ever see contiguous documents.
    """

    batch_size: int
    num_keys: int
    num_queries: int
    doc_row: torch.Tensor
    doc_start: torch.Tensor
    doc_length: torch.Tensor
    doc_first_position: torch.Tensor
    cache: dict = field(default_factory=dict, repr=False)
    compaction: "Compaction | None" = None

    @property
    def query_begin(self) -> int:
        return self.num_keys - self.num_queries

    @property
    def num_documents(self) -> int:
        return int(self.doc_row.numel())

    @classmethod
    def build(
        cls,
        batch_size: int,
        num_keys: int,
        num_queries: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_offset: torch.Tensor | int | None = None,
        device: torch.device | None = None,
    ) -> "TokenLayout":
        """Checks ``attention_mask`` / ``cu_seqlens`` / ``position_offset`` and turns them into documents.

        A batch of whole rows (no mask, or a mask of 1s; one shared int offset) gets the one layout kept for its
        sizes, so that the tables backends derive from it (``cache``) are built once, not at every call.
        Inside torch.compile / torch.export it returns the inputs themselves (``LayoutInputs``): the attention's
        custom op builds the layout when the graph runs.
        """
        num_queries = num_keys if num_queries is None else num_queries
        if is_tracing():
            return LayoutInputs(batch_size, num_keys, num_queries, attention_mask, cu_seqlens, position_offset)
        compaction = None
        if attention_mask is None and cu_seqlens is None and num_keys > 0 and _is_shared_offset(position_offset):
            return _whole_rows_layout(batch_size, num_keys, num_queries, int(position_offset or 0))
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError(
                "give either `attention_mask` (padding) or `cu_seqlens` (packed documents), not both: packed "
                "rows have no padding"
            )
        if cu_seqlens is not None:
            if position_offset is not None:
                raise ValueError("`position_offset` cannot be combined with `cu_seqlens`")
            if num_queries != num_keys:
                raise ValueError("`cu_seqlens` needs as many queries as keys")
            starts, lengths = _documents_from_cu_seqlens(cu_seqlens, batch_size, num_keys, device)
            rows = torch.zeros_like(starts)
            first = torch.zeros_like(starts)
        else:
            rows = torch.arange(batch_size)
            if attention_mask is not None:
                starts, lengths, compaction = _documents_from_mask(attention_mask, batch_size, num_keys, num_queries, device)
            else:
                starts = torch.zeros(batch_size, dtype=torch.long)
                lengths = torch.full((batch_size,), num_keys, dtype=torch.long)
            first = _position_offsets(position_offset, batch_size)
            keep = lengths > 0
            rows, starts, lengths, first = rows[keep], starts[keep], lengths[keep], first[keep]
            if num_keys > 0 and len(rows) == batch_size and bool((lengths == num_keys).all()) and bool((first == first[0]).all()):
                return _whole_rows_layout(batch_size, num_keys, num_queries, int(first[0]))
        return cls(batch_size, num_keys, num_queries, rows, starts, lengths, first, compaction=compaction)

    def is_whole_rows(self) -> bool:
        """Whether every row is one document of all its keys from logical position 0, with as many queries as keys:
        a batch without padding, packing or a KV cache (kept in ``cache``: it reads the documents once)."""
        key = "whole_rows"
        if key not in self.cache:
            self.cache[key] = (
                self.compaction is None
                and self.num_queries == self.num_keys
                and self.num_documents == self.batch_size
                and bool((self.doc_row == torch.arange(self.batch_size)).all())
                and bool((self.doc_start == 0).all())
                and bool((self.doc_length == self.num_keys).all())
                and bool((self.doc_first_position == 0).all())
            )
        return self.cache[key]

    def logical_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(document id, logical position)`` of every key, shape (B, N_k) each, on the CPU; document id -1 is
        padding. Kept in ``cache``: every layer of a forward asks it of the same layout (do not modify them)."""
        if "logical_positions" not in self.cache:
            self.cache["logical_positions"] = self._logical_positions()
        return self.cache["logical_positions"]

    def _logical_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        doc = torch.full((self.batch_size, self.num_keys), -1, dtype=torch.long)
        pos = torch.zeros((self.batch_size, self.num_keys), dtype=torch.long)
        for d in range(self.num_documents):
            b, s, n, p = (int(x[d]) for x in (self.doc_row, self.doc_start, self.doc_length, self.doc_first_position))
            doc[b, s : s + n] = d
            pos[b, s : s + n] = torch.arange(p, p + n)
        if self.compaction is not None:  # back from the compacted rows to where the tokens are
            order = self.compaction.key_order.cpu()
            real = order >= 0
            rows = torch.arange(self.batch_size)[:, None].expand_as(order)
            doc_back = torch.full_like(doc, -1)
            pos_back = torch.zeros_like(pos)
            doc_back[rows[real], order[real]] = doc[real]
            pos_back[rows[real], order[real]] = pos[real]
            doc, pos = doc_back, pos_back
        return doc, pos


@dataclass(eq=False)
class Compaction:
    """How a batch whose mask has holes maps onto rows of contiguous real tokens: each row's real keys, in order,
    at its end. ``key_order[b, j]``: the key index that compacted key j of row b comes from, -1 for padding;
    ``query_order[b, i]``: the query index that compacted query i (key ``num_keys - num_queries + i``) comes
    from, -1 where it is no query of the batch (padding, or an earlier real key moved there: its output is
    computed and dropped); ``query_slot[b, i]``: where query i went, -1 for a hole."""

    key_order: torch.Tensor
    query_order: torch.Tensor
    query_slot: torch.Tensor

    @classmethod
    def from_real(cls, real: torch.Tensor, num_queries: int, device) -> "Compaction":
        batch_size, num_keys = real.shape
        query_begin = num_keys - num_queries
        counts = real.sum(-1, keepdim=True)
        # rank of each real key among its row's real keys, and the compacted slot it goes to
        slot = torch.where(real, num_keys - counts + real.long().cumsum(-1) - 1, -1)
        rows = torch.arange(batch_size)[:, None].expand_as(real)
        key_order = torch.full((batch_size, num_keys), -1, dtype=torch.long)
        key_order[rows[real], slot[real]] = torch.arange(num_keys).expand_as(real)[real]
        query_order = key_order[:, query_begin:] - query_begin
        query_order = torch.where(query_order >= 0, query_order, -1)
        query_slot = torch.where(slot[:, query_begin:] >= 0, slot[:, query_begin:] - query_begin, -1)
        return cls(*(t.to(device) for t in (key_order, query_order, query_slot)))

    @staticmethod
    def gather(x: torch.Tensor, order: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Row ``order[b, j]`` of ``x[b]`` (B, L, ...) at ``[b, j]``, ``fill`` where ``order`` is -1; differentiable."""
        return _CompactionGather.apply(x, order, fill)

    def scatter_back(self, out: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """The compacted queries' rows ``out`` (B, N_q, ...) back where the queries are, ``fill`` at the holes."""
        return self.gather(out, self.query_slot, fill)


def _gather_rows(x: torch.Tensor, order: torch.Tensor, fill: float) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    picked = x[rows, order.clamp(min=0)]
    keep = (order >= 0).view(*order.shape, *([1] * (x.dim() - 2)))
    return torch.where(keep, picked, torch.full((), fill, dtype=x.dtype, device=x.device))


class _CompactionGather(torch.autograd.Function):
    """An autograd Function rather than indexing ops, so that it is differentiable also where autograd's dispatch
    is off: the compiled graph's backward op recomputes the attention under ``torch.autograd.grad`` inside a
    custom op (see ``dilated_attention._attention_backward_op``), where only Functions record a graph, as the
    backends' do."""

    @staticmethod
    def forward(ctx, x, order, fill):
        ctx.save_for_backward(order)
        ctx.source_shape = x.shape
        return _gather_rows(x, order, fill)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        grad_x = grad.new_zeros(ctx.source_shape)
        keep = order >= 0
        rows = torch.arange(order.shape[0], device=order.device)[:, None].expand_as(order)
        # the taken rows receive their gradient; each source row is taken at most once (orders are injective)
        grad_x[rows[keep], order[keep]] = grad[keep]
        return grad_x, None, None


def packed_documents(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``cu_seqlens`` of the documents packed in one row, marked by ``position_ids`` restarting at 0 (as
    ``DataCollatorWithFlattening`` makes them), or None if nothing restarts."""
    restarts = position_ids[..., 1:] == 0
    if not bool(restarts.any()):
        return None
    if batch != 1 or position_ids.dim() != 2:
        raise ValueError(
            "`position_ids` restart at 0 inside a row, which marks packed sequences; packing needs batch size 1 (as "
            "DataCollatorWithFlattening makes). For padded batches pass an `attention_mask` instead"
        )
    starts = torch.nonzero(restarts[0]).flatten() + 1
    length = torch.tensor([position_ids.shape[-1]], device=starts.device)
    return torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts, length]).to(torch.int32)


def _is_shared_offset(position_offset) -> bool:
    return position_offset is None or (
        isinstance(position_offset, Integral) and not isinstance(position_offset, bool) and 0 <= position_offset <= MAX_BRANCH_VALUE
    )


@functools.lru_cache(maxsize=64)
def _whole_rows_layout(batch_size: int, num_keys: int, num_queries: int, first_position: int) -> TokenLayout:
    """The layout of ``batch_size`` rows of ``num_keys`` real tokens each, the first at ``first_position``: one per
    sizes, shared by every call (and every layer) that has them. Bounded: 64 shapes at most are kept."""
    return TokenLayout(
        batch_size, num_keys, num_queries,
        doc_row=torch.arange(batch_size),
        doc_start=torch.zeros(batch_size, dtype=torch.long),
        doc_length=torch.full((batch_size,), num_keys, dtype=torch.long),
        doc_first_position=torch.full((batch_size,), first_position, dtype=torch.long),
    )


def _on_device(tensor: torch.Tensor, device) -> bool:
    """Whether ``tensor`` lies on ``device`` (None: anywhere), given as a string or a torch.device; "cuda" without
    an index means the current GPU."""
    if device is None:
        return True
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return tensor.device == device


def _documents_from_mask(mask: torch.Tensor, batch_size: int, num_keys: int, num_queries: int, device):
    """``(starts, lengths, compaction)`` of the one document per row; a row with holes is compacted (its real
    tokens moved to its end), and then every row is."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != (batch_size, num_keys):
        raise ValueError(
            f"`attention_mask` must have shape (batch, key_length) = {(batch_size, num_keys)}, got {tuple(mask.shape)}"
        )
    if not _on_device(mask, device):
        raise ValueError(f"`attention_mask` is on {mask.device} but the queries are on {device}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("`attention_mask` must hold 1 for real tokens and 0 for padding, got other values")
    real = (mask != 0).cpu()
    lengths = real.sum(dim=1)
    index = torch.arange(num_keys).expand_as(real)
    starts = torch.where(real, index, num_keys).amin(dim=1)
    ends = torch.where(real, index + 1, 0).amax(dim=1)
    holes = ((ends - starts) != lengths) & (lengths > 0)
    if bool(holes.any()):
        # 0s between 1s: those tokens simply are not there (SPEC.md); every row becomes left-padded
        return (num_keys - lengths).long(), lengths.long(), Compaction.from_real(real, num_queries, device)
    starts = torch.where(lengths > 0, starts, 0)
    return starts.long(), lengths.long(), None


def _documents_from_cu_seqlens(cu_seqlens, batch_size: int, num_keys: int, device) -> tuple[torch.Tensor, ...]:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"`cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`cu_seqlens` must be int32 (or int64), got {cu_seqlens.dtype}")
    if batch_size != 1:
        raise ValueError(f"`cu_seqlens` packs documents into one row: the batch size must be 1, got {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"`cu_seqlens` must be 1-D with documents + 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if not _on_device(cu_seqlens, device):
        raise ValueError(f"`cu_seqlens` is on {cu_seqlens.device} but the queries are on {device}")
    cu = cu_seqlens.cpu().long()
    if int(cu[0]) != 0 or int(cu[-1]) != num_keys:
        raise ValueError(f"`cu_seqlens` must start at 0 and end at the sequence length {num_keys}, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"`cu_seqlens` must be non-decreasing, got {cu.tolist()}")
    keep = lengths > 0
    return cu[:-1][keep], lengths[keep]


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers: positions, token ids, labels (bool is a mask, not a number)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _position_offsets(position_offset, batch_size: int) -> torch.Tensor:
    if position_offset is None:
        return torch.zeros(batch_size, dtype=torch.long)
    if isinstance(position_offset, Integral) and not isinstance(position_offset, bool):
        offsets = torch.full((batch_size,), int(position_offset), dtype=torch.long)
    elif isinstance(position_offset, torch.Tensor) and is_integer_dtype(position_offset.dtype):
        if position_offset.shape not in ((batch_size,), ()):
            raise ValueError(f"`position_offset` must have shape (batch,) = ({batch_size},), got {tuple(position_offset.shape)}")
        offsets = position_offset.detach().cpu().long().expand(batch_size).clone()
    else:
        raise TypeError(f"`position_offset` must be an int or an integer tensor of shape (batch,), got {position_offset!r}")
    if bool((offsets < 0).any()) or bool((offsets > MAX_BRANCH_VALUE).any()):
        raise ValueError(
            f"`position_offset` must be between 0 and 2**48 (positions are computed in int64), got {offsets.tolist()}"
        )
    return offsets



# ----------------------------------------------------------------------------------------------------------
# Branch gather tables and the exact merge, shared by the backends
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _BranchTables:
    """Gather tables of one branch: (S, H, L) flat row indices of queries and keys, and their validity."""

    q_index: torch.Tensor  # into q.reshape(B * N_q * H, D); invalid entries point at row 0
    q_valid: torch.Tensor
    k_index: torch.Tensor  # into k.reshape(B * N_k * H_kv, D)
    k_valid: torch.Tensor
    q_position: torch.Tensor  # logical positions, for the causal mask
    k_position: torch.Tensor
    # Score biases of the chunks (0 where a query sees a key, -inf elsewhere): built by the first layer, reused by
    # the others and by the backward pass, since rebuilding the mask costs as much as the scores' arithmetic.
    score_bias: dict = field(default_factory=dict, repr=False)
    score_bias_bytes: int = 0


def _participating(seg_base, seg_lo, seg_hi, offsets, r):
    """Enumerate t = seg_base + o + j*r in [lo, hi) for every (segment, head): returns t (S, H, L) and validity."""
    o = offsets.view(1, -1)
    rel_lo = (seg_lo - seg_base).view(-1, 1) - o
    rel_hi = (seg_hi - seg_base).view(-1, 1) - o
    j_lo = torch.div(rel_lo + r - 1, r, rounding_mode="floor").clamp(min=0)
    j_hi = torch.div(rel_hi + r - 1, r, rounding_mode="floor").clamp(min=0)
    count = (j_hi - j_lo).clamp(min=0)
    length = int(count.max()) if count.numel() else 0
    j = j_lo.unsqueeze(-1) + torch.arange(length)
    t = seg_base.view(-1, 1, 1) + o.unsqueeze(-1) + j * r
    valid = torch.arange(length) < count.unsqueeze(-1)
    return t, valid


def _branch_tables(layout: TokenLayout, w: int, r: int, offsets: list[int], num_heads: int, num_kv_heads: int, device):
    key = ("torch", w, r, tuple(offsets), num_heads, num_kv_heads, str(device))
    if key in layout.cache:
        return layout.cache[key]
    first = layout.doc_first_position
    start, length, row = layout.doc_start, layout.doc_length, layout.doc_row
    # logical range of each document's queries (the last num_queries key positions)
    q_first = first + (layout.query_begin - start).clamp(min=0)
    last = first + length  # exclusive
    has_queries = q_first < last
    seg_first = torch.div(q_first, w, rounding_mode="floor")
    seg_count = torch.where(has_queries, torch.div(last - 1, w, rounding_mode="floor") - seg_first + 1, 0)
    doc_of_seg = torch.repeat_interleave(torch.arange(len(seg_count)), seg_count)
    seg_number = seg_first[doc_of_seg] + torch.arange(len(doc_of_seg)) - torch.repeat_interleave(
        torch.cumsum(seg_count, 0) - seg_count, seg_count
    )
    seg_base = seg_number * w
    hi = torch.minimum(seg_base + w, last[doc_of_seg])
    k_lo = torch.maximum(seg_base, first[doc_of_seg])
    q_lo = torch.maximum(seg_base, q_first[doc_of_seg])
    offs = torch.tensor(offsets, dtype=torch.long)
    k_t, k_valid = _participating(seg_base, k_lo, hi, offs, r)
    q_t, q_valid = _participating(seg_base, q_lo, hi, offs, r)

    group = num_heads // num_kv_heads
    heads = torch.arange(num_heads).view(1, -1, 1)
    doc_row = row[doc_of_seg].view(-1, 1, 1)
    to_physical = (start - first)[doc_of_seg].view(-1, 1, 1)
    k_index = ((doc_row * layout.num_keys + k_t + to_physical) * num_kv_heads + heads // group)
    q_index = ((doc_row * layout.num_queries + q_t + to_physical - layout.query_begin) * num_heads + heads)
    tables = _BranchTables(
        q_index=torch.where(q_valid, q_index, 0).to(device),
        q_valid=q_valid.to(device),
        k_index=torch.where(k_valid, k_index, 0).to(device),
        k_valid=k_valid.to(device),
        q_position=q_t.to(device),
        k_position=k_t.to(device),
    )
    layout.cache[key] = tables
    return tables


def merge_partial(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor):
    """Mix a partial result (its rows' outputs and log-sum-exps) into the running ``out`` / ``lse``, in place.

    This is how a flash-attention kernel merges key blocks, and how the branches mix: the result is the softmax
    over the union of the keys seen so far. ``rows`` must not repeat, except for a spare row nobody reads.

    The two weights are ``exp(lse - M)`` over their sum, ``M`` the larger LSE: they add up to one whatever the
    scale of the logits, so the output stays a convex combination of value rows. (Weights ``exp(lse - LSE)``
    against a separately rounded ``LSE`` do not: at logits of 1e9 an LSE is rounded by 64 and the weights by e^64.)
    """
    old_lse = lse[rows]
    largest = torch.maximum(old_lse, part_lse)
    finite = largest.nan_to_num(neginf=0.0)  # rows that have seen nothing yet stay 0 instead of NaN
    total = _mix_rows(out, rows, torch.exp(old_lse - finite), part_out, torch.exp(part_lse - finite))
    lse[rows] = torch.where(total > 0, largest + torch.log(torch.where(total > 0, total, 1.0)), largest)


def _mix_rows(out, rows, old_weight, part_out, part_weight) -> torch.Tensor:
    """``out[rows]`` := the weighted mean of itself and ``part_out``; returns the weights' total (0 where both are)."""
    total = old_weight + part_weight
    safe_total = torch.where(total > 0, total, 1.0)
    out[rows] = (out[rows] * old_weight.unsqueeze(-1) + part_out * part_weight.unsqueeze(-1)) / safe_total.unsqueeze(-1)
    return total


def merge_partial_max_sum(out, row_max, row_sum, rows, part_out, part_max, part_sum):
    """:func:`merge_partial` from running maxima and sums instead of log-sum-exps, in place.

    A row's state is its largest score ``row_max`` (a score itself, so ``score - row_max`` loses nothing at any
    scale) and ``row_sum = sum exp(score - row_max)`` over the keys seen so far; ``LSE = row_max + log(row_sum)``
    is formed only at the end. Folding one into the other would round the LSE by ``ulp(row_max)``: 64 at logits
    of 1e9 in float32, which would then return as a factor e^64 on the softmax entries of the backward pass.
    """
    old_max, old_sum = row_max[rows], row_sum[rows]
    new_max = torch.maximum(old_max, part_max)
    finite = new_max.nan_to_num(neginf=0.0)  # rows that have seen nothing yet stay 0 instead of NaN
    old_weight, part_weight = old_sum * torch.exp(old_max - finite), part_sum * torch.exp(part_max - finite)
    row_sum[rows] = _mix_rows(out, rows, old_weight, part_out, part_weight)
    row_max[rows] = new_max


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a softmax's row statistics (maxima, sums, LSE) and accumulations for inputs of ``dtype``:
    float64 for float64, float32 for everything narrower (16-bit inputs accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_from_max_and_sum(row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """A softmax row's log-sum-exp ``m + log(l)`` from its largest score ``m`` and its sum ``l = sum exp(s - m)``,
    formed only at the end (SPEC.md, mixing): ``-inf`` where the row saw nothing (``l = 0``)."""
    return torch.where(row_sum > 0, row_max + torch.log(torch.where(row_sum > 0, row_sum, 1.0)), float("-inf"))


def softmax_entries(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(scores - lse)``, the mixed softmax's entries in a backward pass, at most 1 as a probability is: a
    score recomputed with another rounding than the one that made the LSE must not overflow (fp16 logits of 1e3
    otherwise give infinite dQ)."""
    return torch.exp(torch.clamp(scores - lse, max=0.0))
