"""The dense backend (``dilated_attention_dense``): a :class:`PositionLayout` (each key's and query's position, keys
in any order) computed with dense masks, forward, LSE and gradient, against the float64 reference; inside a
compiled graph it is plain tensor operations (no custom op, nothing read on the host)."""

from __future__ import annotations

import pytest
import torch
from cases import attention_cases, make_inputs, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_dilated_attention

from modeling_longnet import PositionLayout, dilated_attention


def position_layout(case, key_order=None):
    """The case's layout as positions (keys in ``key_order``): its mask and offset, queries the last keys."""
    mask = case["attention_mask"]
    if mask is None:
        mask = torch.ones(case["batch"], case["num_keys"], dtype=torch.long)
    offset = case["position_offset"] if case["position_offset"] is not None else 0
    layout = PositionLayout.from_mask(mask, case["num_queries"], offset)
    if key_order is not None:
        layout = PositionLayout(layout.key_positions[:, key_order], layout.key_real[:, key_order], layout.query_positions, layout.query_real)
    return layout


@settings(max_examples=60)
@given(case=attention_cases(max_len=80).filter(lambda c: c["cu_seqlens"] is None), shuffle=st.booleans())
def test_the_dense_backend_equals_the_reference_with_keys_in_any_order(case, shuffle):
    q, k, v = make_inputs(case, requires_grad=True)
    order = torch.randperm(case["num_keys"], generator=torch.Generator().manual_seed(case["seed"])) if shuffle else None
    layout = position_layout(case, order)
    k_in, v_in = (k[:, order], v[:, order]) if shuffle else (k, v)
    out, lse = dilated_attention(
        q, k_in, v_in, case["segment_lengths"], case["dilation_rates"], causal=case["causal"], offsets=case["offsets"],
        token_layout=layout, return_lse=True,
    )
    kwargs = dict(causal=case["causal"], offsets=case["offsets"], attention_mask=case["attention_mask"], position_offset=case["position_offset"])
    ref, ref_lse = reference_dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], return_lse=True, **kwargs)
    assert relative_error(out, ref) <= 1e-12
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert relative_error(lse[finite], ref_lse[finite]) <= 1e-12
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(case["seed"] + 2))
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert relative_error(g, w) <= 1e-12, name


def test_a_share_of_the_heads_takes_the_offsets_of_its_global_index():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 6, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 30, 6, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    layout = PositionLayout.from_mask(torch.ones(2, 30, dtype=torch.long), 3, torch.tensor([0, 7]))
    whole = dilated_attention(q, k, v, [4, 16], [2, 3], causal=True, token_layout=layout)
    share = dilated_attention(q[:, :, 2:5], k[:, :, 2:5], v[:, :, 2:5], [4, 16], [2, 3], causal=True, token_layout=layout, heads=(2, 6))
    torch.testing.assert_close(share, whole[:, :, 2:5], rtol=0, atol=0)


def test_in_a_compiled_graph_the_dense_backend_is_plain_tensor_operations():
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4, 16, generator=generator)
    k, v = (torch.randn(1, 40, 2, 16, generator=generator) for _ in range(2))
    mask = (torch.rand(1, 40, generator=generator) < 0.8).long()
    mask[:, -2:] = 1

    def attention(q, k, v, mask):
        layout = PositionLayout.from_mask(mask, 2, 5)
        return dilated_attention(q, k, v, [8, 32], [1, 4], causal=True, token_layout=layout)

    compiled = torch.compile(attention, backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), attention(q, k, v, mask), rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1 and "modeling_longnet" not in graphs[0]


def test_a_position_layout_of_other_shapes_is_named():
    q, k, v = torch.zeros(1, 2, 2, 8), torch.zeros(1, 10, 2, 8), torch.zeros(1, 10, 2, 8)
    layout = PositionLayout.from_mask(torch.ones(1, 9, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"PositionLayout.key_positions must have shape \(1, 10\) for these q, k, v; got \(1, 9\)"):
        dilated_attention(q, k, v, 4, 1, token_layout=layout)
    with pytest.raises(ValueError, match="`token_layout` already says where the tokens are"):
        dilated_attention(q, k, v, 4, 1, token_layout=PositionLayout.from_mask(torch.ones(1, 10), 2), attention_mask=torch.ones(1, 10))


def test_selected_keys_of_other_shapes_are_named():
    """SelectedKeys (a static cache's decoding step) are the candidates of one query per row, per query head."""
    from modeling_longnet.dilated_attention_pattern import SelectedKeys

    q, k, v = torch.zeros(1, 1, 2, 8), torch.zeros(1, 10, 2, 8), torch.zeros(1, 10, 2, 8)
    out = dilated_attention(q, k, v, 4, 1, token_layout=SelectedKeys(torch.ones(1, 2, 10, dtype=torch.bool)))
    assert out.shape == (1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"SelectedKeys are the candidate keys of one query per row, per query head: .* valid \(1, 2, 9\)"):
        dilated_attention(q, k, v, 4, 1, token_layout=SelectedKeys(torch.ones(1, 2, 9, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"SelectedKeys are the candidate keys of one query per row.*got q \(1, 2, 2, 8\)"):
        dilated_attention(torch.zeros(1, 2, 2, 8), k, v, 4, 1, token_layout=SelectedKeys(torch.ones(1, 2, 10, dtype=torch.bool)))
