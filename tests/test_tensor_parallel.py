"""Tensor parallelism (issue 10 point 6): ``from_pretrained(..., tp_plan="auto")`` over 2 gloo ranks on CPU splits the
heads, and each rank's heads keep the dilation offsets of their global index, so the logits are one process's, for
every head class."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetForSequenceClassification, LongNetModel

CONFIGS = {
    # 4 heads over 2 ranks: with interleaved offsets rank 1's heads 2, 3 must take offsets 2 % r, 3 % r, not 0, 1
    "interleaved": dict(dilation_offsets="interleaved", num_key_value_heads=4),
    "grouped": dict(dilation_offsets="grouped", num_key_value_heads=4),
    "grouped-query attention": dict(dilation_offsets="interleaved", num_key_value_heads=2),
    "plain MLP, xPos": dict(gated_mlp=False, position_encoding="xpos", num_key_value_heads=2),
    # the other head classes: the plan is the base model's, a classifier's score stays whole on every rank
    "LongNetModel": dict(dilation_offsets="interleaved", num_key_value_heads=2, model_class=LongNetModel),
    "LongNetForSequenceClassification": dict(
        dilation_offsets="interleaved", num_key_value_heads=4, pad_token_id=0, model_class=LongNetForSequenceClassification
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tensor_parallel_logits(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    ids = torch.randint(3, 100, (2, 37), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    expected, model_dirs = {}, []
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        overrides = dict(overrides)
        model_class = overrides.pop("model_class", LongNetForCausalLM)
        config = LongNetConfig.from_preset("tiny", segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4], **overrides)
        model = model_class(config).eval()
        directory = root / name.replace(" ", "_").replace(",", "")
        model.save_pretrained(directory)
        with torch.no_grad():
            out = model(ids)
            expected[name] = out.last_hidden_state if model_class is LongNetModel else out.logits
        model_dirs.append(str(directory))
    worker = Path(__file__).with_name("tensor_parallel_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(worker), str(root), *model_dirs]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = {name: torch.load(root / f"logits_{i}.pt") for i, name in enumerate(CONFIGS)}
    return expected, got


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_tensor_parallel_ranks_give_the_logits_of_one_process(tensor_parallel_logits, name):
    expected, got = tensor_parallel_logits
    config = LongNetConfig.from_preset("tiny")
    assert got[name]["q_rows_per_rank"] == config.num_attention_heads * config.head_dim // 2  # the heads were split
    torch.testing.assert_close(got[name]["logits"], expected[name], rtol=0, atol=1e-5)


def test_no_tensor_parallel_plan_where_a_layer_needs_every_head():
    assert LongNetConfig.from_preset("tiny").base_model_tp_plan["layers.*.self_attn.q_proj"] == "colwise"
    assert LongNetConfig.from_preset("tiny", normalization="sub_layernorm").base_model_tp_plan is None
    assert LongNetConfig.from_preset("tiny", use_relative_position_bias=True).base_model_tp_plan is None
    assert "base_model_tp_plan" not in LongNetConfig.from_preset("tiny").to_dict()
