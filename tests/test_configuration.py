"""LongNetConfig: presets, serialisation, and the error message of every invalid field."""

from __future__ import annotations

import json
import re

import pytest
import torch

from modeling_longnet import LongNetConfig, LongNetForCausalLM
from modeling_longnet.configuration_longnet import AUTO_MAP, PRESETS_DIR


def test_presets_are_listed_and_load():
    assert LongNetConfig.available_presets() == ["llama-1b", "longnet-32k", "longnet-paper", "tiny"]
    for name in LongNetConfig.available_presets():
        assert LongNetConfig.from_preset(name).model_type == "longnet"


def test_paper_preset_is_the_papers_model():
    config = LongNetConfig.from_preset("longnet-paper")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    assert config.segment_lengths == [2048, 4096, 8192, 16384, 32768]
    assert config.dilation_rates == [1, 2, 4, 6, 12]
    assert config.position_encoding == "xpos" and config.normalization == "sub_layernorm"
    assert not config.gated_mlp and config.hidden_act == "gelu"


def test_llama_1b_preset_has_about_a_billion_parameters():
    with torch.device("meta"):
        model = LongNetForCausalLM(LongNetConfig.from_preset("llama-1b"))
    assert 1.0e9 < sum(p.numel() for p in model.parameters()) < 1.2e9


def test_from_preset_applies_overrides_and_names_the_presets_of_an_unknown_name():
    assert LongNetConfig.from_preset("tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(
        ValueError, match=re.escape("unknown preset 'huge': the presets are ['llama-1b', 'longnet-32k', 'longnet-paper', 'tiny']")
    ):
        LongNetConfig.from_preset("huge")


def test_preset_files_are_valid_json_of_known_fields():
    fields = set(LongNetConfig.__dataclass_fields__)
    for path in PRESETS_DIR.glob("*.json"):
        assert set(json.loads(path.read_text())) <= fields, path.name


@pytest.mark.transformers_versions
def test_round_trip_through_save_pretrained(tmp_path):
    config = LongNetConfig.from_preset("tiny", dilation_offsets="grouped", causal=False, rope_theta=500.0)
    config.save_pretrained(tmp_path)
    loaded = LongNetConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}  # the legacy `rope_theta` argument
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_defaults_follow_the_sizes():
    config = LongNetConfig(hidden_size=64, num_attention_heads=8)
    assert (config.head_dim, config.num_key_value_heads) == (8, 8)


TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    segment_lengths=[4, 8],
    dilation_rates=[1, 2],
)

