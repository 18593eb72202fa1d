"""One graph (issue 14 point 2, issue 10 point 4): inside torch.compile and torch.export the attention is one custom
op, ``modeling_longnet::dilated_attention``, which reads the layout when the graph runs; its gradient recomputes
the forward under autograd. ``fullgraph=True`` fails on any graph break, so these tests also assert there is none."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from cases import holes_mask, relative_error, static_cache_supported
from reference import reference_dilated_attention

from transformers.modeling_outputs import BaseModelOutputWithPast

from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetStaticCache, TokenLayout, dilated_attention

# transformers 5.24 renamed `past_key_values` to `cache`
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

SEGMENTS, RATES = [4, 8, 16], [1, 2, 4]


def tiny_model(**overrides):
    torch.manual_seed(0)
    return LongNetForCausalLM(LongNetConfig.from_preset("tiny", attn_implementation="torch", **overrides))


LAYOUTS = {
    "whole rows": lambda b, n: {},
    "holes": lambda b, n: {"attention_mask": holes_mask(b, n, 1)},
    "kv-cache queries": lambda b, n: {"position_offset": torch.tensor([3, 9][:b])},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_compiled_function_equals_the_reference_forward_and_gradient(layout):
    batch, num_keys = 2, 29
    num_queries = 7 if layout == "kv-cache queries" else num_keys
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, num_queries, 4, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, num_keys, 2, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kwargs = LAYOUTS[layout](batch, num_keys)

    def attention(q, k, v):
        return dilated_attention(q, k, v, SEGMENTS, RATES, causal=True, backend="torch", **kwargs)

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    ref = reference_dilated_attention(q, k, v, SEGMENTS, RATES, causal=True, **kwargs)
    assert relative_error(out, ref) <= 1e-12
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for name, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert relative_error(got, want) <= 1e-12, name


def test_a_prepared_layout_enters_the_graph_and_one_with_holes_is_refused_plainly():
    q, k, v = (torch.randn(1, 20, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, :4] = 0
    layout = TokenLayout.build(1, 20, attention_mask=mask)
    compiled = torch.compile(
        lambda q, k, v, layout: dilated_attention(q, k, v, SEGMENTS, RATES, causal=True, token_layout=layout),
        backend="eager", fullgraph=True,
    )
    torch.testing.assert_close(compiled(q, k, v, layout), dilated_attention(q, k, v, SEGMENTS, RATES, causal=True, attention_mask=mask))
    mask[0, 10] = 0
    with pytest.raises(Exception, match="holes cannot enter a compiled"):
        compiled(q, k, v, TokenLayout.build(1, 20, attention_mask=mask))


def test_compiled_dropout_reuses_its_mask_in_the_backward():
    """O = P_dropped V is linear in V, so <dO, O> = <dV, V> exactly when the backward drops what the forward did."""
    q, k, v = (torch.randn(1, 32, 2, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64, requires_grad=True) for i in range(3))
    compiled = torch.compile(
        lambda q, k, v: dilated_attention(q, k, v, SEGMENTS, RATES, causal=True, dropout_p=0.3), backend="aot_eager", fullgraph=True
    )
    torch.manual_seed(5)
    out = compiled(q, k, v)
    torch.manual_seed(5)
    assert torch.equal(out, compiled(q, k, v))
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (grad_v,) = torch.autograd.grad(out, (v,), grad_out)
    assert float((grad_out * out).sum()) == pytest.approx(float((grad_v * v).sum()), rel=1e-12)
    assert not torch.equal(out, compiled(q, k, v))  # another draw, another mask


def test_the_custom_op_passes_torch_library_opcheck():
    q = torch.randn(2, 12, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 12, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = holes_mask(2, 12, 3)
    args = (q, k, v, mask, None, None, None, None, [4, 8], [1, 2], "interleaved", [], True, 8**-0.5, 0.0, "torch", None)
    torch.library.opcheck(torch.ops.modeling_longnet.dilated_attention.default, args)


def test_compiled_training_with_fullgraph_has_the_losses_of_eager_training():
    eager = tiny_model().train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled_model)]
    for step in range(3):
        ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(step))
        mask = holes_mask(2, 32, step) if step == 2 else None
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers):
            loss = model(ids, attention_mask=mask, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), f"step {step}"


# transformers' StaticCache needs layers that count their tokens (every supported version's do)
STATIC_CACHES = [
    "LongNetStaticCache",
    pytest.param("StaticCache", marks=pytest.mark.skipif(not static_cache_supported(), reason="this StaticCache does not count its tokens")),
]


def cpu_compile_config():
    """generate's compile options for the CPU: fullgraph, fixed shapes, aot_eager (no C++ toolchain needed)."""
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only, unless told
    return compile_config


def greedy_tokens_one_at_a_time(step, prompt, length) -> list[int]:
    """Feeds ``prompt`` and then the greedy picks of ``step(position, token) -> logits`` one token per call, until
    ``length`` tokens."""
    tokens = prompt[0].tolist()
    with torch.no_grad():
        for position in range(length - 1):
            logits = step(position, tokens[position])
            if position >= prompt.shape[1] - 1:
                tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.transformers_versions
