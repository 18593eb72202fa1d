"""Generation with the KV caches (dynamic, bounded, the static bounded ring, transformers' StaticCache) against
generation without a cache: padded batches, chunked prefill over any mask, beam search, the bounded caches' memory
and per-step work, and the errors."""

from __future__ import annotations

import importlib
import re
from unittest import mock

import pytest
import torch
from cases import static_cache_supported
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from modeling_longnet import (
    ALL_DILATED_ATTENTION_FUNCTIONS,
    LongNetBoundedCache,
    LongNetConfig,
    LongNetForCausalLM,
    LongNetStaticCache,
)
from modeling_longnet import modeling_longnet as modeling

# transformers 5.24 renamed `past_key_values` to `cache`; generate takes the name of the installed version
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# the tiny preset has branches w = 4, 8, 16; these lengths cross several boundaries of every branch
PROMPT, NEW = 13, 40


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LongNetForCausalLM(LongNetConfig.from_preset("tiny", **overrides)).eval()


def generate(model, ids, attention_mask=None, cache=None, use_cache=True, new_tokens=NEW, **kwargs):
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    return model.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


NEEDS_STATIC_CACHE = pytest.mark.skipif(not static_cache_supported(), reason="this StaticCache does not count its tokens")
# "ring": a LongNetStaticCache; "static": generate's cache_implementation="static" (transformers' StaticCache)
CACHE_KINDS = ["dynamic", "bounded", "ring", pytest.param("static", marks=NEEDS_STATIC_CACHE)]
CACHE_TYPES = {"dynamic": DynamicCache, "bounded": LongNetBoundedCache, "ring": LongNetStaticCache, "static": StaticCache}


def cache_options(model, kind) -> dict:
    """generate's keyword arguments for a kind of cache: a fresh bounded cache or static bounded cache, transformers'
    StaticCache through ``cache_implementation``, or nothing (a DynamicCache)."""
    if kind == "bounded":
        return {CACHE_KWARG: LongNetBoundedCache(model.config)}
    if kind == "ring":
        return {CACHE_KWARG: LongNetStaticCache(model.config)}
    return {"cache_implementation": "static"} if kind == "static" else {}


