"""DilatedAttention, the standalone layer: shapes, the brute-force reference, positions, the hook, training."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import allowed_mask, logical_positions, reference_dilated_attention
from torch import nn

from modeling_longnet import ALL_DILATED_ATTENTION_FUNCTIONS, DilatedAttention
from modeling_longnet.modeling_longnet import LongNetAttention, _backend_is_available


def random_mask(draw, batch, seq_len):
    kind = draw(st.sampled_from(["none", "left", "right"]))
    if kind == "none":
        return None
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        pad = draw(st.integers(0, seq_len - 1))
        if kind == "left":
            mask[b, :pad] = 0
        else:
            mask[b, seq_len - pad :] = 0
    return mask


@st.composite
def layer_cases(draw, max_len=48):
    num_kv_heads = draw(st.integers(1, 3))
    num_heads = num_kv_heads * draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8]))
    branches = draw(st.integers(1, 3))
    rates = [1] + [draw(st.integers(1, 4)) for _ in range(branches - 1)]  # a rate-1 branch covers every position
    segments = [draw(st.integers(1, 24)) for _ in range(branches)]
    batch, seq_len = draw(st.integers(1, 2)), draw(st.integers(1, max_len))
    return dict(
        d_model=num_heads * head_dim,
        num_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        dilation_rate=rates,
        segment_size=segments,
        causal=draw(st.booleans()),
        offsets=draw(st.sampled_from(["interleaved", "grouped"])),
        batch=batch,
        seq_len=seq_len,
        mask=random_mask(draw, batch, seq_len),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_layer(case, **extra):
    torch.manual_seed(case["seed"])
    layer = DilatedAttention(
        case["d_model"],
        case["num_heads"],
        case["dilation_rate"],
        case["segment_size"],
        causal=case["causal"],
        num_key_value_heads=case["num_key_value_heads"],
        offsets=case["offsets"],
        **extra,
    )
    return layer.double().eval()


def projections(layer, x):
    batch, seq_len, _ = x.shape
    q = layer.q_proj(x).view(batch, seq_len, layer.num_heads, layer.head_dim)
    k = layer.k_proj(x).view(batch, seq_len, layer.num_key_value_heads, layer.head_dim)
    v = layer.v_proj(x).view(batch, seq_len, layer.num_key_value_heads, layer.head_dim)
    return q, k, v


def xpos_reference(q, k, positions, scale_base=512.0, theta=10000.0):
    """RoPE (rotate-half convention) then xPos's decay, scores scaling as zeta ** ((n - m) / scale_base), in float64."""
    head_dim = q.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[..., None].double() * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, :, None], torch.cat([angles.sin()] * 2, -1)[:, :, None]

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    zeta = (torch.arange(0, head_dim, 2, dtype=torch.float64) + 0.4 * head_dim) / (1.4 * head_dim)
    power = torch.cat([zeta, zeta]) ** (positions[..., None].double() / scale_base)
    return rotate(q) * power[:, :, None], rotate(k) / power[:, :, None]


@given(layer_cases())
def test_output_equals_out_projection_of_the_reference(case):
    layer = build_layer(case)
    x = torch.randn(case["batch"], case["seq_len"], case["d_model"], dtype=torch.float64)
    out = layer(x, attention_mask=case["mask"])
    q, k, v = projections(layer, x)
    expected = reference_dilated_attention(
        q,
        k,
        v,
        case["segment_size"],
        case["dilation_rate"],
        causal=case["causal"],
        offsets=case["offsets"],
        attention_mask=case["mask"],
    )
    expected = layer.o_proj(expected.reshape(*x.shape[:2], -1))
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=25)
@given(layer_cases(max_len=40))
def test_xpos_layer_equals_reference_with_rotary_and_decay(case):
    layer = build_layer(case, use_xpos=True)
    x = torch.randn(case["batch"], case["seq_len"], case["d_model"], dtype=torch.float64)
    out = layer(x, attention_mask=case["mask"])
    q, k, v = projections(layer, x)
    mask = case["mask"]
    positions = (
        (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(x.shape[1]).expand(x.shape[0], -1)
    )
    q, k = xpos_reference(q, k, positions)
    expected = reference_dilated_attention(
        q,
        k,
        v,
        case["segment_size"],
        case["dilation_rate"],
        causal=case["causal"],
        offsets=case["offsets"],
        attention_mask=mask,
    )
    # rotations and decays are computed in float32 (as transformers' rotary embeddings), the rest in float64
    torch.testing.assert_close(out, layer.o_proj(expected.reshape(*x.shape[:2], -1)), rtol=1e-6, atol=1e-6)


def biased_reference(q, k, v, layer, mask):
    """Softmax over the multiset union of the branches' keys of ``scale * q.k + bias[bucket(m - n)]``, densely."""
    batch, seq_len, num_heads, head_dim = q.shape
    doc, pos = logical_positions(batch, seq_len, mask)
    allowed = allowed_mask(
        layer.segment_lengths, layer.dilation_rates, num_heads, seq_len, doc, pos, layer.is_causal, layer.offsets
    )
    group = num_heads // k.shape[2]
    kh, vh = k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2).transpose(1, 2)
    scores = q.transpose(1, 2) @ kh.transpose(-1, -2) * head_dim**-0.5
    bias = layer.relative_position_bias.relative_attention_bias(
        layer.relative_position_bias.bucket(pos[:, None, :] - pos[:, :, None])
    ).permute(0, 3, 1, 2)
    weights = torch.exp(scores + bias)[None] * allowed  # (branch, B, H, N, N): a key seen by two branches counts twice
    weights = weights.sum(0)
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / total, 0.0)
    return (weights @ vh).transpose(1, 2)


