"""LongNet (Ding et al. 2023) for transformers: a Llama-style decoder whose self-attention is dilated attention.

The model follows ``transformers/models/llama/modeling_llama.py``; the attention module knows nothing of
segments: it projects, positions and caches q, k, v, then hands them with the branch layout and a
:class:`~modeling_longnet.dilated_attention.TokenLayout` (built once per forward: padding, packed documents,
logical positions) to an *attention function*.

Attention functions
-------------------
``ALL_DILATED_ATTENTION_FUNCTIONS`` maps ``attn_implementation`` names to functions (as transformers'
``ALL_ATTENTION_FUNCTIONS`` does for other models). Built in: ``"auto"`` (the default: the core picks the
fused Triton kernel on CUDA where it applies, cuDNN's for long training calls on Hopper, else PyTorch),
``"torch"``, ``"triton"``, ``"cudnn"``, ``"flash"`` (the
core's backends) and ``"eager"`` (dense attention weights, for ``output_attentions`` and the relative position
bias; memory quadratic in the length). Choose one with ``from_pretrained(..., attn_implementation=name)`` or
``model.set_attn_implementation(name)``. One case skips the function: a decoding step of one token per row with a
``LongNetStaticCache``, under ``"triton"`` or ``"auto"`` on a GPU, runs the fused decoding kernel of
``dilated_attention_decode`` over the cache's ring (other functions get each head's candidate keys, gathered).
Another module (sequence parallelism, say) substitutes its own without editing the model::

    ALL_DILATED_ATTENTION_FUNCTIONS.register("my_attention", my_attention)
    model.set_attn_implementation("my_attention")

with ``my_attention`` of this signature::

    def my_attention(
        module,            # the DilatedAttention layer: module.segment_lengths, .dilation_rates, .offsets,
                           # .is_causal, .layer_idx (None outside a model), .num_heads, .num_key_value_heads
        query,             # (batch, num_queries, num_heads, head_dim), positions applied
        key, value,        # (batch, num_keys, num_key_value_heads, head_dim); with a KV cache the queries are
                           # the last num_queries of the num_keys positions
        token_layout,      # where the real tokens are, for (batch, num_keys, num_queries): a TokenLayout; with a
                           # static cache a PositionLayout (a decoding step) or the ring's SelectedKeys; under
                           # torch.compile the LayoutInputs the traced op reads. dilated_attention takes each.
        *, scaling,        # softmax scale
        dropout,           # attention dropout probability (0.0 in evaluation)
        heads=None,        # (first, total) under tensor parallelism: query holds heads first .. of total, whose
                           # offsets follow the global index (pass it on to dilated_attention)
        **kwargs,          # whatever else reached the model's forward
    ) -> tuple[attn_output, attn_weights]  # (batch, num_queries, num_heads, head_dim), and
                                           # (batch, num_heads, num_queries, num_keys) or None
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging
from transformers.utils.generic import GeneralInterface, can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_longnet import LongNetStaticCache, cached_lengths, check_cache, ring_candidates, static_key_order
from .configuration_longnet import (
    LongNetConfig,
    check_pattern_coverage,
    check_relative_position_buckets,
    is_finite_positive,
)
from .dilated_attention import (
    BACKEND_REQUIREMENTS,
    OFFSET_MODES,
    TokenLayout,
    available_backends,
    dilated_attention,
    ring_decode_attention,
    ring_decode_supports,
)
from .dilated_attention_pattern import (
    LayoutInputs,
    PositionLayout,
    branch_values,
    is_integer_dtype,
    is_tracing,
    packed_documents,
    positions_from_mask,
)

logger = logging.get_logger(__name__)

# Steps of at most this many queries per row with a LongNetStaticCache (decoding) attend densely
# (dilated_attention_dense): their work grows as queries * keys, and they need no layout built on the host.
DENSE_MAX_QUERIES = 16

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, in forward arguments and output fields;
# the models accept both names and fill the output field this version has.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# ----------------------------------------------------------------------------------------------------------
# Attention functions
# ----------------------------------------------------------------------------------------------------------


def _core_attention_function(backend: str):
    def attention(module, query, key, value, token_layout, *, scaling, dropout=0.0, heads=None, **kwargs):
        attn_output = dilated_attention(
            query,
            key,
            value,
            module.segment_lengths,
            module.dilation_rates,
            causal=module.is_causal,
            softmax_scale=scaling,
            offsets=module.offsets,
            dropout_p=dropout,
            backend=backend,
            token_layout=token_layout,
            heads=heads,
        )
        return attn_output, None

    attention.__name__ = attention.__qualname__ = f"dilated_attention_{backend}"
    return attention


def eager_dilated_attention(module, query, key, value, token_layout, *, scaling, dropout=0.0, heads=None, **kwargs):
    """Dense attention weights ``(batch, heads, queries, keys)`` of the dilated pattern, then ``weights @ value``.

    The weights come from the core itself: attending to one-hot values (query and key zero-padded to the same
    width, which leaves the scores unchanged) returns each query's row of the mixed softmax, a key seen by
    two branches counted twice. Time and memory grow as ``queries * keys``.
    """
    batch, _, num_heads, head_dim = query.shape
    num_keys, num_kv_heads = key.shape[1], key.shape[2]
    width = max(head_dim, num_keys)
    one_hot = torch.eye(num_keys, width, dtype=query.dtype, device=query.device)
    one_hot = one_hot[None, :, None, :].expand(batch, num_keys, num_kv_heads, width)
    weights = dilated_attention(
        F.pad(query, (0, width - head_dim)),
        F.pad(key, (0, width - head_dim)),
        one_hot,
        module.segment_lengths,
        module.dilation_rates,
        causal=module.is_causal,
        softmax_scale=scaling,
        offsets=module.offsets,
        backend="torch",
        token_layout=token_layout,
        heads=heads,
    )
    weights = weights[..., :num_keys].transpose(1, 2)
    if module.relative_position_bias is not None:
        weights = module.relative_position_bias(weights, token_layout)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    value = value.repeat_interleave(num_heads // num_kv_heads, dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", weights, value), weights


class DilatedAttentionInterface(GeneralInterface):
    """Attention functions of LongNet models by ``attn_implementation`` name (see the module docstring)."""

    _global_mapping = {
        "auto": _core_attention_function("auto"),
        "torch": _core_attention_function("torch"),
        "triton": _core_attention_function("triton"),
        "cudnn": _core_attention_function("cudnn"),
        "flash": _core_attention_function("flash"),
        "eager": eager_dilated_attention,
    }


ALL_DILATED_ATTENTION_FUNCTIONS = DilatedAttentionInterface()


def _backend_is_available(name: str) -> bool:
    return name in available_backends()


def resolve_attn_implementation(requested: str | None, relative_position_bias: bool = False) -> str:
    """The attention function name to use for ``requested`` (None: the default), or a ValueError saying why not."""
    if requested is None:
        return "eager" if relative_position_bias else "auto"
    names = sorted(ALL_DILATED_ATTENTION_FUNCTIONS)
    if requested not in ALL_DILATED_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"attn_implementation={requested!r} is not a LongNet attention; choose one of {names} (LongNet's attention "
            "is dilated, so the dense 'sdpa' / 'flash_attention_2' of other models do not apply)"
        )
    if requested in BACKEND_REQUIREMENTS and not _backend_is_available(requested):
        needs = BACKEND_REQUIREMENTS[requested]
        raise ValueError(
            f"attn_implementation={requested!r} needs {needs}; use 'auto' (the best that runs here) or 'torch'"
        )
    if relative_position_bias and requested != "eager":
        raise ValueError(
            "the relative position bias (`use_relative_position_bias` / `use_rel_pos_bias`) runs only with "
            "attn_implementation='eager' (dense weights; the kernels take no score bias yet), got "
            f"attn_implementation={requested!r}"
        )
    return requested


# ----------------------------------------------------------------------------------------------------------
# Positions: rotary embeddings, xPos, relative position bias
# ----------------------------------------------------------------------------------------------------------


class LongNetRotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: LongNetConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: LongNetConfig, device=None, seq_len=None, **kwargs
    ) -> tuple[torch.Tensor, float]:
        return _inverse_frequencies(config.head_dim, config.rope_parameters["rope_theta"], device), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        return _rotary_cos_sin(self.inv_freq, position_ids, self.attention_scaling, x.dtype)


def _inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim)
    )


def _rotary_cos_sin(inv_freq, position_ids, scaling: float, dtype):
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 2):
    """Rotates q and k, laid out (batch, seq, heads, head_dim), by cos/sin of shape (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def xpos_rates(head_dim: int, scale_base: float, device=None) -> torch.Tensor:
    """``log(zeta_d) / scale_base`` per dimension (rotate_half order), float32: a score's factor is
    ``exp((n - m) * rate_d)`` for a query at n and a key at m (every rate is negative: the score decays)."""
    zeta = (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) + 0.4 * head_dim) / (1.4 * head_dim)
    return torch.cat([zeta.log(), zeta.log()]) / scale_base