def prompt(batch=1, length=PROMPT, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(rows, side):
    """``(ids, mask)`` of one-row prompts of different lengths, padded with 0 on the ``side`` given."""
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        where = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        ids[b, where], mask[b, where] = row[0], 1
    return ids, mask


@pytest.mark.transformers_versions
@pytest.mark.parametrize("position_encoding", ["rope", "xpos"])
@pytest.mark.parametrize("cache_kind", CACHE_KINDS)
def test_cached_generation_equals_uncached(position_encoding, cache_kind):
    model = tiny_model(position_encoding=position_encoding, dilation_offsets="grouped")
    ids = prompt(batch=2)
    expected = generate(model, ids, use_cache=False)
    got = generate(model, ids, **cache_options(model, cache_kind))
    assert type(getattr(got, CACHE_KWARG)) is CACHE_TYPES[cache_kind]
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.transformers_versions
@pytest.mark.parametrize("cache_kind", CACHE_KINDS)
def test_left_padded_batch_generates_what_each_row_generates_alone(cache_kind):
    model = tiny_model()
    rows = [prompt(length=n, seed=n) for n in (13, 5, 21)]
    ids, mask = padded_batch(rows, "left")
    width = ids.shape[1]
    batched = generate(model, ids, attention_mask=mask, **cache_options(model, cache_kind))
    for b, row in enumerate(rows):
        alone = generate(model, row, **cache_options(model, cache_kind))
        assert torch.equal(batched.sequences[b, width:], alone.sequences[0, row.shape[1] :]), f"row {b}"
        for a, c in zip(batched.logits, alone.logits):
            torch.testing.assert_close(a[b], c[0], rtol=1e-5, atol=1e-5)


@pytest.mark.transformers_versions
@pytest.mark.parametrize("cache_kind", CACHE_KINDS)
def test_right_padded_batch_generates_what_each_row_generates_alone(cache_kind):
    """``generate`` extends a right-padded prompt after its padding (mask ``[1, .., 1, 0, .., 0, 1, 1, ..]``): the
    0s are no tokens, so each row continues exactly as alone. The first new token is read at the last position of
    the batch, a padding position in the shorter rows (as in every transformers model); from there each row must
    generate what that row, with that first token, generates alone."""
    model = tiny_model()
    rows = [prompt(length=n, seed=n) for n in (13, 5, 21)]
    ids, mask = padded_batch(rows, "right")
    width = ids.shape[1]
    batched = generate(model, ids, attention_mask=mask, **cache_options(model, cache_kind))
    uncached = generate(model, ids, attention_mask=mask, use_cache=False)
    assert torch.equal(batched.sequences, uncached.sequences)
    for b, row in enumerate(rows):
        first = batched.sequences[b : b + 1, width : width + 1]
        alone = generate(model, torch.cat([row, first], dim=1), new_tokens=NEW - 1, **cache_options(model, cache_kind))
        assert torch.equal(batched.sequences[b, width + 1 :], alone.sequences[0, row.shape[1] + 1 :]), f"row {b}"
        for a, c in zip(batched.logits[1:], alone.logits):
            torch.testing.assert_close(a[b], c[0], rtol=1e-5, atol=1e-5)


def decode(model, ids, cache, steps, attention_mask=None):
    """Greedy decoding by hand; yields the cache after each step."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model(ids, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(token, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
        yield cache


def kept_tokens(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


@pytest.mark.transformers_versions
def test_bounded_cache_memory_stops_growing_after_the_longest_segment():
    model = tiny_model()
    longest = max(model.config.segment_lengths)
    kept = [
        max(kept_tokens(cache)) for cache in decode(model, prompt(length=3), LongNetBoundedCache(model.config), 120)
    ]
    assert max(kept) == longest - 1  # the most that future queries can still see
    assert max(kept[longest:]) == max(kept)  # reached, and never exceeded however long the generation
    full = [max(kept_tokens(cache)) for cache in decode(model, prompt(length=3), DynamicCache(), 120)]
    assert full[-1] == 3 + 120


@pytest.mark.transformers_versions
def test_bounded_cache_with_left_padding_keeps_at_most_the_padding_difference_more():
    model = tiny_model()
    longest = max(model.config.segment_lengths)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    caches = decode(model, prompt(batch=2, length=20), LongNetBoundedCache(model.config), 60, attention_mask=mask)
    assert max(max(kept_tokens(cache)) for cache in caches) <= longest - 1 + 7


def test_each_decoding_step_attends_a_bounded_number_of_keys():
    model = tiny_model()
    key_lengths = []

    def recording_attention(module, query, key, value, token_layout, **kwargs):
        key_lengths.append(key.shape[1])
        return ALL_DILATED_ATTENTION_FUNCTIONS["auto"](module, query, key, value, token_layout, **kwargs)

    ALL_DILATED_ATTENTION_FUNCTIONS["recording"] = recording_attention
    try:
        model.set_attn_implementation("recording")
        for _ in decode(model, prompt(length=40), LongNetBoundedCache(model.config), 80):
            pass
    finally:
        del ALL_DILATED_ATTENTION_FUNCTIONS["recording"]
    decode_steps = key_lengths[model.config.num_hidden_layers :]  # after the prefill
    assert max(decode_steps) <= max(model.config.segment_lengths)


@pytest.mark.transformers_versions
def test_prefill_in_chunks_with_the_bounded_cache_equals_one_forward():
    model = tiny_model(position_encoding="xpos")
    ids = prompt(length=70)
    expected = model(ids).logits
    cache = LongNetBoundedCache(model.config)
    pieces = []
    for start in range(0, 70, 11):
        chunk = ids[:, start : start + 11]
        mask = torch.ones(1, start + chunk.shape[1], dtype=torch.long)
        pieces.append(model(chunk, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)
    assert max(kept_tokens(cache)) < max(model.config.segment_lengths)


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask of the tokens so far"])
@NEEDS_STATIC_CACHE
def test_prefill_in_chunks_with_a_static_cache_equals_one_forward(masked):
    model = tiny_model(position_encoding="xpos")
    ids = prompt(length=70)
    expected = model(ids).logits
    cache = StaticCache(config=model.config, max_cache_len=75)
    pieces = []
    for start in range(0, 70, 11):
        chunk = ids[:, start : start + 11]
        mask = {"attention_mask": torch.ones(1, start + chunk.shape[1], dtype=torch.long)} if masked else {}
        pieces.append(model(chunk, **mask, **{CACHE_KWARG: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)
    assert int(cache.get_seq_length()) == 70


@NEEDS_STATIC_CACHE
def test_static_cache_errors_name_the_fix():
    model = tiny_model()
    with pytest.raises(ValueError, match="holds 10 tokens per row and this step would make it 12: .*max_cache_len"):
        model(prompt(length=12), **{CACHE_KWARG: StaticCache(config=model.config, max_cache_len=10)})
    with pytest.raises(ValueError, match=r"StaticCache of 20 slots `attention_mask` must have shape"):
        model(prompt(length=5), attention_mask=torch.ones(1, 21), **{CACHE_KWARG: StaticCache(config=model.config, max_cache_len=20)})


def test_the_static_bounded_cache_holds_one_ring_of_the_largest_segment_however_long_the_generation():
    model = tiny_model()
    ids = prompt(batch=2)
    got = generate(model, ids, new_tokens=100, **cache_options(model, "ring"))
    cache = getattr(got, CACHE_KWARG)
    slots = max(model.config.segment_lengths)
    assert type(cache) is LongNetStaticCache
    # one spare slot takes what a step does not keep (padding)
    assert {tuple(layer.keys.shape) for layer in cache.layers} == {(2, model.config.num_key_value_heads, slots + 1, model.config.head_dim)}
    assert int(cache.get_seq_length()) == PROMPT + 100 - 1  # the last token is never fed back
    assert cache.real_tokens.tolist() == [PROMPT + 100 - 1] * 2


@NEEDS_STATIC_CACHE
def test_cache_implementation_static_is_transformers_static_cache_of_max_length_slots():
    """What transformers' own static-cache tests and tools (export, ExecuTorch) expect of any model."""
    model = tiny_model()
    got = generate(model, prompt(length=5), cache_implementation="static", new_tokens=40)
    cache = getattr(got, CACHE_KWARG)
    assert type(cache) is StaticCache
    assert cache.layers[0].keys.shape == (1, model.config.num_key_value_heads, 5 + 40 - 1, model.config.head_dim)


def new_cache(model, kind):
    """A fresh cache of each kind that a test feeds by hand (at most 128 tokens)."""
    if kind == "ring":
        return LongNetStaticCache(model.config)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=128)
    return CACHE_TYPES[kind](config=model.config)


