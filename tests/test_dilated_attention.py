"""The dilated attention core against the brute-force reference: values, gradients, dropout, coverage, errors."""

from __future__ import annotations

import importlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from cases import attention_cases, call_kwargs, make_inputs, relative_error
from memory_probe import LargestTensor
from reference import head_offset, reference_dilated_attention

from modeling_longnet import (
    DilatedPattern,
    PositionLayout,
    TokenLayout,
    available_backends,
    dilated_attention,
    pattern_coverage,
)

# the package exports the function under the module's name, so reach the module through importlib
torch_backend_module = importlib.import_module("modeling_longnet.dilated_attention_torch")
dispatcher = importlib.import_module("modeling_longnet.dilated_attention")

# ---------------------------------------------------------------------------------------------------------
# random cases
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------------------


@given(attention_cases())
def test_torch_backend_matches_reference_values_and_gradients(case):
    q, k, v = make_inputs(case, requires_grad=True)
    out = dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], backend="torch", **call_kwargs(case))
    ref = reference_dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], **call_kwargs(case))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= 1e-10
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(case["seed"] + 1))
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, w) <= 1e-10, name


@settings(max_examples=12)
@given(attention_cases(max_len=10, max_heads=2, head_dims=(8,), max_branches=3))
def test_gradcheck(case):
    q, k, v = make_inputs(case, requires_grad=True)

    def attention(q, k, v):
        return dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], backend="torch", **call_kwargs(case))

    # fast mode checks random projections of the Jacobian: the same failures, a fraction of the time
    assert torch.autograd.gradcheck(attention, (q, k, v), fast_mode=True)


@settings(max_examples=30)
@given(attention_cases(max_len=80))
def test_returned_lse_matches_reference_and_is_differentiable(case):
    q, k, v = make_inputs(case, requires_grad=True)
    out, lse = dilated_attention(
        q, k, v, case["segment_lengths"], case["dilation_rates"], backend="torch", return_lse=True, **call_kwargs(case)
    )
    _, want = reference_dilated_attention(
        q, k, v, case["segment_lengths"], case["dilation_rates"], return_lse=True, **call_kwargs(case)
    )
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want))
    finite = torch.isfinite(want)
    assert relative_error(lse[finite], want[finite]) <= 1e-10
    # gradient through the LSE (where finite) and the output together
    weights = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(7))
    loss = (out.sum(-1) + torch.where(finite, lse, 0.0)) * weights
    got = torch.autograd.grad(loss.sum(), (q, k, v))
    ref = reference_dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], **call_kwargs(case))
    loss_ref = (ref.sum(-1) + torch.where(finite, want, 0.0)) * weights
    wanted = torch.autograd.grad(loss_ref.sum(), (q, k, v))
    for name, g, w in zip("qkv", got, wanted):
        assert relative_error(g, w) <= 1e-10, name