def apply_xpos_decay(query, key, position_ids, scale_base: float, key_position_ids=None, span_bound=None):
    """xPos (Sun et al. 2022): scales rotated queries by ``zeta ** (n / scale_base)`` and keys by
    ``zeta ** (-m / scale_base)``, so that each score decays as ``zeta ** ((n - m) / scale_base)``.

    Only the difference matters, so the exponents are taken from the middle of this call's key positions (the
    keys of a cache were stored unscaled). ``position_ids`` are the queries' positions, ``key_position_ids`` the
    keys' ((B, N_k), or (B, N_k, H) for keys chosen per head; a mask with holes among cached keys needs them);
    without them the keys are the contiguous positions that end with the queries (a cache holds the tokens just
    before the queries). The factors still reach
    ``zeta ** (+-span / 2 / scale_base)``, so one call may span only as many positions as the dtype holds.
    ``span_bound``: what bounds that span where the key count does not (keys chosen along dilated rows).
    """
    num_queries, num_keys, head_dim = query.shape[1], key.shape[1], query.shape[-1]
    rates = xpos_rates(head_dim, scale_base, query.device)
    query_positions = position_ids.to(device=query.device, dtype=torch.float)
    if key_position_ids is not None:
        key_positions = key_position_ids.to(device=query.device, dtype=torch.float)
    else:
        earlier = torch.arange(num_keys - num_queries, 0, -1, device=query.device, dtype=torch.float)
        key_positions = torch.cat([query_positions[:, :1] - earlier, query_positions], dim=1).clamp(min=0)
    low = key_positions.flatten(1).amin(1, keepdim=True)  # (B, 1)
    high = key_positions.flatten(1).amax(1, keepdim=True)
    # the largest rate in closed form (zeta is smallest at dimension 0), so that no tensor value is read on the host
    steepest = -math.log(0.4 / 1.4) / scale_base
    # The keys' count bounds the span of a call's positions (each real key has its own; padding takes a
    # neighbour's): checked without reading a tensor on the host, which would synchronise every layer. Only where
    # the bound is too wide is the span itself read (outside a traced graph: a static cache of many empty slots).
    span = num_keys - 1 if span_bound is None else span_bound
    dtype_info = torch.finfo(query.dtype)
    limit = min(math.log(dtype_info.max), -math.log(dtype_info.tiny)) - math.log(100.0)
    if span / 2 * steepest > limit and not is_tracing():
        span = int(float((high - low).max()))
    largest_exponent = span / 2 * steepest
    if largest_exponent > limit:
        max_span = int(2 * limit / steepest)
        if max_span < 2:  # no chunking helps: even two neighbouring positions overflow
            raise ValueError(
                f"`xpos_scale_base`={scale_base} is too small for {query.dtype}: xPos scales even neighbouring "
                f"positions apart by e^{steepest:.0f}, beyond what {query.dtype} holds (e^{limit:.0f}). For the "
                f"{span + 1} positions of this call use a scale base of at least "
                f"{span / 2 * steepest * scale_base / limit:.3g} (the paper's is 512)"
            )
        raise ValueError(
            f"xPos scales queries and keys by up to e^{largest_exponent:.0f} over the "
            f"{span + 1} positions of this call, beyond what {query.dtype} holds "
            f"(e^{limit:.0f}): process at most {max_span} positions per call (prefill in chunks with a "
            f"LongNetBoundedCache or LongNetStaticCache: generate(..., prefill_chunk_size={min(max_span // 2, 32768)})), "
            "raise `xpos_scale_base`, or use `position_encoding='rope'`"
        )
    center = (low + high) / 2
    query_scale = torch.exp((query_positions - center)[..., None] * rates)[:, :, None, :]
    if key_positions.dim() == 3:  # per head
        key_scale = torch.exp(-(key_positions - center[:, :, None])[..., None] * rates)
    else:
        key_scale = torch.exp(-(key_positions - center)[..., None] * rates)[:, :, None, :]
    return (query.float() * query_scale).to(query.dtype), (key.float() * key_scale).to(key.dtype)


