"""Dilated attention (LongNet, Ding et al. 2023): the entry point, its argument checks and the choice of backend.

The function computed here is the one in SPEC.md, for every backend:

* Each real token gets a *logical position* t: 0, 1, 2, ... within its document (left padding shifts it,
  packed documents restart it, a KV cache that dropped old tokens starts it at ``position_offset``).
* Branch i is a pair (segment length w_i, dilation rate r_i). For head h the token at t *participates* in
  branch i iff ``(t mod w_i) mod r_i == o_i(h)``, with the head's offset o_i(h) = h mod r_i ("interleaved",
  the paper's) or h // ceil(H / r_i) ("grouped", torchscale's).
* In branch i a query sees the keys that participate, lie in the same segment (``t // w_i``) of the same
  document, and, if causal, are not after it.
* The branches are mixed by their softmax denominators: the output is the softmax over the multiset union of
  every branch's keys, ``O = sum_i exp(lse_i - LSE) O_i``. A query that sees nothing (no branch covers it,
  or it is padding) gets 0.

Backends receive the pattern (:class:`DilatedPattern`) and where the tokens are (:class:`TokenLayout`), both
checked here, so that they cannot disagree on logical positions. The layers, from the bottom:

* ``dilated_attention_pattern``: the pattern, the layout, branch tables and the exact merge (imports nothing of
  the package);
* the backends, each importing only that floor: ``dilated_attention_torch`` (readable, any device),
  ``dilated_attention_triton`` (fused kernels), ``dilated_attention_cudnn`` (cuDNN's attention kernels on each
  branch's segments), ``dilated_attention_flash`` (flash-attn, optional),
  ``dilated_attention_dense`` (dense masks from a :class:`PositionLayout`: decoding steps, no host work),
  ``dilated_attention_decode`` (a decoding step read straight from a static cache's ring, one fused kernel);
* this module, which imports them; the model and sequence parallelism import this module.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from numbers import Real
from typing import Sequence

import torch

from .dilated_attention_pattern import (
    MAX_BRANCH_VALUE,
    OFFSET_MODES,
    DilatedPattern,
    LayoutInputs,
    PatternCoverage,
    PositionLayout,
    SelectedKeys,
    TokenLayout,
    head_offsets,
    is_integer_dtype,
    is_tracing,
    packed_documents,
    pattern_coverage,
    statistics_dtype,
)
from .dilated_attention_decode import ring_decode_attention
from .dilated_attention_decode import supports as ring_decode_supports
from .dilated_attention_dense import dilated_attention_dense, selected_keys_attention
from .dilated_attention_torch import dilated_attention_torch

BACKENDS = ("auto", "torch", "triton", "cudnn", "flash")

__all__ = [
    "DilatedPattern",
    "PositionLayout",
    "TokenLayout",
    "dilated_attention",
    "head_offsets",
    "PatternCoverage",
    "pattern_coverage",
    "available_backends",
    "MAX_BRANCH_VALUE",
    "OFFSET_MODES",
]


# ----------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------


def _largest_finite(dtype: torch.dtype) -> float:
    """The largest finite value of the dtype the scores are computed in (float32 for half-precision inputs)."""
    return float(torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).max)


def _check_qkv(q, k, v) -> None:
    if _well_formed(q, k, v):  # the common case in one expression (about half the host time of the checks below)
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must have shape (batch, seq_len, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"`q`, `k` and `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"`q`, `k` and `v` must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"`k` and `v` must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"`q` and `k` must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"`q` and `k` must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(
            f"`q` has {q.shape[1]} positions but `k` only {k.shape[1]}: queries are the last positions of the key "
            "sequence, so there cannot be more of them"
        )
    sizes = (("batch", q.shape[0]), ("seq_len of `q`", q.shape[1]), ("seq_len of `k`", k.shape[1]), ("head_dim", q.shape[3]))
    for name, size in sizes:
        if size == 0:
            raise ValueError(
                f"`q`, `k` and `v` must not be empty: {name} is 0 (q {tuple(q.shape)}, k {tuple(k.shape)}); "
                "give at least one token, row and feature"
            )
    if q.shape[2] == 0:
        raise ValueError(f"`q` has no heads (shape {tuple(q.shape)}): give at least one query head")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[2]}) must be a multiple of the number of key/value heads "
            f"({k.shape[2]}) for grouped-query attention"
        )


def _well_formed(q, k, v) -> bool:
    """Whether every check of :func:`_check_qkv` passes (it then has nothing to say)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    q_shape, k_shape = q.shape, k.shape
    return (
        len(q_shape) == 4 and k_shape == v.shape and len(k_shape) == 4
        and q.is_floating_point() and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
        and q_shape[0] == k_shape[0] > 0 and q_shape[3] == k_shape[3] > 0 and 0 < q_shape[1] <= k_shape[1]
        and k_shape[2] > 0 and q_shape[2] % k_shape[2] == 0 and q_shape[2] > 0
    )


