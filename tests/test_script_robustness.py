"""The scripts under failure (issue 11, items 6-8): training that stops on NaN/inf instead of saving it, checkpoints
that survive a kill during their save, resumes that say what they change, and command lines that answer at once.

The command-line checks run in processes that cannot import torch or transformers (a fake package of each comes
first on PYTHONPATH and raises): every bad argument must be refused before the slow imports.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scripts_support import SCRIPTS, TINY_MODEL_ARGS, assert_clean_failure, load_script, run_script, script_env

pytest_plugins = ["scripts_support"]  # its fixtures: trained_model, one_torch_thread (autouse)

# Small enough for a few seconds per run in this process: 16 documents, contexts of 256 tokens, 2 per step.
SMALL = [*TINY_MODEL_ARGS, "--default-documents", "16", "--default-validation-documents", "2"]
TOKENS_PER_STEP = 2 * 256  # --per-device-train-batch-size 2, --block-size 256
PROGRESS_BAR = re.compile(r"it/s|s/it|examples/s|\d%\||█")


def _train(capsys, output_dir: Path, *arguments: str) -> tuple[int, str]:
    """Runs train.py's main in this process; returns its exit status and what it wrote to stderr."""
    capsys.readouterr()
    status = load_script("train").main(["--output-dir", str(output_dir), *SMALL, *arguments])
    return status, capsys.readouterr().err


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if ".py: error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# 6. Training that cannot lie
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.transformers_versions
def test_training_stops_at_a_non_finite_step_and_saves_no_such_weights(capsys, tmp_path):
    """A learning rate of 1e30 blows the weights up within a few steps: the run exits with one error line naming
    the step and what to try, writes no model, keeps only finite checkpoints, and its summary says it failed."""
    from safetensors.torch import load_file

    status, stderr = _train(capsys, tmp_path, "--max-steps", "6", "--save-steps", "1", "--learning-rate", "1e30")
    assert status == 1
    line = _error_line(stderr)
    match = re.search(r"train\.py: error: step (\d+): the (training loss|gradient norm|weights)", line)
    assert match, line
    assert "not a finite number" in line or "no longer finite numbers" in line, line
    assert "--learning-rate (now 1e+30)" in line and "check the data and the config" in line
    step = int(match.group(1))
    assert not (tmp_path / "model.safetensors").exists()  # no finished model
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["model_saved"] is False and summary["failed_at_step"] == step
    assert "eval_loss" not in summary and "train_loss" not in summary
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints and all(int(path.name.split("-")[1]) < step for path in checkpoints)
    for path in checkpoints:
        for name, tensor in load_file(path / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (path.name, name)


def test_training_guard_checks_the_logged_loss_and_gradient_norm():
    """The callback against the Trainer's log entries: `loss` and `grad_norm` (what transformers 5.17 and 5.24
    log), a forced log before every save, no check of evaluation logs, and fp16's loss-scaler overflows let pass."""
    from transformers import TrainerControl, TrainerState

    train = load_script("train")
    args = train.parse_args(["--learning-rate", "0.1"])
    guard = train.training_guard(args, None)
    training_args = type("Args", (), {"learning_rate": 0.1, "fp16": False})()
    state, control = TrainerState(global_step=5, max_steps=10), TrainerControl()
    guard.on_train_begin(training_args, state, control)
    control.should_save = True
    assert guard.on_step_end(training_args, state, control).should_log  # a save is preceded by a checked log
    control.should_save = False
    guard.on_log(training_args, state, control, logs={"loss": 2.5, "grad_norm": 1.0, "learning_rate": 0.1})
    guard.on_log(training_args, state, control, logs={"eval_loss": math.nan})  # evaluation: not the guard's
    state.global_step = 8
    with pytest.raises(train.TrainingFailed, match=r"step 8: the training loss \(the mean of steps 6-8\) is nan"):
        guard.on_log(training_args, state, control, logs={"loss": math.nan, "grad_norm": 1.0})
    state.global_step = 9
    with pytest.raises(train.TrainingFailed, match=r"step 9: the gradient norm is inf, .*lower --learning-rate \(now 0.1\)"):
        guard.on_log(training_args, state, control, logs={"loss": 2.0, "grad_norm": math.inf})
    training_args.fp16 = True  # the loss scaler skips such a step and scales down
    guard.on_log(training_args, state, control, logs={"loss": 2.0, "grad_norm": math.inf})


# ----------------------------------------------------------------------------------------------------------
# 7. Checkpoints that survive a kill; resumes that say what they change
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory) -> Path:
    """A 3-step run (cosine schedule) with a checkpoint after every step: checkpoint-2 and checkpoint-3 are kept."""
    output_dir = tmp_path_factory.mktemp("three-steps") / "run"
    torch.set_num_threads(1)
    assert load_script("train").main(["--output-dir", str(output_dir), *SMALL, "--max-steps", "3", "--save-steps", "1"]) == 0
    assert {path.name for path in output_dir.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-3"}
    return output_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "no-trainer-state": (lambda folder: (folder / "trainer_state.json").unlink(), "it has no trainer_state.json"),
    "cut-trainer-state": (lambda folder: _truncate(folder / "trainer_state.json"), "its trainer_state.json cannot be read"),
    "cut-weights": (lambda folder: _truncate(folder / "model.safetensors"), "its model.safetensors has"),
    "no-weights": (lambda folder: (folder / "model.safetensors").unlink(), "it holds no weights"),
}


