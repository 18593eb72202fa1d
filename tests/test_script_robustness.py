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


# Bad command lines found by the audit of the scripts (items 10-42): each is refused in one line that names the
# flag and the fix, before torch and transformers are imported where the check needs neither.
REFUSED_BEFORE_IMPORTS = [
    # 10, 11: an output folder that is a file (save_pretrained wrote nothing, and the script said "wrote"), or the
    # Llama checkpoint's own folder (overwritten)
    ("convert_llama_to_longnet", ["{tmp}/llama", "{tmp}/notes.txt"], ["output_dir: '{tmp}/notes.txt' is a file", "give a folder"]),
    ("convert_llama_to_longnet", ["{tmp}/llama", "{tmp}/notes.txt/out"], ["output_dir:", "lies inside the file", "give a folder"]),
    ("convert_llama_to_longnet", ["{tmp}/llama", "{tmp}/llama/"],
     ["output_dir: '{tmp}/llama/' is the Llama checkpoint's own folder", "give another folder"]),
    # 12: sampling options without --do-sample (greedy decoding ignored them)
    ("generate", ["{tmp}", "--temperature", "0.5"], ["--temperature applies only with --do-sample", "add it, or drop it"]),
    ("generate", ["{tmp}", "--top-k", "5", "--top-p", "0.9"], ["--top-k and --top-p apply only with --do-sample", "add it, or drop them"]),
    # 13: check cases that do not exist (every case was skipped, and the check passed)
    ("benchmark", ["--check", "--check-cases", "zzz"], ["--check-cases: unknown case 'zzz'", "indices 0 to 9 and/or dropout, logits"]),
    ("benchmark", ["--check", "--check-cases", "0,10"], ["--check-cases: unknown case '10'", "indices 0 to 9"]),
    ("benchmark", ["--check-cases", "0"], ["--check-cases applies only with --check", "add it"]),
    # 14: an empty table, or an error in every row, and exit status 0
    ("benchmark_decode", ["--variants", "bogus"], ["--variants: unknown variant 'bogus'", "from: LongNet, bounded cache, eager;"]),
    ("benchmark_decode", ["--variants", "Llama, StaticCache, eager", "--llama-max-context", "0"],
     ["--variants: Llama, StaticCache, eager run only at contexts up to --llama-max-context (0)", "raise --llama-max-context"]),
    ("benchmark_decode", ["--contexts", "0"], ["--contexts: every length must be positive"]),
    ("benchmark", ["--n", "8K,0"], ["--n: every length must be positive"]),
    ("benchmark_training", ["--n", "x"], ["--n: 'x' is not a comma-separated list of sizes (e.g. 32K,128K,1M)"]),
    ("benchmark_decode", ["--prefill-chunk", "-1"], ["--prefill-chunk must be at least 1, got -1"]),
    # 15: main.py deletes sub-folders of its output folder: only in one it made
    ("main", ["--output-dir", "{tmp}/busy"],
     ["--output-dir: '{tmp}/busy' already holds files main.py did not write (notes.txt)", "give a new or empty folder"]),
    # 36: an output folder that is a file (FileExistsError after the work)
    ("train", ["--output-dir", "{tmp}/notes.txt"], ["--output-dir: '{tmp}/notes.txt' is a file", "give a folder"]),
    ("evaluate", ["{tmp}", "--output-dir", "{tmp}/notes.txt"], ["--output-dir: '{tmp}/notes.txt' is a file", "give a folder"]),
    ("main", ["--output-dir", "{tmp}/notes.txt"], ["--output-dir: '{tmp}/notes.txt' is a file", "give a folder"]),
    # 37: a --device that is no torch device string (the type and the machine are checked once torch is imported)
    ("generate", ["{tmp}", "--device", "cuda:x"], ["--device cuda:x is not a torch device", "(cpu, cuda, cuda:1, ...)"]),
    ("evaluate", ["{tmp}", "--device", "gpu 0"], ["--device gpu 0 is not a torch device", "(cpu, cuda, cuda:1, ...)"]),
    # 38: presets and attention functions that do not exist, answered after the imports (or with a traceback)
    ("train", ["--preset", "bogus"], ["unknown preset 'bogus': --preset takes one of", "tiny"]),
    ("train", ["--attn-implementation", "sdpa"],
     ["--attn-implementation 'sdpa' is not a LongNet attention", "choose one of auto, torch, triton, cudnn, flash, eager"]),
    ("benchmark_decode", ["--preset", "bogus"], ["unknown preset 'bogus': --preset takes one of", "tiny"]),
    ("benchmark_decode", ["--attn", "bogus"], ["--attn 'bogus' is not a LongNet attention", "choose one of auto,"]),
    ("benchmark_decode", ["--contexts", "x"], ["--contexts: 'x' is not a comma-separated list of sizes", "(e.g. 4K,64K,1M)"]),
    ("benchmark_training", ["--preset", "bogus"], ["unknown preset 'bogus': --preset takes one of", "tiny"]),
    ("benchmark_training", ["--attn", "bogus"], ["--attn 'bogus' is not a LongNet attention", "choose one of auto,"]),
    # 39, 40: a staging folder that is a file (the flag was not named); a repository id the Hub refuses
    ("push_to_hub", ["{tmp}", "--repo-id", "user/x", "--staging-dir", "{tmp}/notes.txt"],
     ["--staging-dir: '{tmp}/notes.txt' is a file", "give a folder"]),
    ("push_to_hub", ["{tmp}", "--repo-id", "u/x y!", "--dry-run", "--staging-dir", "{tmp}/stage"],
     ["--repo-id 'u/x y!' is not a valid Hub repository id", "must use alphanumeric chars, '-', '_' or '.'"]),
    # 41: launch configurations parsed only after CUDA was set up (a TypeError); result files in missing folders
    ("benchmark", ["--forward-config", "1,2"],
     ["--forward-config: '1,2' has 2 values", "block_m,block_n,num_warps,num_stages[", "takes 4 to 7"]),
    ("benchmark", ["--backward-config", "128,32,64,64,4,3,1,1,fast"],
     ["--backward-config:", "dq_mode must be one of recompute, atomic, tma-atomic, got 'fast'"]),
    ("benchmark", ["--forward-configs", "64,64,4,3;64,64,4,x"],
     ["--forward-configs: '64,64,4,x': num_stages must be a positive integer, got 'x'"]),
    ("benchmark", ["--json", "{tmp}/missing/results.json"], ["--json: the folder of '{tmp}/missing/results.json'", "does not exist; create it"]),
    ("benchmark", ["--plot", "{tmp}"], ["--plot: '{tmp}' is a folder; give a file name"]),
    ("benchmark_decode", ["--markdown", "{tmp}/missing/table.md"], ["--markdown: the folder of", "does not exist; create it"]),
    # 42: head counts that do not divide (a ValueError on every rank, after the process group started)
    ("benchmark_sequence_parallel", ["--heads", "4", "--kv-heads", "3"], ["--heads 4 must be a multiple of --kv-heads 3"]),
    ("benchmark_sequence_parallel", ["--hidden-size", "30", "--heads", "4"], ["--hidden-size 30 must be a multiple of --heads 4"]),
    ("benchmark_sequence_parallel", ["--hidden-size", "36", "--heads", "4"],
     ["--hidden-size 36 / --heads 4 = 9 dimensions per head", "change --hidden-size or --heads"]),
]