def test_lse_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attention = lambda q, k, v: dilated_attention(q, k, v, [4, 8], [1, 3], causal=True, return_lse=True, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_dropout_backward_drops_exactly_what_the_forward_dropped():
    """O = P_dropped V is linear in V, so <dO, O> = <dV, V> to rounding when the backward applies the forward's
    mask and scale. (gradcheck's tolerances let a scale rounded to float32 through: 2.4e-8 relative.)"""
    q, k, v = (t.requires_grad_() for t in _dropout_inputs(n=32, dim=8))
    torch.manual_seed(5)
    out = dilated_attention(q, k, v, dropout_p=0.3, backend="torch", **DROPOUT_ARGS)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9))
    (grad_v,) = torch.autograd.grad(out, (v,), grad_out)
    assert float((grad_out * out).sum()) == pytest.approx(float((grad_v * v).sum()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_follow_the_reference(dtype):
    case = dict(batch=2, num_keys=200, num_queries=200, num_heads=4, num_kv_heads=2, head_dim=16, seed=3)
    q, k, v = make_inputs(case, dtype=dtype, requires_grad=False)
    out = dilated_attention(q, k, v, [16, 64], [1, 4], causal=True, backend="torch")
    ref = reference_dilated_attention(q.double(), k.double(), v.double(), [16, 64], [1, 4], causal=True)
    assert out.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert relative_error(out.double(), ref) <= tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype_like_sdpa(dtype):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 4, 16, generator=generator)  # float32, as after rotary positions
    k = torch.randn(2, 40, 2, 16, generator=generator)
    v = torch.randn(2, 40, 2, 16, generator=generator).to(dtype)  # straight out of a projection under autocast
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = dilated_attention(q, k, v, [8, 32], [1, 4], causal=True)
    plain = dilated_attention(q.detach().to(dtype), k.detach().to(dtype), v.detach(), [8, 32], [1, 4], causal=True)
    assert out.dtype == dtype and torch.equal(out, plain)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == dtype


def test_fully_padded_batch_gives_zeros_not_nan():
    q, k, v = (torch.randn(2, 9, 2, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    out, lse = dilated_attention(q, k, v, [4], [2], attention_mask=mask, causal=True, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


def test_segment_longer_than_sequence_is_one_segment():
    q, k, v = (torch.randn(1, 50, 2, 8, dtype=torch.float64) for _ in range(3))
    long = dilated_attention(q, k, v, [10**9], [1], causal=True)
    exact = dilated_attention(q, k, v, [50], [1], causal=True)
    assert torch.equal(long, exact)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    assert relative_error(long, dense) <= 1e-12


def test_token_layout_reuse_equals_direct_call():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 4, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0
    layout = TokenLayout.build(2, 40, attention_mask=mask)
    first = dilated_attention(q, k, v, [8, 32], [1, 4], token_layout=layout, causal=True)
    again = dilated_attention(q, k, v, [8, 32], [1, 4], token_layout=layout, causal=True)  # cached tables
    direct = dilated_attention(q, k, v, [8, 32], [1, 4], attention_mask=mask, causal=True)
    assert torch.equal(first, direct) and torch.equal(again, direct)


def test_token_layout_takes_the_device_as_a_string_and_names_a_mask_elsewhere():
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0
    by_name = TokenLayout.build(2, 40, attention_mask=mask, device="cpu")
    by_device = TokenLayout.build(2, 40, attention_mask=mask, device=torch.device("cpu"))
    assert torch.equal(by_name.doc_length, by_device.doc_length)
    cu_seqlens = torch.tensor([0, 15, 40], dtype=torch.int32)
    assert TokenLayout.build(1, 40, cu_seqlens=cu_seqlens, device="cpu").num_documents == 2
    with pytest.raises(ValueError, match="`attention_mask` is on cpu but the queries are on meta"):
        TokenLayout.build(2, 40, attention_mask=mask, device="meta")


# ---------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------

DROPOUT_ARGS = dict(segment_lengths=[4, 16], dilation_rates=[1, 2], causal=True)


def _dropout_inputs(n=24, dim=8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, n, 2, dim, generator=generator, dtype=torch.float64) for _ in range(3)]


def test_dropout_same_seed_same_result_different_seed_different_result():
    q, k, v = _dropout_inputs()
    torch.manual_seed(11)
    a = dilated_attention(q, k, v, dropout_p=0.3, **DROPOUT_ARGS)
    torch.manual_seed(11)
    b = dilated_attention(q, k, v, dropout_p=0.3, **DROPOUT_ARGS)
    torch.manual_seed(12)
    c = dilated_attention(q, k, v, dropout_p=0.3, **DROPOUT_ARGS)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dropout_zero_is_the_plain_function():
    q, k, v = _dropout_inputs()
    assert torch.equal(dilated_attention(q, k, v, dropout_p=0.0, **DROPOUT_ARGS), dilated_attention(q, k, v, **DROPOUT_ARGS))


def test_dropout_is_unbiased():
    q, k, v = _dropout_inputs()
    exact = dilated_attention(q, k, v, **DROPOUT_ARGS)
    torch.manual_seed(0)
    draws = torch.stack([dilated_attention(q, k, v, dropout_p=0.25, **DROPOUT_ARGS) for _ in range(400)])
    mean, std = draws.mean(0), draws.std(0)
    varying = std > 0
    assert torch.equal(mean[~varying], exact[~varying])
    z = (mean - exact)[varying] / (std[varying] / math.sqrt(len(draws)))
    assert z.abs().max() < 6.0
    assert 0.7 < float((z**2).mean()) < 1.3  # z is standard normal if the mean is right


def test_dropout_gradient_is_exact_for_a_fixed_mask():
    q, k, v = (t.requires_grad_() for t in _dropout_inputs(n=12, dim=4))

    def attention(q, k, v):
        torch.manual_seed(5)  # the same dropout mask on every call
        return dilated_attention(q, k, v, dropout_p=0.4, return_lse=True, **DROPOUT_ARGS)

    assert torch.autograd.gradcheck(attention, (q, k, v))


# ---------------------------------------------------------------------------------------------------------
# coverage
# ---------------------------------------------------------------------------------------------------------


def _brute_force_coverage(segment_lengths, dilation_rates, num_heads, offsets):
    """Every (position, head) pair over lcm(segment_lengths), and the positions no head covers."""
    period = math.lcm(*segment_lengths)
    pairs = [
        (t, h)
        for t in range(period)
        for h in range(num_heads)
        if not any((t % w) % r == head_offset(h, r, num_heads, offsets) for w, r in zip(segment_lengths, dilation_rates))
    ]
    outside = set(pairs)
    positions = [t for t in range(period) if all((t, h) in outside for h in range(num_heads))]
    return period, pairs, positions


@settings(max_examples=150)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6)), min_size=1, max_size=4),
    st.integers(1, 8),
    st.sampled_from(["interleaved", "grouped"]),
)
def test_pattern_coverage_matches_brute_force_and_the_function(branches, num_heads, offsets):
    segment_lengths = [w for w, _ in branches]
    dilation_rates = [r for _, r in branches]
    got = pattern_coverage(segment_lengths, dilation_rates, num_heads, offsets)
    period, pairs, positions = _brute_force_coverage(segment_lengths, dilation_rates, num_heads, offsets)
    assert period % got.period == 0  # the reported period is a period of the pattern
    repeats = period // got.period
    assert got.uncovered_pairs * repeats == len(pairs)
    assert got.uncovered_positions * repeats == len(positions)
    assert got.some_pair_uncovered == bool(pairs) and got.complete == (not pairs)
    assert got.every_position_covered == (not positions)
    if got.first_uncovered_pair is not None:
        assert got.first_uncovered_pair == min(pairs)
    if got.first_uncovered_position is not None:
        assert got.first_uncovered_position == min(positions)
    # the queries at those pairs are exactly the ones that see nothing
    q = k = v = torch.randn(1, period, num_heads, 8, dtype=torch.float64)
    _, lse = dilated_attention(q, k, v, segment_lengths, dilation_rates, offsets=offsets, return_lse=True)
    assert sorted(map(tuple, torch.isneginf(lse[0]).nonzero().tolist())) == pairs