@pytest.mark.transformers_versions
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_skips_a_newest_checkpoint_whose_save_was_cut_short(capsys, tmp_path, three_step_run, damage):
    """checkpoint-3 left as a kill during its save leaves it: --resume-from-checkpoint (latest) says why it skips it
    and resumes from checkpoint-2, training the one step that is left."""
    run = _copy(three_step_run, tmp_path)
    spoil, reason = DAMAGES[damage]
    spoil(run / "checkpoint-3")
    status, stderr = _train(capsys, run, "--max-steps", "3", "--save-steps", "1", "--resume-from-checkpoint")
    assert status == 0, stderr
    assert f"train.py: warning: skipping {run / 'checkpoint-3'}: {reason}" in stderr
    assert "resuming from checkpoint-2, the newest complete checkpoint" in stderr
    assert "schedule" not in stderr  # the same --max-steps: nothing to warn about
    summary = _summary(run)
    assert summary["resumed_from"] == str(run / "checkpoint-2") and summary["global_step"] == 3
    assert summary["steps_this_run"] == 1 and summary["tokens_this_run"] == TOKENS_PER_STEP
    assert (run / "checkpoint-3" / "trainer_state.json").is_file()  # saved again, whole


def test_resume_refuses_incomplete_checkpoints_in_one_line(capsys, tmp_path, three_step_run):
    run = _copy(three_step_run, tmp_path)
    (run / "checkpoint-3" / "trainer_state.json").unlink()
    _truncate(run / "checkpoint-2" / "model.safetensors")
    status, stderr = _train(capsys, run, "--max-steps", "4", "--resume-from-checkpoint", str(run / "checkpoint-3"))
    assert status == 1 and "checkpoint-3' is not a complete checkpoint: it has no trainer_state.json" in _error_line(stderr)
    status, stderr = _train(capsys, run, "--max-steps", "4", "--resume-from-checkpoint")
    line = _error_line(stderr)
    assert status == 1 and "no complete checkpoint in" in line and "checkpoint-3: it has no" in line and "checkpoint-2: its" in line


