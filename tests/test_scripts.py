"""scripts/ (train, evaluate, generate, push_to_hub, main) and the metrics of modeling_longnet.evaluation.

The scripts run as processes where the command line itself is under test (exit codes, one-line errors, the
reload in a process that cannot import modeling_longnet), and in-process through their ``main(argv)`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import math
import random
import subprocess
import sys
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scripts_support import (
    SCRIPTS,
    TINY_MODEL_ARGS,
    assert_clean_failure,
    load_script,
    run_script,
    script_env,
    training_summary,
)

from modeling_longnet.data import byte_level_tokenizer, generate_default_dataset, is_retrieval_record
from modeling_longnet.evaluation import (
    DistanceBucket,
    EvaluationReport,
    PositionBucket,
    RetrievalResult,
    distance_edges,
    locate_answer,
    perplexity_by_position,
    plot_report,
    retrieval_accuracy_by_distance,
    score_retrieval,
    token_negative_log_likelihoods,
)

pytest_plugins = ["scripts_support"]  # its fixtures: trained_model, one_torch_thread (autouse)

SCRIPT_NAMES = ("train", "evaluate", "generate", "push_to_hub", "main")


# ----------------------------------------------------------------------------------------------------------
# Command lines: --help documents every option; bad input fails in one line
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_option_has_help(name):
    parser = load_script(name).build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, action.dest


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_help_lists_every_option(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    parser = load_script(name).build_parser()
    for action in parser._actions:
        for option in action.option_strings or [action.dest]:
            assert option in result.stdout, option
    assert "Examples:" in result.stdout


def _fail_in_process(capsys, name: str, argv: list[str]) -> str:
    """Runs a script's main in this process; returns its single error line."""
    assert load_script(name).main(argv) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{name}.py: error: "), lines
    return lines[-1]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--preset", "no-such-preset"], ["unknown preset 'no-such-preset'", "tiny"]),
        (["--config", "{tmp}/missing.json"], ["--config", "missing.json' does not exist"]),
        (["--config", "{tmp}/broken.json"], ["broken.json' is not valid JSON"]),
        (["--config", "{tmp}/negative.json"], ["`hidden_size` must be a positive int"]),
        (["--set", "hidden_size"], ["--set expects FIELD=VALUE"]),
        (["--set", "segment_lengths=[8,0]"], ["segment_lengths"]),
        (["--train-files", "{tmp}/missing.txt"], ["missing.txt' does not exist"]),
        (["--train-files", "{tmp}/notes.csv"], ["extension '.csv' is not one of"]),
        (["--model", "{tmp}/no-model"], ["--model", "does not exist"]),
        (["--tokenizer", "{tmp}/no-tokenizer"], ["no-tokenizer' does not exist"]),
        (["--resume-from-checkpoint", "{tmp}/checkpoint-9"], ["checkpoint-9' does not exist"]),
        (["--block-size", "0"], ["--block-size must be positive"]),
        (["--block-size", "200", "--set", "segment_lengths=[64,128]", "--set", "dilation_rates=[1,2]"],
         ["too short for evidence 128 characters", "at least 320"]),
        (["--sequence-parallel-size", "2"], ["--sequence-parallel-size 2"]),
        (["--answer-loss-weight", "-1"], ["--answer-loss-weight must be a finite number >= 0"]),
        (["--default-task-weights", "0", "0", "0"], ["--default-task-weights must be three finite numbers"]),
        (["--adam-beta2", "1"], ["--adam-beta2 must be in [0, 1)"]),
        (["--stream-default-data"], ["--stream-default-data", "--max-steps"]),
        (["--stream-default-data", "--max-steps", "2", "--train-files", "{tmp}/notes.txt"], ["leave out --train-files"]),
        (["--stream-default-data", "--max-steps", "2", "--tokenizer", "bpe"], ["needs a ready tokenizer"]),
        (["--architecture", "llama", "--model", "{tmp}"], ["--architecture llama", "leave out --model"]),
        (["--default-passkey-statements", "3"], ["--default-passkey-statements must be a power of two"]),
        (["--default-min-distance", "64", "--default-max-distance", "32"], ["--default-max-distance (32) must be at least"]),
        (["--default-curriculum", "512:10"], ["--default-curriculum orders the streamed", "add --stream-default-data"]),
        (["--stream-default-data", "--max-steps", "5", "--default-curriculum", "512"], ["stages MAX_CHARS:STEPS", "'512'"]),
        (["--stream-default-data", "--max-steps", "5", "--default-curriculum", "512:0"], ["stages MAX_CHARS:STEPS", "'512:0'"]),
        (["--stream-default-data", "--max-steps", "5", "--default-curriculum", "300:2", "400:3"],
         ["stages take 5 steps, --max-steps 5", "leave steps for the full-length documents"]),
        (["--stream-default-data", "--max-steps", "5", "--default-curriculum", "100:2"],
         ["stage 100:2", "must be at least 200", "at most --block-size - 1 = 1023"]),
        (["--max-train-minutes", "0"], ["--max-train-minutes must be positive"]),
    ],
)
def test_train_rejects_bad_input_in_one_line(capsys, tmp_path, argv, fragments):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "negative.json").write_text(json.dumps({"model_type": "longnet", "hidden_size": -1}))
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "notes.txt").write_text("some text\n")
    argv = [part.format(tmp=tmp_path) for part in argv]
    line = _fail_in_process(capsys, "train", ["--output-dir", str(tmp_path / "out"), "--default-documents", "4", *argv])
    for fragment in fragments:
        assert fragment in line, line


