"""Shared helpers of the script tests: loading the scripts as modules, running them as processes (also in a
process that cannot import modeling_longnet), and one tiny model trained by scripts/train.py, shared by every
pytest-xdist worker of a session."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"

# A model small enough to train in seconds on two cores, with segments (16, 64, 256) over contexts of 256
# byte-level tokens, trained on a few dozen documents of the embedded dataset.
TINY_MODEL_ARGS = [
    "--preset", "tiny", "--set", "num_key_value_heads=4", "--set", "segment_lengths=[16,64,256]",
    "--set", "dilation_rates=[1,2,4]", "--set", "max_position_embeddings=256", "--tokenizer", "byte",
    "--block-size", "256", "--default-documents", "40", "--default-validation-documents", "8",
"--per-device-train-batch-size", "2", "--per-device-eval-batch-size", "2",
    "--learning-rate", "3e-3", "--logging-steps", "1", "--quiet", "--seed", "0",
]


@cache
def load_script(name: str):
    """``scripts/<name>.py`` as a module (its ``main(argv)`` and helpers), without running it."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in it look their module up there
    spec.loader.exec_module(module)
    return module


def script_env(hf_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a script process: this checkout importable, no Xet, quiet tokenizers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # One thread per process: tests run two at a time on two cores, and oversubscribed OpenMP threads spin-wait.
    env.update(HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    env.update(extra)
    return env


def run_script(name: str, *arguments: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               isolated: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``scripts/<name>.py``; with ``isolated``, in an interpreter that cannot import modeling_longnet (the
    runner of scripts/main.py)."""
    script = SCRIPTS / f"{name}.py"
    command = load_script("main").isolated_command(script, list(arguments)) if isolated else [sys.executable, str(script), *arguments]
    return subprocess.run(command, env=env if env is not None else script_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def assert_clean_failure(result, *fragments: str) -> None:
    """A failed run with one line ``<script>.py: error: ...`` on stderr holding every fragment, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ".py: error: " in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _train_tiny_model(output_dir: Path, hf_home: Path) -> None:
    result = run_script(
        "train", "--output-dir", str(output_dir), *TINY_MODEL_ARGS, "--max-steps", "8", "--save-steps", "8",
        env=script_env(hf_home),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    evaluation = run_script("evaluate", str(output_dir), "--documents", "12", "--batch-size", "4", env=script_env(hf_home))
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run two at a time on two cores (pytest -n 2): one thread each avoids oversubscription, which makes
    OpenMP's spinning threads several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A tiny LongNet trained (8 steps) and evaluated by the scripts, once per session across xdist workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist each worker has its own base folder inside the session's: share the session's.
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    output_dir = shared / "tiny-longnet"
    with FileLock(str(shared / "tiny-longnet.lock")):
        if not (output_dir / "training_summary.json").is_file():
            _train_tiny_model(output_dir, shared / "hf-home")
    return output_dir


def training_summary(model_dir: Path) -> dict:
    return json.loads((model_dir / "training_summary.json").read_text())