@pytest.mark.parametrize(
    "segment_lengths, dilation_rates, num_heads",
    [
        ([8191, 8192], [2, 2], 4),  # lcm 67M: 21.8 GB and 11 minutes with the old list of pairs
        ([4095, 4096], [2, 2], 4),
        ([2**31 - 1, 2**31 - 3], [5, 7], 3),
        ([4093, 1021, 7, 11, 13, 2, 9, 5], [3, 5, 7, 11, 13, 2, 9, 5], 2),
        ([2**31 - 1] * 8, [2**31 - 1] * 8, 4),
        ([2**31 - 1, 2**31 - 2, 2**30, 3, 5, 7, 2**20, 2**31 - 5], [2**30, 3, 2**29, 3, 5, 7, 2, 11], 12),
    ],
)
def test_pattern_coverage_scans_a_bounded_number_of_positions(monkeypatch, segment_lengths, dilation_rates, num_heads):
    """The cost does not grow with the period: at most 2**20 positions of any group of branches are scanned."""
    core = importlib.import_module("modeling_longnet.dilated_attention_pattern")
    scanned = []
    real_arange = torch.arange

    def counting_arange(*args, **kwargs):
        out = real_arange(*args, **kwargs)
        scanned.append(out.numel())
        return out

    monkeypatch.setattr(core.torch, "arange", counting_arange)
    try:
        coverage = pattern_coverage(segment_lengths, dilation_rates, num_heads)
    except ValueError as error:  # undecidable within the bounds: the error says what to change
        assert "multiples of their dilation rates" in str(error)
        coverage = None
    assert sum(scanned) <= core._COVERAGE_SCAN_LIMIT * len(segment_lengths)
    if coverage is not None:
        assert coverage.describe()


def test_pattern_coverage_summaries():
    # the paper's pattern: complete
    assert pattern_coverage([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12], 12).complete
    # the original LongNet layer's example: one dilated branch, each head on its own residue, every position covered
    single = pattern_coverage([64], [2], 8)
    assert single.every_position_covered and not single.complete and single.uncovered_pairs == 8  # per period 2
    assert single.first_uncovered_pair == (0, 1)
    # fewer heads than the rate: positions that no head covers
    sparse = pattern_coverage([64], [4], 2)
    assert sparse.uncovered_positions == 2 and sparse.first_uncovered_position == 2
    # coprime periods: the counts multiply (Chinese remainder theorem)
    coprime = pattern_coverage([7, 9], [7, 9], 1)
    assert coprime.uncovered_positions == 6 * 8