def test_train_resume_without_checkpoint_fails_in_one_line(capsys, tmp_path):
    line = _fail_in_process(capsys, "train", ["--output-dir", str(tmp_path), *TINY_MODEL_ARGS, "--max-steps", "1", "--resume-from-checkpoint"])
    assert "no checkpoint-* folder in" in line


def test_train_offline_hub_dataset_fails_clearly(tmp_path):
    result = run_script(
        "train", "--output-dir", str(tmp_path / "out"), "--dataset", "someone/some-dataset",
        env=script_env(tmp_path / "hf", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )
    assert_clean_failure(result, "cannot load the Hub dataset 'someone/some-dataset'", "offline mode is on")


def test_evaluate_generate_push_reject_missing_inputs(capsys, tmp_path, trained_model):
    assert "model folder" in _fail_in_process(capsys, "evaluate", [str(tmp_path / "no-model")])
    assert "missing.jsonl' does not exist" in _fail_in_process(capsys, "evaluate", [str(trained_model), "--files", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)])
    assert "--batch-size must be positive" in _fail_in_process(capsys, "evaluate", [str(trained_model), "--batch-size", "0"])
    assert "model folder" in _fail_in_process(capsys, "generate", [str(tmp_path / "no-model")])
    assert "--prompt-file" in _fail_in_process(capsys, "generate", [str(trained_model), "--prompt-file", str(tmp_path / "p.txt")])
    assert "--max-new-tokens must be positive" in _fail_in_process(capsys, "generate", [str(trained_model), "--max-new-tokens", "0"])
    assert "does not exist" in _fail_in_process(capsys, "push_to_hub", [str(tmp_path / "no-model"), "--repo-id", "user/x"])


