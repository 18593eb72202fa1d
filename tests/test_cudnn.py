"""The cuDNN backend's views, gathering, mixing and exact backward against the float64 reference, run on
PyTorch's CPU flash-attention kernels in the place of cuDNN's (tests/cpu_attention_kernels.py); on a GPU, the
real kernels (test_cudnn_kernels_on_the_gpu)."""

import importlib

import cpu_attention_kernels
import pytest
import torch
from cases import attention_cases, check_backend_against_reference, make_inputs, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_dilated_attention

from modeling_longnet import TokenLayout, available_backends, dilated_attention

cudnn_backend = importlib.import_module("modeling_longnet.dilated_attention_cudnn")
on_cpu_kernels = cpu_attention_kernels.installed


@settings(max_examples=40)
@given(case=attention_cases(max_len=120))
def test_cudnn_backend_matches_reference(case):
    """Every layout (padding, packed documents, holes, KV-cache queries): the gathered path, or the views."""
    check_backend_against_reference(case, "cudnn", on_cpu_kernels)


@settings(max_examples=40)
@given(case=attention_cases(max_len=160), first_head=st.integers(0, 5))
def test_cudnn_backend_on_whole_rows_matches_reference(case, first_head):
    """Whole rows take the strided views (segments that do not divide the length, several rows, grouped-query
    heads, heads of a tensor-parallel shard), the output-only gradient as well."""
    case = dict(case, attention_mask=None, cu_seqlens=None, position_offset=None, num_queries=case["num_keys"])
    heads = None
    if first_head:  # a shard of a layer's heads, taking the offsets of their global index
        heads = (first_head, first_head + case["num_heads"])
        case["num_kv_heads"] = case["num_heads"]
    check_backend_against_reference(case, "cudnn", on_cpu_kernels, heads=heads)
    q, k, v = make_inputs(case, requires_grad=True)
    with on_cpu_kernels():
        out = dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], backend="cudnn", causal=case["causal"])
        got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = reference_dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], causal=case["causal"])
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert relative_error(g, w) <= 1e-10, name


def test_whole_rows_are_read_in_place():
    """On whole rows the kernels get views of q, k, v (no copies), one call per (branch, offset)."""
    q, k, v = (torch.randn(1, 64, 4, 8, dtype=torch.float64) for _ in range(3))
    seen = []

    def forward(q_part, k_part, v_part, causal, scale):
        seen.append(q_part.untyped_storage().data_ptr() == q.untyped_storage().data_ptr())
        return cpu_attention_kernels._forward(q_part, k_part, v_part, causal, scale)

    with on_cpu_kernels(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudnn_backend, "_kernels", cudnn_backend._Kernels(forward, cpu_attention_kernels._backward))
        dilated_attention(q, k, v, [16, 32], [1, 4], causal=True, backend="cudnn")
    assert seen == [True] * 5  # r = 1: one offset; r = 4: four