def test_pattern_coverage_errors():
    with pytest.raises(ValueError, match="num_heads"):
        pattern_coverage([4], [2], 0)
    with pytest.raises(ValueError, match="segment_lengths"):
        pattern_coverage([4, 0], [2, 1], 2)


# ---------------------------------------------------------------------------------------------------------
# memory: nothing quadratic
# ---------------------------------------------------------------------------------------------------------


def _largest_tensor(n: int, monkeypatch) -> int:
    monkeypatch.setattr(torch_backend_module, "_CHUNK_ELEMENTS", 1 << 16)  # small chunks, small test
    q, k, v = (torch.randn(1, n, 1, 8, requires_grad=True) for _ in range(3))
    with LargestTensor() as probe:
        out = dilated_attention(q, k, v, [n], [1], causal=True, backend="torch")  # one segment of the whole sequence
        out.sum().backward()
    return probe.elements


def test_torch_backend_never_builds_an_n_by_n_matrix(monkeypatch):
    n = 2048
    largest = _largest_tensor(n, monkeypatch)
    assert largest < n * n / 16, f"a tensor of {largest} elements for N={n}"
    assert _largest_tensor(2 * n, monkeypatch) <= 2 * largest  # linear growth


# ---------------------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the parameter
# ---------------------------------------------------------------------------------------------------------


def _qkv(batch=1, n=8, heads=4, kv_heads=4, dim=8, dtype=torch.float32):
    return torch.randn(batch, n, heads, dim, dtype=dtype), torch.randn(batch, n, kv_heads, dim, dtype=dtype), torch.randn(
        batch, n, kv_heads, dim, dtype=dtype
    )


