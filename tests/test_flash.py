"""The flash-attn backend's gathering, mixing and exact backward, run on a pure-PyTorch stand-in for flash-attn's
varlen kernels (flash-attn cannot be built here); on a GPU with flash-attn installed, the real thing."""

import importlib

import fake_flash_attn
import pytest
import torch
from hypothesis import given, settings
from cases import attention_cases, check_backend_against_reference

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
    check_backend_against_reference(case, "flash", stand_in_for_flash_attn)


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
