"""PyTorch's CPU flash-attention kernels in the place of cuDNN's, for testing the cuDNN backend's views,
gathering, mixing and exact backward on machines without a GPU. They have the cuDNN kernels' contract: dense
(batch, heads, rows, head_dim) tensors of any strides, a causal mask aligned to the top left, the log-sum-exp
returned, and a backward that works from the O and LSE it is handed; and they run in float64."""

import contextlib
import importlib

import pytest
import torch

_aten = torch.ops.aten


def _forward(q, k, v, causal, scale):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, None


def _backward(grad_out, q, k, v, out, lse, state, causal, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)


@contextlib.contextmanager
def installed():
    """The package's cuDNN backend runs on the CPU kernels (any dtype) while the context is open."""
    cudnn_backend = importlib.import_module("modeling_longnet.dilated_attention_cudnn")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cudnn_backend, "_kernels", cudnn_backend._Kernels(_forward, _backward))
        patch.setattr(cudnn_backend, "is_available", lambda: True)
        patch.setattr(cudnn_backend, "_unsupported_reason", lambda q, dropout_p: None)  # CPU, float64
        yield
