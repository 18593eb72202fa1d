"""KV caches for LongNet generation.

In every branch (w, r) a causal query at logical position t sees only keys of its own segment,
``[t // w * w, t]``. Once a row holds ``L`` real tokens, no future query (t >= L) can see a key before
``min_i (L // w_i) * w_i``: :class:`LongNetBoundedCache` drops those keys after each step. It holds fewer than
``max(segment_lengths)`` tokens per row and layer however long the generation (a batch keeps the earliest key
any row still needs, so left padding adds the difference in padding), and each decoding step attends a
bounded number of keys. The model tells the attention where the kept keys start logically through
``position_offset`` (see ``dilated_attention``), so the result is exactly the full cache's.

:class:`LongNetStaticCache` is the same bound with fixed shapes, for compiled decoding (CUDA graphs, export): per
layer a ring of ``max(segment_lengths)`` slots, the real token of logical position ``p`` in slot ``p % slots``.
Pass it to ``generate`` as the bounded cache is passed.

A plain ``transformers.DynamicCache`` works too, and keeps everything. So does transformers' ``StaticCache``
(``generate(..., cache_implementation="static")``, which transformers' tools and tests expect to give exactly
that): fixed shapes, ``max_cache_len`` slots. Its buffers hold the tokens at slots ``0 .. seen - 1`` and nothing
after; for the kernels the model reads them rotated by :func:`static_key_order`, the unwritten slots first, which
makes them left padding and the new tokens the last keys, the layout every backend takes, with no value of a
tensor read on the host (a decoding step reads them as they lie, as a :class:`PositionLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticCache

from .dilated_attention_pattern import PositionLayout, SelectedKeys, TokenLayout, head_offsets, is_tracing

__all__ = [
    "LongNetBoundedCache",
    "LongNetStaticCache",
    "RingCandidates",
    "RingStep",
    "SegmentBoundedLayer",
    "SegmentRingLayer",
    "cached_lengths",
    "check_cache",
    "ring_candidates",
    "static_key_order",
]


class SegmentBoundedLayer(DynamicLayer):
    """One layer of :class:`LongNetBoundedCache`: keys and values ``(batch, kv_heads, kept, head_dim)`` of the
    most recent tokens, from the first one a future query can still see."""

    is_sliding = True  # bounded: offloading treats it like a sliding-window layer
    is_croppable = False

    def __init__(self, segment_lengths):
        super().__init__()
        self.segment_lengths = tuple(int(w) for w in segment_lengths)
        self.cumulative_length = 0  # tokens seen, kept or dropped

    def update(self, key_states, value_states, *args, token_layout: TokenLayout | None = None, **kwargs):
        """Appends the new states, returns every kept key and value (the current queries may need all of them),
        then drops the leading positions that no later query can see. ``token_layout`` describes the returned
        keys (the model passes the one it built for this step); without it every row is taken as unpadded."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        keep_from = self._first_needed_key(keys.shape[-2], token_layout)
        self.keys, self.values = keys[..., keep_from:, :], values[..., keep_from:, :]
        return keys, values

    def _first_needed_key(self, num_keys: int, layout: TokenLayout | None) -> int:
        if layout is None:
            seen = self.cumulative_length
            return min(seen // w * w for w in self.segment_lengths) - (seen - num_keys)
        key = ("bounded_cache_keep_from", self.segment_lengths)
        if key not in layout.cache:  # every layer asks the same of one layout
            if layout.num_keys != num_keys:
                raise ValueError(f"`token_layout` describes {layout.num_keys} keys but the cache holds {num_keys}")
            # Logical end of each document, the first position a later query of it can see, and where that lies.
            end = layout.doc_first_position + layout.doc_length
            first_needed = torch.stack([end // w * w for w in self.segment_lengths]).amin(0)
            index = layout.doc_start + (first_needed - layout.doc_first_position)
            # Only the last document of a row goes on; the others need nothing any more.
            last_start = torch.full((layout.batch_size,), -1, dtype=torch.long)
            last_start = last_start.scatter_reduce(0, layout.doc_row, layout.doc_start, reduce="amax")
            last = layout.doc_start == last_start[layout.doc_row]
            index, rows = index[last], layout.doc_row[last]
            if layout.compaction is not None and index.numel():  # compacted key j is key key_order[b, j]
                order = layout.compaction.key_order.cpu()
                index = torch.where(index < num_keys, order[rows, index.clamp(max=num_keys - 1)], num_keys)
            layout.cache[key] = int(index.min()) if index.numel() else num_keys
        return layout.cache[key]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "LongNetBoundedCache cannot be rolled back (it has dropped keys that earlier positions would need again); "
            "use a DynamicCache for assisted or speculative decoding"
        )

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0


def _check_cache_config(config, cache_name: str) -> None:
    """A LongNet cache is sized by a LongNet model's config: its layers and its segment lengths."""
    if not all(hasattr(config, name) for name in ("segment_lengths", "num_hidden_layers", "causal")):
        raise TypeError(
            f"{cache_name} takes the LongNetConfig of the model it serves (`{cache_name}(model.config)`), "
            f"got {type(config).__name__}"
        )
    if not config.causal:
        raise ValueError(
            f"{cache_name} needs a causal model (`config.causal=True`): a bidirectional model has no KV cache"
        )


class LongNetBoundedCache(Cache):
    """A KV cache that keeps, per layer, only the keys that causal dilated attention can still use: fewer than
    ``max(config.segment_lengths)`` tokens per row, whatever the number of tokens generated.

    Pass it to ``generate`` (``cache=`` from transformers 5.24, ``past_key_values=`` before) or to the forward::

        cache = LongNetBoundedCache(model.config)
        model.generate(**inputs, cache=cache, max_new_tokens=100_000)
    """

    def __init__(self, config, offloading: bool = False):
        _check_cache_config(config, type(self).__name__)
        self.segment_lengths = tuple(int(w) for w in config.segment_lengths)
        layers = [SegmentBoundedLayer(self.segment_lengths) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers, offloading=offloading)


@dataclass(eq=False)
class RingStep:
    """What one forward step with a :class:`LongNetStaticCache` reads and writes, planned once for every layer
    (:meth:`LongNetStaticCache.plan_step`).

    For the kernels (``positions`` None) the step attends ``slots + new`` keys in position order: the ring read
    oldest first (``read_slots``), then the new tokens; ``key_mask`` and ``position_offset`` make their
    TokenLayout. For the dense path (``positions``, a :class:`PositionLayout`) the keys stay in slot order: one
    new token is written first and the ring is attended as it lies (``in_place``, no copy; the layers of most
    implementations then read only each head's candidates, :func:`ring_candidates`); more are attended after the
    ring, before they are written."""

    write_slots: torch.Tensor  # (batch, new): where each new token goes; the spare slot `slots` for padding
    key_positions: torch.Tensor  # (batch, keys): the step's keys' logical positions (any value for padding)
    query_positions: torch.Tensor  # (batch, new): the new tokens' logical positions
    read_slots: torch.Tensor | None = None  # (batch, slots): the slot of each ring key, oldest first
    key_mask: torch.Tensor | None = None  # (batch, slots + new): which of the step's keys are real tokens
    position_offset: torch.Tensor | None = None  # (batch,): the logical position of each row's first real key
    positions: PositionLayout | None = None
    in_place: bool = False
    # what the layers derive from the step, computed by the first and reused by the others (ring_candidates)
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def num_keys(self) -> int:
        return self.key_positions.shape[1]


class SegmentRingLayer(CacheLayerMixin):
    """One layer of :class:`LongNetStaticCache`: fixed buffers ``(batch, kv_heads, slots + 1, head_dim)``; the
    real token of logical position ``p`` lies in slot ``p % slots``, the last slot takes what is not kept."""

    is_compileable = True
    is_sliding = True
    is_croppable = False

    def __init__(self, slots: int):
        super().__init__()
        self.slots = slots
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # tokens seen, padding included

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.slots + 1, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.slots + 1, value_states.shape[-1])
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not is_tracing():  # fixed addresses: compiled steps update them in place (and CUDA graphs may replay)
            for tensor in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, ring_step: RingStep | None = None, **kwargs):
        """Returns the ring's keys and values, oldest first, followed by the new ones (``ring_step.num_keys``),
        then writes the new ones into their slots. It reads before it writes: a new token may take the slot of a
        key that this step's first queries still see."""
        if ring_step is None:
            raise ValueError(
                "a LongNetStaticCache is updated by the LongNet model's forward, which plans each step for all "
                "layers (LongNetStaticCache.plan_step): pass the cache to the model as `cache`"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif (self.keys.shape[1], self.keys.shape[-1]) != (key_states.shape[1], key_states.shape[-1]):
            raise ValueError(
                f"this LongNetStaticCache's buffers hold (heads, head_dim) = {(self.keys.shape[1], self.keys.shape[-1])} "
                f"(early_initialization), the model's keys have {(key_states.shape[1], key_states.shape[-1])}: "
                "pass early_initialization the model's config.num_key_value_heads and config.head_dim"
            )

        def per_token(index, states):  # (batch, n) slots -> an index over (batch, heads, n, head_dim)
            return index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])

        def write():
            # An index_put_ (not a scatter_): inductor writes it into the ring in place, where a compiled scatter_
            # on a graph input rewrote the whole ring and copied it back (run 17, H100: 1.6 of a 2.6 ms step at 4K)
            rows = torch.arange(key_states.shape[0], device=key_states.device)[:, None]
            self.keys[rows, :, ring_step.write_slots] = key_states.transpose(1, 2)
            self.values[rows, :, ring_step.write_slots] = value_states.transpose(1, 2)
            self.cumulative_length.add_(key_states.shape[-2])

        if ring_step.in_place:
            write()
            return self.keys, self.values
        if ring_step.read_slots is None:  # the dense path: the ring as it lies, then the new tokens
            keys, values = torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)
        else:
            keys = torch.cat([self.keys.gather(2, per_token(ring_step.read_slots, key_states)), key_states], dim=2)
            values = torch.cat([self.values.gather(2, per_token(ring_step.read_slots, value_states)), value_states], dim=2)
        write()
        return keys, values

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_max_length(self) -> int:
        return -1  # a ring: generation may go on as long as it likes

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "LongNetStaticCache cannot be rolled back (its ring has overwritten keys that earlier positions would "
            "need again); use a DynamicCache for assisted or speculative decoding"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # in place, keeping the buffers' addresses
            self.keys.copy_(self.keys.index_select(0, beam_idx.to(self.device)))
            self.values.copy_(self.values.index_select(0, beam_idx.to(self.device)))

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.cumulative_length.zero_()