@dataclass(frozen=True)
class _Backend:
    check_supported: object  # (q, pattern, layout, dropout_p) -> None, or a ValueError naming the parameter
    supports: object  # (q, pattern, layout, dropout_p) -> bool
    run: object  # (q, k, v, pattern, layout, *, causal, softmax_scale, dropout_p) -> (out, lse)


_BACKEND_MODULES: dict = {}  # name -> the backend's module, once imported


def _optional_backend(name: str) -> _Backend | None:
    """An optional backend that can run on this machine, else None.

    The imports are lazy (triton and flash-attn are optional) and spelled ``from .module import ...`` on purpose:
    transformers copies into a saved model exactly the files named by such lines, so the backends travel with
    remote code.
    """
    module = _BACKEND_MODULES.get(name)
    if module is None:  # imported once (the import statements cost about 2 us at every call)
        try:
            if name == "triton":
                from .dilated_attention_triton import dilated_attention_triton as run
            elif name == "cudnn":
                from .dilated_attention_cudnn import dilated_attention_cudnn as run
            else:
                from .dilated_attention_flash import dilated_attention_flash as run
        except ImportError:
            return None
        module = _BACKEND_MODULES[name] = sys.modules[run.__module__]
    # looked up at each call, not kept: whether the backend runs here may change (a test switches the interpreter)
    if not module.is_available():
        return None
    return _Backend(module.check_supported, module.supports, getattr(module, f"dilated_attention_{name}"))


def available_backends() -> list[str]:
    """Backends that can run on this machine (each still checks its own shape limits)."""
    return ["torch"] + [name for name in BACKEND_REQUIREMENTS if _optional_backend(name) is not None]


BACKEND_REQUIREMENTS = {
    "triton": "the `triton` package and a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)",
    "cudnn": "a CUDA GPU of compute capability 8.0 or later with cuDNN (PyTorch's cuDNN attention kernels)",
    "flash": "the `flash-attn` package and a CUDA GPU (pip install flash-attn)",
}


# Measured on one H200 (docs/benchmarks.md, "The cuDNN backend", run 8 of 2026-12-03; the paper's branches, B = 1,
# H = 12, D = 64, bf16): a forward+backward over N = 1M took 90.6 ms with backend="cudnn" against 109.6 with the
# Triton kernels (the FA2 floor: 109.0); at N = 128K and below, and in every forward alone, the Triton kernels were
# faster (the cuDNN backend issues about 17 small operations per (branch, offset) around its kernels). So "auto"
# takes cuDNN for calls that will be differentiated, of at least that much work (tokens x heads), on Hopper.
CUDNN_MIN_TOKEN_HEADS = 12 * 2**20


def _preferred_cudnn(q, pattern, layout, dropout_p) -> _Backend | None:
    """The cuDNN backend where "auto" should take it (see above), else None."""
    if not (q.is_cuda and q.requires_grad and torch.is_grad_enabled()):
        return None
    if q.shape[0] * q.shape[1] * q.shape[2] < CUDNN_MIN_TOKEN_HEADS or torch.cuda.get_device_capability(q.device) != (9, 0):
        return None
    cudnn_backend = _optional_backend("cudnn")
    if cudnn_backend is None or not cudnn_backend.supports(q, pattern, layout, dropout_p):
        return None
    from .dilated_attention_cudnn import reads_in_place

    return cudnn_backend if reads_in_place(pattern, layout, q.shape[2]) else None


