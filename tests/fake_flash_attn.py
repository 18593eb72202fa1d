"""A pure-PyTorch stand-in for flash-attn's variable-length kernels, for testing the flash backend's wiring on
machines without flash-attn. Same signatures and semantics as `flash_attn.flash_attn_interface`'s
`_flash_attn_varlen_forward` / `_flash_attn_varlen_backward` (flash-attn >= 2.7): causal masks aligned to the
bottom right, LSE shaped (heads, total_q), the backward working from the O and LSE it is handed, and dropout
replayed from the rng state that the forward returned."""

import contextlib
import importlib
import types

import pytest
import torch


def _sequences(cu_seqlens_q, cu_seqlens_k):
    for i in range(len(cu_seqlens_q) - 1):
        yield slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])), slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))


def _scores(q, k, scale, causal):
    scores = q[:, 0] @ k[:, 0].T * scale
    if causal:
        n_q, n_k = scores.shape
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _keep(shape, seed, index, dropout_p):
    generator = torch.Generator().manual_seed(int(seed) * 7919 + index)
    return (torch.rand(shape, generator=generator) >= dropout_p).double() / (1 - dropout_p)


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, *args, **kwargs):
    out = torch.zeros_like(q)
    lse = torch.zeros(1, q.shape[0], dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    seed = torch.randint(0, 1 << 30, (2,))
    for i, (sq, sk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if sq.stop == sq.start:
            continue
        scores = _scores(q[sq], k[sk], softmax_scale, causal)
        lse[0, sq] = torch.logsumexp(scores, -1).to(lse.dtype)
        probs = torch.softmax(scores, -1)
        if dropout_p > 0:
            probs = probs * _keep(probs.shape, seed[0], i, dropout_p).to(probs.dtype)
        out[sq, 0] = probs @ v[sk, 0]
    return out, lse, None, seed


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    dq.zero_(), dk.zero_(), dv.zero_()
    for i, (sq, sk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        if sq.stop == sq.start:
            continue
        scores = _scores(q[sq], k[sk], softmax_scale, causal)
        probs = torch.exp(scores - softmax_lse[0, sq].to(scores.dtype)[:, None])
        d_probs = dout[sq, 0] @ v[sk, 0].T
        dropped = probs
        if dropout_p > 0:
            keep = _keep(probs.shape, rng_state[0], i, dropout_p).to(probs.dtype)
            dropped, d_probs = probs * keep, d_probs * keep
        delta = (dout[sq, 0] * out[sq, 0]).sum(-1, keepdim=True)
        d_scores = probs * (d_probs - delta) * softmax_scale
        dq[sq, 0] = d_scores @ k[sk, 0]
        dk[sk, 0] = d_scores.T @ q[sq, 0]
        dv[sk, 0] = dropped.T @ dout[sq, 0]
    return None


flash_attn_interface = types.SimpleNamespace(
    _flash_attn_varlen_forward=_flash_attn_varlen_forward, _flash_attn_varlen_backward=_flash_attn_varlen_backward
)


@contextlib.contextmanager
def installed():
    """The package's flash backend runs on this stand-in (any device and dtype) while the context is open."""
    flash_backend = importlib.import_module("modeling_longnet.dilated_attention_flash")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flash_backend, "_flash_attn_interface", flash_attn_interface)
        patch.setattr(flash_backend, "is_available", lambda: True)
        patch.setattr(flash_backend, "_unsupported_reason", lambda q, dropout_p: None)  # CPU, float64
        yield
