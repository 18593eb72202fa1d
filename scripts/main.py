#!/usr/bin/env python
"""The main job: train a tiny LongNet on the embedded default data, evaluate it, save it with its code and
tokenizer, then reload it in a fresh process that cannot import modeling_longnet (through
AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)) and generate.

Each step runs one of the scripts of scripts/ as a separate process, and the commands are printed, so that the
job doubles as a tour of them. `make main` runs it in the project's virtual environment.

Examples:
    python scripts/main.py
    python scripts/main.py --output-dir outputs/main --max-steps 600
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
PROG = "main.py"

# The model of the main job: the `tiny` preset widened a little, with segments of 64, 256 and 1024 tokens (rates
# 1, 2, 4) over contexts of 1024 byte-level tokens. The retrieval evidence of the default data then lies at least
# 128 tokens (twice the smallest segment) before the answer: beyond the smallest segment.
MODEL_OVERRIDES = (
    "hidden_size=64", "intermediate_size=192", "num_attention_heads=4", "num_key_value_heads=4",
    "segment_lengths=[64,256,1024]", "dilation_rates=[1,2,4]", "max_position_embeddings=1024",
)

# Runs a script in a process that cannot import modeling_longnet, whatever is installed (an editable install,
# PYTHONPATH): python -I ignores PYTHON* variables, the user site and the current folder, and this finder,
# placed first, refuses the package itself. The model then can only come from the code saved beside its weights.
ISOLATED_RUNNER = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_longnet" or name.startswith("modeling_longnet."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden from this process)", name=name)
            return None

    sys.meta_path.insert(0, HidePackage())
    script, *arguments = sys.argv[1:]
    sys.argv = [script, *arguments]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        remote = sorted(m.__file__ for n, m in list(sys.modules.items()) if n.startswith("transformers_modules.") and n.endswith(".modeling_longnet"))
        print("[isolated process] modeling_longnet importable: no; model code loaded from: " + (", ".join(remote) or "nothing"), file=sys.stderr)
    """
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "main"), help="where the model and the evaluation go (replaced)")
    parser.add_argument("--max-steps", type=int, default=200, help="training steps (8 contexts of 1024 tokens each)")
    parser.add_argument("--documents", type=int, default=3000, help="training documents of the embedded dataset")
    parser.add_argument("--eval-documents", type=int, default=150, help="documents evaluate.py scores")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")
    return parser