def _select_backend(backend: str, q: torch.Tensor, pattern, layout, dropout_p: float):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return dilated_attention_torch
    if backend == "auto":  # the fastest where it runs (as measured), else the readable path
        cudnn_backend = _preferred_cudnn(q, pattern, layout, dropout_p)
        if cudnn_backend is not None:
            return cudnn_backend.run
        triton_backend = _optional_backend("triton") if q.is_cuda else None
        if triton_backend is not None and triton_backend.supports(q, pattern, layout, dropout_p):
            return triton_backend.run
        return dilated_attention_torch
    chosen = _optional_backend(backend)
    if chosen is None:
        raise RuntimeError(f"backend={backend!r} needs {BACKEND_REQUIREMENTS[backend]}; use backend='torch' or 'auto'")
    chosen.check_supported(q, pattern, layout, dropout_p)
    return chosen.run


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: int | Sequence[int],
    dilation_rates: int | Sequence[int],
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    offsets: str = "interleaved",
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    position_offset: torch.Tensor | int | None = None,
    token_layout: TokenLayout | None = None,
    return_lse: bool = False,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of SPEC.md: a mixture of (segment length, dilation rate) branches.

    Args:
        q: ``(B, N_q, H, D)`` queries.
        k, v: ``(B, N_k, H_kv, D)`` keys and values; ``H`` must be a multiple of ``H_kv`` (grouped-query
            attention: query head h reads key/value head ``h // (H // H_kv)``). Usually ``N_q == N_k``; with a
            KV cache the queries are the last ``N_q`` of the ``N_k`` positions.
        segment_lengths, dilation_rates: one positive int per branch (an int means one branch).
        causal: a query sees no key after it.
        softmax_scale: defaults to ``D ** -0.5``.
        offsets: ``"interleaved"`` (head h takes offset ``h mod r``, the paper's) or ``"grouped"``
            (``h // ceil(H / r)``, torchscale's).
        attention_mask: ``(B, N_k)``, 1 for real tokens and 0 for padding, anywhere: a 0 is no token (it neither
            attends nor is attended, and logical positions skip it). Padding queries get 0.
        cu_seqlens: int32 ``(documents + 1,)`` cumulative lengths of documents packed into one row (B = 1).
        dropout_p: probability of dropping an entry of the mixed softmax (use 0 in evaluation).
        backend: ``"auto"`` (on CUDA the Triton kernels where they apply, cuDNN's for long differentiated calls on
            Hopper: ``CUDNN_MIN_TOKEN_HEADS``; else torch), ``"torch"``, ``"triton"``, ``"cudnn"`` (cuDNN's fused
            attention on each branch's segments), ``"flash"``.
        position_offset: int or ``(B,)``: logical position of each row's first real key (a KV cache that has
            dropped the tokens no query can see again passes how many it dropped).
        token_layout: a :class:`TokenLayout` built once and reused across layers, instead of ``attention_mask`` /
            ``cu_seqlens`` / ``position_offset``; or a :class:`PositionLayout` (every key's and query's position on
            the device, keys in any order), which every backend computes densely, for calls of few queries.
        return_lse: also return the log-sum-exp of the mixed softmax, ``(B, N_q, H)`` in float32 (float64 for
            float64 inputs), ``-inf`` where a query sees nothing. It is differentiable: partial results computed
            apart (for instance on different devices) mix exactly as ``sum_j exp(lse_j - logsumexp_j lse_j) O_j``.
        heads: ``(first, total)`` when q holds only heads ``first .. first + H - 1`` of a layer of ``total`` heads
            (tensor parallelism): each head takes the offsets of its global index. Default: q holds every head.

    Returns:
        ``(B, N_q, H, D)`` in the dtype of ``q``, and the LSE if ``return_lse``.

    A (query, head) pair that no branch covers gets 0, as SPEC.md defines: :func:`pattern_coverage` says which
    a pattern leaves (``DilatedAttention`` and ``LongNetConfig`` refuse a pattern that leaves a position to no head
    at all). Values are not checked, which would wait for the device: NaN or inf in q, k or v give NaN, as in
    ``scaled_dot_product_attention``.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_qkv(q, k, v)
    pattern = DilatedPattern(segment_lengths, dilation_rates, offsets, heads)
    if not isinstance(causal, bool):
        raise TypeError(f"`causal` must be a bool, got {causal!r}")
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys = k.shape[1]
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    elif (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, Real)
        or not 0 < softmax_scale < _largest_finite(q.dtype)
    ):
        raise ValueError(
            f"`softmax_scale` must be a finite positive number (it multiplies q.k, and in {q.dtype} at most "
            f"{_largest_finite(q.dtype):.3g}), or None for head_dim ** -0.5; got {softmax_scale!r}"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"`dropout_p` must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"`return_lse` must be a bool, got {return_lse!r}")
    if token_layout is not None and not isinstance(token_layout, (TokenLayout, PositionLayout, SelectedKeys, LayoutInputs)):
        raise TypeError(
            f"`token_layout` must be a TokenLayout (TokenLayout.build(...)) or a PositionLayout, got "
            f"{type(token_layout).__name__}; or pass attention_mask / cu_seqlens / position_offset instead"
        )
    if token_layout is not None and (attention_mask is not None or cu_seqlens is not None or position_offset is not None):
        raise ValueError("`token_layout` already says where the tokens are: drop attention_mask/cu_seqlens/position_offset")
    if isinstance(token_layout, SelectedKeys):  # candidates already chosen per head: one masked softmax
        if tuple(token_layout.valid.shape) != (batch, num_heads, num_keys) or num_queries != 1 or k.shape[2] != num_heads:
            raise ValueError(
                f"SelectedKeys are the candidate keys of one query per row, per query head: q (B, 1, H, D), k and v "
                f"(B, N_k, H, D), valid (B, H, N_k); got q {tuple(q.shape)}, k {tuple(k.shape)}, valid "
                f"{tuple(token_layout.valid.shape)}"
            )
        with _autocast_off(q.device.type):
            out, lse = selected_keys_attention(
                q, k, v, token_layout, softmax_scale=float(softmax_scale), dropout_p=float(dropout_p)
            )
        return (out, lse) if return_lse else out
    if isinstance(token_layout, PositionLayout):  # traced or not: plain tensor operations, no table, no host read
        _check_position_layout(token_layout, batch, num_keys, num_queries)
        with _autocast_off(q.device.type):
            out, lse = dilated_attention_dense(
                q, k, v, pattern, token_layout, causal=causal, softmax_scale=float(softmax_scale), dropout_p=float(dropout_p)
            )
        return (out, lse) if return_lse else out
    if is_tracing():  # torch.compile / torch.export: one custom op, which reads the layout when the graph runs
        if token_layout is None:
            token_layout = LayoutInputs(batch, num_keys, num_queries, attention_mask, cu_seqlens, position_offset)
        out, lse = _traced_call(q, k, v, pattern, token_layout, causal, float(softmax_scale), float(dropout_p), backend)
        return (out, lse) if return_lse else out
    if isinstance(token_layout, LayoutInputs):  # built in a traced region that a graph break left before this call
        token_layout = _layout_from_inputs(token_layout, q.device)
    if token_layout is None:
        token_layout = TokenLayout.build(
            batch, num_keys, num_queries,
            attention_mask=attention_mask, cu_seqlens=cu_seqlens, position_offset=position_offset, device=q.device,
        )
    elif (token_layout.batch_size, token_layout.num_keys, token_layout.num_queries) != (batch, num_keys, num_queries):
        raise ValueError(
            f"`token_layout` was built for (batch, keys, queries) = "
            f"{(token_layout.batch_size, token_layout.num_keys, token_layout.num_queries)}, the tensors have "
            f"{(batch, num_keys, num_queries)}"
        )
    run = _select_backend(backend, q, pattern, token_layout, float(dropout_p))
    compaction = token_layout.compaction
    if compaction is not None:  # a mask with holes: the backends see each row's real tokens together, at its end
        q = compaction.gather(q, compaction.query_order)
        k, v = (compaction.gather(t, compaction.key_order) for t in (k, v))
    # The backends choose their own precision (float32 accumulation for 16-bit inputs): autocast must not recast it
    # (entering and leaving the context costs about 10 us: only where autocast is on).
    with _autocast_off(q.device.type):
        out, lse = run(
            q, k, v, pattern, token_layout, causal=causal, softmax_scale=float(softmax_scale), dropout_p=float(dropout_p)
        )
    if compaction is not None:
        out, lse = compaction.scatter_back(out), compaction.scatter_back(lse, float("-inf"))
    return (out, lse) if return_lse else out


def _check_position_layout(layout, batch, num_keys, num_queries):
    shapes = {
        "key_positions": (layout.key_positions, (batch, num_keys)),
        "key_real": (layout.key_real, (batch, num_keys)),
        "query_positions": (layout.query_positions, (batch, num_queries)),
        "query_real": (layout.query_real, (batch, num_queries)),
    }
    for name, (tensor, shape) in shapes.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"PositionLayout.{name} must be a tensor of shape {shape}, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"PositionLayout.{name} must have shape {shape} for these q, k, v; got {tuple(tensor.shape)}")
        is_mask = name.endswith("_real")
        if not (tensor.dtype == torch.bool if is_mask else is_integer_dtype(tensor.dtype)):
            wanted = "a bool tensor" if is_mask else "an integer tensor of logical positions (>= 0)"
            raise TypeError(f"PositionLayout.{name} must be {wanted}, got {tensor.dtype}")


def _autocast_off(device_type: str):
    """A context in which autocast is off on ``device_type``: ``torch.autocast(enabled=False)`` where it is on."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):  # (none on meta)
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_inputs(q, k, v):
    """Under autocast, attention runs in the autocast dtype, as ``scaled_dot_product_attention`` does (rotary
    positions computed in float32 often leave q and k in float32 while v comes out of a bf16 projection)."""
    tensors = (q, k, v)
    if not isinstance(q, torch.Tensor) or (device_type := q.device.type) not in ("cpu", "cuda"):
        return tensors
    if torch.is_autocast_enabled(device_type) and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


# ----------------------------------------------------------------------------------------------------------
# One graph: the attention as a custom op for torch.compile and torch.export
# ----------------------------------------------------------------------------------------------------------
#
# A traced graph cannot read tensor values, and building a layout does (where the mask's 1s are). So inside
# torch.compile / torch.export the whole call is one opaque op, ``modeling_longnet::dilated_attention``: it takes
# the layout's inputs as tensors, builds and checks the layout when the graph runs, and calls the eager function
# above. Its gradient is a second op that recomputes the forward under autograd (exact, like every backend: the
# same function; dropout redraws the same mask from the seed the forward got). Eager calls never come here.

_OP_SCHEMA_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor? attention_mask, Tensor? cu_seqlens, Tensor? position_offset, "
    "Tensor? packing_position_ids, Tensor? documents, int[] segment_lengths, int[] dilation_rates, str offsets, int[] heads, "
    "bool causal, float softmax_scale, float dropout_p, str backend, Tensor? seed"
)


def _layout_from_inputs(inputs: LayoutInputs, device, documents: torch.Tensor | None = None) -> TokenLayout:
    if documents is not None:  # a TokenLayout prepared outside the graph: its documents, one int64 row each
        row, start, length, first = documents.cpu()
        return TokenLayout(inputs.batch_size, inputs.num_keys, inputs.num_queries, row, start, length, first)
    cu_seqlens = inputs.cu_seqlens
    if inputs.packing_position_ids is not None:
        cu_seqlens = packed_documents(inputs.packing_position_ids, inputs.batch_size)
    return TokenLayout.build(
        inputs.batch_size, inputs.num_keys, inputs.num_queries, attention_mask=inputs.attention_mask,
        cu_seqlens=cu_seqlens, position_offset=inputs.position_offset, device=device,
    )


@contextlib.contextmanager
def _seeded(seed: torch.Tensor | None):
    """The backends draw their dropout seed from torch's (CPU) default generator: set it from ``seed``, so that the
    recomputing backward draws the forward's mask, and leave the generator as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _eager_from_op(q, k, v, attention_mask, cu_seqlens, position_offset, packing_position_ids, documents,
                   segment_lengths, dilation_rates, offsets, heads, causal, softmax_scale, dropout_p, backend, seed):
    batch, num_queries = q.shape[:2]
    inputs = LayoutInputs(batch, k.shape[1], num_queries, attention_mask, cu_seqlens, position_offset, packing_position_ids)
    layout = _layout_from_inputs(inputs, q.device, documents)
    with _seeded(seed):
        return dilated_attention(
            q, k, v, list(segment_lengths), list(dilation_rates), causal=causal, softmax_scale=softmax_scale,
            offsets=offsets, dropout_p=dropout_p, backend=backend, token_layout=layout, return_lse=True,
            heads=tuple(heads) if heads else None,
        )


# The ops read the layout's inputs on the host (a synchronisation), which no CUDA graph may capture: the tag makes
# inductor's graph partitioning leave them outside the captured parts (mode="reduce-overhead")
_OP_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op(
    "modeling_longnet::dilated_attention", mutates_args=(), schema=f"({_OP_SCHEMA_ARGS}) -> (Tensor, Tensor)", tags=_OP_TAGS
)
def _attention_op(*args):
    with torch.no_grad():  # the gradient is the backward op's; no graph to keep here
        out, lse = _eager_from_op(*args)
    return out, lse


@_attention_op.register_fake
def _(q, k, *args):
    lse_dtype = statistics_dtype(q.dtype)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op(
    "modeling_longnet::dilated_attention_backward", mutates_args=(),
    schema=f"(Tensor grad_out, Tensor grad_lse, {_OP_SCHEMA_ARGS}) -> (Tensor, Tensor, Tensor)", tags=_OP_TAGS,
)
def _attention_backward_op(grad_out, grad_lse, q, k, v, *rest):
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = _eager_from_op(*leaves, *rest)
        dq, dk, dv = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip((dq, dk, dv), (q, k, v)))


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs[3:]  # everything after q, k, v (tensors among them are not differentiated)
    ctx.save_for_backward(*inputs[:3])


def _attention_op_backward(ctx, grad_out, grad_lse):
    q, k, v = ctx.saved_tensors
    grad_out = torch.zeros_like(q) if grad_out is None else grad_out
    if grad_lse is None:
        grad_lse = q.new_zeros(q.shape[:3], dtype=statistics_dtype(q.dtype))
    dq, dk, dv = _attention_backward_op(grad_out, grad_lse, q, k, v, *ctx.inputs)
    return (dq, dk, dv) + (None,) * len(ctx.inputs)


_attention_op.register_autograd(_attention_op_backward, setup_context=_setup_context)


def _traced_call(q, k, v, pattern: DilatedPattern, layout, causal, softmax_scale, dropout_p, backend):
    documents = None
    if isinstance(layout, TokenLayout):  # prepared outside the graph
        if layout.compaction is not None:
            raise ValueError(
                "a `token_layout` built from a mask with holes cannot enter a compiled or exported graph: pass "
                "the `attention_mask` itself instead"
            )
        documents = torch.stack([layout.doc_row, layout.doc_start, layout.doc_length, layout.doc_first_position]).long()
        layout = LayoutInputs(layout.batch_size, layout.num_keys, layout.num_queries)
    position_offset = layout.position_offset
    if position_offset is not None and not isinstance(position_offset, torch.Tensor):
        position_offset = torch.tensor(int(position_offset))
    seed = torch.randint(0, 1 << 62, (1,)) if dropout_p > 0 else None
    return _attention_op(
        q, k, v, layout.attention_mask, layout.cu_seqlens, position_offset, layout.packing_position_ids, documents,
        list(pattern.segment_lengths), list(pattern.dilation_rates), pattern.offsets, list(pattern.head_range or ()),
        causal, softmax_scale,
        dropout_p, backend, seed,
    )