@pytest.mark.parametrize(
    "segment_lengths, dilation_rates, error, match",
    [
        ([4, 8], [1], ValueError, "one entry per branch"),
        ([], [], ValueError, "segment_lengths.*empty"),
        ([4], [], ValueError, "dilation_rates.*empty"),
        ([0], [1], ValueError, "segment_lengths.*positive"),
        ([4], [-1], ValueError, "dilation_rates.*positive"),
        ([4.0], [1], TypeError, "segment_lengths.*ints"),
        ([4], [1.5], TypeError, "dilation_rates.*ints"),
        ([True], [1], TypeError, "segment_lengths"),
        ("48", [1], TypeError, "segment_lengths"),
        (4, None, TypeError, "dilation_rates"),
        ([2**62], [1], ValueError, r"segment_lengths.*up to 2\*\*48"),
        ([8], [2**63 - 1], ValueError, r"dilation_rates.*up to 2\*\*48"),
    ],
)
def test_bad_branches(segment_lengths, dilation_rates, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        dilated_attention(q, k, v, segment_lengths, dilation_rates)


def test_int_branches_mean_one_branch():
    q, k, v = _qkv()
    assert torch.equal(dilated_attention(q, k, v, 4, 2), dilated_attention(q, k, v, [4], [2]))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "`q` must have shape"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), ValueError, "head_dim"),
        (lambda q, k, v: (q, k, v[:, :4]), ValueError, "`k` and `v` must have the same shape"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch size"),
        (lambda q, k, v: (torch.cat([q, q], 1), k, v), ValueError, "queries are the last positions"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), ValueError, "multiple of the number of key/value heads"),
        (lambda q, k, v: (q, k.double(), v.double()), TypeError, "one dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "`q` must be a floating-point"),
        (lambda q, k, v: (q, k.to("meta"), v.to("meta")), ValueError, "one device"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "`q` must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "must not be empty: seq_len of `q` is 0"),
        (lambda q, k, v: (q[:0], k[:0], v[:0]), ValueError, "must not be empty: batch is 0"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "must not be empty: head_dim is 0"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "`q` has no heads"),
    ],
)
def test_bad_tensors(change, error, match):
    q, k, v = change(*_qkv())
    with pytest.raises(error, match=match):
        dilated_attention(q, k, v, [4], [1])


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.tuples(*[st.sampled_from([0, 1, 1, 2, 2, 3, 3, 3])] * 6),  # batch, queries, keys, kv heads, group, head_dim
    change=st.sampled_from(["none"] * 4 + ["q dims", "k dims", "v shape", "k batch", "q heads", "dtype", "int dtype"]),
)
def test_the_checks_fast_path_accepts_exactly_what_the_checks_accept(sizes, change):
    """_check_qkv first tries one expression for the common case (host time per call); it must pass exactly the
    inputs that the named checks pass, or a bad input would get through unnamed. Sizes of 0 and one changed
    property make bad inputs of every kind; unchanged sizes above 0 make good ones."""
    batch, queries, keys, kv_heads, group, head_dim = sizes
    q_shape, k_shape = [batch, queries, kv_heads * group, head_dim], [batch, keys, kv_heads, head_dim]
    v_shape, dtypes = list(k_shape), [torch.float32] * 3
    if change == "q dims":
        q_shape = q_shape[1:]
    elif change == "k dims":
        k_shape = v_shape = k_shape + [1]
    elif change == "v shape":
        v_shape[3] += 1
    elif change == "k batch":
        k_shape[0] = v_shape[0] = batch + 1
    elif change == "q heads":
        q_shape[2] += 1
    elif change == "dtype":
        dtypes[1] = torch.float16
    elif change == "int dtype":
        dtypes = [torch.int32] * 3
    q, k, v = (torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in zip((q_shape, k_shape, v_shape), dtypes))
    fast = dispatcher._well_formed(q, k, v)
    event(f"well formed: {fast}")
    try:
        with mock.patch.object(dispatcher, "_well_formed", lambda *tensors: False):
            dispatcher._check_qkv(q, k, v)
        named_checks_pass = True
    except (TypeError, ValueError):
        named_checks_pass = False
    assert fast == named_checks_pass


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(offsets="random"), ValueError, "offsets"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(causal=1), TypeError, "causal"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
        (dict(softmax_scale="1"), ValueError, "softmax_scale"),
        (dict(softmax_scale=float("inf")), ValueError, "softmax_scale.*finite positive"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale.*finite positive"),
        (dict(softmax_scale=1e308), ValueError, r"softmax_scale.*in torch.float32 at most 3.4e\+38"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(return_lse=1), TypeError, "return_lse"),
        (dict(attention_mask=torch.ones(1, 7)), ValueError, "attention_mask.*shape"),
        (dict(attention_mask=torch.ones(8)), ValueError, "attention_mask.*shape"),
        (dict(attention_mask=torch.full((1, 8), 2)), ValueError, "attention_mask.*1 for real tokens"),
        (dict(attention_mask=torch.ones(1, 8, device="meta")), ValueError, "attention_mask.*is on"),
        (dict(attention_mask=[[1] * 8]), TypeError, "attention_mask"),
        (dict(cu_seqlens=torch.tensor([0, 3, 8])), TypeError, None),  # int64 is accepted: no error
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens.*int32"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "cu_seqlens.*end at the sequence length"),
        (dict(cu_seqlens=torch.tensor([1, 8], dtype=torch.int32)), ValueError, "cu_seqlens.*start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 6, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens.*non-decreasing"),
        (dict(cu_seqlens=torch.tensor([[0, 8]], dtype=torch.int32)), ValueError, "cu_seqlens.*1-D"),
        (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), attention_mask=torch.ones(1, 8)), ValueError, "not both"),
        (dict(position_offset=-1), ValueError, r"position_offset.*between 0 and 2\*\*48"),
        (dict(position_offset=2**62), ValueError, r"position_offset.*between 0 and 2\*\*48"),
        (dict(position_offset=torch.tensor([1, 2])), ValueError, "position_offset.*shape"),
        (dict(position_offset=1.5), TypeError, "position_offset"),
        (dict(position_offset=torch.tensor([True])), TypeError, "`position_offset` must be an int or an integer tensor"),
        (dict(token_layout={}), TypeError, r"`token_layout` must be a TokenLayout \(TokenLayout.build\(...\)\) or a PositionLayout, got dict"),
        (dict(token_layout=torch.ones(1, 8)), TypeError, "`token_layout` must be a TokenLayout .* got Tensor"),
        (dict(token_layout=TokenLayout.build(1, 9)), ValueError, "token_layout"),
        (dict(token_layout=TokenLayout.build(1, 8), attention_mask=torch.ones(1, 8)), ValueError, "token_layout"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k, v = _qkv()
    if match is None:
        dilated_attention(q, k, v, [4], [1], **kwargs)
        return
    with pytest.raises(error, match=match):
        dilated_attention(q, k, v, [4], [1], **kwargs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(key_positions=lambda p: p + 0.5), TypeError, r"PositionLayout.key_positions must be an integer tensor of logical positions \(>= 0\), got torch.float32"),
        (dict(query_positions=lambda p: p == 0), TypeError, "PositionLayout.query_positions must be an integer tensor"),
        (dict(key_real=lambda r: r.float()), TypeError, "PositionLayout.key_real must be a bool tensor, got torch.float32"),
        (dict(query_real=lambda r: r.long()), TypeError, "PositionLayout.query_real must be a bool tensor, got torch.int64"),
        (dict(key_real=lambda r: r.tolist()), TypeError, r"PositionLayout.key_real must be a tensor of shape \(1, 8\), got list"),
        (dict(key_positions=lambda p: p[:, 1:]), ValueError, r"PositionLayout.key_positions must have shape \(1, 8\)"),
    ],
)
def test_a_malformed_position_layout_is_named(change, error, match):
    q, k, v = _qkv()
    fields = dict(PositionLayout.from_mask(torch.ones(1, 8), 8).__dict__)
    for name, alter in change.items():
        fields[name] = alter(fields[name])
    with pytest.raises(error, match=match):
        dilated_attention(q, k, v, [4], [1], token_layout=PositionLayout(**fields))