@pytest.mark.parametrize("position_encoding", ["rope", "xpos"])
@pytest.mark.parametrize("cache", STATIC_CACHES)
def test_compiled_generation_with_a_static_cache_gives_the_tokens_of_uncached_greedy_generation(cache, position_encoding):
    """generate compiles its decoding steps (fullgraph, fixed shapes: the ring of the static bounded cache and the
    step's own mask, or a StaticCache's slots and a mask padded to them) and must pick what generation without a
    cache picks, for a left- and a right-padded row, in one graph for every step."""
    model = tiny_model(position_encoding=position_encoding).eval()
    ids = torch.randint(3, 100, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 15:] = 0  # right padding: generate continues after it, a mask with holes
    options = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, use_cache=False, **options)
    # 21 + 12 tokens: the ring (16 slots) wraps; the StaticCache is generate's cache_implementation="static"
    chosen = {CACHE_KWARG: LongNetStaticCache(model.config)} if cache == "LongNetStaticCache" else {"cache_implementation": "static"}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = model.generate(ids, compile_config=cpu_compile_config(), return_dict_in_generate=True, **chosen, **options)
    assert hasattr(model, "_compiled_call"), "generate did not compile"
    assert type(getattr(got, CACHE_KWARG)).__name__ == cache
    assert torch.equal(got.sequences, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "a decoding step recompiled"


def test_compiled_generation_with_triton_runs_the_fused_decoding_kernel_inside_the_graph():
    """With the Triton kernels (the interpreter here) a compiled decoding step with the static bounded cache reads the
    ring through the fused decoding kernel, a custom op inside the one graph, and picks the tokens of uncached
    greedy generation."""
    decode = pytest.importorskip("modeling_longnet.dilated_attention_decode")
    if decode.triton is None or not decode.interpreting():
        pytest.skip("the fused kernel takes CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    model = tiny_model(position_encoding="xpos").eval()
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, use_cache=False, **options)
    model.set_attn_implementation("triton")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with mock.patch.object(decode, "_launch", wraps=decode._launch) as launches:
        got = model.generate(ids, compile_config=cpu_compile_config(), **{CACHE_KWARG: LongNetStaticCache(model.config)}, **options)
    assert hasattr(model, "_compiled_call"), "generate did not compile"
    assert torch.equal(got, expected)
    # every step after the prefill, in every layer (the warm-up runs of the compiled step may add one step's worth)
    assert launches.call_count >= 7 * model.config.num_hidden_layers
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "a decoding step recompiled"


@pytest.mark.transformers_versions
@pytest.mark.parametrize("cache", STATIC_CACHES)
def test_compiled_generation_with_a_chunked_prefill_gives_the_tokens_of_uncached_greedy_generation(cache):
    """prefill_chunk_size runs the prefill through the compiled forward too, so the cache is allocated before it
    (the ring by early_initialization, transformers' StaticCache by generate)."""
    model = tiny_model(position_encoding="xpos").eval()
    ids = torch.randint(3, 100, (1, 50), generator=torch.Generator().manual_seed(2))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, use_cache=False, **options)
    if cache == "LongNetStaticCache":
        ring = LongNetStaticCache(model.config)
        ring.early_initialization(1, model.config.num_key_value_heads, model.config.head_dim, torch.float32, "cpu")
        chosen = {CACHE_KWARG: ring}
    else:
        chosen = {"cache_implementation": "static"}
    got = model.generate(ids, prefill_chunk_size=11, compile_config=cpu_compile_config(), return_dict_in_generate=True, **chosen, **options)
    assert type(getattr(got, CACHE_KWARG)).__name__ == cache
    assert torch.equal(got.sequences, expected)


class RingDecodeStep(torch.nn.Module):
    """One decoding step with a LongNetStaticCache, its ring held as buffers (as transformers' ExecuTorch wrapper
    holds a StaticCache), so that torch.export records the in-place updates."""

    def __init__(self, model, batch_size=1):
        super().__init__()
        config = model.config
        self.model, self.cache = model, LongNetStaticCache(config)
        self.cache.early_initialization(batch_size, config.num_key_value_heads, config.head_dim, model.dtype, model.device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"keys_{i}", layer.keys, persistent=False)
            self.register_buffer(f"values_{i}", layer.values, persistent=False)
            self.register_buffer(f"seen_{i}", layer.cumulative_length, persistent=False)
        self.register_buffer("real_tokens", self.cache.real_tokens, persistent=False)

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=True, **{CACHE_KWARG: self.cache}).logits


def test_an_exported_static_bounded_cache_decode_step_generates_the_tokens_of_uncached_greedy_generation():
    """Exported once, fed the prompt and then its own greedy picks one token per call, well past its ring."""
    model = tiny_model(position_encoding="xpos").eval()
    with torch.no_grad():
        program = torch.export.export(RingDecodeStep(model), (torch.tensor([[5]]),), strict=False).module()
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False, use_cache=False, pad_token_id=0
    )
    tokens = greedy_tokens_one_at_a_time(lambda position, token: program(torch.tensor([[token]])), ids, expected.shape[1])
    assert len(tokens) > 2 * max(model.config.segment_lengths)
    assert tokens == expected[0].tolist()


def test_an_exported_static_cache_decode_step_generates_the_tokens_of_uncached_greedy_generation():
    """transformers' ExecuTorch wrapper (a StaticCache held as buffers, one token per call at ``cache_position``),
    exported once; fed the prompt and then its own greedy picks, at their positions."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = tiny_model(position_encoding="xpos").eval()
    model.generation_config.cache_implementation = "static"
    module = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=40)
    program = torch.export.export(
        module, (), {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([0])}, strict=False
    ).module()
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0
    )
    tokens = greedy_tokens_one_at_a_time(
        lambda position, token: program(input_ids=torch.tensor([[token]]), cache_position=torch.tensor([position])),
        ids, expected.shape[1],
    )
    assert tokens == expected[0].tolist()