class RelativePositionBias(nn.Module):
    """A learned bias per head and bucket of relative distance (T5), added to the attention scores."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        check_relative_position_buckets(num_buckets, max_distance, bidirectional)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        """T5's bucket of ``key position - query position``: one bucket per small distance, logarithmic beyond."""
        num_buckets, buckets = self.num_buckets, torch.zeros_like(relative_position)
        if self.bidirectional:
            num_buckets //= 2
            buckets += (relative_position > 0).long() * num_buckets
            distance = relative_position.abs()
        else:
            distance = (-relative_position).clamp(min=0)
        max_exact = num_buckets // 2
        log_bucket = (
            max_exact
            + (
                torch.log(distance.float().clamp(min=1) / max_exact)
                / math.log(self.max_distance / max_exact)
                * (num_buckets - max_exact)
            ).long()
        )
        log_bucket = log_bucket.clamp(max=num_buckets - 1)
        return buckets + torch.where(distance < max_exact, distance, log_bucket)

    def forward(self, weights: torch.Tensor, token_layout: TokenLayout) -> torch.Tensor:
        """Reweights the dense attention ``weights`` (batch, heads, queries, keys) by ``exp(bias)`` and renormalises:
        the softmax of the biased scores over the same keys."""
        _, positions = token_layout.logical_positions()
        positions = positions.to(weights.device)
        relative = positions[:, None, :] - positions[:, -weights.shape[2] :, None]
        bias = self.relative_attention_bias(self.bucket(relative)).permute(0, 3, 1, 2)
        weights = weights * torch.exp(bias.to(weights.dtype))
        total = weights.sum(-1, keepdim=True)
        return torch.where(total > 0, weights / total.clamp(min=torch.finfo(weights.dtype).tiny), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class LongNetRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _norm(config: LongNetConfig, size: int) -> nn.Module:
    if config.normalization == "rmsnorm":
        return LongNetRMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps)


def _magneto_gain(config: LongNetConfig) -> float:
    """Magneto's initialisation (with sub-LN) scales the value, output and MLP projections by sqrt(log 2L)."""
    return math.sqrt(math.log(2 * config.num_hidden_layers))


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)