def test_resume_with_another_max_steps_warns_and_reports_its_own_throughput(capsys, tmp_path, three_step_run):
    """A longer --max-steps under the cosine schedule does not continue the 3-step run: a warning says so. The
    summary's throughput counts the 2 steps this process trained, not the 5 of the whole run."""
    run = _copy(three_step_run, tmp_path)
    status, stderr = _train(capsys, run, "--max-steps", "3", "--resume-from-checkpoint")
    assert status == 1 and "checkpoint-3 is already at step 3; nothing is left to train" in _error_line(stderr)

    status, stderr = _train(capsys, run, "--max-steps", "5", "--save-steps", "1", "--resume-from-checkpoint")
    assert status == 0, stderr
    warning = next(line for line in stderr.splitlines() if "learning-rate schedule" in line)
    assert warning.startswith("train.py: warning: checkpoint-3 was saved by a run of --max-steps 3, and this run has --max-steps 5")
    assert "cosine learning-rate schedule restarts" in warning and "differs from an uninterrupted 5-step run" in warning
    assert re.search(r"step 4 trains with a learning rate of [0-9.e-]+, where the 3-step run had [0-9.e-]+", warning)
    summary = _summary(run)
    assert (summary["global_step"], summary["resumed_at_step"], summary["steps_this_run"]) == (5, 3, 2)
    assert summary["train_tokens"] == 5 * TOKENS_PER_STEP and summary["tokens_this_run"] == 2 * TOKENS_PER_STEP
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens_this_run"] / summary["train_seconds"])
    assert summary["status"] == "completed"