@pytest.mark.parametrize(
    "name, arguments, fragments", REFUSED_BEFORE_IMPORTS,
    ids=[f"{i}-{n}-{a[-2] if len(a) > 1 else a[0]}" for i, (n, a, _) in enumerate(REFUSED_BEFORE_IMPORTS)],
)
def test_audited_bad_arguments_are_refused_before_torch_is_imported(no_torch, tmp_path, name, arguments, fragments):
    (tmp_path / "notes.txt").write_text("not a folder\n")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("someone else's\n")
    result = run_script(name, *(part.format(tmp=tmp_path) for part in arguments), env=no_torch, cwd=tmp_path, timeout=60)
    assert_clean_failure(result, *(fragment.format(tmp=tmp_path) for fragment in fragments))
    assert result.returncode == (2 if name.startswith(("convert", "benchmark", "main")) else 1)  # their argparse convention
    assert not (tmp_path / "stage").exists() and not (tmp_path / "llama" / "model.safetensors").exists()


# Checks that need the imported library (its names differ between versions, or the machine decides): in this
# process, where torch and transformers are imported already.
REFUSED_AFTER_IMPORTS = [
    # 35: names the Trainer refused with a traceback, after the data and the model were made
    ("train", ["--lr-scheduler-type", "bogus"],
     ["--lr-scheduler-type 'bogus' is not a transformers scheduler", "choose one of linear, cosine,"]),
    ("train", ["--report-to", "bogus"],
     ["--report-to 'bogus' is not a tracker transformers knows", "choose one of none, all,", "tensorboard"]),
    # 37: a device torch does not know, or that this machine does not have (torch tracebacks)
    ("generate", ["{tmp}", "--device", "bogus"], ["--device bogus is not a torch device", "(cpu, cuda, cuda:1, ...)"]),
    ("evaluate", ["{tmp}", "--device", "bogus"], ["--device bogus is not a torch device", "(cpu, cuda, cuda:1, ...)"]),
    pytest.param("generate", ["{tmp}", "--device", "cuda"], ["--device cuda: no CUDA GPU here; use --device cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    pytest.param("evaluate", ["{tmp}", "--device", "cuda"], ["--device cuda: no CUDA GPU here; use --device cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    # 14: a torch.compile backend that does not exist (an error in every compiled row, exit status 0)
    ("benchmark_decode", ["--compile-backend", "bogus"],
     ["--compile-backend 'bogus' is not a torch.compile backend", "choose one of", "aot_eager", "inductor"]),
]


@pytest.mark.parametrize("name, arguments, fragments", REFUSED_AFTER_IMPORTS)
def test_audited_bad_arguments_are_refused_once_torch_is_imported(capsys, monkeypatch, tmp_path, name, arguments, fragments):
    """Refused right after the import, before any data, model or compilation: in one line, as parse_args' errors."""
    monkeypatch.syspath_prepend(str(SCRIPTS))  # benchmark_decode imports benchmark_support beside it
    script = load_script(name)
    if name == "train":
        arguments = ["--output-dir", str(tmp_path / "out"), *arguments]
    capsys.readouterr()
    status = script.main([part.format(tmp=tmp_path) for part in arguments])
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"{name}.py: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert status == (2 if name.startswith("benchmark") else 1)
    assert not (tmp_path / "out").exists()  # train.py: refused before the data and the model


def test_main_writes_only_into_a_folder_of_its_own(tmp_path):
    """main.py replaces the sub-folders of its --output-dir: it takes a new or empty folder, one it marked, or one
    that holds only what main.py writes (a run from before the marker); never another (item 15)."""
    main = load_script("main")

    def accepted(folder: Path) -> bool:
        return main.output_dir_problem(str(folder)) is None

    assert accepted(tmp_path / "new" / "run") and accepted(tmp_path)  # to be made; empty
    earlier = tmp_path / "earlier"
    for part in ("longnet", "local", "evaluation"):
        (earlier / part).mkdir(parents=True)
        (earlier / part / "weights").write_text("old")
    (earlier / "local-training.log").write_text("log")
    assert accepted(earlier)
    main.prepare_output_dir(earlier)
    assert (earlier / main.OUTPUT_MARKER).is_file() and not (earlier / "longnet").exists()
    (earlier / "notes.txt").write_text("the user's, beside main.py's outputs")
    assert accepted(earlier)  # marked as main.py's
    assert "already holds files main.py did not write (earlier)" in main.output_dir_problem(str(tmp_path))
    home = main.output_dir_problem(str(Path.home()))
    assert home is None or "already holds files main.py did not write" in home  # an empty home in some sandboxes


def test_the_names_checked_before_the_imports_are_those_of_the_package():
    """The attention functions, presets, launch-configuration fields and data defaults that the scripts name without
    importing modeling_longnet are the package's own; train.py's --help lists the attention functions (cudnn was
    missing)."""
    import dataclasses

    from modeling_longnet import LongNetConfig
    from modeling_longnet import dilated_attention_triton as kernels
    from modeling_longnet.modeling_longnet import DilatedAttentionInterface

    cli_support = load_script("cli_support")
    # sequence_parallel registers sequence_parallel_<backend>_<n> functions at run time
    built_in = {name for name in DilatedAttentionInterface._global_mapping if not name.startswith("sequence_parallel_")}
    assert set(cli_support.LONGNET_ATTENTIONS) == built_in
    assert cli_support.preset_names() == LongNetConfig.available_presets()
    help_text = " ".join(load_script("train").build_parser().format_help().split())
    assert "LongNet attention function: auto, torch, triton, cudnn, flash, eager" in help_text
    from modeling_longnet.data import DEFAULT_TASK_WEIGHTS

    assert tuple(load_script("train").build_parser().get_default("default_task_weights")) == DEFAULT_TASK_WEIGHTS

    benchmark = load_script("benchmark")
    for fields, config in ((benchmark.FORWARD_CONFIG_FIELDS, kernels.ForwardConfig),
                           (benchmark.BACKWARD_CONFIG_FIELDS, kernels.BackwardConfig)):
        assert [name for name, _ in fields] == [field.name for field in dataclasses.fields(config)]
    assert benchmark.DQ_MODES == kernels.DQ_MODES
    forward = kernels.ForwardConfig(128, 64, 8, 2, True, 2, True)
    backward = kernels.BackwardConfig(128, 32, 64, 64, 4, 3, False, True, "tma-atomic", 2, True)
    assert benchmark.forward_config_from(benchmark.config_text(forward)) == forward  # what --sweep prints, taken back
    assert benchmark.backward_config_from(benchmark.config_text(backward)) == backward
    assert benchmark.forward_config_from("64,64,4,3") == kernels.ForwardConfig(64, 64, 4, 3)
