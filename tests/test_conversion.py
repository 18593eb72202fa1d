"""Llama -> LongNet: the converted model computes what Llama computes (one branch covering the sequence), the
function's errors, and the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modeling_longnet import LongNetForCausalLM, convert_llama_to_longnet

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "convert_llama_to_longnet.py"


def tiny_llama(**overrides):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def left_padded_batch():
    ids = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    mask[2, :30] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.transformers_versions
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"head_dim": 16},
    ],
    ids=["plain", "tied-biases", "scaled-rope", "head-dim"],
)
def test_converted_model_gives_llamas_logits(overrides):
    llama = tiny_llama(**overrides)
    longnet = convert_llama_to_longnet(llama)
    assert longnet.config.segment_lengths == [64] and longnet.config.dilation_rates == [1]
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (longnet(ids).logits - llama(ids).logits).abs().max() <= 1e-5
        ids, mask = left_padded_batch()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # Llama needs them given; LongNet derives the same from the mask
        expected = llama(ids, attention_mask=mask, position_ids=positions).logits
        got = longnet(ids, attention_mask=mask).logits
    assert (got - expected)[mask == 1].abs().max() <= 1e-5


@pytest.mark.transformers_versions
def test_converted_model_generates_llamas_greedy_tokens():
    llama = tiny_llama()
    longnet = convert_llama_to_longnet(llama)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(longnet.generate(ids, **kwargs), llama.generate(ids, **kwargs))


def test_conversion_from_a_folder_with_overrides(tmp_path):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path)
    longnet = convert_llama_to_longnet(tmp_path, segment_lengths=[8, 32], dilation_rates=[1, 2])
    assert isinstance(longnet, LongNetForCausalLM) and longnet.config.segment_lengths == [8, 32]
    assert torch.equal(longnet.model.layers[1].mlp.down_proj.weight, llama.model.layers[1].mlp.down_proj.weight)


def test_conversion_errors():
    with pytest.raises(
        TypeError, match="`model_or_path` must be a LlamaForCausalLM or the path / Hub id of one, got int"
    ):
        convert_llama_to_longnet(3)
    with pytest.raises(TypeError, match=r"unknown LongNetConfig field\(s\) in the overrides: \['segment_length'\]"):
        convert_llama_to_longnet(tiny_llama(), segment_length=[8])
    with pytest.raises(ValueError, match="seen by no head at all"):  # 4 heads cannot cover 8 residues
        convert_llama_to_longnet(tiny_llama(), segment_lengths=[8], dilation_rates=[8])
    with pytest.raises(FileNotFoundError, match=re.escape("`model_or_path`: '/no/such/llama' is neither a local folder nor a Llama checkpoint found on the Hub")):
        convert_llama_to_longnet("/no/such/llama")


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_script_help_documents_every_option():
    result = run_script("--help")
    assert result.returncode == 0
    for option in (
        "model",
        "output_dir",
        "--segment-lengths",
        "--dilation-rates",
        "--dilation-offsets",
        "--dtype",
        "--no-tokenizer",
    ):
        assert option in result.stdout, option


def test_script_errors_are_clear(tmp_path):
    missing = run_script(tmp_path / "nowhere", tmp_path / "out")
    assert missing.returncode == 2 and f"model: no such folder: {tmp_path / 'nowhere'}" in missing.stderr
    unpaired = run_script(tmp_path, tmp_path / "out", "--segment-lengths", "8", "16", "--dilation-rates", "1")
    assert unpaired.returncode == 2 and "--segment-lengths has 2 values and --dilation-rates 1" in unpaired.stderr
    not_llama = run_script(tmp_path, tmp_path / "out")
    assert not_llama.returncode == 2 and "cannot load a Llama checkpoint from" in not_llama.stderr


def test_script_converts_a_saved_llama(tmp_path):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    result = run_script(
        tmp_path / "llama",
        tmp_path / "longnet",
        "--segment-lengths",
        "64",
        "--dilation-rates",
        "1",
        "--dtype",
        "float32",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    longnet = AutoModelForCausalLM.from_pretrained(tmp_path / "longnet").eval()
    assert isinstance(longnet, LongNetForCausalLM)
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        assert (longnet(ids).logits - llama(ids).logits).abs().max() <= 1e-5


@pytest.mark.transformers_versions
@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}, {"head_dim": 16}, {"rope_theta": 1e6}],
    ids=["plain", "tied-biases", "head-dim", "rope-theta"],
)
def test_a_llama_of_a_longnets_sizes_converts_back_to_the_same_config(overrides):
    """train.py --architecture llama: the dense reference of a LongNet config is the Llama whose conversion gives
    that LongNet config back, up to its branches (the Llama attends to the whole context)."""
    from modeling_longnet import LongNetConfig
    from modeling_longnet.conversion import llama_config_from_longnet, longnet_config_from_llama

    config = LongNetConfig.from_preset("tiny", segment_lengths=[8, 16], dilation_rates=[1, 2], **overrides)
    llama_config = llama_config_from_longnet(config)
    assert isinstance(llama_config, LlamaConfig)
    back = longnet_config_from_llama(llama_config, segment_lengths=[8, 16], dilation_rates=[1, 2])
    assert back.to_dict() == config.to_dict()
    llama = LlamaForCausalLM(llama_config)
    assert sum(p.numel() for p in llama.parameters()) == sum(p.numel() for p in LongNetForCausalLM(config).parameters())


@pytest.mark.parametrize(
    "field, value", [("normalization", "sub_layernorm"), ("gated_mlp", False), ("position_encoding", "xpos"), ("causal", False)]
)
def test_a_longnet_that_is_not_a_llama_block_has_no_llama_config(field, value):
    from modeling_longnet import LongNetConfig
    from modeling_longnet.conversion import llama_config_from_longnet

    with pytest.raises(ValueError, match=f"not Llama blocks: {field}="):
        llama_config_from_longnet(LongNetConfig.from_preset("tiny", **{field: value}))
    with pytest.raises(TypeError, match="must be a LongNetConfig"):
        llama_config_from_longnet(LlamaConfig())