# A wrapper that runs train.py with the Trainer's optimizer save of checkpoint-3 cut in the middle: it writes a
# partial optimizer.pt, touches the marker file and waits there to be killed.
CUT_SHORT_SAVE = """
import os, pathlib, runpy, signal, sys, time
import transformers.trainer as trainer

# Ctrl-C as in a terminal: a test run started in the background (`make test &` from a script) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

original = trainer.Trainer._save_optimizer_and_scheduler

def save(self, output_dir):
    if os.path.basename(output_dir) == "checkpoint-3":
        pathlib.Path(output_dir, "optimizer.pt").write_bytes(b"partial")
        pathlib.Path(os.environ["SAVE_MARKER"]).touch()
        time.sleep(600)
    return original(self, output_dir)

trainer.Trainer._save_optimizer_and_scheduler = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_one_before(capsys, tmp_path, kill):
    """A real training process, killed while it writes checkpoint-3 (it waits there: the moment is exact), then
    resumed: the partial checkpoint-3 is skipped and the run completes from checkpoint-2."""
    marker, run, log = tmp_path / "saving", tmp_path / "run", tmp_path / "stderr.txt"
    with log.open("w") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-c", CUT_SHORT_SAVE, str(SCRIPTS / "train.py"), "--output-dir", str(run), *SMALL,
             "--max-steps", "4", "--save-steps", "1"],
            env=script_env(tmp_path / "hf", SAVE_MARKER=str(marker)), stdout=subprocess.DEVNULL, stderr=stderr_file,
        )
        try:
            deadline = time.monotonic() + 240  # a bound on a hang, not a timing assertion
            while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), f"the run never saved checkpoint-3: {log.read_text()[-3000:]}"
            process.send_signal(kill)
            try:
                process.wait(timeout=180)  # a bound on a hang: Ctrl-C ends the run at once, exit included
            except subprocess.TimeoutExpired:
                pytest.fail(f"the run did not end within 180 s of {kill.name}: {log.read_text()[-3000:]}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    stderr = log.read_text()
    if kill == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    elif kill == signal.SIGTERM:  # as Ctrl-C, with the shell's status for SIGTERM
        assert process.returncode == 143 and "Traceback" not in stderr, stderr
        assert "train.py: error: terminated (SIGTERM); nothing was saved as the model" in _error_line(stderr)
    else:  # Ctrl-C: one line, no traceback
        assert process.returncode == 130 and "Traceback" not in stderr, stderr
        assert "train.py: error: interrupted; nothing was saved as the model" in _error_line(stderr)
    assert not (run / "checkpoint-3" / "trainer_state.json").exists() and not (run / "model.safetensors").exists()

    status, stderr = _train(capsys, run, "--max-steps", "4", "--save-steps", "1", "--resume-from-checkpoint")
    assert status == 0, stderr
    assert f"skipping {run / 'checkpoint-3'}: it has no trainer_state.json" in stderr
    summary = _summary(run)
    assert summary["resumed_from"] == str(run / "checkpoint-2") and summary["global_step"] == 4
    assert summary["steps_this_run"] == 2 and (run / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------
# 8. A command line that answers fast and plainly
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_torch(tmp_path) -> dict[str, str]:
    """The environment of a process in which importing torch or transformers raises."""
    fake = tmp_path / "fake-packages"
    for name in ("torch", "transformers"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise RuntimeError('this test forbids importing {name}')\n")
    env = script_env(tmp_path / "hf-home")
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    return env


BAD_COMMAND_LINES = [
    ("train", ["--block-size", "0"], "--block-size must be positive, got 0"),
    ("train", ["--max-steps", "0"], "--max-steps must be positive (or -1"),
    ("train", ["--learning-rate", "nan"], "--learning-rate must be a positive finite number"),
    ("train", ["--validation-fraction", "1"], "--validation-fraction must be in [0, 1)"),
    ("train", ["--train-files", "{tmp}/missing.txt"], "--train-files: file '{tmp}/missing.txt' does not exist"),
    ("train", ["--config", "{tmp}/missing.json"], "--config: '{tmp}/missing.json' does not exist"),
    ("train", ["--model", "./missing-model"], "--model: folder './missing-model' does not exist"),
    ("train", ["--tokenizer", "{tmp}/missing-tokenizer"], "--tokenizer: tokenizer folder"),
    ("train", ["--model", "{tmp}", "--set", "hidden_size=64"], "with --model the saved model's config is used"),
    ("train", ["--dataset", "user/data", "--train-files", "{tmp}/missing.txt"], "either --train-files or --dataset"),
    ("train", ["--resume-from-checkpoint", "{tmp}/checkpoint-7"], "checkpoint folder '{tmp}/checkpoint-7' does not exist"),
    ("train", ["--sequence-parallel-size", "2"], "--sequence-parallel-size 2 needs a multiple of 2 processes"),
    ("evaluate", ["./outputs/missing"], "model folder './outputs/missing' does not exist"),
    ("evaluate", ["outputs/tiny/missing"], "model folder 'outputs/tiny/missing' does not exist"),
    ("evaluate", ["{tmp}", "--batch-size", "0"], "--batch-size must be positive"),
    ("evaluate", ["{tmp}", "--files", "{tmp}/missing.jsonl"], "--files: file '{tmp}/missing.jsonl' does not exist"),
    ("generate", ["~/missing-model-folder"], "model folder '~/missing-model-folder' does not exist"),
    ("generate", ["{tmp}", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    ("generate", ["{tmp}", "--prompt-file", "{tmp}/missing.txt"], "--prompt-file '{tmp}/missing.txt' does not exist"),
    ("push_to_hub", ["../missing-model", "--repo-id", "user/x"], "model folder '../missing-model' does not exist"),
    ("push_to_hub", ["{tmp}", "--repo-id", "user/x/y"], "--repo-id must be user/name or name"),
    ("push_to_hub", ["{tmp}", "--repo-id", "user/x", "--dry-run"], "--dry-run keeps nothing without --staging-dir"),
    ("convert_llama_to_longnet", ["{tmp}/missing", "{tmp}/out"], "model: no such folder"),
    ("benchmark", ["--heads", "0"], "--heads must be positive, got 0"),
    ("benchmark", ["--n", "8X"], "--n: '8X' is not a comma-separated list of sizes"),
    ("benchmark_sequence_parallel", ["--steps", "0"], "--steps must be >= 1"),
    ("benchmark_decode", ["--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
    ("benchmark_decode", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("benchmark_training", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("benchmark_training", ["--n", "32K,x"], "--n: '32K,x' is not a comma-separated list of sizes"),
    ("benchmark_sequence_parallel", ["--segment-lengths", "1K,2K", "--dilation-rates", "1"], "one entry per branch"),
]


@pytest.mark.parametrize("name, arguments, fragment", BAD_COMMAND_LINES, ids=[f"{i}-{n}" for i, (n, _, _) in enumerate(BAD_COMMAND_LINES)])
def test_bad_arguments_are_refused_before_torch_is_imported(no_torch, tmp_path, name, arguments, fragment):
    arguments = [part.format(tmp=tmp_path) for part in arguments]
    result = run_script(name, *arguments, env=no_torch, cwd=tmp_path, timeout=60)
    assert_clean_failure(result, fragment.format(tmp=tmp_path))
    assert result.returncode == (2 if name.startswith(("convert", "benchmark")) else 1)  # their argparse convention


def test_a_hub_id_that_is_nowhere_fails_at_once(no_torch, tmp_path):
    """An id of one '/' (or none) that is not a local folder may be a Hub id: one quick question to the Hub (or
    to its cache, offline), then a plain answer, before torch is imported."""
    from hub_server import serve

    offline = run_script("evaluate", "outputs/tiny", env={**no_torch, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=60)
    assert_clean_failure(offline, "model 'outputs/tiny' is not a local folder, and offline mode is on (HF_HUB_OFFLINE)")
    closed = _closed_port_url()
    unreachable = run_script("generate", "user/model", env={**no_torch, "HF_ENDPOINT": closed}, cwd=tmp_path, timeout=60)
    assert_clean_failure(unreachable, f"model 'user/model' is not a local folder, and the Hub ({closed}) cannot be reached")
    hub = serve({})
    try:
        for name in ("evaluate", "generate"):
            missing = run_script(name, "outputs/tiny", env={**no_torch, "HF_ENDPOINT": hub.url}, cwd=tmp_path, timeout=60)
            assert_clean_failure(missing, "model 'outputs/tiny' does not exist: there is no local folder of that name")
        assert "GET /api/models/outputs/tiny" in hub.requests
    finally:
        hub.shutdown()
        hub.server_close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_push_to_hub_refuses_a_folder_whose_training_failed(no_torch, tmp_path):
    (tmp_path / "training_summary.json").write_text(json.dumps({"status": "failed", "failed_at_step": 3, "error": "step 3: ..."}))
    result = run_script("push_to_hub", str(tmp_path), "--repo-id", "user/x", env=no_torch, timeout=60)
    assert_clean_failure(result, "holds no finished model: its training failed at step 3")


def _tiny_longnet_folder(folder: Path) -> Path:
    from modeling_longnet import LongNetConfig, LongNetForCausalLM

    torch.manual_seed(0)
    config = LongNetConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    LongNetForCausalLM(config).save_pretrained(folder)
    return folder


def test_convert_refuses_a_model_that_is_not_a_llama(no_torch, tmp_path):
    """A LongNet folder used to "convert" into a one-branch LongNet: the script (before torch) and the function
    name the model_type they found."""
    from modeling_longnet import convert_llama_to_longnet

    folder = _tiny_longnet_folder(tmp_path / "longnet")
    result = run_script("convert_llama_to_longnet", str(folder), str(tmp_path / "out"), env=no_torch, timeout=60)
    assert result.returncode == 2
    assert_clean_failure(result, f"'{folder}' is not a Llama model: its config.json has model_type 'longnet'")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is not a Llama model: its config.json has model_type 'longnet'"):
        convert_llama_to_longnet(folder)


def test_train_refuses_an_unknown_config_field_and_suggests_the_closest(capsys, tmp_path):
    status, stderr = _train(capsys, tmp_path, "--set", "hiden_size=64", "--max-steps", "1")
    line = _error_line(stderr)
    assert status == 1 and "'hiden_size' is not a LongNetConfig field; did you mean hidden_size" in line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any data or model
    train = load_script("train")
    train.check_config_fields({"hidden_size": 64, "rope_theta": 5e5, "segment_lengths": [8]})  # fields and aliases
    with pytest.raises(ValueError, match="did you mean dilation_rates"):
        train.check_config_fields({"dilation_rate": [1]})


def test_quiet_training_shows_no_progress_bar(capsys, tmp_path):
    """--quiet: neither the Trainer's bar, nor those of datasets (tokenizing, packing) and transformers (writing
    the model's shards)."""
    status, stderr = _train(capsys, tmp_path, "--max-steps", "1", "--save-steps", "1")
    assert status == 0, stderr
    assert not PROGRESS_BAR.search(stderr), stderr
