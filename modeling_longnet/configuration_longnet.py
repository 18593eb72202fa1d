"""LongNet model configuration: the fields, their validation, and the named presets of ``configuration/``."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import field
from numbers import Integral, Real
from pathlib import Path

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging

from .dilated_attention_pattern import OFFSET_MODES, DilatedPattern, pattern_coverage

logger = logging.get_logger(__name__)

POSITION_ENCODINGS = ("rope", "xpos", "none")
NORMALIZATIONS = ("rmsnorm", "sub_layernorm")

# Where the preset JSON files live: `configuration/` beside the package in a source checkout; an installed wheel
# carries the same files as `modeling_longnet/presets/`.
_PRESET_DIRS = (Path(__file__).resolve().parent.parent / "configuration", Path(__file__).resolve().parent / "presets")
PRESETS_DIR = next((path for path in _PRESET_DIRS if path.is_dir()), _PRESET_DIRS[0])

# Where a saved model finds its code when loaded with `trust_remote_code=True` (the files `save_pretrained` copies).
AUTO_MAP = {
    "AutoConfig": "configuration_longnet.LongNetConfig",
    "AutoModel": "modeling_longnet.LongNetModel",
    "AutoModelForCausalLM": "modeling_longnet.LongNetForCausalLM",
    "AutoModelForSequenceClassification": "modeling_longnet.LongNetForSequenceClassification",
}


# The names of the original LongNet layer (DilatedAttention's arguments), which a config spells in the plural.
_LAYER_ARGUMENT_NAMES = {"segment_size": "segment_lengths", "dilation_rate": "dilation_rates"}


class LongNetConfig(PreTrainedConfig):
    r"""Configuration of a LongNet model: a Llama-style (or the paper's Magneto-style) decoder whose self-attention is
    dilated attention (Ding et al. 2023), a mixture of (segment length, dilation rate) branches.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: the usual sizes.
        num_key_value_heads: key/value heads (grouped-query attention); defaults to `num_attention_heads`.
        head_dim: defaults to `hidden_size // num_attention_heads`.
        segment_lengths, dilation_rates: one entry per branch (w_i, r_i). Every position must be seen by some head
            (a pattern that leaves one to no head is refused); a (position, head) pair that no branch covers gives
            zero in that head, with a warning. A branch with rate 1 covers every pair.
        dilation_offsets: which positions head h takes in a branch of rate r: `"interleaved"` (h mod r, the paper's)
            or `"grouped"` (h // ceil(H / r), torchscale's).
        causal: `False` makes `LongNetModel` a bidirectional encoder (no KV cache).
        position_encoding: `"rope"` (rotary, parameters in `rope_parameters`: `rope_theta`, scaling), `"xpos"`
            (rotary with xPos's length-extrapolating decay, as in the paper; scale base `xpos_scale_base`), or `"none"`.
        use_relative_position_bias: add a learned T5-style bucketed bias (`relative_attention_num_buckets`,
            `relative_attention_max_distance`) to the attention scores. The kernels take no score bias yet, so this
            runs on the dense `attn_implementation="eager"` path (memory quadratic in the sequence length).
        normalization: `"rmsnorm"` (pre-norm RMSNorm, as Llama) or `"sub_layernorm"` (pre-norm LayerNorm plus the
            sub-LN of Magneto inside each block, and its initialisation, as the paper). `norm_eps` is their epsilon.
        hidden_act, gated_mlp: the MLP's activation, and whether it is gated (SwiGLU-style, as Llama) or plain (as the
            paper).
        attention_bias, mlp_bias: biases of the attention and MLP projections.
        attention_dropout: dropout on the attention probabilities; hidden_dropout: on each block's output, before the
            residual sum.
        initializer_range: standard deviation of the normal initialisation.
        loss_chunk_size: with `labels`, compute the causal-LM loss this many tokens at a time, recomputing each chunk's
            logits in the backward pass, so that the (tokens x vocabulary) logits are never held whole. The forward then
            returns no logits. `None` computes the loss from full logits.
        tie_word_embeddings: share the input embeddings with the LM head.
    """

    model_type = "longnet"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    segment_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768])
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 12])
    dilation_offsets: str = "interleaved"
    causal: bool = True
    position_encoding: str = "rope"
    rope_parameters: dict | None = None
    xpos_scale_base: float = 512.0
    max_position_embeddings: int = 32768
    use_relative_position_bias: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    normalization: str = "rmsnorm"
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    gated_mlp: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    loss_chunk_size: int | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    # Tensor parallelism (``from_pretrained(..., tp_plan="auto")``), as Llama's: heads split across ranks by the
    # q/k/v projections, joined by the output projection; each rank's heads keep the dilation offsets of their
    # global index (DilatedAttention.head_range). Not for sub-LN, which normalises over all heads (and the MLP's
    # whole width) at once, nor for the relative position bias, which holds a bias per global head.
    _TENSOR_PARALLEL_PLAN = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    @property
    def base_model_tp_plan(self):
        if self.normalization == "sub_layernorm" or self.use_relative_position_bias:
            return None
        plan = dict(self._TENSOR_PARALLEL_PLAN)
        if not self.gated_mlp:
            del plan["layers.*.mlp.gate_proj"]
        return plan

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, value):  # transformers assigns the class default; the plan follows the fields
        pass

    def __post_init__(self, **kwargs):
        _refuse_misspelled_fields(kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_positive_int(self.hidden_size) and _is_positive_int(self.num_attention_heads):
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                    f"({self.num_attention_heads}), or give `head_dim` explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, Mapping):
            raise TypeError(
                f"`rope_parameters` must be a mapping such as {{'rope_type': 'default', 'rope_theta': 10000.0}}, or "
                f"None for the defaults; got {self.rope_parameters!r}"
            )
        if isinstance(self.segment_lengths, (tuple, list)):
            self.segment_lengths = list(self.segment_lengths)
        if isinstance(self.dilation_rates, (tuple, list)):
            self.dilation_rates = list(self.dilation_rates)
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self.validate_architecture()

    def validate_architecture(self):
        """Raises a ValueError naming the first invalid field and how to fix it (also run when a model is built)."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _check_positive_int(self, name)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}): each key/value head serves a group of query heads"
            )
        if self.dilation_offsets not in OFFSET_MODES:
            raise ValueError(f"`dilation_offsets` must be one of {OFFSET_MODES}, got {self.dilation_offsets!r}")
        DilatedPattern(self.segment_lengths, self.dilation_rates, self.dilation_offsets)  # names the bad field
        check_pattern_coverage(
            self.segment_lengths, self.dilation_rates, self.num_attention_heads, self.dilation_offsets,
            names=("segment_lengths", "dilation_rates", "num_attention_heads"),
        )
        for name in (
            "causal",
            "use_relative_position_bias",
            "gated_mlp",
            "attention_bias",
            "mlp_bias",
            "tie_word_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        self._validate_positions()
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS} (pre-norm RMSNorm as Llama, or LayerNorm with "
                f"Magneto's sub-LN as the paper), got {self.normalization!r}"
            )
        _check_positive_real(self, "norm_eps")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"`hidden_act` must be an activation of transformers' ACT2FN (e.g. 'silu', 'gelu'), "
                f"got {self.hidden_act!r}"
            )
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}")
        if (
            isinstance(self.initializer_range, bool)
            or not isinstance(self.initializer_range, Real)
            or not 0 <= self.initializer_range < math.inf
        ):
            raise ValueError(
                f"`initializer_range` must be a finite non-negative number (the standard deviation of the "
                f"initialisation, e.g. 0.02), got {self.initializer_range!r}"
            )
        self._validate_special_tokens()
        if self.loss_chunk_size is not None and not _is_positive_int(self.loss_chunk_size):
            raise ValueError(
                f"`loss_chunk_size` must be a positive number of tokens, or None to compute the loss from full logits, "
                f"got {self.loss_chunk_size!r}"
            )

    def _validate_special_tokens(self):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            values = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            for token in values:
                if token is None:
                    continue
                if isinstance(token, bool) or not isinstance(token, Integral):
                    raise TypeError(f"`{name}` must be an int token id (or None), got {token!r}")
                if not 0 <= token < self.vocab_size:
                    raise ValueError(
                        f"`{name}` must be a token id in [0, vocab_size={self.vocab_size}), got {token}: "
                        f"use the tokenizer's id, or None"
                    )

    def _validate_positions(self):
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"`position_encoding` must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}")
        if self.position_encoding != "none":
            if self.head_dim % 2 != 0:
                raise ValueError(
                    f"`head_dim` must be even for rotary position encodings (it rotates pairs of dimensions), got "
                    f"{self.head_dim}; change `hidden_size` / `num_attention_heads` or use `position_encoding='none'`"
                )
            rope_type = self.rope_parameters.get("rope_type", "default")
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(
                    f"`rope_parameters` has an unknown rope_type {rope_type!r}; use 'default' or one of "
                    f"{sorted(ROPE_INIT_FUNCTIONS)}"
                )
            if self.position_encoding == "xpos" and rope_type != "default":
                raise ValueError(
                    f"`position_encoding='xpos'` is defined on the default rotary frequencies; `rope_parameters` asks "
                    f"for rope_type {rope_type!r}: drop the scaling or use `position_encoding='rope'`"
                )
            theta = self.rope_parameters.get("rope_theta")
            if not is_finite_positive(theta):
                raise ValueError(
                    f"`rope_parameters['rope_theta']` must be a finite positive number (the rotary base, e.g. "
                    f"10000.0), got {theta!r}: the frequencies theta ** (-2i / head_dim) are NaN or inf otherwise"
                )
            factor = self.rope_parameters.get("factor")
            if rope_type != "default" and factor is not None and not (is_finite_positive(factor) and factor >= 1):
                raise ValueError(
                    f"`rope_parameters['factor']` must be a finite number >= 1 (by how much the {rope_type!r} scaling "
                    f"stretches the trained context), got {factor!r}"
                )
            self.validate_rope()
        _check_positive_real(self, "xpos_scale_base")
        if self.use_relative_position_bias:
            check_relative_position_buckets(
                self.relative_attention_num_buckets, self.relative_attention_max_distance, bidirectional=not self.causal
            )

    @classmethod
    def available_presets(cls) -> list[str]:
        """Names accepted by :meth:`from_preset` (the JSON files of ``configuration/``)."""
        return sorted(path.stem for path in PRESETS_DIR.glob("*.json")) if PRESETS_DIR.is_dir() else []

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LongNetConfig:
        """A named preset: ``"tiny"`` (tests and demos), ``"longnet-32k"`` (the 13.9M-parameter, 4-layer model of the
        GPU retrieval recipe, docs/quality.md: width 512, 16 heads of 32, w = 2048/8192/32768, r = 1/4/8), ``"longnet-paper"`` (the paper's 12-layer, 768-wide model with
        xPos, sub-LN and w = 2048..32768, r = 1..12) or ``"llama-1b"`` (a ~1B Llama-shaped LongNet). Keyword arguments
        override fields of the preset."""
        presets = cls.available_presets()
        if not presets:
            raise FileNotFoundError(
                f"no preset configurations found: {PRESETS_DIR} does not exist (presets ship with a source checkout "
                "of modeling_longnet); use LongNetConfig.from_pretrained(path_to_json) or LongNetConfig(**fields)"
            )
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: the presets are {presets}")
        values = json.loads((PRESETS_DIR / f"{name}.json").read_text())
        values.update(overrides)
        return cls(**values)