HIDE_DATASETS = """
import importlib.abc, runpy, sys

class HideDatasets(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideDatasets())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_train_without_the_datasets_package_fails_in_one_line(tmp_path):
    """As on machines that lack `datasets` (the project's GPU machines): a clear error, not a traceback."""
    result = subprocess.run(
        [sys.executable, "-c", HIDE_DATASETS, str(SCRIPTS / "train.py"), "--output-dir", str(tmp_path)],
        env=script_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300, check=False,
    )
    assert_clean_failure(result, "needs the `datasets` package: pip install datasets")


# As where `datasets` is not installed at all: importlib.util.find_spec answers None (transformers asks it).
WITHOUT_DATASETS = """
import runpy, sys

sys.modules["datasets"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_streamed_training_needs_no_datasets_package(tmp_path):
    """--stream-default-data, as on the GPU machines (no `datasets`): the contexts are made as they are read, the
    answers weighted, and the summary says so."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_DATASETS, str(SCRIPTS / "train.py"), "--output-dir", str(tmp_path / "out"),
         *TINY_MODEL_ARGS, "--stream-default-data", "--max-steps", "3", "--save-steps", "3", "--dataloader-num-workers", "1",
         "--default-task-weights", "1", "0", "0", "--answer-loss-weight", "5", "--default-max-distance", "200",
         "--default-passkey-statements", "2", "--default-curriculum", "230:2"],
        env=script_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3 and summary["data"]["streamed"]
    source = summary["data"]["source"]
    assert source["default_max_distance"] == 200 and source["default_passkey_statements"] == 2
    documents = summary["data"]["documents"]
    assert documents["train"] == "streamed" and documents["validation"] == 8
    # The first 2 steps (2 rows each) read documents of at most 230 characters: about one to a row of 256 tokens.
    [stage] = documents["curriculum"]
    assert stage["max_chars"] == 230 and stage["steps"] == 2 and 4 <= stage["documents"] <= 8
    assert summary["loss_history"][0][1] > summary["eval_loss"] + 5  # the answers' loss, weighted, is in it
    assert summary["stopped_at_time_limit"] is None and summary["max_steps"] == 3