class DilatedAttention(nn.Module):
    """LongNet's dilated self-attention as a standalone layer: ``(batch, seq, d_model) -> (batch, seq, d_model)``.

    Args:
        d_model: model width; must be a multiple of ``num_heads``.
        num_heads: query heads.
        dilation_rate, segment_size: an int (one branch) or lists of equal length (the mixture of branches
            (segment_size[i], dilation_rate[i]) of the paper). In a branch of rate r head h attends from and to
            the positions of residue ``h mod r`` of each segment; a (position, head) pair that no branch covers
            gives zero in that head (SPEC.md), with a warning. Every position must be covered by some head:
            a pattern that leaves a position to no head at all is refused (use at least ``max(dilation_rate)``
            heads, or a branch of rate 1).
        dropout: attention dropout (training only).
        causal: a token attends no later token.
        use_xpos: rotary position encoding with xPos decay (the paper's); without it the layer has none.
        use_rel_pos_bias: a learned T5-style relative position bias (runs on the dense ``"eager"`` attention).
        num_key_value_heads: fewer key/value heads for grouped-query attention (default ``num_heads``).
        offsets: ``"interleaved"`` (head h takes offset ``h mod r``, the paper's) or ``"grouped"`` (torchscale's).
        bias: biases in the four projections.
        sub_layernorm: Magneto's sub-LN, a LayerNorm before the output projection.
        attn_implementation: an ``ALL_DILATED_ATTENTION_FUNCTIONS`` name (default: the best that runs here).

    ``forward(x, attention_mask=None)``: ``attention_mask`` ``(batch, seq)`` holds 1 for tokens and 0 for
    padding, anywhere in the row; padding attends nothing and is attended by nothing, and positions skip it.

    Example::

        layer = DilatedAttention(d_model=512, num_heads=8, dilation_rate=[1, 2, 4], segment_size=[64, 128, 256])
        y = layer(torch.randn(2, 1000, 512))  # (2, 1000, 512)

        # the original LongNet documentation's example: one dilated branch, heads on alternate residues
        layer = DilatedAttention(d_model=512, num_heads=8, dilation_rate=2, segment_size=64, dropout=0.1,
                                 causal=True, use_xpos=False, use_rel_pos_bias=False)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dilation_rate,
        segment_size,
        dropout: float = 0.0,
        causal: bool = False,
        use_xpos: bool = False,
        use_rel_pos_bias: bool = False,
        *,
        num_key_value_heads: int | None = None,
        offsets: str = "interleaved",
        bias: bool = True,
        sub_layernorm: bool = False,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        xpos_scale_base: float = 512.0,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        head_dim: int | None = None,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        d_model, num_heads = _positive_int(d_model, "d_model"), _positive_int(num_heads, "num_heads")
        if head_dim is None and d_model % num_heads:
            raise ValueError(
                f"`d_model` ({d_model}) must be a multiple of `num_heads` ({num_heads}), or give `head_dim`"
            )
        self.head_dim = d_model // num_heads if head_dim is None else _positive_int(head_dim, "head_dim")
        num_key_value_heads = (
            num_heads if num_key_value_heads is None else _positive_int(num_key_value_heads, "num_key_value_heads")
        )
        if num_heads % num_key_value_heads:
            raise ValueError(
                f"`num_heads` ({num_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
            )
        self.dilation_rates = list(branch_values(dilation_rate, "dilation_rate"))
        self.segment_lengths = list(branch_values(segment_size, "segment_size"))
        if len(self.dilation_rates) != len(self.segment_lengths):
            raise ValueError(
                f"`dilation_rate` and `segment_size` need one entry per branch, got {self.dilation_rates} and "
                f"{self.segment_lengths}"
            )
        if offsets not in OFFSET_MODES:
            raise ValueError(f"`offsets` must be one of {OFFSET_MODES}, got {offsets!r}")
        check_pattern_coverage(
            self.segment_lengths, self.dilation_rates, num_heads, offsets,
            names=("segment_size", "dilation_rate", "num_heads"),
        )
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a probability in [0, 1), got {dropout!r}")
        for name, flag in (
            ("causal", causal),
            ("use_xpos", use_xpos),
            ("use_rel_pos_bias", use_rel_pos_bias),
            ("bias", bias),
            ("sub_layernorm", sub_layernorm),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False, got {flag!r}")
        self.offsets, self.is_causal, self.dropout = offsets, causal, float(dropout)
        self.num_heads, self.num_key_value_heads = num_heads, num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = None
        for name, value in (("rope_theta", rope_theta), ("xpos_scale_base", xpos_scale_base), ("norm_eps", norm_eps)):
            if not is_finite_positive(value):
                raise ValueError(f"`{name}` must be a finite positive number, got {value!r}")
        self.use_xpos, self.rope_theta, self.xpos_scale_base = use_xpos, float(rope_theta), float(xpos_scale_base)
        if use_xpos and self.head_dim % 2:
            raise ValueError(
                f"`use_xpos` rotates pairs of dimensions: the head dimension must be even, got {self.head_dim}"
            )

        self.q_proj = nn.Linear(d_model, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=bias)
        self.sub_norm = nn.LayerNorm(num_heads * self.head_dim, eps=norm_eps) if sub_layernorm else None
        self.relative_position_bias = (
            RelativePositionBias(num_heads, relative_attention_num_buckets, relative_attention_max_distance, not causal)
            if use_rel_pos_bias
            else None
        )
        self._attn_implementation = resolve_attn_implementation(attn_implementation, use_rel_pos_bias)

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    def head_range(self, local_heads: int) -> tuple[int, int]:
        """``(first, total)`` of the heads this rank holds when tensor parallelism has split the q projection
        (its weight a DTensor sharded by output rows): their dilation offsets are those of their global index."""
        mesh = getattr(self.q_proj.weight, "device_mesh", None)
        if mesh is None or mesh.ndim != 1:
            raise ValueError(
                f"q_proj gives {local_heads} heads where the layer has {self.num_heads}: only tensor parallelism "
                "(from_pretrained(..., tp_plan='auto')) may split the heads"
            )
        if self.num_heads % mesh.size() or self.num_key_value_heads % mesh.size():
            raise ValueError(
                f"tensor parallelism over {mesh.size()} ranks needs num_attention_heads ({self.num_heads}) and "
                f"num_key_value_heads ({self.num_key_value_heads}) divisible by it"
            )
        return mesh.get_local_rank() * local_heads, self.num_heads

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if (
            not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.q_proj.in_features
            or x.shape[0] == 0 or x.shape[1] == 0
        ):
            raise ValueError(
                f"`x` must be a tensor of shape (batch, seq_len, d_model={self.q_proj.in_features}) with at least one "
                "row of at least one token, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        batch, seq_len, _ = x.shape
        token_layout = TokenLayout.build(batch, seq_len, attention_mask=attention_mask, device=x.device)
        position_ids = position_embeddings = None
        if self.use_xpos:
            position_ids = (
                positions_from_mask(attention_mask)
                if attention_mask is not None
                else torch.arange(seq_len, device=x.device)[None]
            )
            inv_freq = _inverse_frequencies(self.head_dim, self.rope_theta, x.device)
            position_embeddings = _rotary_cos_sin(inv_freq, position_ids, 1.0, x.dtype)
        return self.attend(x, token_layout, position_embeddings, position_ids)[0]

    def _reads_ring_candidates(self, ring_step, query) -> bool:
        """A step of one token per row with a LongNetStaticCache reads only its candidate keys from the ring: not
        for the eager implementation (its weights cover the cache's keys), in training (dropout), or with the
        relative bias (it needs the whole layout) or a share of the heads (tensor parallelism)."""
        return (
            ring_step is not None
            and ring_step.in_place
            and self.attn_implementation != "eager"
            and not self.training
            and self.relative_position_bias is None
            and query.shape[2] == self.num_heads
        )

    def _fuses_ring_decode(self, query) -> bool:
        """A step that reads ring candidates does so in one fused kernel (``dilated_attention_decode``) where the
        Triton kernels are this module's attention: ``"triton"``, or ``"auto"`` on a GPU."""
        implementation = self.attn_implementation
        return (implementation == "triton" or (implementation == "auto" and query.is_cuda)) and ring_decode_supports(query)

    def attend(
        self, hidden_states, token_layout, position_embeddings=None, position_ids=None, cache=None,
        static_key_order=None, ring_step=None, key_position_ids=None, **kwargs,
    ):
        """Projections, positions, KV cache, the attention function, output projection: ``(output, weights)``.
        ``static_key_order``: the slot order in which a StaticCache's buffers are read (see
        :func:`~modeling_longnet.cache_longnet.static_key_order`); ``ring_step``: a LongNetStaticCache's plan of
        the step; ``key_position_ids``: the keys' logical positions where a mask leaves holes among them (xPos)."""
        span_bound = None
        batch, seq_len, _ = hidden_states.shape
        # -1 heads: under tensor parallelism the projections give this rank's share of the heads
        query = self.q_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)
        if query.shape[2] != self.num_heads:
            kwargs["heads"] = self.head_range(query.shape[2])
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:  # transformers' caches hold (batch, heads, seq, head_dim)
            step = {"ring_step": ring_step} if ring_step is not None else {"token_layout": token_layout}
            key, value = cache.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_idx, **step)
            if static_key_order is not None:
                key, value = key.index_select(2, static_key_order), value.index_select(2, static_key_order)
            if self._reads_ring_candidates(ring_step, query):  # only the keys the pattern can show, per head
                if self._fuses_ring_decode(query):  # read where they lie in the ring, by one kernel
                    attn_output = self._ring_decode(query, key, value, ring_step, position_ids)
                    return self._output(attn_output, batch, seq_len), None
                candidates = ring_candidates(
                    ring_step, self.segment_lengths, self.dilation_rates, self.offsets, self.num_heads, cache.slots
                )
                key, value = candidates.gather(key), candidates.gather(value)
                token_layout, key_position_ids = candidates.layout, candidates.positions.transpose(1, 2)
                span_bound = max(self.segment_lengths) - 1  # one query's segment holds every candidate
            else:
                key, value = key.transpose(1, 2), value.transpose(1, 2)
        if self.use_xpos:  # after the cache, which keeps keys without their decay
            query, key = apply_xpos_decay(query, key, position_ids, self.xpos_scale_base, key_position_ids, span_bound)
        attention_function = ALL_DILATED_ATTENTION_FUNCTIONS[self.attn_implementation]
        attn_output, attn_weights = attention_function(
            self,
            query,
            key,
            value,
            token_layout,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            **kwargs,
        )
        return self._output(attn_output, batch, seq_len), attn_weights

    def _output(self, attn_output, batch: int, seq_len: int) -> torch.Tensor:
        attn_output = attn_output.reshape(batch, seq_len, -1)
        if self.sub_norm is not None:
            attn_output = self.sub_norm(attn_output)
        return self.o_proj(attn_output)

    def _ring_decode(self, query, key_ring, value_ring, ring_step, position_ids) -> torch.Tensor:
        """The step's attention read straight from the ring (keys kept without their xPos decay, which the kernel
        applies by each candidate's distance to the query's xPos position). The positions are laid out once per
        step, for every layer."""
        key = ("ring_decode", self.use_xpos, self.head_dim, self.xpos_scale_base)
        if key not in ring_step.derived:
            batch = query.shape[0]
            inputs = {
                "query_positions": ring_step.query_positions[:, 0].contiguous(),
                "query_real": ring_step.positions.query_real[:, 0].contiguous(),
            }
            if self.use_xpos:
                inputs["decay_rates"] = xpos_rates(self.head_dim, self.xpos_scale_base, query.device)
                inputs["decay_positions"] = position_ids[:, -1].expand(batch).contiguous()
            ring_step.derived[key] = inputs
        return ring_decode_attention(
            query, key_ring, value_ring, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            offsets=self.offsets, softmax_scale=self.scaling, **ring_step.derived[key],
        )


