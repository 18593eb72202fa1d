"""KV caches for LongNet generation.

In every branch (w, r) a causal query at logical position t sees only keys of its own segment,
``[t // w * w, t]``. Once a row holds ``L`` real tokens, no future query (t >= L) can see a key before
``min_i (L // w_i) * w_i``: :class:`LongNetBoundedCache` drops those keys after each step. It holds fewer than
``max(segment_lengths)`` tokens per row and layer however long the generation (a batch keeps the earliest key
any row still needs, so left padding adds the difference in padding), and each decoding step attends a
bounded number of keys. The model tells the attention where the kept keys start logically through
``position_offset`` (see ``dilated_attention``), so the result is exactly the full cache's.

A plain ``transformers.DynamicCache`` works too, and keeps everything. So does transformers' ``StaticCache``
(``generate(..., cache_implementation="static")``): fixed shapes, for compiled decoding. Its buffers hold the
tokens at slots ``0 .. seen - 1`` and nothing after; the model reads them rotated by :func:`static_key_order`, the
unwritten slots first, which makes them left padding and the new tokens the last keys, the layout every backend
takes, with no value of a tensor read on the host.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache

from .dilated_attention_pattern import TokenLayout

__all__ = ["LongNetBoundedCache", "SegmentBoundedLayer", "cached_lengths", "check_cache", "static_key_order"]


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


class LongNetBoundedCache(Cache):
    """A KV cache that keeps, per layer, only the keys that causal dilated attention can still use: fewer than
    ``max(config.segment_lengths)`` tokens per row, whatever the number of tokens generated.

    Pass it to ``generate`` (``cache=`` from transformers 5.24, ``past_key_values=`` before) or to the forward::

        cache = LongNetBoundedCache(model.config)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=100_000)
    """

    def __init__(self, config, offloading: bool = False):
        if not getattr(config, "causal", False):
            raise ValueError(
                "LongNetBoundedCache needs a causal model (`config.causal=True`): a bidirectional model has no KV cache"
            )
        layers = [SegmentBoundedLayer(config.segment_lengths) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers, offloading=offloading)


def check_cache(cache) -> None:
    """Caches whose layers append keys and at most drop the oldest ones, or transformers' StaticCache."""
    if isinstance(cache, StaticCache):
        if not all(hasattr(layer, "cumulative_length") and hasattr(layer, "max_cache_len") for layer in cache.layers):
            raise TypeError(
                "this transformers version's StaticCache does not count its tokens itself (`cumulative_length`, "
                "transformers >= 5.24): use a DynamicCache or a LongNetBoundedCache, or upgrade transformers"
            )
        if len({layer.max_cache_len for layer in cache.layers}) != 1:
            raise TypeError("LongNet takes a StaticCache whose layers all hold the same number of tokens")
        return
    if not isinstance(cache, (DynamicCache, LongNetBoundedCache)):
        raise TypeError(
            f"LongNet models take a transformers DynamicCache, StaticCache or a LongNetBoundedCache as `cache`, got "
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