def test_max_train_minutes_stops_then_evaluates_and_saves(tmp_path):
    """A time limit that has passed after the first step: training stops there, the model is evaluated and saved
    like a finished one, and the summary says where it stopped (the schedule was that of --max-steps)."""
    out = tmp_path / "out"
    result = run_script(
        "train", "--output-dir", str(out), *TINY_MODEL_ARGS, "--max-steps", "50", "--max-train-minutes", "1e-9",
        env=script_env(tmp_path / "hf"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = training_summary(out)
    assert summary["status"] == "completed" and summary["global_step"] == 1 and summary["max_steps"] == 50
    assert summary["stopped_at_time_limit"] == 1 and summary["eval_loss"] is not None
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert "stopped by --max-train-minutes after step 1 of 50" in result.stdout


def test_a_llama_of_the_same_sizes_trains_and_is_compared(tmp_path, trained_model):
    """--architecture llama: the dense reference, saved as a plain transformers Llama, scored beside a LongNet."""
    output = tmp_path / "llama"
    result = run_script(
        "train", "--output-dir", str(output), *TINY_MODEL_ARGS, "--architecture", "llama", "--max-steps", "2",
        "--save-steps", "2", env=script_env(tmp_path / "hf"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 32 and "segment_lengths" not in config
    assert not list(output.glob("*.py"))  # transformers' own model: no remote code
    evaluation = run_script(
        "evaluate", str(trained_model), str(output), "--labels", "LongNet", "Llama", "--documents", "4",
        "--output-dir", str(tmp_path / "evaluation"), env=script_env(tmp_path / "hf"),
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    reports = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert set(reports) == {"LongNet", "Llama"} and reports["Llama"]["segment_lengths"] is None


def test_a_failing_script_exits_non_zero_with_one_line(tmp_path):
    """The real command line: exit status 1, one error line on stderr, no traceback."""
    result = run_script("train", "--output-dir", str(tmp_path), "--preset", "no-such-preset", env=script_env(tmp_path / "hf"))
    assert result.returncode == 1
    assert_clean_failure(result, "train.py: error: unknown preset 'no-such-preset'")


# ----------------------------------------------------------------------------------------------------------
# Training, resuming, evaluating, generating
# ----------------------------------------------------------------------------------------------------------


def test_train_writes_a_complete_model_folder(trained_model):
    files = {path.name for path in trained_model.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "modeling_longnet.py",
            "configuration_longnet.py", "training_summary.json", "checkpoint-8"} <= files
    summary = training_summary(trained_model)
    assert summary["global_step"] == 8 and summary["block_size"] == 256 and summary["tokenizer"] == "byte"
    assert len(summary["loss_history"]) == 8 and math.isfinite(summary["eval_loss"])
    assert summary["data"]["source"]["kind"] == "default" and summary["data"]["source"]["default_min_distance"] == 32
    config = json.loads((trained_model / "config.json").read_text())
    assert config["vocab_size"] == 258 and config["eos_token_id"] == 256 and config["use_cache"] is True


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    """6 steps straight and 4 + 2 resumed from the step-4 checkpoint end with the same weights (a constant
    learning rate, so that the schedule does not depend on --max-steps)."""
    from safetensors.torch import load_file

    train = load_script("train").main
    common = [*TINY_MODEL_ARGS, "--default-documents", "16", "--default-validation-documents", "2", "--save-steps", "4",
              "--lr-scheduler-type", "constant", "--warmup-steps", "0"]
    assert train(["--output-dir", str(tmp_path / "straight"), *common, "--max-steps", "6"]) == 0
    assert train(["--output-dir", str(tmp_path / "resumed"), *common, "--max-steps", "4"]) == 0
    assert train(["--output-dir", str(tmp_path / "resumed"), *common, "--max-steps", "6", "--resume-from-checkpoint"]) == 0
    summary = training_summary(tmp_path / "resumed")
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["global_step"] == 6
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_sequence_parallel_training_matches_one_process(tmp_path):
    """--sequence-parallel-size 2 over two CPU processes (gloo) takes the same step as one process given both
    processes' rows: the group trains on every row the data loader hands out, none is skipped."""
    from safetensors.torch import load_file

    # 40 documents make several batches, so that the two processes get different rows
    common = [*TINY_MODEL_ARGS, "--default-validation-documents", "2", "--packing", "concat",
              "--use-cpu", "--max-steps", "1", "--warmup-steps", "0", "--lr-scheduler-type", "constant", "--save-steps", "1"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPTS / "train.py")]
    result = subprocess.run([*launch, "--output-dir", str(tmp_path / "sp"), *common, "--sequence-parallel-size", "2"],
                            env=script_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    # one process with the batch of both: the same rows in the same order
    one = [*common, "--per-device-train-batch-size", "4"]
    assert load_script("train").main(["--output-dir", str(tmp_path / "one"), *one]) == 0
    summary = training_summary(tmp_path / "sp")
    assert (summary["world_size"], summary["sequence_parallel_size"]) == (2, 2)
    assert summary["train_tokens"] == training_summary(tmp_path / "one")["train_tokens"]
    # Adam's first step hides the gradient's scale: compare the gradient norm, then the weights.
    logs = [json.loads((tmp_path / run / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0] for run in ("sp", "one")]
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-6)
    assert logs[0]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-5)
    split = load_file(tmp_path / "sp" / "model.safetensors")
    whole = load_file(tmp_path / "one" / "model.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(split[name], tensor, rtol=0, atol=1e-4, msg=name)  # steps are ~3e-3


def test_mixed_precision_training(tmp_path):
    """--precision bf16 trains under autocast (here on the CPU) and saves float32 weights."""
    train = load_script("train").main
    common = [*TINY_MODEL_ARGS, "--default-documents", "8", "--default-validation-documents", "2", "--max-steps", "2", "--use-cpu"]
    assert train(["--output-dir", str(tmp_path), *common, "--precision", "bf16"]) == 0
    summary = training_summary(tmp_path)
    assert summary["precision"] == "bf16" and all(math.isfinite(loss) for _, loss in summary["loss_history"])


def test_evaluate_writes_tables_and_plot(trained_model):
    folder = trained_model / "evaluation"
    report = EvaluationReport.load(folder / "evaluation.json")
    assert report.block_size == 256 and report.segment_lengths == [16, 64, 256]
    assert report.num_retrieval_examples > 0 and 0.0 <= report.exact_match <= 1.0
    assert sum(b.num_tokens for b in report.position_buckets) == report.num_tokens
    assert (folder / "evaluation.md").read_text() == report.to_markdown()
    assert (folder / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_reloads_without_the_package(trained_model, tmp_path):
    """generate.py in a process that cannot import modeling_longnet: the model comes from its saved code."""
    env = script_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    arguments = [str(trained_model), "--prompt", "What is the pass key? The pass key is", "--max-new-tokens", "6"]
    refused = run_script("generate", *arguments, env=env, cwd=tmp_path, isolated=True)
    assert_clean_failure(refused, "trust_remote_code")
    result = run_script("generate", *arguments, "--trust-remote-code", env=env, cwd=tmp_path, isolated=True)
    assert result.returncode == 0, result.stderr[-3000:]
    prompt = "What is the pass key? The pass key is"
    assert result.stdout.startswith(prompt) and len(result.stdout.rstrip("\n")) > len(prompt)
    assert f"model code loaded from: {tmp_path / 'modules'}" in result.stderr


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path):
    result = run_script("main", "--output-dir", str(tmp_path), "--max-steps", "10", "--eval-documents", "5", "--demo-questions", "2", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the reloaded LongNet (trust_remote_code, isolated process) answered" in result.stdout
    assert "modeling_longnet importable: no" in result.stderr
    reports = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert list(reports) == ["LongNet", "local-only"]


def test_evaluate_compares_models_on_the_same_documents(trained_model, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(trained_model, twin, ignore=shutil.ignore_patterns("evaluation"))
    result = run_script(
        "evaluate", str(trained_model), str(twin), "--labels", "first", "second", "--documents", "6", "--batch-size", "4",
        "--output-dir", str(tmp_path / "comparison"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads((tmp_path / "comparison" / "evaluation.json").read_text())
    assert list(reports) == ["first", "second"]
    # The same weights on the same documents: the same numbers, every question of every document scored.
    first, second = reports.values()
    assert first["position_buckets"] == second["position_buckets"] and first["distance_buckets"] == second["distance_buckets"]
    records = generate_default_dataset(6, split="test", max_chars=255, min_distance=32)
    assert first["num_retrieval_examples"] == sum(len(r["questions"]) for r in records) > len(records)
    table = (tmp_path / "comparison" / "evaluation.md").read_text()
    assert "| positions | first | second |" in table and "| distance (tokens) | first | second |" in table
    png = tmp_path / "comparison" / "evaluation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_labels_that_do_not_name_the_models_apart(capsys, trained_model):
    line = _fail_in_process(capsys, "evaluate", [str(trained_model), str(trained_model), "--labels", "one"])
    assert "--labels names 1 model(s) but 2 were given" in line
    line = _fail_in_process(capsys, "evaluate", [str(trained_model), str(trained_model), "--labels", "a", "a"])
    assert "same label" in line


def test_generate_answers_many_prompts_as_json_lines(trained_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    items = [{"prompt": "the pass key is E2. key? ", "id": 1}, {"prompt": "The old sailor", "id": 2}]
    prompts.write_text("".join(json.dumps(item) + "\n" for item in items))
    result = run_script("generate", str(trained_model), "--prompts-jsonl", str(prompts), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [{k: a[k] for k in ("prompt", "id")} for a in answers] == items
    # greedy decoding: the same continuation as a single --prompt run
    single = run_script("generate", str(trained_model), "--prompt", items[1]["prompt"], "--max-new-tokens", "4", "--no-prompt-echo")
    assert single.returncode == 0, single.stderr[-3000:]
    assert answers[1]["generated"] == single.stdout.rstrip("\n")


def test_generate_refuses_bad_prompt_lines(capsys, trained_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    assert "--prompts-jsonl line 2: not JSON" in _fail_in_process(capsys, "generate", [str(trained_model), "--prompts-jsonl", str(bad)])
    bad.write_text('{"text": "no prompt field"}\n')
    assert "line 1: needs an object with a non-empty string 'prompt'" in _fail_in_process(capsys, "generate", [str(trained_model), "--prompts-jsonl", str(bad)])


def test_answer_token_loss_is_the_mean_over_the_marked_tokens():
    answer_token_loss = load_script("train").answer_token_loss
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[1, 2] = -100
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, 3] = mask[1, 5] = mask[1, 2] = mask[0, 0] = 1  # (1, 2) has no label and (0, 0) no prediction: neither counts
    expected = (
        torch.nn.functional.cross_entropy(logits[0, 2], labels[0, 3]) + torch.nn.functional.cross_entropy(logits[1, 4], labels[1, 5])
    ) / 2
    assert torch.allclose(answer_token_loss(logits, labels, mask), expected)
    assert answer_token_loss(logits, labels, torch.zeros_like(mask)) == 0


def test_answer_weighted_training_runs_and_keeps_validation_plain(tmp_path):
    result = run_script(
        "train", "--output-dir", str(tmp_path), *TINY_MODEL_ARGS, "--max-steps", "2", "--save-steps", "2",
        "--default-task-weights", "1", "0", "0", "--answer-loss-weight", "5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["source"]["default_task_weights"] == [1.0, 0.0, 0.0]
    # the weighted training loss adds 5 x the answers' loss (about log 26 or log 10 each, untrained) to the plain one
    assert summary["loss_history"][0][1] > summary["eval_loss"] + 5


# ----------------------------------------------------------------------------------------------------------
# Metrics, against direct computations
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), positions=st.integers(2, 40), seed=st.integers(0, 2**16), buckets=st.integers(1, 6))
def test_perplexity_by_position_matches_a_direct_count(rows, positions, seed, buckets):
    generator = torch.Generator().manual_seed(seed)
    nll = torch.rand(rows, positions, generator=generator) * 5
    mask = torch.rand(rows, positions, generator=generator) > 0.3
    edges = sorted(random.Random(seed).sample(range(1, positions), min(buckets, positions - 1)))
    edges = [0, *edges, positions]
    result = perplexity_by_position(nll, mask, edges)
    expected = []
    for start, end in pairwise(edges):
        values = [float(nll[r, t]) for r in range(rows) for t in range(start, end) if mask[r, t]]
        if values:
            expected.append((start, end, len(values), sum(values) / len(values)))
    assert [(b.start, b.end, b.num_tokens) for b in result] == [e[:3] for e in expected]
    for bucket, (*_, mean) in zip(result, expected):
        assert bucket.mean_nll == pytest.approx(mean, rel=1e-9)
        assert bucket.perplexity == pytest.approx(math.exp(mean), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    results=st.lists(
        st.tuples(st.integers(0, 300), st.lists(st.booleans(), min_size=1, max_size=5)), min_size=1, max_size=30
    ),
)
def test_retrieval_accuracy_by_distance_matches_a_direct_count(results):
    records = [RetrievalResult("passkey", d, "", "", correct) for d, correct in results]
    edges = [0, 50, 100, 301]
    buckets = retrieval_accuracy_by_distance(records, edges)
    for low, high in pairwise(edges):
        members = [(d, c) for d, c in results if low <= d < high]
        bucket = next((b for b in buckets if b.low == low), None)
        if not members:
            assert bucket is None
            continue
        assert bucket.num_examples == len(members)
        assert bucket.exact_match == pytest.approx(sum(all(c) for _, c in members) / len(members))
        assert bucket.token_accuracy == pytest.approx(sum(sum(c) for _, c in members) / sum(len(c) for _, c in members))


def test_metric_arguments_are_checked():
    with pytest.raises(ValueError, match="`bucket_edges`"):
        perplexity_by_position(torch.zeros(1, 4), torch.ones(1, 4), [0, 0, 4])
    with pytest.raises(ValueError, match="`nll` and `mask`"):
        perplexity_by_position(torch.zeros(1, 4), torch.ones(1, 5), [0, 4])
    with pytest.raises(ValueError, match="`edges`"):
        retrieval_accuracy_by_distance([], [5])


def test_distance_edges_follow_the_segments():
    assert distance_edges([40, 300], [16, 64, 256, 1024]) == [0, 16, 64, 256, 301]
    assert distance_edges([40, 300]) == [0, 64, 128, 256, 301]


def _tiny_model():
    from modeling_longnet import LongNetConfig, LongNetForCausalLM

    torch.manual_seed(0)
    config = LongNetConfig.from_preset("tiny", vocab_size=258, pad_token_id=257, eos_token_id=256, bos_token_id=256)
    return LongNetForCausalLM(config).eval()


def test_token_nll_matches_the_model_loss():
    model = _tiny_model()
    input_ids = torch.randint(0, 256, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0  # right padding
    attention_mask[2, 7:] = 0
    nll, mask = token_negative_log_likelihoods(model, input_ids, attention_mask)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert int(mask.sum()) == 19 + 14 + 6
    torch.testing.assert_close(nll[mask].mean(), loss, rtol=1e-5, atol=1e-6)


class _Oracle(torch.nn.Module):
    """A stand-in model whose logits put all mass on the true next token (or, wrong=True, on another one)."""

    def __init__(self, vocab_size: int, wrong: bool = False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.wrong = vocab_size, wrong

    def forward(self, input_ids, attention_mask=None):
        following = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            following = (following + 1) % self.vocab_size
        logits = torch.nn.functional.one_hot(following, self.vocab_size).float() * 10
        return type("Output", (), {"logits": logits})()


def test_retrieval_scoring_with_an_oracle():
    tokenizer = byte_level_tokenizer()
    records = [r for r in generate_default_dataset(12, split="test", max_chars=700, min_distance=64) if is_retrieval_record(r)]
    for record in records:
        _, evidence, answer = locate_answer(tokenizer, record)
        # One byte per ASCII character: token indices are character offsets.
        assert (evidence, answer) == (record["evidence_start"], list(range(record["answer_start"], record["answer_end"])))
    right = score_retrieval(_Oracle(258), tokenizer, records, batch_size=3)
    assert [r.distance for r in right] == [r["answer_start"] - r["evidence_start"] for r in records]
    assert all(r.exact_match and r.predicted == r.expected for r in right)
    wrong = score_retrieval(_Oracle(258, wrong=True), tokenizer, records, batch_size=3)
    assert not any(any(r.correct_tokens) for r in wrong)


def test_report_round_trip_and_plot(tmp_path):
    report = EvaluationReport(
        perplexity=3.5, num_tokens=100, position_buckets=[PositionBucket(0, 8, 60, 1.2, math.exp(1.2)), PositionBucket(8, 16, 40, 1.3, math.exp(1.3))],
        distance_buckets=[DistanceBucket(16, 64, 3, 1 / 3, 0.5)], exact_match=1 / 3, num_retrieval_examples=3,
        block_size=16, segment_lengths=[4, 8, 16], metadata={"documents": 5},
    )
    assert EvaluationReport.load(report.save(tmp_path / "report.json")) == report
    assert "| 16-63 | 3 | 33.3% | 50.0% |" in report.to_markdown()
    png = plot_report(report, tmp_path / "report.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_decoding_benchmark_times_each_cache_and_its_variants_agree(tmp_path):
    """scripts/benchmark_decode.py on the CPU (tiny model, float32): a row per variant, the same tokens from each
    cache, eager and compiled, past the static cache's ring (16 slots)."""
    out = tmp_path / "decode.json"
    argv = ["--preset", "tiny", "--attn", "torch", "--dtype", "float32", "--contexts", "40", "--new-tokens", "4",
            "--compile-backend", "aot_eager", "--llama-max-context", "0", "--json", str(out)]
    run = run_script("benchmark_decode", *argv, timeout=600)  # a process of its own: it sets compiler options
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    variants = {row["variant"]: row for row in result["rows"]}
    assert set(variants) == {
        "LongNet, bounded cache, eager", "LongNet, static bounded cache, eager", "LongNet, static bounded cache, compiled"
    }
    # both figures of each row: the median interval between decoding steps, eager and compiled, and the subtraction
    assert all(row["ms_per_token"] is not None and row["ms_per_token"] > 0 for row in variants.values()), variants
    assert all(row["ms_per_token_by_subtraction"] > 0 for row in variants.values()), variants
    assert result["agreement"] == [{"context": 40, "reference": "LongNet, bounded cache, eager", "differences": {}}]


def test_the_training_benchmark_times_longnet_and_its_llama_twin(tmp_path):
    """scripts/benchmark_training.py on the CPU (tiny model, float32): a step per model, finite, timed."""
    out = tmp_path / "training.json"
    argv = ["--preset", "tiny", "--attn", "torch", "--dtype", "float32", "--n", "128", "--steps", "1", "--json", str(out)]
    run = run_script("benchmark_training", *argv, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["model"] for row in rows] == ["LongNet", "Llama (SDPA)"]
    assert all(row["tokens_per_s"] > 0 for row in rows), rows
    assert "| 128 | LongNet |" in run.stdout


def test_the_kernel_benchmark_counts_kernels_only_after_every_timing(monkeypatch):
    """scripts/benchmark.py counts each call's kernels with torch.profiler only after every timing of every method
    and length, so that no profiler session runs between two timings; a count that fails leaves its row timed."""
    benchmark = load_script("benchmark")
    args = benchmark.parse_args(["--n", "8K,16K", "--methods", "triton,floor-fa2"])
    calls = []

    def logged(name, value=None):
        return lambda *a, **k: calls.append(name) or value

    for name, value in (("time_call", 1.0), ("time_back_to_back", 1.0), ("host_time", 0.1), ("peak_memory", 1)):
        monkeypatch.setattr(benchmark, name, logged(name, value))

    def kernels_per_call(run):
        calls.append("kernels_per_call")
        if run() == ("floor-fa2", 16384, True):
            raise RuntimeError("out of memory in the profiler")
        return 7, []

    monkeypatch.setattr(benchmark, "kernels_per_call", kernels_per_call)
    monkeypatch.setattr(benchmark, "drawn_problem", lambda n, args, pattern: SimpleNamespace(n=n, tensors={}))
    monkeypatch.setattr(benchmark, "free_problem", lambda problem: None)
    monkeypatch.setattr(benchmark, "make_method", lambda name, problem, backward: lambda: (name, problem.n, backward))
    monkeypatch.setattr(benchmark.torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(benchmark.torch.cuda, "empty_cache", lambda: None)
    results = benchmark.benchmark(args, progress=lambda line: None)
    assert len(results) == 8 and calls.count("kernels_per_call") == 8
    first_count = calls.index("kernels_per_call")
    assert all(name == "kernels_per_call" for name in calls[first_count:])
    assert [row["kernels"] for row in results].count(7) == 7
    failed = [row for row in results if row["kernels"] is None]
    assert [(row["method"], row["n"], row["mode"]) for row in failed] == [("floor-fa2", 16384, "fwd+bwd")]
    assert "ms" in failed[0] and "host_ms" in failed[0]


def test_the_kernel_benchmark_tables_give_every_timing_of_each_call():
    """scripts/benchmark.py's tables (its timings need a GPU; the tables are plain): for each method and length the
    single synced call, back to back, the rate, and the host time and kernels per call; a skipped method says why."""
    benchmark = load_script("benchmark")
    args = benchmark.parse_args(["--n", "32K,1M", "--methods", "triton,cudnn", "--modes", "fwd"])
    results = [
        dict(n=32768, method="triton", mode="fwd", ms=1.3, ms_back_to_back=0.9, tflops=165.0, peak_bytes=2**30,
             host_ms=0.68, kernels=8),
        dict(n=32768, method="cudnn", mode="fwd", ms=9.59, ms_back_to_back=10.05, tflops=22.0, peak_bytes=2**29,
             host_ms=9.1, kernels=235),
        dict(n=1048576, method="triton", mode="fwd", ms=26.04, ms_back_to_back=25.01, tflops=264.0, peak_bytes=2**32,
             host_ms=0.7, kernels=12),
        dict(n=1048576, method="cudnn", mode="fwd", skipped="out of memory"),
    ]
    env = dict(card="H200", torch="2.11", triton="3.6", cuda="13.0", cudnn=91900, date="2026-12-03")
    table = benchmark.markdown_table(args, results, env, "Causal")
    assert "| 32K | 1.30 / 0.90 (165) | 9.59 / 10.05 (22) | 1.00 |" in table
    assert "| 1M | 26.04 / 25.01 (264) | - (out of memory) | 4.00 |" in table
    assert "| 32K | 0.68 / 8 | 9.10 / 235 |" in table
    assert "| 1M | 0.70 / 12 | - |" in table
