"""LongNet (dilated attention) for Hugging Face transformers.

Importing the package registers the models with transformers' Auto classes (``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``), and marks them so that ``save_pretrained``
writes their code beside the weights (a folder that loads with ``trust_remote_code=True`` where this package is
not installed).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .cache_longnet import LongNetBoundedCache, LongNetStaticCache
from .configuration_longnet import LongNetConfig
from .conversion import convert_llama_to_longnet
from .dilated_attention import (
    DilatedPattern,
    PatternCoverage,
    PositionLayout,
    TokenLayout,
    available_backends,
    dilated_attention,
    head_offsets,
    pattern_coverage,
)
from .modeling_longnet import (
    ALL_DILATED_ATTENTION_FUNCTIONS,
    DilatedAttention,
    LongNetForCausalLM,
    LongNetForSequenceClassification,
    LongNetModel,
    LongNetPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(LongNetConfig.model_type, LongNetConfig, exist_ok=True)
for _auto_class, _model_class in (
    (AutoModel, LongNetModel),
    (AutoModelForCausalLM, LongNetForCausalLM),
    (AutoModelForSequenceClassification, LongNetForSequenceClassification),
):
    _auto_class.register(LongNetConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
LongNetConfig.register_for_auto_class("AutoConfig")

__all__ = [
    "ALL_DILATED_ATTENTION_FUNCTIONS",
    "DilatedAttention",
    "DilatedPattern",
    "LongNetBoundedCache",
    "LongNetStaticCache",
    "LongNetConfig",
    "LongNetForCausalLM",
    "LongNetForSequenceClassification",
    "LongNetModel",
    "LongNetPreTrainedModel",
    "PatternCoverage",
    "PositionLayout",
    "TokenLayout",
    "available_backends",
    "convert_llama_to_longnet",
    "dilated_attention",
    "head_offsets",
    "pattern_coverage",
]
