"""LongNet models: attention inside the model against the brute-force reference, the transformers common checks,
attention implementations, gradient checkpointing, the chunked loss, sequence classification, bad inputs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_probe import LargestTensor
from reference import reference_dilated_attention
from transformers import AutoModelForCausalLM, DynamicCache, EncoderDecoderCache

from modeling_longnet import (
    LongNetConfig,
    LongNetForCausalLM,
    LongNetForSequenceClassification,
    LongNetModel,
)
from modeling_longnet import modeling_longnet as modeling


def tiny_config(**overrides) -> LongNetConfig:
    return LongNetConfig.from_preset("tiny", **overrides)


def tiny_model(model_class=LongNetForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(**overrides)).eval()


def random_ids(batch, seq_len, seed=0, vocab=128):
    return torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# attention inside the model against the reference
# ---------------------------------------------------------------------------------------------------------


def rotary_reference(x, positions, theta):
    head_dim = x.shape[-1]
    angles = positions[..., None].double() * theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, :, None], torch.cat([angles.sin()] * 2, -1)[:, :, None]
    half = head_dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@st.composite
def model_layouts(draw):
    kind = draw(st.sampled_from(["none", "left", "right", "holes", "packed"]))
    batch = 1 if kind == "packed" else draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 40))
    mask = cu_seqlens = None
    position_ids = torch.arange(seq_len).expand(batch, -1)
    if kind in ("left", "right"):
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        for b in range(batch):
            pad = draw(st.integers(0, seq_len - 1))
            mask[b, :pad] = 0 if kind == "left" else 1
            if kind == "right" and pad:
                mask[b, seq_len - pad :] = 0
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    if kind == "holes":  # 0s anywhere, as generate makes of right-padded prompts
        mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=seq_len, max_size=seq_len), min_size=batch, max_size=batch))).long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    if kind == "packed":
        lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        seq_len = position_ids.shape[1]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(kind=kind, batch=batch, seq_len=seq_len, mask=mask, cu_seqlens=cu_seqlens, position_ids=position_ids)


@settings(max_examples=30)
@given(
    model_layouts(),
    st.sampled_from(["rope", "none"]),
    st.booleans(),
    st.sampled_from(["interleaved", "grouped"]),
    st.integers(0, 2**31 - 1),
)
def test_attention_layer_in_the_model_equals_out_projection_of_the_reference(
    layout, position_encoding, causal, offsets, seed
):
    model = tiny_model(
        LongNetModel,
        seed=seed % 1000,
        position_encoding=position_encoding,
        causal=causal,
        dilation_offsets=offsets,
        rope_theta=100.0,
    ).double()
    attention = model.layers[1].self_attn
    captured = {}
    hook = attention.register_forward_hook(
        lambda module, args, kwargs, output: captured.update(hidden=args[0], output=output[0]), with_kwargs=True
    )
    ids = random_ids(layout["batch"], layout["seq_len"], seed)
    position_ids = layout["position_ids"] if layout["kind"] == "packed" else None  # the model derives them otherwise
    model(ids, attention_mask=layout["mask"], position_ids=position_ids)
    hook.remove()

    hidden = captured["hidden"]
    batch, seq_len, _ = hidden.shape
    q = attention.q_proj(hidden).view(batch, seq_len, -1, attention.head_dim)
    k = attention.k_proj(hidden).view(batch, seq_len, -1, attention.head_dim)
    v = attention.v_proj(hidden).view(batch, seq_len, -1, attention.head_dim)
    if position_encoding == "rope":
        q, k = rotary_reference(q, layout["position_ids"], 100.0), rotary_reference(k, layout["position_ids"], 100.0)
    expected = reference_dilated_attention(
        q,
        k,
        v,
        model.config.segment_lengths,
        model.config.dilation_rates,
        causal=causal,
        offsets=offsets,
        attention_mask=layout["mask"],
        cu_seqlens=layout["cu_seqlens"],
    )
    expected = attention.o_proj(expected.reshape(batch, seq_len, -1))
    # rotations are computed in float32, as transformers' rotary embeddings
    torch.testing.assert_close(captured["output"], expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# transformers' common model checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.transformers_versions
def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    ids = random_ids(2, 20)
    from_ids = model(ids).logits
    from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_ids, from_embeds, rtol=0, atol=0)


@pytest.mark.transformers_versions
@pytest.mark.parametrize("causal, padding_side", [(True, "left"), (True, "right"), (False, "left"), (False, "right")])
def test_padded_batch_equals_each_row_alone(causal, padding_side):
    model = tiny_model(LongNetModel, causal=causal, position_encoding="xpos")
    lengths = [23, 9, 17]
    rows = [random_ids(1, n, seed=n) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        place = slice(width - row.shape[1], width) if padding_side == "left" else slice(0, row.shape[1])
        ids[b, place], mask[b, place] = row[0], 1
    batched = model(ids, attention_mask=mask).last_hidden_state
    for b, row in enumerate(rows):
        alone = model(row).last_hidden_state[0]
        torch.testing.assert_close(batched[b][mask[b] == 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.transformers_versions
def test_hidden_states_count_and_shapes():
    model = tiny_model()
    out = model(random_ids(2, 13), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 13, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(random_ids(2, 13)))
    tuple_out = model(random_ids(2, 13), output_hidden_states=True, return_dict=False)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], out.logits)


@pytest.mark.transformers_versions
def test_resizing_tied_embeddings_keeps_them_tied():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.resize_token_embeddings(150)
    assert model.config.vocab_size == 150
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (150, 32)
    assert model(random_ids(1, 8, vocab=150)).logits.shape == (1, 8, 150)


@pytest.mark.transformers_versions
def test_evaluation_is_deterministic_and_training_applies_dropout():
    model = tiny_model(attention_dropout=0.3, hidden_dropout=0.3)
    ids = random_ids(2, 30)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------------
# attention implementations
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.transformers_versions
def test_eager_attentions_are_the_dense_weights_of_the_same_attention(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="torch").eval()
    assert model.config._attn_implementation == "eager"
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0
    ids = random_ids(2, 21)
    out = model(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.logits, reference(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    weights = out.attentions[0]
    assert len(out.attentions) == 2 and weights.shape == (2, 4, 21, 21)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(4, 21))  # every real query's row is a distribution
    assert bool((weights.triu(1) == 0).all())  # causal
    assert bool((weights[1, :, :, :5] == 0).all()) and bool((weights[1, :, :5] == 0).all())  # padding


@pytest.mark.transformers_versions
def test_attn_implementation_errors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "attn_implementation='sdpa' is not a LongNet attention; "
            "choose one of ['auto', 'cudnn', 'eager', 'flash', 'torch', 'triton']"
        ),
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=re.escape("attn_implementation='cudnn' needs a CUDA GPU")):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="cudnn")
    with pytest.raises(ValueError, match="is not a LongNet attention"):
        tiny_model().set_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match=re.escape("runs only with attn_implementation='eager'")):
        LongNetForCausalLM._from_config(tiny_config(use_relative_position_bias=True), attn_implementation="torch")
    assert tiny_model(use_relative_position_bias=True).config._attn_implementation == "eager"


def test_triton_implementation_matches_torch_where_it_runs():
    from modeling_longnet.modeling_longnet import _backend_is_available

    if not _backend_is_available("triton"):
        pytest.skip("Triton cannot run here")
    config = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16, which the kernels take
    model = tiny_model(**config)
    ids = random_ids(2, 24)
    expected = model(ids).logits
    model.set_attn_implementation("triton")
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# training features
# ---------------------------------------------------------------------------------------------------------


def gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.transformers_versions
def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(position_encoding="xpos").train()
    ids = random_ids(2, 40)
    plain = gradients(model, ids)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24 renamed it (5.17 has the old name)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_gradient_checkpointing
    checkpointed = gradients(model, ids)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.transformers_versions
def test_chunked_loss_equals_the_plain_loss_and_gradients():
    model = tiny_model().train()
    ids = random_ids(2, 37)
    labels = ids.clone()
    labels[0, :4] = -100
    plain_loss = model(ids, labels=labels).loss
    plain = gradients(model, ids)
    model.config.loss_chunk_size = 10
    out = model(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, plain_loss, rtol=1e-6, atol=1e-6)
    chunked = gradients(model, ids)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # with the token count Trainer passes for gradient accumulation
    num_items = torch.tensor(50)
    model.config.loss_chunk_size = None
    expected = model(ids, labels=labels, num_items_in_batch=num_items).loss
    model.config.loss_chunk_size = 7
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=num_items).loss, expected)


def loss_memory(model, ids):
    """(largest tensor made, bytes kept for the backward pass) of one training step's loss and backward."""
    saved = []
    probe = LargestTensor()
    with (
        probe,
        torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ),
    ):
        model(ids, labels=ids).loss.backward()
    return probe.bytes, sum(saved)