INVALID_FIELDS = [
    (dict(vocab_size=0), "`vocab_size` must be a positive int, got 0"),
    (dict(hidden_size=30), "`hidden_size` (30) must be a multiple of `num_attention_heads` (4), or give `head_dim`"),
    (dict(hidden_size=-32, head_dim=8), "`hidden_size` must be a positive int, got -32"),
    (dict(intermediate_size=1.5), "`intermediate_size` must be a positive int, got 1.5"),
    (dict(num_hidden_layers=0), "`num_hidden_layers` must be a positive int, got 0"),
    (dict(num_attention_heads=0), "`num_attention_heads` must be a positive int, got 0"),
    (dict(num_key_value_heads=0), "`num_key_value_heads` must be a positive int, got 0"),
    (dict(num_key_value_heads=3), "`num_attention_heads` (4) must be a multiple of `num_key_value_heads` (3)"),
    (dict(head_dim=0), "`head_dim` must be a positive int, got 0"),
    (dict(max_position_embeddings=0), "`max_position_embeddings` must be a positive int, got 0"),
    (
        dict(segment_lengths=[4, 8], dilation_rates=[1]),
        "`segment_lengths` and `dilation_rates` must have one entry per branch",
    ),
    (dict(segment_lengths=[4, 0]), "`segment_lengths` must contain positive ints, got 0"),
    (dict(dilation_rates=[1, -2]), "`dilation_rates` must contain positive ints, got -2"),
    (dict(dilation_offsets="random"), "`dilation_offsets` must be one of ('interleaved', 'grouped'), got 'random'"),
    (
        dict(segment_lengths=[8], dilation_rates=[8]),
        (
            "`segment_lengths`=[8] with `dilation_rates`=[8] and 4 heads (`num_attention_heads`) leave 4 of every 8 "
            "positions (the first: 4) seen by no head at all"
        ),
    ),
    (
        dict(segment_lengths=[12, 16], dilation_rates=[6, 8]),
        "Use at least max(`dilation_rates`) heads, or add a branch with dilation rate 1 (it covers every position of every head)",
    ),
    (dict(causal="yes"), "`causal` must be True or False, got 'yes'"),
    (dict(use_relative_position_bias=1), "`use_relative_position_bias` must be True or False, got 1"),
    (dict(gated_mlp=None), "`gated_mlp` must be True or False, got None"),
    (dict(attention_bias="no"), "`attention_bias` must be True or False, got 'no'"),
    (dict(mlp_bias=0), "`mlp_bias` must be True or False, got 0"),
    (dict(tie_word_embeddings="true"), "`tie_word_embeddings` must be True or False, got 'true'"),
    (dict(position_encoding="alibi"), "`position_encoding` must be one of ('rope', 'xpos', 'none'), got 'alibi'"),
    (dict(hidden_size=36, num_attention_heads=4), "`head_dim` must be even for rotary position encodings"),
    (dict(rope_parameters={"rope_type": "spiral"}), "`rope_parameters` has an unknown rope_type 'spiral'"),
    (
        dict(position_encoding="xpos", rope_parameters={"rope_type": "linear", "factor": 2.0}),
        "`position_encoding='xpos'` is defined on the default rotary frequencies",
    ),
    (dict(xpos_scale_base=0), "`xpos_scale_base` must be a finite positive number, got 0"),
    (
        dict(use_relative_position_bias=True, relative_attention_num_buckets=0),
        "`relative_attention_num_buckets` must be a positive int, got 0",
    ),
    (
        dict(use_relative_position_bias=True, relative_attention_max_distance=-1),
        "`relative_attention_max_distance` must be a positive int, got -1",
    ),
    (
        dict(use_relative_position_bias=True, relative_attention_max_distance=16),
        "`relative_attention_max_distance` (16) must exceed the 16 distances",
    ),
    (
        dict(use_relative_position_bias=True, relative_attention_num_buckets=1),
        "must exceed the 0 distances that get a bucket each",
    ),
    (dict(normalization="batchnorm"), "`normalization` must be one of ('rmsnorm', 'sub_layernorm')"),
    (dict(norm_eps=0.0), "`norm_eps` must be a finite positive number, got 0.0"),
    (dict(hidden_act="swish2"), "`hidden_act` must be an activation of transformers' ACT2FN"),
    (dict(attention_dropout=1.0), "`attention_dropout` must be a probability in [0, 1), got 1.0"),
    (dict(hidden_dropout=-0.1), "`hidden_dropout` must be a probability in [0, 1), got -0.1"),
    (dict(initializer_range=-0.02), "`initializer_range` must be a finite non-negative number (the standard deviation of the initialisation, e.g. 0.02), got -0.02"),
    (dict(loss_chunk_size=0), "`loss_chunk_size` must be a positive number of tokens, or None"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "`rope_parameters['rope_theta']` must be a finite positive number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "`rope_parameters['rope_theta']` must be a finite positive number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}), "`rope_parameters['rope_theta']` must be a finite positive number"),
    (dict(norm_eps=-1e-6), "`norm_eps` must be a finite positive number, got -1e-06"),
    (dict(xpos_scale_base=float("inf")), "`xpos_scale_base` must be a finite positive number, got inf"),
    (dict(initializer_range=float("nan")), "`initializer_range` must be a finite non-negative number"),
    (dict(pad_token_id=100), "`pad_token_id` must be a token id in [0, vocab_size=100), got 100"),
    (dict(pad_token_id=-1), "`pad_token_id` must be a token id in [0, vocab_size=100), got -1"),
    (dict(bos_token_id=100), "`bos_token_id` must be a token id in [0, vocab_size=100), got 100"),
    (dict(eos_token_id=[2, 1000]), "`eos_token_id` must be a token id in [0, vocab_size=100), got 1000"),
    (dict(segment_lengths=[4, 2**49]), "`segment_lengths` must contain ints up to 2**48"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": -2.0}), "`rope_parameters['factor']` must be a finite number >= 1 (by how much the 'linear' scaling stretches the trained context), got -2.0"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 0.5}), "`rope_parameters['factor']` must be a finite number >= 1"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": "4"}), "`rope_parameters['factor']` must be a finite number >= 1 (by how much the 'yarn' scaling stretches the trained context), got '4'"),
]