@settings(max_examples=20)
@given(layer_cases(max_len=32))
def test_relative_position_bias_equals_dense_reference(case):
    layer = build_layer(
        case, use_rel_pos_bias=True, relative_attention_num_buckets=8, relative_attention_max_distance=20
    )
    nn.init.normal_(layer.relative_position_bias.relative_attention_bias.weight, std=1.0)
    assert layer.attn_implementation == "eager"
    x = torch.randn(case["batch"], case["seq_len"], case["d_model"], dtype=torch.float64)
    out = layer(x, attention_mask=case["mask"])
    q, k, v = projections(layer, x)
    expected = biased_reference(q, k, v, layer, case["mask"])
    torch.testing.assert_close(out, layer.o_proj(expected.reshape(*x.shape[:2], -1)), rtol=1e-9, atol=1e-9)


def test_relative_position_buckets_are_t5s():
    bias = DilatedAttention(8, 2, 1, 8, causal=True, use_rel_pos_bias=True).relative_position_bias
    distances = torch.tensor([0, 1, 15, 16, 17, 50, 127, 128, 10_000])
    # causal, 32 buckets: 16 exact distances, then log-spaced up to 128, then the last bucket
    buckets = bias.bucket(-distances)
    assert buckets[:3].tolist() == [0, 1, 15]
    assert buckets[3] == 16 and buckets[-1] == 31 and bool((buckets.diff() >= 0).all())
    assert bias.bucket(distances[1:2]).item() == 0  # a later key is distance 0 in a causal layer


@given(st.integers(1, 300), st.sampled_from([1, 3]), st.booleans(), st.booleans())
@settings(max_examples=30)
def test_output_shape_is_input_shape_for_any_length(seq_len, batch, causal, use_xpos):
    layer = DilatedAttention(32, 4, [1, 2, 4], [16, 64, 128], causal=causal, use_xpos=use_xpos)
    x = torch.randn(batch, seq_len, 32)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_same_code_as_the_model_attention():
    assert issubclass(LongNetAttention, DilatedAttention)
    assert LongNetAttention.attend is DilatedAttention.attend


def test_attention_function_hook_receives_the_documented_arguments():
    calls = []

    def spy(module, query, key, value, token_layout, *, scaling, dropout, **kwargs):
        calls.append((module, query.shape, key.shape, token_layout.num_keys, scaling, dropout))
        return ALL_DILATED_ATTENTION_FUNCTIONS["torch"](
            module, query, key, value, token_layout, scaling=scaling, dropout=dropout
        )

    ALL_DILATED_ATTENTION_FUNCTIONS["spy"] = spy
    try:
        torch.manual_seed(0)
        layer = DilatedAttention(16, 4, [1, 2], [4, 8], num_key_value_heads=2, attn_implementation="spy")
        reference_layer = DilatedAttention(16, 4, [1, 2], [4, 8], num_key_value_heads=2, attn_implementation="torch")
        reference_layer.load_state_dict(layer.state_dict())
        x = torch.randn(2, 10, 16)
        torch.testing.assert_close(layer(x), reference_layer(x))
        assert calls == [(layer, (2, 10, 4, 4), (2, 10, 2, 4), 10, 0.5, 0.0)]
    finally:
        del ALL_DILATED_ATTENTION_FUNCTIONS["spy"]