def _new_tokens_mask(attention_mask, batch: int, num_queries: int):
    """The mask of a step's own tokens, its last ``num_queries`` columns (a LongNetStaticCache counts the rest)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != batch or (
        attention_mask.shape[1] < num_queries
    ):
        raise ValueError(
            f"with a LongNetStaticCache `attention_mask` must have shape (batch, cached + new tokens) or (batch, new "
            f"tokens) with batch = {batch} and {num_queries} new tokens, 1 for real tokens; got "
            f"{_shape_or_type(attention_mask)}"
        )
    return attention_mask[:, -num_queries:]


class LongNetAttention(DilatedAttention):
    """The self-attention of a LongNet block: :class:`DilatedAttention` configured by a :class:`LongNetConfig`."""

    def __init__(self, config: LongNetConfig, layer_idx: int):
        super().__init__(
            config.hidden_size,
            config.num_attention_heads,
            config.dilation_rates,
            config.segment_lengths,
            dropout=config.attention_dropout,
            causal=config.causal,
            use_xpos=config.position_encoding == "xpos",
            use_rel_pos_bias=config.use_relative_position_bias,
            num_key_value_heads=config.num_key_value_heads,
            offsets=config.dilation_offsets,
            bias=config.attention_bias,
            sub_layernorm=config.normalization == "sub_layernorm",
            norm_eps=config.norm_eps,
            xpos_scale_base=config.xpos_scale_base,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            head_dim=config.head_dim,
            attn_implementation=config._attn_implementation,
        )
        self.config, self.layer_idx = config, layer_idx
        if config.normalization == "sub_layernorm":
            self.v_proj.init_gain = self.o_proj.init_gain = _magneto_gain(config)

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def forward(self, hidden_states, token_layout, position_embeddings=None, position_ids=None, cache=None, **kwargs):
        return self.attend(hidden_states, token_layout, position_embeddings, position_ids, cache, **kwargs)


class LongNetMLP(nn.Module):
    """Gated (``down(act(gate(x)) * up(x))``, as Llama) or plain (``down(act(up(x)))``, as the paper) feed-forward,
    with Magneto's sub-LN before the down projection when ``normalization='sub_layernorm'``."""

    def __init__(self, config: LongNetConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.sub_norm = None
        if config.normalization == "sub_layernorm":
            self.sub_norm = nn.LayerNorm(inner, eps=config.norm_eps)
            for projection in (self.gate_proj, self.up_proj, self.down_proj):
                if projection is not None:
                    projection.init_gain = _magneto_gain(config)

    def forward(self, x):
        if self.gate_proj is not None:
            hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = self.act_fn(self.up_proj(x))
        if self.sub_norm is not None:
            hidden = self.sub_norm(hidden)
        return self.down_proj(hidden)


class LongNetDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LongNetConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LongNetAttention(config, layer_idx)
        self.mlp = LongNetMLP(config)
        self.input_layernorm = _norm(config, config.hidden_size)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_layout: TokenLayout | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), token_layout, position_embeddings, position_ids, cache, **kwargs
        )
        hidden_states = residual + self.dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + self.dropout(hidden_states)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class LongNetPreTrainedModel(PreTrainedModel):
    config: LongNetConfig
    config_class = LongNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongNetDecoderLayer"]
    _can_record_outputs = {"hidden_states": LongNetDecoderLayer, "attentions": LongNetAttention}
    # torch.compile(fullgraph=True) traces forward and backward (the attention is one custom op, see
    # dilated_attention.py) and a StaticCache decodes with fixed shapes (tests/test_compile.py)
    _can_compile_fullgraph = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        # transformers checks names against its dense attentions; LongNet has its own (ALL_DILATED_ATTENTION_FUNCTIONS)
        return resolve_attn_implementation(attn_implementation, self.config.use_relative_position_bias)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        gain = getattr(module, "init_gain", None)  # set on the projections that Magneto's initialisation scales
        if gain is not None:
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range * gain)