def _refuse_misspelled_fields(extra: dict) -> None:
    """A config keeps keys it does not know as plain attributes (transformers' convention, so that a saved config
    with extra keys still loads); a key that is one letter off a LongNet field, or the layer's name for one, is a
    typo whose value would silently be ignored: refused."""
    own = [name for name in LongNetConfig.__annotations__ if not name.startswith("_")]
    for name in extra:
        meant = _LAYER_ARGUMENT_NAMES.get(name) or next(iter(difflib.get_close_matches(name, own, n=1, cutoff=0.9)), None)
        if meant is not None and meant != name:
            raise TypeError(
                f"`{name}` is not a LongNetConfig field, so its value would be ignored: did you mean `{meant}`?"
            )


def check_pattern_coverage(segment_lengths, dilation_rates, num_heads, offsets, *, names) -> None:
    """Refuses a pattern that leaves some position without any head (no layer could recover such a token); warns
    once about (position, head) pairs outside every branch, whose outputs are zero (SPEC.md), as in the paper's
    single dilated branch where each head covers its own residues."""
    coverage = pattern_coverage(segment_lengths, dilation_rates, num_heads, offsets)
    segments, rates, heads = names
    if not coverage.every_position_covered:
        count = "some" if coverage.uncovered_positions is None else str(coverage.uncovered_positions)
        first = coverage.first_uncovered_position
        where = "" if first is None else f" (the first: {first})"
        raise ValueError(
            f"`{segments}`={list(segment_lengths)} with `{rates}`={list(dilation_rates)} and {num_heads} heads "
            f"(`{heads}`) leave {count} of every {coverage.period} positions{where} seen by no head at all: "
            f"their attention output would be zero in every head. Use at least max(`{rates}`) heads, or add a "
            "branch with dilation rate 1 (it covers every position of every head)"
        )
    if not coverage.complete:
        logger.warning_once(
            f"`{segments}`={list(segment_lengths)}, `{rates}`={list(dilation_rates)}, {num_heads} heads: "
            f"{coverage.describe()}. Every position is still seen by some head; add a branch with dilation rate 1 "
            "if every head should see every position"
        )