def test_chunked_loss_never_materialises_the_full_logits():
    model = tiny_model(vocab_size=1000).train()
    ids = random_ids(1, 512, vocab=1000)
    logits_bytes = 512 * 1000 * 4
    plain_largest, plain_saved = loss_memory(model, ids)
    model.config.loss_chunk_size = 64
    chunked_largest, chunked_saved = loss_memory(model, ids)
    assert plain_largest >= logits_bytes
    assert chunked_largest <= logits_bytes // 4
    assert plain_saved - chunked_saved >= logits_bytes  # the plain path keeps the logits for its backward


@pytest.mark.gpu
def test_chunked_loss_lowers_peak_cuda_memory():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = LongNetForCausalLM(tiny_config(vocab_size=32000, hidden_size=64, intermediate_size=128)).to(device).train()
    ids = torch.randint(3, 32000, (1, 4096), device=device)

    def peak():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - before

    plain = peak()
    model.config.loss_chunk_size = 256
    chunked = peak()
    logits_bytes = 4096 * 32000 * 4
    assert plain > 2 * logits_bytes and chunked < plain / 4, (plain, chunked)


def test_magneto_initialisation_scales_the_sub_ln_projections():
    model = tiny_model(
        LongNetModel,
        normalization="sub_layernorm",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=4,
        initializer_range=0.02,
    )
    gain = math.sqrt(math.log(8))
    layer = model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for projection in (layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
        assert projection.weight.std().item() == pytest.approx(0.02 * gain, rel=0.03)
    assert isinstance(layer.self_attn.sub_norm, torch.nn.LayerNorm) and isinstance(
        layer.mlp.sub_norm, torch.nn.LayerNorm
    )


# ---------------------------------------------------------------------------------------------------------
# sequence classification
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.transformers_versions
def test_sequence_classification_pools_the_last_real_token():
    model = tiny_model(LongNetForSequenceClassification, num_labels=3)
    rows = [random_ids(1, 12, seed=1), random_ids(1, 7, seed=2)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = rows[0][0], 1
    ids[1, 5:], mask[1, 5:] = rows[1][0], 1  # left padding
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    for b, row in enumerate(rows):
        torch.testing.assert_close(out.logits[b], model(row).logits[0], rtol=1e-5, atol=1e-5)
    right = torch.zeros_like(ids)
    right[1, :7] = rows[1][0]  # right padding with the pad token (0), no mask
    torch.testing.assert_close(model(right).logits[1], out.logits[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------


MALFORMED_INPUTS = [  # (name, forward arguments from (model, ids (2, 6)), error, message)
    ("3-D input_ids", lambda m, ids: dict(input_ids=ids[None]), ValueError, "`input_ids` must hold at least one row of at least one token, shape (batch, seq); got (1, 2, 6)"),
    ("float input_ids", lambda m, ids: dict(input_ids=ids.float()), TypeError, "`input_ids` must be an integer tensor of token ids, got torch.float32"),
    ("list input_ids", lambda m, ids: dict(input_ids=ids.tolist()), TypeError, "`input_ids` must be a torch.Tensor of shape (batch, seq), got list"),
    ("2-D inputs_embeds", lambda m, ids: dict(inputs_embeds=m.get_input_embeddings()(ids)[0]), ValueError, "`inputs_embeds` must hold at least one row of at least one token, shape (batch, seq, hidden_size=32); got (6, 32)"),
    ("inputs_embeds too narrow", lambda m, ids: dict(inputs_embeds=m.get_input_embeddings()(ids)[..., 1:]), ValueError, "`inputs_embeds` must have shape (batch, seq, hidden_size=32), got (2, 6, 31)"),
    ("position_ids too short", lambda m, ids: dict(input_ids=ids, position_ids=torch.arange(5).expand(2, 5)), ValueError, "`position_ids` must be a tensor of shape (batch, seq) = (2, 6) (or (1, seq)), one logical position per token of `input_ids`; got (2, 5)"),
    ("1-D position_ids", lambda m, ids: dict(input_ids=ids, position_ids=torch.arange(6)), ValueError, "`position_ids` must be a tensor of shape (batch, seq) = (2, 6) (or (1, seq))"),
    ("position_ids of 3 rows", lambda m, ids: dict(input_ids=ids, position_ids=torch.arange(6).expand(3, 6)), ValueError, "got (3, 6)"),
    ("list position_ids", lambda m, ids: dict(input_ids=ids, position_ids=[list(range(6))] * 2), ValueError, "got list"),
    ("negative logits_to_keep", lambda m, ids: dict(input_ids=ids, logits_to_keep=-1), ValueError, "`logits_to_keep` must be 0 (every position), a positive number of last positions, or a tensor of position indices; got -1"),
    ("labels too short", lambda m, ids: dict(input_ids=ids, labels=ids[:, 1:]), ValueError, "`labels` must have the shape of the inputs, (batch, seq) = (2, 6): the token ids to predict (shifted inside the model), -100 where no loss is wanted; got (2, 5)"),
    ("1-D labels", lambda m, ids: dict(input_ids=ids, labels=ids.flatten()), ValueError, "got (12,)"),
    ("float labels", lambda m, ids: dict(input_ids=ids, labels=ids.float()), TypeError, "`labels` must be an integer tensor of token ids, got torch.float32"),
    ("labels without inputs", lambda m, ids: dict(labels=ids), ValueError, "give exactly one of `input_ids` or `inputs_embeds`"),
]


@pytest.mark.parametrize("name, arguments, error, message", MALFORMED_INPUTS, ids=[case[0] for case in MALFORMED_INPUTS])
def test_malformed_inputs_are_named_before_any_layer_runs(name, arguments, error, message):
    model = tiny_model()
    with pytest.raises(error, match=re.escape(message)):
        model(**arguments(model, random_ids(2, 6)))


def test_well_formed_position_ids_and_labels_still_pass():
    model = tiny_model()
    ids = random_ids(2, 6)
    shared = model(ids, position_ids=torch.arange(6)[None]).logits
    per_row = model(ids, position_ids=torch.arange(6).expand(2, 6)).logits
    assert torch.equal(shared, per_row) and torch.equal(shared, model(ids).logits)
    assert model(ids, labels=ids).loss.isfinite()
    assert model(ids, logits_to_keep=2).logits.shape == (2, 2, 128)


def test_classifier_continues_a_cached_sequence_as_its_docstring_says():
    """With a cache the mask spans the cached tokens too; the pooled token is the last real one of the new part,
    and its logits equal those of one uncached call over the whole sequence."""
    model = tiny_model(LongNetForSequenceClassification, num_labels=3)
    ids = random_ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, -2:] = 0  # the second row ends in padding
    whole = model(ids, attention_mask=mask).logits
    first = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    continued = model(ids[:, 6:], attention_mask=mask, **{modeling._CACHE_FIELD: getattr(first, modeling._CACHE_FIELD)}).logits
    torch.testing.assert_close(continued, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("labels", [torch.tensor([1]), torch.tensor(1), [0, 1]], ids=["one row", "0-dim", "list"])
def test_classifier_labels_need_one_entry_per_row(labels):
    model = tiny_model(LongNetForSequenceClassification)
    with pytest.raises(ValueError, match=re.escape("`labels` must hold one entry per row, shape (2,) (class ids or regression targets) or (2, num_labels)")):
        model(random_ids(2, 6), labels=labels)
    assert model(random_ids(2, 6), labels=torch.tensor([0, 1])).loss.isfinite()


def test_bad_inputs_are_named():
    model = tiny_model()
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match=re.escape("give exactly one of `input_ids` or `inputs_embeds`")):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(
        ValueError, match=re.escape("`attention_mask` must have shape (batch, cached + new tokens) = (2, 6)")
    ):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="packing needs batch size 1"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))
    with pytest.raises(ValueError, match=re.escape("give the KV cache as `cache` or as `past_key_values`")):
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(TypeError, match="LongNet models take a transformers DynamicCache or StaticCache, a LongNetBoundedCache or a LongNetStaticCache"):
        model(ids, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    with pytest.raises(ValueError, match=re.escape("LongNetForCausalLM needs `causal=True`")):
        tiny_model(causal=False)
    encoder = tiny_model(LongNetModel, causal=False)
    with pytest.raises(ValueError, match=re.escape("a bidirectional LongNet (`config.causal=False`) has no KV cache")):
        encoder(ids, past_key_values=DynamicCache())
    assert encoder(ids, use_cache=True).to_tuple()[1:] == ()  # nothing but the hidden states
    for empty, name in ((ids[:, :0], "input_ids"), (ids[:0], "input_ids")):
        with pytest.raises(ValueError, match=re.escape(f"`{name}` must hold at least one row of at least one token")):
            model(empty)
    with pytest.raises(ValueError, match=re.escape("`inputs_embeds` must hold at least one row of at least one token")):
        model(inputs_embeds=model.get_input_embeddings()(ids)[:, :0])