def child_environment() -> dict[str, str]:
    """The scripts import modeling_longnet from this checkout, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _printable(command: list[str]) -> str:
    parts = []
    for part in command:
        if part == ISOLATED_RUNNER:
            parts.append("<code that hides modeling_longnet, then runs:>")
        elif part.startswith(str(REPO_ROOT)):
            parts.append(shlex.quote(os.path.relpath(part, REPO_ROOT)))
        else:
            parts.append(shlex.quote(part))
    return " ".join(parts)


def run_step(title: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print(f"\n=== {title}\n$ {_printable(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, check=False, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{PROG}: error: {title} failed (exit code {result.returncode})")
    STEP_SECONDS[title.split(" ", 1)[1]] = time.perf_counter() - start
    return result


STEP_SECONDS: dict[str, float] = {}


def isolated_command(script: Path, arguments: list[str]) -> list[str]:
    """The command that runs ``script`` in a fresh interpreter that cannot import modeling_longnet."""
    return [sys.executable, "-I", "-c", ISOLATED_RUNNER, str(script), *arguments]


def passkey_prompt(seed: int, max_chars: int, min_distance: int) -> tuple[str, str, int]:
    """A held-out pass-key document cut just before its answer: (prompt, expected answer, distance in chars)."""
    sys.path.insert(0, str(REPO_ROOT))
    from modeling_longnet.data import generate_default_dataset

    index = 0
    while True:
        record = generate_default_dataset(index + 1, split="demo", seed=seed, max_chars=max_chars, min_distance=min_distance)[index]
        if record["task"] == "passkey":
            text = record["text"]
            answer = text[record["answer_start"] : record["answer_end"]]
            return text[: record["answer_start"]], answer, record["answer_start"] - record["evidence_start"]
        index += 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    env = child_environment()
    model_dir = Path(args.output_dir) / "model"
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    print(f"{PROG}: python {sys.version.split()[0]}, {os.cpu_count()} CPU cores; output in {args.output_dir}", flush=True)

    overrides = [item for override in MODEL_OVERRIDES for item in ("--set", override)]
    run_step(
        "1/3 Train a tiny LongNet on the embedded default dataset",
        [sys.executable, str(SCRIPTS / "train.py"), "--output-dir", str(model_dir), "--preset", "tiny", *overrides,
         "--tokenizer", "byte", "--block-size", "1024", "--default-documents", str(args.documents),
         "--default-validation-documents", "40", "--max-steps", str(args.max_steps), "--per-device-train-batch-size", "8",
         "--learning-rate", str(args.learning_rate), "--warmup-steps", "0.05", "--logging-steps", "20",
         "--save-steps", str(args.max_steps), "--save-total-limit", "1", "--seed", str(args.seed)],
        env=env,
    )
    summary = json.loads((model_dir / "training_summary.json").read_text())
    losses = [loss for _, loss in summary["loss_history"]]
    tail = sum(losses[-3:]) / len(losses[-3:])
    print(f"\n{PROG}: training loss {losses[0]:.3f} -> {tail:.3f} (mean of the last 3 logs)", flush=True)
    if not tail < losses[0]:
        raise SystemExit(f"{PROG}: error: the training loss did not go down ({losses[0]:.3f} -> {tail:.3f})")

    run_step(
        "2/3 Evaluate: perplexity by position, retrieval accuracy by distance",
        [sys.executable, str(SCRIPTS / "evaluate.py"), str(model_dir), "--documents", str(args.eval_documents)],
        env=env,
    )

    source = summary["data"]["source"]
    prompt, answer, distance = passkey_prompt(args.seed, source["default_max_chars"], source["default_min_distance"])
    with tempfile.TemporaryDirectory(prefix="longnet-reload-") as scratch:
        prompt_file = Path(scratch, "prompt.txt")
        prompt_file.write_text(prompt)
        # A fresh module cache: the model code is copied from the saved folder, not found from an earlier run.
        isolated_env = {**os.environ, "HF_MODULES_CACHE": str(Path(scratch, "modules")), "TOKENIZERS_PARALLELISM": "false"}
        isolated_env.pop("PYTHONPATH", None)
        print(f"\n(prompt: a held-out pass-key document of {len(prompt)} characters, the key {distance} characters "
              f"before its end; it ends with ...{prompt[-60:]!r})", flush=True)
        result = run_step(
            "3/3 Reload in a fresh process that cannot import modeling_longnet, and generate",
            isolated_command(
                SCRIPTS / "generate.py",
                [str(model_dir.resolve()), "--trust-remote-code", "--prompt-file", str(prompt_file), "--max-new-tokens", "8", "--no-prompt-echo"],
            ),
            cwd=scratch, env=isolated_env, stdout=subprocess.PIPE, text=True,
        )
    generated = result.stdout
    print(generated, flush=True)
    evaluation = json.loads((model_dir / "evaluation" / "evaluation.json").read_text())
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    print("\nMain job summary")
    print(f"  training       {summary['global_step']} steps, loss {losses[0]:.3f} -> {tail:.3f}, validation perplexity {summary['eval_perplexity']:.3f}")
    exact = evaluation["exact_match"]
    print(f"  evaluation     perplexity {evaluation['perplexity']:.3f}; retrieval exact match {exact:.1%} over {evaluation['num_retrieval_examples']} records"
          if exact is not None else f"  evaluation     perplexity {evaluation['perplexity']:.3f}")
    print(f"  saved          {model_dir} (weights, model code, tokenizer; evaluation/ holds the table and plot)")
    print(f"  generation     reloaded with trust_remote_code in an isolated process: {generated.strip()!r} (pass key {answer}: "
          f"{'found' if generated.strip().startswith(answer) else 'not found'})")
    steps = ", ".join(f"{title.split(' ')[0].split(':')[0].lower()} {elapsed:.0f} s" for title, elapsed in STEP_SECONDS.items())
    print(f"  wall time      {int(minutes)}m{seconds:04.1f}s ({steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