def check_relative_position_buckets(num_buckets, max_distance, bidirectional: bool) -> None:
    """T5's buckets: half of those of a direction hold one distance each, the rest grow logarithmically up to
    ``max_distance``, which must therefore exceed the exactly-bucketed distances."""
    for name, value in (
        ("relative_attention_num_buckets", num_buckets),
        ("relative_attention_max_distance", max_distance),
    ):
        if not _is_positive_int(value):
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    exact = num_buckets // (2 if bidirectional else 1) // 2
    if exact < 1 or max_distance <= exact:
        raise ValueError(
            f"`relative_attention_max_distance` ({max_distance}) must exceed the {exact} distances that get a bucket "
            f"each (half of `relative_attention_num_buckets`={num_buckets}"
            f"{', per direction' if bidirectional else ''}, "
            "which must leave at least 1): raise the distance, or the number of buckets"
        )


def _is_positive_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value > 0


def _check_positive_int(config, name: str) -> None:
    value = getattr(config, name)
    if not _is_positive_int(value):
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


def is_finite_positive(value) -> bool:
    """A real number (not a bool) in (0, inf): NaN and inf are not."""
    return not isinstance(value, bool) and isinstance(value, Real) and 0 < value < math.inf


def _check_positive_real(config, name: str) -> None:
    value = getattr(config, name)
    if not is_finite_positive(value):
        raise ValueError(f"`{name}` must be a finite positive number, got {value!r}")


__all__ = ["LongNetConfig", "check_pattern_coverage", "is_finite_positive"]