def _one_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "give the KV cache as `cache` or as `past_key_values` (its name before transformers 5.24), not both"
        )
    if past_key_values is not None and _CACHE_FIELD == "cache" and not torch.compiler.is_compiling():
        # the words of transformers' own models (utils.generic), where the new name exists; none before
        logger.warning_once("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
    return cache if cache is not None else past_key_values


def _check_inputs(input_ids, inputs_embeds, position_ids, hidden_size: int) -> None:
    """Shapes and dtypes only (no value is read: a check of the token ids against the vocabulary would wait for
    the GPU at every call, as Llama's does not either)."""
    given, name = (input_ids, "input_ids") if input_ids is not None else (inputs_embeds, "inputs_embeds")
    shape = "(batch, seq)" if name == "input_ids" else f"(batch, seq, hidden_size={hidden_size})"
    if not isinstance(given, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {shape}, got {type(given).__name__}")
    if given.dim() != (2 if name == "input_ids" else 3) or given.shape[0] == 0 or given.shape[1] == 0:
        raise ValueError(f"`{name}` must hold at least one row of at least one token, shape {shape}; got {tuple(given.shape)}")
    if name == "input_ids" and not is_integer_dtype(given.dtype):
        raise TypeError(f"`input_ids` must be an integer tensor of token ids, got {given.dtype}")
    if name == "inputs_embeds" and given.shape[2] != hidden_size:
        raise ValueError(f"`inputs_embeds` must have shape {shape}, got {tuple(given.shape)}")
    if position_ids is not None:
        batch, seq = given.shape[:2]
        if (
            not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
            or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq
        ):
            raise ValueError(
                f"`position_ids` must be a tensor of shape (batch, seq) = {(batch, seq)} (or (1, seq)), one logical "
                f"position per token of `{name}`; got {_shape_or_type(position_ids)}"
            )


def _check_labels(labels, inputs, per_token: bool) -> None:
    """``labels`` against the inputs' (batch, seq): a token id per position for a language model (the model shifts
    them), one entry per row for a classifier. Shapes only, as :func:`_check_inputs`. Without inputs it leaves
    the error to the model's forward, which names them."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return
    batch, seq = inputs.shape[:2]
    if per_token:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (batch, seq):
            raise ValueError(
                f"`labels` must have the shape of the inputs, (batch, seq) = {(batch, seq)}: the token ids to predict "
                f"(shifted inside the model), -100 where no loss is wanted; got {_shape_or_type(labels)}"
            )
        if not is_integer_dtype(labels.dtype):
            raise TypeError(f"`labels` must be an integer tensor of token ids, got {labels.dtype}")
    elif not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] != batch:
        raise ValueError(
            f"`labels` must hold one entry per row, shape ({batch},) (class ids or regression targets) or "
            f"({batch}, num_labels); got {_shape_or_type(labels)}"
        )


def _shape_or_type(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class LongNetModel(LongNetPreTrainedModel):
    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        config.validate_architecture()  # fields may have been edited since the config was built
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LongNetDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _norm(config, config.hidden_size)
        self.rotary_emb = LongNetRotaryEmbedding(config) if config.position_encoding != "none" else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids / inputs_embeds: exactly one of them, ``(batch, seq)`` / ``(batch, seq, hidden)``.
            attention_mask: ``(batch, past + seq)``: 1 for real tokens (the cached ones included), 0 for padding
                anywhere (a 0 is no token: positions skip it, it neither attends nor is attended).
            position_ids: ``(batch, seq)``; without a mask, positions restarting at 0 inside a row mark packed
                documents (batch size 1), which then see only themselves.
            cache: a ``DynamicCache``, a ``StaticCache``, a :class:`~modeling_longnet.cache_longnet.LongNetBoundedCache`
                or a :class:`~modeling_longnet.cache_longnet.LongNetStaticCache` (``past_key_values``, its name before
                transformers 5.24, is accepted too). A LongNetStaticCache counts the tokens so far itself: it reads
                only the last ``seq`` columns of ``attention_mask``.
        """
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of `input_ids` or `inputs_embeds`")
        _check_inputs(input_ids, inputs_embeds, position_ids, self.config.hidden_size)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if (
            kwargs.get("output_attentions", self.config.output_attentions)
            and self.config._attn_implementation != "eager"
        ):
            # As transformers' SDPA and flash integrations do: the kernels form no weight matrix, so the call runs
            # and no weights come back (the output's `attentions` holds none).
            logger.warning_once(
                f"attn_implementation={self.config._attn_implementation!r} returns no attention weights: "
                "output_attentions=True gives none. For dense weights load the model with "
                "attn_implementation='eager' or call model.set_attn_implementation('eager') (memory grows as the "
                "square of the length)"
            )
        if not self.config.causal:
            if cache is not None:
                raise ValueError("a bidirectional LongNet (`config.causal=False`) has no KV cache: drop `cache`")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            check_cache(cache, self.config)

        batch, num_queries = inputs_embeds.shape[:2]
        layer_kwargs = {}
        # With a static cache, a few queries (decoding) take the dense path: no table, no host read, one graph.
        # (Asked only then: with a traced length the comparison would specialise the graph to one side.)
        dense = isinstance(cache, StaticCache | LongNetStaticCache) and (
            num_queries <= DENSE_MAX_QUERIES and not self.config.use_relative_position_bias
        )
        if isinstance(cache, LongNetStaticCache):
            step = cache.plan_step(
                _new_tokens_mask(attention_mask, batch, num_queries), batch, num_queries, inputs_embeds.device, dense
            )
            if dense:
                token_layout = step.positions
            else:
                token_layout = TokenLayout.build(
                    batch, step.num_keys, num_queries, attention_mask=step.key_mask,
                    position_offset=step.position_offset, device=inputs_embeds.device,
                )
            position_ids = step.query_positions if position_ids is None else position_ids
            layer_kwargs.update(ring_step=step, key_position_ids=step.key_positions)
        elif isinstance(cache, StaticCache):
            token_layout, position_ids, layer_kwargs["static_key_order"], layer_kwargs["key_position_ids"] = (
                self._static_cache_layout(cache, attention_mask, position_ids, batch, num_queries, inputs_embeds.device, dense)
            )
        else:
            past_length, kept_length = cached_lengths(cache)
            token_layout = self._token_layout(
                attention_mask, position_ids, batch, num_queries, past_length, kept_length, inputs_embeds.device
            )
            if attention_mask is not None and cache is not None and past_length:  # holes among cached keys: xPos
                layer_kwargs["key_position_ids"] = positions_from_mask(attention_mask)[:, past_length - kept_length :]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -num_queries:]
            else:
                position_ids = torch.arange(past_length, past_length + num_queries, device=inputs_embeds.device)[None]

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                token_layout=token_layout,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **layer_kwargs,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache})

    @staticmethod
    def _static_cache_layout(cache, attention_mask, position_ids, batch, num_queries, device, dense=False):
        """``(layout, position_ids, slot order, key positions)`` of a step with a StaticCache. For the kernels the
        layers read its slots in the rotated order of :func:`~modeling_longnet.cache_longnet.static_key_order`: its
        unwritten slots first (left padding), then the tokens so far, ending with this step's. ``dense``: a
        :class:`PositionLayout` of the slots as they lie (no order, no copy). Only tensor operations, so that a
        compiled decode step has fixed shapes; the mask may be ``(batch, seen + new)`` or padded to the cache's
        slots (``generate`` pads it, see ``create_masks_for_generate``)."""
        seen, order, slots = static_key_order(cache, num_queries, device)
        if not is_tracing() and int(seen) + num_queries > slots:
            raise ValueError(
                f"the StaticCache holds {slots} tokens per row and this step would make it {int(seen) + num_queries}: "
                "create it with a larger `max_cache_len` (generate: a larger `max_length`)"
            )
        written = torch.arange(slots, device=device) < seen + num_queries
        if attention_mask is None:
            full = written.expand(batch, slots)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != batch or not (
                num_queries <= attention_mask.shape[1] <= slots
            ):
                raise ValueError(
                    f"with a StaticCache of {slots} slots `attention_mask` must have shape (batch, cached + new tokens) "
                    f"or (batch, {slots}) with batch = {batch}, 1 for every real token so far; got {_shape_or_type(attention_mask)}"
                )
            full = F.pad(attention_mask != 0, (0, slots - attention_mask.shape[1])) & written
        if dense:  # this step writes slots seen .. seen + num_queries - 1
            key_positions = positions_from_mask(full)
            written_now = (seen + torch.arange(num_queries, device=device)).expand(batch, num_queries)
            query_positions = key_positions.gather(1, written_now)
            layout = PositionLayout(key_positions, full, query_positions, full.gather(1, written_now))
            return layout, query_positions if position_ids is None else position_ids, None, key_positions
        rotated = full.long().index_select(1, order)
        key_positions = positions_from_mask(rotated)
        if position_ids is None:
            position_ids = key_positions[:, -num_queries:]
        layout = TokenLayout.build(batch, slots, num_queries, attention_mask=rotated, device=device)
        return layout, position_ids, order, key_positions

    @staticmethod
    def _token_layout(
        attention_mask, position_ids, batch, num_queries, past_length, kept_length, device
    ) -> TokenLayout:
        """Where the real tokens are among the kept keys and the new ones, and their logical positions."""
        num_keys = kept_length + num_queries
        dropped = past_length - kept_length  # leading positions a bounded cache no longer holds
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (
                batch,
                past_length + num_queries,
            ):
                raise ValueError(
                    "`attention_mask` must have shape (batch, cached + new tokens) = "
                    f"{(batch, past_length + num_queries)}, 1 for every real token so far (the cached ones included) "
                    f"and 0 for padding; got {_shape_or_type(attention_mask)}"
                )
            position_offset = (attention_mask[:, :dropped] != 0).sum(-1) if dropped else None
            return TokenLayout.build(
                batch,
                num_keys,
                num_queries,
                attention_mask=attention_mask[:, dropped:],
                position_offset=position_offset,
                device=device,
            )
        if position_ids is not None and past_length == 0 and is_tracing():  # read when the graph runs
            return LayoutInputs(batch, num_keys, num_queries, position_offset=dropped or None, packing_position_ids=position_ids)
        cu_seqlens = packed_documents(position_ids, batch) if position_ids is not None and past_length == 0 else None
        return TokenLayout.build(
            batch, num_keys, num_queries, cu_seqlens=cu_seqlens, position_offset=dropped or None, device=device
        )