@settings(max_examples=40, deadline=None)
@given(
    mask=st.lists(st.booleans(), min_size=30, max_size=70).map(lambda bits: [True, *bits]),
    chunk=st.one_of(st.just(1), st.integers(1, 40)),  # 1: decoding steps, which read the ring's candidates
    cache_kind=st.sampled_from(["dynamic", "bounded", "ring"] + (["static"] if static_cache_supported() else [])),
    own_columns_only=st.booleans(),
    position_encoding=st.sampled_from(["rope", "xpos"]),
)
def test_every_cache_fed_in_chunks_equals_one_forward_over_any_mask(mask, chunk, cache_kind, own_columns_only, position_encoding):
    """Holes anywhere (a LongNetStaticCache counts real tokens, so a row's needed keys may lie farther back than its
    slots), steps longer than its ring, and for it either mask convention: the logits of every real token equal one
    uncached forward pass. A small xPos scale base makes a key's misplaced position visible at this tolerance."""
    model = tiny_model(position_encoding=position_encoding, xpos_scale_base=8.0)
    length = len(mask)
    ids = prompt(length=length, seed=length)
    mask = torch.tensor([mask]).long()
    own_columns_only = own_columns_only and cache_kind == "ring"  # the other caches take the mask so far
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        cache, pieces = new_cache(model, cache_kind), []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            step_mask = mask[:, start:end] if own_columns_only else mask[:, :end]
            pieces.append(model(ids[:, start:end], attention_mask=step_mask, **{CACHE_KWARG: cache}, use_cache=True).logits)
    real = mask[0].bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[:, real], expected[:, real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "segment_lengths, dilation_rates, offsets, implementation",
    # the fused kernel (triton) on two of the patterns: the interpreter takes about 25 s per test
    [([4, 8, 16], [1, 2, 4], "grouped", "torch"), ([6, 10, 15], [4, 3, 2], "grouped", "torch"),
     ([5, 12], [2, 5], "interleaved", "torch"), ([16], [3], "interleaved", "torch"),
     ([6, 10, 15], [4, 3, 2], "grouped", "triton"), ([5, 12], [2, 5], "interleaved", "triton")],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else v,
)
def test_decoding_steps_read_the_candidates_of_any_pattern(segment_lengths, dilation_rates, offsets, implementation):
    """One token per step: the ring gives each head only the positions its pattern can show (segments that are
    not multiples of their rate included); the logits equal one uncached forward pass, past several wraps. With
    the Triton kernels (the interpreter here) every step runs the fused decoding kernel instead of the gathers."""
    if implementation == "triton" and not ring_decode_runs():
        pytest.skip("the fused kernel takes CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    model = tiny_model(position_encoding="xpos", xpos_scale_base=8.0, segment_lengths=segment_lengths,
                       dilation_rates=dilation_rates, dilation_offsets=offsets)
    ids, mask = prompt(batch=2, length=45, seed=5), torch.ones(2, 45, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(implementation)
        cache = LongNetStaticCache(model.config)
        with mock.patch.object(modeling, "ring_decode_attention", wraps=modeling.ring_decode_attention) as fused:
            steps = [model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], **{CACHE_KWARG: cache}, use_cache=True).logits for i in range(45)]
    assert fused.call_count == (45 * model.config.num_hidden_layers if implementation == "triton" else 0)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], expected[real], rtol=1e-5, atol=1e-5)