def test_layout_tables_are_kept():
    """The views and groups are planned once per layout: later calls and layers reuse them."""
    layout = TokenLayout.build(2, 40, attention_mask=torch.tensor([[0] * 5 + [1] * 35, [1] * 40]))
    q, k, v = (torch.randn(2, 40, 2, 8, dtype=torch.float64) for _ in range(3))
    with on_cpu_kernels():
        first = dilated_attention(q, k, v, [8, 16], [1, 2], backend="cudnn", token_layout=layout)
        planned = {key for key in layout.cache if key[0] == "cudnn"}
        again = dilated_attention(q, k, v, [8, 16], [1, 2], backend="cudnn", token_layout=layout)
    assert planned and {key for key in layout.cache if key[0] == "cudnn"} == planned
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    "q, dropout_p, match",
    [
        (torch.randn(1, 8, 2, 16, dtype=torch.float16), 0.0, "CUDA"),
        (torch.randn(1, 8, 2, 16, dtype=torch.float32, device="meta"), 0.0, "float16 or bfloat16"),
        (torch.randn(1, 8, 2, 12, dtype=torch.float16, device="meta"), 0.0, "head_dim"),
        (torch.randn(1, 8, 2, 256, dtype=torch.float16, device="meta"), 0.0, "head_dim"),
        (torch.randn(1, 8, 2, 16, dtype=torch.float16, device="meta"), 0.1, "dropout_p"),
    ],
)
def test_cudnn_backend_refuses_what_its_kernels_cannot_take(q, dropout_p, match, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cuda", "meta")))
    with pytest.raises(ValueError, match=match):
        cudnn_backend.check_supported(q, None, None, dropout_p)


def test_a_gradient_on_the_lse_past_the_kernels_head_dim_is_refused_clearly():
    """A gradient on the LSE takes 8 more head-dim columns, which cuDNN's kernels take only up to 128 in all: the
    backward says so and what to use instead (the check is for cuDNN's kernels; here the CPU ones stand for them)."""
    q, k, v = (torch.randn(1, 16, 2, 128, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with on_cpu_kernels(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudnn_backend, "CUDNN_KERNELS", cudnn_backend._kernels)
        out, lse = dilated_attention(q, k, v, [8], [1], causal=True, backend="cudnn", return_lse=True)
        with pytest.raises(ValueError, match=r"head_dim <= 120, got 128: use backend='triton' or 'torch'"):
            torch.autograd.grad(lse.sum(), (q, k, v))
        torch.autograd.grad(out.sum(), (q, k, v))  # without one: no extra columns, no limit


def test_cudnn_backend_needs_a_gpu_here():
    if "cudnn" in available_backends():
        pytest.skip("cuDNN attention runs on this machine")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="backend='cudnn' needs a CUDA GPU"):
        dilated_attention(q, q, q, [4], [1], backend="cudnn")


@pytest.mark.skipif("cudnn" not in available_backends(), reason="needs a GPU with cuDNN attention")
@pytest.mark.parametrize("layout", ["whole", "padded"])
def test_cudnn_kernels_on_the_gpu(layout):
    """The real kernels, in bfloat16, against the float64 reference: the same contract as the CPU kernels."""
    generator = torch.Generator().manual_seed(0)
    batch, n, heads, head_dim = 2, 1000, 4, 64
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=generator) for _ in range(3))
    mask = None if layout == "whole" else torch.ones(batch, n, dtype=torch.long).index_fill_(1, torch.arange(37), 0)
    w, r = [64, 128, 256], [1, 2, 4]
    ref = reference_dilated_attention(*(t.double() for t in (q, k, v)), w, r, causal=True, attention_mask=mask)
    cuda = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    out = dilated_attention(*cuda, w, r, causal=True, attention_mask=None if mask is None else mask.cuda(), backend="cudnn")
    assert relative_error(out, ref) <= 1e-2
    grads = torch.autograd.grad(out.float().square().sum(), cuda)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_dilated_attention(*leaves, w, r, causal=True, attention_mask=mask)
    want = torch.autograd.grad(ref.square().sum(), leaves)
    for name, g, wanted in zip("qkv", grads, want):
        assert relative_error(g, wanted) <= 2e-2, name


def test_auto_takes_cudnn_where_it_measured_fastest(monkeypatch):
    """"auto" picks cuDNN for long differentiated calls on Hopper with whole rows (run 8 of docs/benchmarks.md),
    the Triton kernels or the torch path otherwise. Meta tensors: only the choice is made."""
    from modeling_longnet import DilatedPattern

    entry = importlib.import_module("modeling_longnet.dilated_attention")

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cuda", "meta")))
    pattern = DilatedPattern([2048, 4096], [1, 2])
    long = 12 * 2**20 // 12  # tokens of 12 heads: the measured threshold

    def choice(n, requires_grad=True, mask=None, capability=(9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        q = torch.empty(1, n, 12, 64, device="meta", dtype=torch.bfloat16, requires_grad=requires_grad)
        layout = TokenLayout.build(1, n, attention_mask=mask)
        with on_cpu_kernels():
            return entry._preferred_cudnn(q, pattern, layout, 0.0) is not None

    assert choice(long)
    assert not choice(long // 2)  # shorter: the Triton kernels measured faster
    assert not choice(long, requires_grad=False)  # a forward alone: the Triton kernels measured faster
    assert not choice(long, capability=(8, 0))  # measured on Hopper only
    padded = torch.ones(1, long, dtype=torch.long)
    padded[0, :5] = 0
    assert not choice(long, mask=padded)  # padding copies the rows: not the measured path