@pytest.mark.parametrize("overrides, message", INVALID_FIELDS, ids=[next(iter(o)) for o, _ in INVALID_FIELDS])
def test_invalid_field_names_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LongNetConfig(**{**TINY, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_parameters="10000"), "`rope_parameters` must be a mapping"),
        (dict(rope_parameters=[10000.0]), "`rope_parameters` must be a mapping"),
        (dict(pad_token_id="0"), "`pad_token_id` must be an int token id (or None), got '0'"),
        (dict(pad_token_id=0.0), "`pad_token_id` must be an int token id (or None), got 0.0"),
    ],
)
def test_fields_of_the_wrong_type_are_a_type_error(overrides, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        LongNetConfig(**{**TINY, **overrides})


@pytest.mark.parametrize(
    "typo, meant",
    [("segment_length", "segment_lengths"), ("dilation_rate", "dilation_rates"), ("segment_size", "segment_lengths"),
     ("num_hidden_layer", "num_hidden_layers"), ("dilation_offset", "dilation_offsets")],
)
def test_a_misspelled_field_is_refused_not_kept_unused(typo, meant):
    """transformers keeps unknown keys as attributes: a typo of a LongNet field (or the layer's name for one) would
    leave the field at its preset value, silently."""
    message = f"`{typo}` is not a LongNetConfig field, so its value would be ignored: did you mean `{meant}`?"
    with pytest.raises(TypeError, match=re.escape(message)):
        LongNetConfig(**{**TINY, typo: [8]})
    with pytest.raises(TypeError, match=re.escape(message)):
        LongNetConfig.from_preset("tiny", **{typo: [8]})


def test_unrelated_extra_keys_and_scaled_rope_still_load(tmp_path):
    config = LongNetConfig(
        **{**TINY, "my_tokenizer_note": "kept", "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}
    )
    config.save_pretrained(tmp_path)
    loaded = LongNetConfig.from_pretrained(tmp_path)
    assert loaded.my_tokenizer_note == "kept" and loaded.rope_parameters["factor"] == 2.0


def test_a_nan_rope_theta_can_no_longer_reach_training():
    """rope_theta 0 made every rotary frequency NaN: train.py trained on NaN and saved 21 of 21 tensors as NaN."""
    for theta in (0, -1, float("inf")):
        with pytest.raises(ValueError, match="rope_theta"):
            LongNetConfig(**{**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": theta}})


def test_segment_lengths_of_the_wrong_type_are_a_type_error():
    with pytest.raises(TypeError, match="`segment_lengths` must be a positive int or a list of positive ints"):
        LongNetConfig(**{**TINY, "segment_lengths": "48"})


def test_model_revalidates_a_config_edited_after_creation():
    config = LongNetConfig(**TINY)
    config.segment_lengths, config.dilation_rates = [16, 8], [8, 8]
    with pytest.raises(ValueError, match="seen by no head at all"):
        LongNetForCausalLM(config)


def test_a_single_dilated_branch_is_accepted_with_a_warning(caplog):
    """The paper's single dilated branch: each head covers its own residues, the heads together every position."""
    import logging

    with caplog.at_level(logging.WARNING):
        config = LongNetConfig(**{**TINY, "segment_lengths": [8], "dilation_rates": [2]})
    assert config.dilation_rates == [2]
    assert "lie outside every branch" in caplog.text and "Every position is still seen by some head" in caplog.text


@pytest.mark.parametrize(
    "segment_lengths, dilation_rates",
    [([8191, 8192], [2, 2]), ([4095, 4096], [2, 2]), ([2**31 - 1, 2**31 - 2], [2**30, 4]), ([2**31 - 1] * 8, [1] * 8)],
)
def test_large_or_coprime_branch_values_validate_without_enumerating_the_period(segment_lengths, dilation_rates):
    """A 1.2 KB config.json with segment lengths 8191 and 8192 used to take 21.8 GB and 11 minutes to validate
    (every pair of lcm = 67M positions listed); coverage is now decided per residue (see pattern_coverage)."""
    config = LongNetConfig(**{**TINY, "segment_lengths": segment_lengths, "dilation_rates": dilation_rates})
    assert config.segment_lengths == segment_lengths