def ring_decode_runs() -> bool:
    """The fused kernel takes the CPU tensors of these tests: Triton's interpreter (a GPU has test_ring_decode's)."""
    decode = importlib.import_module("modeling_longnet.dilated_attention_decode")
    return decode.triton is not None and decode.interpreting()


def test_beam_search_with_the_static_bounded_cache_equals_beam_search_without_cache():
    model = tiny_model()
    ids = prompt(batch=2)
    kwargs = dict(num_beams=3, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    expected = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(model.generate(ids, **{CACHE_KWARG: LongNetStaticCache(model.config)}, **kwargs), expected)


def test_static_bounded_cache_errors_name_the_fix():
    with pytest.raises(ValueError, match=re.escape("LongNetStaticCache needs a causal model (`config.causal=True`)")):
        LongNetStaticCache(LongNetConfig.from_preset("tiny", causal=False))
    model = tiny_model()
    cache = LongNetStaticCache(model.config)
    with pytest.raises(ValueError, match="LongNetStaticCache cannot be rolled back"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="updated by the LongNet model's forward, which plans each step"):
        cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 0)
    with pytest.raises(ValueError, match=r"with a LongNetStaticCache `attention_mask` must have shape .* got \(1, 3\)"):
        model(prompt(length=5), attention_mask=torch.ones(1, 3), **{CACHE_KWARG: cache})
    model(prompt(length=5), **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="holds 1 rows and the step has 2: use one cache per batch"):
        model(prompt(batch=2, length=1), **{CACHE_KWARG: cache})


def test_beam_search_with_the_bounded_cache_equals_beam_search_without_cache():
    model = tiny_model()
    ids = prompt(batch=2)
    kwargs = dict(
        num_beams=3,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    expected = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(model.generate(ids, **{CACHE_KWARG: LongNetBoundedCache(model.config)}, **kwargs), expected)


@pytest.mark.parametrize("cache_class", [LongNetBoundedCache, LongNetStaticCache])
def test_a_cache_built_for_another_model_is_refused(cache_class):
    """The caches keep the keys the model's segments can still see: one built from another config would keep the
    wrong ones (the logits moved by 0.017, silently) or too few layers (an IndexError inside transformers)."""
    model = tiny_model()
    build = f"`{cache_class.__name__}(model.config)`"
    other_segments = LongNetConfig.from_preset("tiny", segment_lengths=[2, 4], dilation_rates=[1, 2])
    message = f"this {cache_class.__name__} was built for segment_lengths=[2, 4], the model's are [4, 8, 16]: it would keep the wrong keys. Build the cache from the model's config ({build})"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(prompt(length=5), **{CACHE_KWARG: cache_class(other_segments)})
    fewer_layers = LongNetConfig.from_preset("tiny", num_hidden_layers=1)
    message = f"this {cache_class.__name__} has 1 layer(s), the model 2: build the cache from the model's config ({build})"
    with pytest.raises(ValueError, match=re.escape(message)):
        model(prompt(length=5), **{CACHE_KWARG: cache_class(fewer_layers)})
    for not_a_config in (model, None, {"causal": True}):
        message = f"{cache_class.__name__} takes the LongNetConfig of the model it serves ({build}), got {type(not_a_config).__name__}"
        with pytest.raises(TypeError, match=re.escape(message)):
            cache_class(not_a_config)


def test_a_static_cache_initialised_for_other_heads_is_refused():
    model = tiny_model()
    cache = LongNetStaticCache(model.config)
    with pytest.raises(ValueError, match=re.escape("early_initialization: `batch_size` must be a positive int, got -1")):
        cache.early_initialization(-1, 2, 8, torch.float32, "cpu")
    cache.early_initialization(1, 3, 8, torch.float32, "cpu")
    message = (
        "this LongNetStaticCache's buffers hold (heads, head_dim) = (3, 8) (early_initialization), the model's keys "
        "have (2, 8): pass early_initialization the model's config.num_key_value_heads and config.head_dim"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model(prompt(length=5), **{CACHE_KWARG: cache})


def test_bounded_cache_errors():
    with pytest.raises(ValueError, match=re.escape("LongNetBoundedCache needs a causal model (`config.causal=True`)")):
        LongNetBoundedCache(LongNetConfig.from_preset("tiny", causal=False))
    cache = LongNetBoundedCache(LongNetConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="LongNetBoundedCache cannot be rolled back"):
        cache.crop(-1)