def chunked_causal_lm_loss(
    hidden_states,
    lm_head: nn.Linear,
    labels,
    chunk_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels=None,
    **kwargs,
) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``), computed ``chunk_size`` tokens at a time: each chunk's logits
    are made, reduced to a summed cross-entropy and freed, then made again in the backward pass."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)

    def chunk_loss(hidden_chunk, target_chunk):
        logits = lm_head(hidden_chunk).float()
        return F.cross_entropy(logits, target_chunk, ignore_index=ignore_index, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_loss, hidden[chunk], targets[chunk], use_reentrant=False)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


class LongNetForCausalLM(LongNetPreTrainedModel, GenerationMixin):
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongNetConfig):
        if not config.causal:
            raise ValueError(
                "LongNetForCausalLM needs `causal=True`: a bidirectional LongNet (`causal=False`) is an encoder, for "
                "LongNetModel or LongNetForSequenceClassification"
            )
        super().__init__(config)
        self.model = LongNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # Logical positions count a row's real tokens (SPEC.md), and the model derives them from the mask at each
        # step. generate's own ids are computed once and then incremented: a right-padded row's new tokens would
        # get the positions after its padding, not after its last real token.
        return None

    @staticmethod
    def create_masks_for_generate(attention_mask=None, cache=None, **kwargs):
        # generate calls this for compileable caches instead of making 4D masks, which LongNet does not read: the 2D
        # mask in one shape at every decode step, padded with 0s to a StaticCache's slots, or for a
        # LongNetStaticCache (which counts the earlier tokens) only the step's own columns.
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if attention_mask is None or attention_mask.dim() != 2:
            return attention_mask
        if isinstance(cache, LongNetStaticCache):  # a copy: a view's strides would change at every step (recompiles)
            return attention_mask[:, -kwargs["inputs_embeds"].shape[1] :].contiguous()
        if not isinstance(cache, StaticCache):
            return attention_mask
        slots = cache.layers[0].max_cache_len
        return F.pad(attention_mask, (0, max(slots - attention_mask.shape[1], 0)))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Arguments as :meth:`LongNetModel.forward`, and:
            labels: ``(batch, seq)`` token ids to predict (shifted inside), -100 where no loss is wanted.
            logits_to_keep: compute logits for the last this many positions only (0: all), or for these indices.

        With ``labels`` and ``config.loss_chunk_size`` set, the loss is computed in chunks and no logits are returned.

        Example::

            >>> model = LongNetForCausalLM(LongNetConfig.from_preset("tiny"))
            >>> out = model(input_ids, labels=input_ids)
            >>> out.loss.backward()
        """
        if labels is not None:
            _check_labels(labels, input_ids if input_ids is not None else inputs_embeds, per_token=True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None and self.config.loss_chunk_size is not None:
            loss = chunked_causal_lm_loss(hidden_states, self.lm_head, labels, self.config.loss_chunk_size, **kwargs)
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep < 0:
                raise ValueError(
                    f"`logits_to_keep` must be 0 (every position), a positive number of last positions, or a tensor "
                    f"of position indices; got {logits_to_keep}"
                )
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


class LongNetForSequenceClassification(LongNetPreTrainedModel):
    """A linear head on the last real token of each row (the transformers convention for decoder classifiers)."""

    def __init__(self, config: LongNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LongNetModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        r"""
        Arguments as :meth:`LongNetModel.forward`, and ``labels`` ``(batch,)`` (class ids, or values for regression).
        The pooled token is the last one with ``attention_mask`` 1, else the last one not equal to
        ``config.pad_token_id``, else the last position. ``use_cache`` defaults to False (a classifier rarely
        continues a sequence); a cache given is filled and returned, as by Llama's classifier.
        """
        if labels is not None:
            _check_labels(labels, input_ids if input_ids is not None else inputs_embeds, per_token=False)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=bool(use_cache),
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch, seq_len = logits.shape[:2]
        positions = torch.arange(seq_len, device=logits.device)
        if attention_mask is not None:  # with a cache the mask covers the cached tokens too: its last seq_len columns
            last_token = (positions * (attention_mask[:, -seq_len:].to(logits.device) != 0)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last_token = (positions * (input_ids.to(logits.device) != self.config.pad_token_id)).argmax(-1)
        else:
            last_token = torch.full((batch,), seq_len - 1, device=logits.device)
        pooled_logits = logits[torch.arange(batch, device=logits.device), last_token]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


__all__ = [
    "ALL_DILATED_ATTENTION_FUNCTIONS",
    "DilatedAttention",
    "LongNetForCausalLM",
    "LongNetForSequenceClassification",
    "LongNetModel",
    "LongNetPreTrainedModel",
]