class SimpleTransformer(nn.Module):
    """The usage example of the original LongNet layer: dilated attention, then a linear head on position 0."""

    def __init__(self, d_model, num_heads, dilation_rate, segment_size, num_classes):
        super().__init__()
        self.dilated_attention = DilatedAttention(d_model, num_heads, dilation_rate, segment_size)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.fc(self.dilated_attention(x)[:, 0])


def test_simple_transformer_trains_in_a_plain_pytorch_loop():
    torch.manual_seed(0)
    model = SimpleTransformer(d_model=32, num_heads=4, dilation_rate=[1, 2], segment_size=[8, 16], num_classes=2)
    x = torch.randn(32, 16, 32)
    y = (x[:, :8].mean(dim=(1, 2)) > 0).long()  # depends on the tokens position 0 can see
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


LAYER_ARGS = dict(d_model=16, num_heads=4, dilation_rate=[1, 2], segment_size=[4, 8])
INVALID_LAYER_ARGUMENTS = [
    (dict(d_model=0), ValueError, "`d_model` must be a positive int, got 0"),
    (dict(num_heads=3), ValueError, "`d_model` (16) must be a multiple of `num_heads` (3), or give `head_dim`"),
    (dict(num_heads=True), ValueError, "`num_heads` must be a positive int, got True"),
    (dict(num_key_value_heads=3), ValueError, "`num_heads` (4) must be a multiple of `num_key_value_heads` (3)"),
    (dict(dilation_rate="1"), TypeError, "`dilation_rate` must be a positive int or a list of positive ints, got '1'"),
    (dict(dilation_rate=[]), ValueError, "`dilation_rate` is empty: give at least one branch"),
    (dict(segment_size=[4, 0]), ValueError, "`segment_size` must contain positive ints, got 0 in [4, 0]"),
    (dict(segment_size=[2**60, 8]), ValueError, "`segment_size` must contain ints up to 2**48"),
    (dict(dilation_rate=[1, 2**60]), ValueError, "`dilation_rate` must contain ints up to 2**48 (positions are computed in int64), got 1152921504606846976 in [1, 1152921504606846976]"),
    (
        dict(segment_size=[4]),
        ValueError,
        "`dilation_rate` and `segment_size` need one entry per branch, got [1, 2] and [4]",
    ),
    (
        dict(dilation_rate=[8, 8], segment_size=[16, 8]),
        ValueError,
        "`segment_size`=[16, 8] with `dilation_rate`=[8, 8] and 4 heads (`num_heads`) leave 4 of every 8 positions "
        "(the first: 4) seen by no head at all",
    ),
    (dict(offsets="random"), ValueError, "`offsets` must be one of ('interleaved', 'grouped'), got 'random'"),
    (dict(rope_theta=0), ValueError, "`rope_theta` must be a finite positive number, got 0"),
    (dict(rope_theta=-1.0, use_xpos=True), ValueError, "`rope_theta` must be a finite positive number, got -1.0"),
    (dict(xpos_scale_base=0.0), ValueError, "`xpos_scale_base` must be a finite positive number, got 0.0"),
    (dict(xpos_scale_base=float("nan")), ValueError, "`xpos_scale_base` must be a finite positive number, got nan"),
    (dict(norm_eps=0.0, sub_layernorm=True), ValueError, "`norm_eps` must be a finite positive number, got 0.0"),
    (dict(dropout=1.5), ValueError, "`dropout` must be a probability in [0, 1), got 1.5"),
    (dict(causal=1), TypeError, "`causal` must be True or False, got 1"),
    (dict(use_xpos="yes"), TypeError, "`use_xpos` must be True or False, got 'yes'"),
    (
        dict(head_dim=3, use_xpos=True),
        ValueError,
        "`use_xpos` rotates pairs of dimensions: the head dimension must be even, got 3",
    ),
    (
        dict(use_rel_pos_bias=True, relative_attention_max_distance=8),
        ValueError,
        "`relative_attention_max_distance` (8) must exceed the 8 distances",
    ),
    (
        dict(attn_implementation="sdpa"),
        ValueError,
        "attn_implementation='sdpa' is not a LongNet attention; choose one of",
    ),
    (
        dict(attn_implementation="flash"),
        ValueError,
        "attn_implementation='flash' needs the `flash-attn` package and a CUDA GPU",
    ),
    (
        dict(use_rel_pos_bias=True, attn_implementation="torch"),
        ValueError,
        (
            "the relative position bias (`use_relative_position_bias` / `use_rel_pos_bias`) runs only with "
            "attn_implementation='eager'"
        ),
    ),
]


