"""The flash-attn backend's gathering, mixing and exact backward, run on a pure-PyTorch stand-in for flash-attn's
varlen kernels (flash-attn cannot be built here); on a GPU with flash-attn installed, the real thing."""

import importlib

import fake_flash_attn
import pytest
import torch
from hypothesis import given, settings
from reference import reference_dilated_attention
from cases import attention_cases, call_kwargs, make_inputs, relative_error

from modeling_longnet import dilated_attention

flash_backend = importlib.import_module("modeling_longnet.dilated_attention_flash")


stand_in_for_flash_attn = fake_flash_attn.installed


@pytest.fixture
def fake_flash():
    with stand_in_for_flash_attn():
        yield


@settings(max_examples=25)
@given(case=attention_cases(max_len=120))
def test_flash_backend_matches_reference(case):
    q, k, v = make_inputs(case, requires_grad=True)
    with stand_in_for_flash_attn():
        out, lse = dilated_attention(
            q, k, v, case["segment_lengths"], case["dilation_rates"], backend="flash", return_lse=True, **call_kwargs(case)
        )
    ref = reference_dilated_attention(q, k, v, case["segment_lengths"], case["dilation_rates"], **call_kwargs(case))
    assert relative_error(out, ref) <= 1e-10
    _, torch_lse = dilated_attention(
        q, k, v, case["segment_lengths"], case["dilation_rates"], backend="torch", return_lse=True, **call_kwargs(case)
    )
    assert torch.equal(torch.isneginf(lse), torch.isneginf(torch_lse))
    finite = torch.isfinite(torch_lse)
    # gradients of the output and of the LSE together
    weights = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(case["seed"]))
    loss = ((out.sum(-1) + torch.where(finite, lse, 0.0)) * weights).sum()
    with stand_in_for_flash_attn():
        got = torch.autograd.grad(loss, (q, k, v))
    ref_loss = ((ref.sum(-1) + torch.where(finite, torch_lse, 0.0)) * weights).sum()
    want = torch.autograd.grad(ref_loss, (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert relative_error(g, w) <= 1e-10, name


def test_flash_backend_dropout_replays_its_mask(fake_flash):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 30, 2, 8, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(3))

    def attention(q, k, v):
        torch.manual_seed(3)
        return dilated_attention(q, k, v, [8, 16], [1, 2], causal=True, dropout_p=0.3, backend="flash")

    assert torch.autograd.gradcheck(attention, (q, k, v), fast_mode=True)
    torch.manual_seed(4)
    other = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True, dropout_p=0.3, backend="flash")
    assert not torch.allclose(attention(q, k, v), other)


@pytest.mark.parametrize(
    "q, match",
    [
        (torch.randn(1, 8, 2, 16, dtype=torch.float16), "CUDA"),
        (torch.randn(1, 8, 2, 16, dtype=torch.float32, device="meta"), "float16 or bfloat16"),
        (torch.randn(1, 8, 2, 12, dtype=torch.float16, device="meta"), "head_dim"),
        (torch.randn(1, 8, 2, 512, dtype=torch.float16, device="meta"), "head_dim"),
    ],
)
def test_flash_backend_refuses_what_flash_attn_cannot_take(q, match, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cuda", "meta")))
    with pytest.raises(ValueError, match=match):
        flash_backend.check_supported(q, None, None, 0.0)