def test_meta_tensors_give_the_output_shape():
    """Shape inference on the meta device (accelerate's empty weights) runs: autocast, which has no meta device,
    is not asked about it (that raised)."""
    q, k, v = (torch.empty(2, 8, 4, 8, device="meta") for _ in range(3))
    assert dilated_attention(q, k, v, [4, 8], [1, 2], backend="torch").shape == (2, 8, 4, 8)


def test_cu_seqlens_needs_batch_of_one():
    q, k, v = _qkv(batch=2)
    with pytest.raises(ValueError, match="cu_seqlens.*batch size must be 1"):
        dilated_attention(q, k, v, [4], [1], cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_flash_backend_absent_is_a_clear_error():
    pytest.importorskip("modeling_longnet.dilated_attention")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="flash-attn"):
        dilated_attention(q, k, v, [4], [1], backend="flash")


def test_pattern_branches_and_head_offsets_in_both_modes():
    pattern = DilatedPattern([4, 8], [2, 3], "grouped")
    assert pattern.branches == [(4, 2), (8, 3)]
    assert pattern.head_offsets(1, 5) == [0, 0, 1, 1, 2]
    assert DilatedPattern([4, 8], [2, 3]).head_offsets(1, 5) == [0, 1, 2, 0, 1]


# ---------------------------------------------------------------------------------------------------------
# a share of the heads (tensor parallelism)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offsets", ["interleaved", "grouped"])
@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in available_backends()])
def test_a_share_of_the_heads_computes_those_heads_of_the_whole_layer(offsets, backend):
    """``heads=(first, total)``: q holds heads first.. of a layer of `total` heads, each with its global offsets
    (SPEC.md), so every share of a tensor-parallel split equals its slice of the whole call."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 29, 6, 16, generator=generator)  # head_dim 16: the smallest the Triton kernels take
    k, v = (torch.randn(2, 29, 3, 16, generator=generator) for _ in range(2))
    args = dict(segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 3], causal=True, offsets=offsets, backend=backend)
    whole = dilated_attention(q, k, v, **args)
    for first, count in [(0, 2), (2, 2), (4, 2), (2, 4)]:  # whole groups: q head h reads key/value head h // 2
        kv = slice(first // 2, (first + count) // 2)
        share = dilated_attention(q[:, :, first : first + count], k[:, :, kv], v[:, :, kv], heads=(first, 6), **args)
        torch.testing.assert_close(share, whole[:, :, first : first + count], rtol=1e-5, atol=1e-5)


def test_bad_head_shares_are_named():
    q = k = v = torch.zeros(1, 8, 2, 4)
    for heads in [(2, 2), (-1, 4), (0,), "0,4", (0.0, 4)]:
        with pytest.raises(ValueError, match="`heads` must be"):
            dilated_attention(q, k, v, [4], [1], heads=heads)
    with pytest.raises(ValueError, match="leaves no room"):
        dilated_attention(q, k, v, [4], [1], heads=(3, 4))
