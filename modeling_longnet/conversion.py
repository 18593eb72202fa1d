"""Llama -> LongNet: a ``LlamaForCausalLM`` becomes a ``LongNetForCausalLM`` with the same weights.

A LongNet block with the default options (RMSNorm pre-norm, gated SiLU MLP, rotary positions) is a Llama block
whose attention is dilated, and its parameters carry Llama's names, so the conversion copies the configuration's
sizes and the state dict as they are. With one branch covering the whole context (the default:
``segment_lengths=[max_position_embeddings]``, ``dilation_rates=[1]``) the converted model computes what Llama
computes; pass the branches you want to fine-tune with as overrides.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_longnet import LongNetConfig
from .modeling_longnet import LongNetForCausalLM

__all__ = ["check_llama_checkpoint", "convert_llama_to_longnet", "llama_config_from_longnet", "longnet_config_from_llama"]

# LongNetConfig field <- LlamaConfig field
_SAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "use_cache",
)


def longnet_config_from_llama(llama_config: LlamaConfig, **overrides) -> LongNetConfig:
    """The LongNet configuration of a Llama one: same sizes, rotary parameters and special tokens."""
    if not isinstance(llama_config, LlamaConfig):
        raise TypeError(f"`llama_config` must be a LlamaConfig, got {type(llama_config).__name__}")
    fields = {name: getattr(llama_config, name) for name in _SAME_FIELDS}
    fields.update(
        rope_parameters=dict(llama_config.rope_parameters),
        norm_eps=llama_config.rms_norm_eps,
        normalization="rmsnorm",
        gated_mlp=True,
        position_encoding="rope",
        causal=True,
        segment_lengths=[llama_config.max_position_embeddings],
        dilation_rates=[1],
    )
    unknown = sorted(set(overrides) - set(LongNetConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown LongNetConfig field(s) in the overrides: {unknown}")
    fields.update(overrides)
    return LongNetConfig(**fields)


def llama_config_from_longnet(config: LongNetConfig) -> LlamaConfig:
    """The Llama configuration of a LongNet one whose blocks are Llama blocks (RMSNorm, gated SiLU MLP, rotary
    positions): the same sizes, rotary parameters and special tokens, and attention over the whole context (the
    dense reference a LongNet is compared with). The inverse of :func:`longnet_config_from_llama`."""
    if not isinstance(config, LongNetConfig):
        raise TypeError(f"`config` must be a LongNetConfig, got {type(config).__name__}")
    differences = [
        f"{name}={getattr(config, name)!r} (Llama: {wanted!r})"
        for name, wanted in (("normalization", "rmsnorm"), ("gated_mlp", True), ("position_encoding", "rope"), ("causal", True))
        if getattr(config, name) != wanted
    ]
    if differences:
        raise ValueError(f"this LongNet's blocks are not Llama blocks: {', '.join(differences)}; a Llama of its sizes would be another model")
    fields = {name: getattr(config, name) for name in _SAME_FIELDS}
    return LlamaConfig(**fields, rope_parameters=dict(config.rope_parameters), rms_norm_eps=config.norm_eps)


def not_llama_message(name: str | os.PathLike, model_type: str | None) -> str:
    """Why the checkpoint ``name`` whose config.json says ``model_type`` cannot be converted."""
    already = " (it is a LongNet already: load it with AutoModelForCausalLM)" if model_type == "longnet" else ""
    return (
        f"{str(name)!r} is not a Llama model: its config.json has model_type {model_type!r}{already}; the converter "
        "takes checkpoints of LlamaForCausalLM (model_type 'llama')"
    )


def check_llama_checkpoint(name_or_path: str | os.PathLike, **kwargs) -> None:
    """Raises a ValueError naming the model type unless the config.json of ``name_or_path`` (a folder or a Hub repo
    id; ``kwargs`` go to ``get_config_dict``, e.g. ``revision``) is a Llama one. LlamaForCausalLM.from_pretrained
    itself loads any config (with a warning): a LongNet folder would "convert" into a one-branch LongNet."""
    try:
        values, _ = LlamaConfig.get_config_dict(name_or_path, **kwargs)
    except OSError as error:
        if Path(name_or_path).expanduser().exists():
            raise
        raise FileNotFoundError(
            f"`model_or_path`: {str(name_or_path)!r} is neither a local folder nor a Llama checkpoint found on the "
            f"Hub ({error})"
        ) from error
    if values.get("model_type") != LlamaConfig.model_type:
        raise ValueError(not_llama_message(name_or_path, values.get("model_type")))


def convert_llama_to_longnet(
    model_or_path: LlamaForCausalLM | str | os.PathLike, **config_overrides
) -> LongNetForCausalLM:
    """Converts a Llama causal LM (a ``LlamaForCausalLM``, or a folder / Hub repo id holding one) into a
    ``LongNetForCausalLM`` with the same weights, dtype and generation config. A folder or id whose config.json
    is not a Llama one (its ``model_type``) raises a ValueError.

    Keyword arguments override fields of the LongNet configuration, e.g. ``segment_lengths=[2048, 8192]``,
    ``dilation_rates=[1, 4]``.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        check_llama_checkpoint(model_or_path)
        llama = LlamaForCausalLM.from_pretrained(model_or_path, dtype="auto")
    elif isinstance(model_or_path, LlamaForCausalLM):
        llama = model_or_path
    else:
        raise TypeError(
            "`model_or_path` must be a LlamaForCausalLM or the path / Hub id of one, got "
            f"{type(model_or_path).__name__}"
        )
    config = longnet_config_from_llama(llama.config, **config_overrides)
    longnet = LongNetForCausalLM(config).to(device=llama.device, dtype=llama.dtype)
    state = llama.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    missing, unexpected = longnet.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"the Llama checkpoint does not map onto LongNet: missing {missing}, unexpected {unexpected} (is it a "
            "Llama of a layout this converter knows?)"
        )
    longnet.generation_config = llama.generation_config
    longnet.train(llama.training)
    return longnet