class LongNetStaticCache(Cache):
    """The bounded cache with fixed shapes: per layer a ring of ``max(config.segment_lengths)`` slots, exact like
    :class:`LongNetBoundedCache` however long the generation, for compiled decoding and export.

    Pass one to ``generate`` (``cache=`` from transformers 5.24, ``past_key_values=`` before); generate compiles its
    decoding steps on its own where it compiles for a static cache::

        cache = LongNetStaticCache(model.config)
        model.generate(**inputs, cache=cache, max_new_tokens=100_000)

    A prefill in chunks (``prefill_chunk_size``) runs the compiled forward, which must find the buffers allocated:
    call ``cache.early_initialization(batch, num_key_value_heads, head_dim, dtype, device)`` first.

    Each row's tokens are counted on the device (``real_tokens``), so a step needs only the mask of its own tokens:
    the model reads the last ``num_queries`` columns of ``attention_mask``.
    """

    def __init__(self, config):
        _check_cache_config(config, type(self).__name__)
        self.segment_lengths = tuple(int(w) for w in config.segment_lengths)
        self.slots = max(self.segment_lengths)
        super().__init__(layers=[SegmentRingLayer(self.slots) for _ in range(config.num_hidden_layers)])
        self.real_tokens: torch.Tensor | None = None  # (batch,): each row's real tokens so far

    def plan_step(
        self, new_tokens_mask: torch.Tensor | None, batch: int, num_queries: int, device, dense: bool = False
    ) -> RingStep:
        """Plans a step of ``num_queries`` new tokens per row (``new_tokens_mask``: which are real; None: all) and
        counts them; ``dense``: for the dense path (a :class:`PositionLayout`), else for the kernels. Only tensor
        operations, so that a compiled step has fixed shapes and reads nothing on the host."""
        slots = self.slots
        if self.real_tokens is None:
            self._start(batch, device)
        elif not is_tracing() and self.real_tokens.shape[0] != batch:
            raise ValueError(
                f"this LongNetStaticCache holds {self.real_tokens.shape[0]} rows and the step has {batch}: use one "
                "cache per batch (or cache.reset() between batches of the same size)"
            )
        if new_tokens_mask is None:
            new = torch.ones(batch, num_queries, dtype=torch.bool, device=device)
        else:
            new = new_tokens_mask.to(device) != 0
        before = self.real_tokens
        rank = new.long().cumsum(-1)  # real tokens of the step up to each one
        positions = before[:, None] + rank - 1  # a padding token gets its predecessor's (generate's convention)
        total = before + rank[:, -1]
        kept = new & (positions >= total[:, None] - slots)  # of a long step only the last `slots` real tokens
        write_slots = torch.where(kept, positions % slots, slots)
        query_positions = positions.clamp(min=0)
        if dense:
            in_place = num_queries == 1
            # slot s holds the latest position p = s (mod slots) below `upto`; the spare slot holds nothing
            upto = (total if in_place else before)[:, None]
            slot = torch.arange(slots, device=device)
            slot_positions = upto - 1 - (upto - 1 - slot) % slots
            key_positions = torch.cat([slot_positions, torch.zeros_like(upto)], dim=1)
            key_real = torch.cat([slot_positions >= 0, torch.zeros_like(upto, dtype=torch.bool)], dim=1)
            if not in_place:
                key_positions, key_real = torch.cat([key_positions, positions], dim=1), torch.cat([key_real, new], dim=1)
            key_positions = key_positions.clamp(min=0)
            step = RingStep(
                write_slots=write_slots,
                key_positions=key_positions,
                query_positions=query_positions,
                positions=PositionLayout(key_positions, key_real, query_positions, new),
                in_place=in_place,
            )
        else:
            ring_positions = before[:, None] - slots + torch.arange(slots, device=device)
            step = RingStep(
                write_slots=write_slots,
                key_positions=torch.cat([ring_positions, positions], dim=1).clamp(min=0),
                query_positions=query_positions,
                read_slots=ring_positions % slots,
                key_mask=torch.cat([ring_positions >= 0, new], dim=1),
                position_offset=(before - slots).clamp(min=0),
            )
        self.real_tokens.copy_(total)  # in place: a fixed address
        return step

    def _start(self, batch: int, device) -> None:
        self.real_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        if not is_tracing():
            torch._dynamo.mark_static_address(self.real_tokens)

    def early_initialization(self, batch_size, num_heads, head_dim, dtype, device):
        """Allocates every buffer before the first step (``torch.export`` needs them in advance).
        ``num_heads`` is the model's ``config.num_key_value_heads``, ``head_dim`` its ``config.head_dim``."""
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"early_initialization: `{name}` must be a positive int, got {value!r}")
        super().early_initialization(batch_size, num_heads, head_dim, dtype, device)
        if self.real_tokens is None:
            self._start(batch_size, device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.real_tokens is not None:
            self.real_tokens.copy_(self.real_tokens.index_select(0, beam_idx.to(self.real_tokens.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.real_tokens is not None:
            self.real_tokens = self.real_tokens.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.real_tokens is not None:
            self.real_tokens = self.real_tokens[indices]

    def reset(self) -> None:
        super().reset()
        if self.real_tokens is not None:
            self.real_tokens.zero_()


@dataclass(eq=False)
class RingCandidates:
    """The keys one decoding query may see, per query head and branch, as slots of a :class:`LongNetStaticCache`
    ring: ``slots``, ``positions`` and ``valid`` are ``(batch, heads, candidates)``."""

    slots: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    def gather(self, ring: torch.Tensor) -> torch.Tensor:
        """``(batch, candidates, heads, head_dim)`` from a layer's ring ``(batch, kv_heads, slots + 1, head_dim)``
        (query head h reads key/value head h // (heads // kv_heads))."""
        batch, heads = self.slots.shape[:2]
        rows = torch.arange(batch, device=ring.device)[:, None, None]
        kv_head = (torch.arange(heads, device=ring.device) // (heads // ring.shape[1]))[None, :, None]
        return ring[rows, kv_head, self.slots].transpose(1, 2)

    @property
    def layout(self) -> SelectedKeys:
        return SelectedKeys(self.valid)


def ring_candidates(step: RingStep, segment_lengths, dilation_rates, offsets: str, num_heads: int, slots: int) -> RingCandidates:
    """For a step of one new token per row, written in place (``step.in_place``): in branch (w, r) head h's query
    at position t sees the positions ``t // w * w + o_h + r * j <= t`` of its segment (if it participates itself),
    at most ``ceil(w / r)`` of them, all among the ring's last ``slots`` positions (w <= slots). Computed from
    positions alone: ``sum(ceil(w / r))`` candidates instead of the ring's ``slots + 1``. Every layer of a model
    asks the same: computed once per step."""
    key = ("ring_candidates", tuple(segment_lengths), tuple(dilation_rates), offsets, num_heads, slots)
    if key not in step.derived:
        step.derived[key] = _ring_candidates(step, segment_lengths, dilation_rates, offsets, num_heads, slots)
    return step.derived[key]


def _ring_candidates(step, segment_lengths, dilation_rates, offsets, num_heads, slots) -> RingCandidates:
    query = step.query_positions[:, 0]  # (batch,)
    real = step.positions.query_real[:, 0]
    device = query.device
    parts = []
    for w, r in zip(segment_lengths, dilation_rates):
        offset = torch.tensor(head_offsets(r, num_heads, offsets), device=device)[None, :, None]  # (1, H, 1)
        j = torch.arange(-(-w // r), device=device)[None, None, :]
        start = (query // w * w)[:, None, None]
        position = start + offset + r * j  # (batch, H, ceil(w / r))
        participates = (((query % w) % r)[:, None, None] == offset) & real[:, None, None]
        valid = participates & (position <= query[:, None, None])  # (t itself lies in the segment: so do they)
        parts.append((position, valid))
    positions = torch.cat([p for p, _ in parts], dim=-1)
    valid = torch.cat([v for _, v in parts], dim=-1)
    return RingCandidates(positions % slots, positions.clamp(min=0), valid)


def check_cache(cache, config) -> None:
    """Caches whose layers append keys and at most drop the oldest ones, or transformers' StaticCache; a LongNet
    cache or a StaticCache must have been built for this model (``config``): one layer per layer, and for a LongNet
    cache the model's segment lengths, which decide which keys it keeps."""
    if isinstance(cache, (StaticCache, LongNetBoundedCache, LongNetStaticCache)):
        if len(cache.layers) != config.num_hidden_layers:
            raise ValueError(
                f"this {type(cache).__name__} has {len(cache.layers)} layer(s), the model {config.num_hidden_layers}: "
                f"build the cache from the model's config (`{type(cache).__name__}(model.config)`)"
            )
    if isinstance(cache, (LongNetBoundedCache, LongNetStaticCache)):
        if list(cache.segment_lengths) != list(config.segment_lengths):
            raise ValueError(
                f"this {type(cache).__name__} was built for segment_lengths={list(cache.segment_lengths)}, the model's are "
                f"{list(config.segment_lengths)}: it would keep the wrong keys. Build the cache from the model's "
                f"config (`{type(cache).__name__}(model.config)`)"
            )
    if isinstance(cache, StaticCache):
        if not all(hasattr(layer, "cumulative_length") and hasattr(layer, "max_cache_len") for layer in cache.layers):
            raise TypeError(
                "this transformers version's StaticCache does not count its tokens itself (`cumulative_length`, "
                "a newer transformers): use a DynamicCache, a LongNetBoundedCache or a LongNetStaticCache, or upgrade transformers"
            )
        if len({layer.max_cache_len for layer in cache.layers}) != 1:
            raise TypeError("LongNet takes a StaticCache whose layers all hold the same number of tokens")
        return
    if not isinstance(cache, (DynamicCache, LongNetBoundedCache, LongNetStaticCache)):
        raise TypeError(
            "LongNet models take a transformers DynamicCache or StaticCache, a LongNetBoundedCache or a "
            f"LongNetStaticCache as `cache`, got "
            f"{type(cache).__name__} (quantized and other caches are not supported)"
        )


def static_key_order(cache: StaticCache, num_queries: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(seen, order, slots)`` of a StaticCache before this step writes its ``num_queries`` tokens: ``seen`` tokens
    (a 0-dim tensor, never read on the host), and the slot order that puts the ``slots - seen - num_queries``
    unwritten slots first and this step's tokens last (``buffer.index_select(seq_dim, order)``)."""
    layer = cache.layers[0]
    seen = layer.cumulative_length.to(device) if layer.is_initialized else torch.zeros((), dtype=torch.long, device=device)
    slots = layer.max_cache_len
    order = (torch.arange(slots, device=device) + seen + num_queries) % slots
    return seen, order, slots


def cached_lengths(cache: Cache | None) -> tuple[int, int]:
    """``(tokens seen, tokens kept)`` by ``cache``: the difference is how many leading positions it dropped."""
    if cache is None:
        return 0, 0
    seen = cache.get_seq_length()
    layer = cache.layers[0] if len(cache.layers) else None
    if layer is None or not layer.is_initialized or layer.keys is None or layer.keys.dim() < 2:
        return seen, 0
    return seen, layer.keys.shape[-2]