@pytest.mark.parametrize(
    "overrides, error, message", INVALID_LAYER_ARGUMENTS, ids=[str(o) for o, _, _ in INVALID_LAYER_ARGUMENTS]
)
def test_invalid_layer_argument_is_named(overrides, error, message):
    if overrides.get("attn_implementation") == "flash" and _backend_is_available("flash"):
        pytest.skip("flash-attn runs on this machine")
    with pytest.raises(error, match=re.escape(message)):
        DilatedAttention(**{**LAYER_ARGS, **overrides})


@pytest.mark.parametrize("shape", [(2, 0, 16), (0, 5, 16)], ids=["no tokens", "no rows"])
def test_an_empty_input_is_named(shape):
    layer = DilatedAttention(**LAYER_ARGS)
    message = f"`x` must be a tensor of shape (batch, seq_len, d_model=16) with at least one row of at least one token, got {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.randn(shape))


def test_an_xpos_scale_base_too_small_for_any_chunk_says_which_would_do():
    """Chunking cannot help when even neighbouring positions overflow: the message gives the scale base that fits
    this call, and that one runs."""
    x = torch.randn(1, 64, 16)
    layer = DilatedAttention(**LAYER_ARGS, use_xpos=True, xpos_scale_base=1e-3)
    with pytest.raises(ValueError, match=r"`xpos_scale_base`=0.001 is too small for torch.float32.*For the 64 positions of this call use a scale base of at least ([0-9.]+) ") as raised:
        layer(x)
    enough = float(re.search(r"at least ([0-9.]+) ", str(raised.value)).group(1)) * 1.01
    assert DilatedAttention(**LAYER_ARGS, use_xpos=True, xpos_scale_base=enough)(x).isfinite().all()


def test_the_original_layers_documented_example_works_as_documented():
    """The seed's documentation: ``DilatedAttention(d_model=512, num_heads=8, dilation_rate=2, segment_size=64,
    dropout=0.1, causal=True, use_xpos=False, use_rel_pos_bias=False)``. One dilated branch: head h sees the
    positions of residue h mod 2 in its segment, and gives zero at the others (SPEC.md); the heads together cover
    every position. The output is the out-projection of exactly that function."""
    torch.manual_seed(0)
    layer = DilatedAttention(
        d_model=512, num_heads=8, dilation_rate=2, segment_size=64, dropout=0.1, causal=True, use_xpos=False,
        use_rel_pos_bias=False,
    ).double().eval()
    x = torch.randn(2, 150, 512, dtype=torch.float64)
    out = layer(x)
    q, k, v = projections(layer, x)
    attention = reference_dilated_attention(q, k, v, [64], [2], causal=True)
    torch.testing.assert_close(out, layer.o_proj(attention.reshape(2, 150, -1)), rtol=1e-10, atol=1e-10)
    odd_heads_at_even_positions = attention[:, 0::2, 1::2]
    assert torch.count_nonzero(odd_heads_at_even_positions) == 0 and torch.count_nonzero(attention[:, 0::2, 0::2]) > 0
    layer.train()
    layer(x).sum().backward()  # dropout 0.1 in training, gradients flow
    assert layer.q_proj.weight.grad.abs().sum() > 0


def test_bad_input_shape_is_named():
    layer = DilatedAttention(**LAYER_ARGS)
    with pytest.raises(
        ValueError, match=re.escape("`x` must be a tensor of shape (batch, seq_len, d_model=16) with at least one row of at least one token, got (2, 5, 8)")
    ):
        layer(torch.randn(2, 5, 8))


def test_xpos_refuses_spans_its_dtype_cannot_hold():
    layer = DilatedAttention(16, 2, 1, 8, causal=True, use_xpos=True).half()
    message = "xPos scales queries and keys by up to"
    with pytest.raises(ValueError, match=message):
        layer(torch.zeros(1, 5000, 16, dtype=torch.half))
    assert math.isfinite(layer(torch.zeros(1, 500, 16, dtype=torch.half)).float().sum().item())
