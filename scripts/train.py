#!/usr/bin/env python
"""Train or fine-tune a LongNet causal language model with the transformers Trainer.

Data: local text / JSON lines / parquet files, a Hub dataset, or (by default) the embedded synthetic dataset of
modeling_longnet.data (pass-key and key-value retrieval over long distances, plus ordinary sentences), packed into
contexts of --block-size tokens. The model comes from a preset of configuration/ (--preset), a config file
(--config) or a saved model (--model, to fine-tune); the tokenizer is byte-level by default (nothing to download;
saved with the model). The output folder holds the model with its code (loadable with trust_remote_code=True),
the tokenizer, checkpoints, and training_summary.json.

Examples:
    python scripts/train.py --output-dir outputs/tiny --max-steps 200
    python scripts/train.py --train-files corpus.jsonl --tokenizer bpe --vocab-size 8192 --preset tiny \\
        --set hidden_size=256 --set num_hidden_layers=4 --block-size 4096 --precision bf16
    accelerate launch --config_file configuration/accelerate_ddp.yaml scripts/train.py --output-dir outputs/ddp
    python scripts/train.py --output-dir outputs/tiny --max-steps 200 --resume-from-checkpoint

--resume-from-checkpoint (no value) continues from the newest complete checkpoint-N of --output-dir; one whose save
was cut short (a kill) is skipped, with a warning. Give it the --max-steps of the interrupted run: another value
rebuilds the learning-rate schedule (cosine by default) over the new length, so the result differs from an
uninterrupted run of that length (a warning says so). A loss, gradient norm or weights that stop being finite end
the run with an error at that step; nothing of it is saved as the model.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import math
import os
import re
import signal
import struct
import sys
import time
from pathlib import Path

if importlib.util.find_spec("modeling_longnet") is None:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROG = "train.py"

# the shared checks beside this script (a run through runpy, as in main.py's isolated process, does not put
# the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import (  # noqa: E402
    LONGNET_ATTENTIONS, check_output_folder, looks_like_local_path, one_line, unknown_attention_message,
    unknown_preset_message,
)
SUMMARY_FILE = "training_summary.json"
TRAINER_STATE_FILE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint folder
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Names LongNetConfig takes besides its fields: transformers folds them into `rope_parameters`.
CONFIG_ALIASES = ("rope_theta", "rope_scaling")
# Learning-rate schedules whose value at a step does not depend on the total number of steps.
SCHEDULES_WITHOUT_LENGTH = ("constant", "reduce_lr_on_plateau")


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny", help="name of a preset configuration in configuration/ (default: tiny)")
    model.add_argument("--config", help="a LongNet config.json (or a folder holding one); replaces --preset")
    model.add_argument("--model", help="a saved LongNet (folder or Hub id) to fine-tune; replaces --preset and --config")
    model.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="override a config field (VALUE is JSON, else a string), e.g. --set hidden_size=64 "
        "--set 'segment_lengths=[64,256,1024]'; repeatable",
    )
    model.add_argument(
        "--attn-implementation", default=None,
        help=f"LongNet attention function: {', '.join(LONGNET_ATTENTIONS)} (default: auto); with --architecture llama, "
        "a transformers attention (default: sdpa)",
    )
    model.add_argument(
        "--architecture", choices=("longnet", "llama"), default="longnet",
        help="longnet (default), or llama: transformers' LlamaForCausalLM of the same sizes (hidden, layers, heads, "
        "MLP, rotary; the config's segment lengths are not used), with SDPA attention over each whole context: the "
        "dense-attention reference to compare a LongNet with",
    )
    model.add_argument(
        "--sequence-parallel-size", type=int, default=1,
        help="split each sequence over this many processes (modeling_longnet.sequence_parallel; needs --packing "
        "concat and a launcher with a multiple of this many processes); 1 = off",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--train-files", nargs="+", default=[], help="training files: .txt/.md, .json/.jsonl or .parquet")
    data.add_argument("--validation-files", nargs="+", default=[], help="validation files, of the same kind")
    data.add_argument("--dataset", help="a Hub dataset name (needs network access), instead of files")
    data.add_argument("--dataset-config", help="the configuration name of the Hub dataset")
    data.add_argument("--text-column", default="text", help="column holding the text in JSON, parquet and Hub data")
    data.add_argument(
        "--sample-by", choices=("document", "paragraph", "line"), default="document",
        help="what one example of a text file is (default: the whole file)",
    )
    data.add_argument("--validation-fraction", type=float, default=0.05, help="share of training examples held out when no validation data is given")
    data.add_argument("--default-documents", type=int, default=2000, help="training documents of the embedded default dataset")
    data.add_argument("--default-validation-documents", type=int, default=100, help="validation documents of the embedded default dataset")
    data.add_argument("--default-max-chars", type=int, default=None, help="longest document of the embedded default dataset, in characters (default: --block-size - 1, so that a document and its end token fill at most one context)")
    data.add_argument(
        "--default-min-distance", type=int, default=None,
        help="least evidence-to-answer distance of the default dataset (default: twice the smallest segment length)",
    )
    data.add_argument(
        "--default-max-distance", type=int, default=None,
        help="longest evidence-to-answer distance of the default dataset's pass-key questions, drawn log-uniformly from "
        "--default-min-distance to it (default: uniformly up to 2.5 times --default-min-distance)",
    )
    data.add_argument(
        "--default-passkey-statements", type=int, default=4,
        help="how often a pass-key document states its key, a power of two at least the largest dilation rate: the "
        "statements then lie on every residue that a dilated head can see (default: 4)",
    )
    data.add_argument(
        "--stream-default-data", action="store_true",
        help="make the default dataset's training contexts as they are read (endless; needs --max-steps), instead of "
        "generating and tokenizing --default-documents up front with `datasets`: for long contexts and many steps",
    )
    data.add_argument(
        "--default-curriculum", nargs="+", default=None, metavar="MAX_CHARS:STEPS",
        help="with --stream-default-data: train the first STEPS steps on documents of at most MAX_CHARS characters, "
        "then the next stage's, then the rest of --max-steps on the full-length documents (e.g. 512:300 4096:200: "
        "retrieval is learned sooner where a question has few keys to choose from; docs/quality.md)",
    )
    data.add_argument(
        "--default-task-weights", type=float, nargs=3, default=(0.4, 0.4, 0.2), metavar=("PASSKEY", "KEY_VALUE", "TEXT"),
        help="relative frequencies of the default dataset's passkey, key_value and text documents (default: 0.4 0.4 0.2)",
    )
    data.add_argument(
        "--tokenizer", default=None,
        help="'byte' (256 bytes + 2 special tokens; default for a new model), 'bpe' (byte-level BPE trained on the "
        "training text), or an AutoTokenizer folder / Hub id (default with --model: the model's own)",
    )
    data.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the 'bpe' tokenizer")
    data.add_argument("--block-size", type=int, default=None, help="tokens per packed context (default: min(1024, max_position_embeddings))")
    data.add_argument(
        "--packing", choices=("documents", "concat"), default="documents",
        help="documents: whole documents per context, kept apart by restarting position ids; concat: GPT-2 style "
        "concatenation cut every --block-size tokens",
    )
    data.add_argument("--num-proc", type=int, default=None, help="processes for tokenization and packing")

    training = parser.add_argument_group("training")
    training.add_argument("--output-dir", default="outputs/longnet", help="where the model, checkpoints and summary go")
    training.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --num-train-epochs)")
    training.add_argument(
        "--max-train-minutes", type=float, default=None,
        help="stop after the first step that ends this many minutes into training, then evaluate and save as usual "
        "(the learning-rate schedule stays that of --max-steps; the summary says where it stopped)",
    )
    training.add_argument("--num-train-epochs", type=float, default=1.0, help="passes over the training data")
    training.add_argument("--per-device-train-batch-size", type=int, default=8, help="contexts per device per step")
    training.add_argument("--per-device-eval-batch-size", type=int, default=8, help="contexts per device per evaluation step")
    training.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    training.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate of AdamW")
    training.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    training.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW's second-moment decay (0.95 suits short, small-batch runs)")
    training.add_argument("--warmup-steps", type=float, default=0.05, help="warm-up steps (a float < 1 is a share of all steps)")
    training.add_argument(
        "--lr-scheduler-type", default="cosine",
        help="transformers scheduler name (cosine, linear, constant, ...: transformers' SchedulerType)",
    )
    training.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    training.add_argument(
        "--answer-loss-weight", type=float, default=0.0,
        help="add this times the mean loss of the answer tokens of retrieval documents (the default dataset's "
        "questions) to the mean loss of all tokens; 0 = plain language modelling. Retrieval answers are a few tokens "
        "in hundreds: weighting them makes a small model learn to retrieve in far fewer steps (docs/quality.md)",
    )
    training.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None,
        help="mixed precision (default: what an accelerate config sets, else fp32)",
    )
    training.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    training.add_argument("--eval-steps", type=int, default=0, help="evaluate every this many steps (0: only at the end)")
    training.add_argument("--logging-steps", type=int, default=10, help="log the training loss every this many steps")
    training.add_argument("--save-steps", type=int, default=500, help="save a checkpoint every this many steps")
    training.add_argument("--save-total-limit", type=int, default=2, help="checkpoints to keep")
    training.add_argument(
        "--resume-from-checkpoint", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="resume from this checkpoint folder, or (no value) from the latest one in --output-dir",
    )
    training.add_argument("--seed", type=int, default=0, help="random seed (data generation, initialisation, order)")
    training.add_argument("--dataloader-num-workers", type=int, default=0, help="data loading worker processes")
    training.add_argument("--report-to", default="none", help="experiment trackers (transformers' report_to): none, tensorboard, wandb, ...")
    training.add_argument("--use-cpu", action="store_true", help="train on the CPU even where a GPU is present")
    training.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------------------------------------
# The command line, checked before anything slow (torch, transformers: 10-14 s) is imported
# ----------------------------------------------------------------------------------------------------------


def parse_curriculum(stages: list[str]) -> list[tuple[int, int]]:
    """``["512:300", "4096:200"]`` -> ``[(512, 300), (4096, 200)]``: (longest document in characters, steps)."""
    parsed = []
    for stage in stages:
        match = re.fullmatch(r"(\d+):(\d+)", stage)
        if match is None or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(
                f"--default-curriculum takes stages MAX_CHARS:STEPS of two positive integers (e.g. 512:300), got {stage!r}"
            )
        parsed.append((int(match[1]), int(match[2])))
    return parsed


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses a bad command line with one ValueError / FileNotFoundError: numbers out of range, local files and
    folders that do not exist, options that exclude each other. Imports nothing beyond the standard library, so that
    a typo is answered at once (:func:`resolve_checkpoint` then checks the checkpoint to resume, also without)."""
    _check_positive(args, "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "block_size", "default_documents", "sequence_parallel_size",
                    "default_max_chars", "default_min_distance", "default_max_distance", "vocab_size", "num_proc",
                    "num_train_epochs", "default_passkey_statements", "max_train_minutes")
    for name in ("eval_steps", "default_validation_documents", "weight_decay", "warmup_steps", "max_grad_norm",
                 "save_total_limit", "dataloader_num_workers"):
        value = getattr(args, name)
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(f"--max-steps must be positive (or -1: train for --num-train-epochs), got {args.max_steps}")
    if not 0 <= args.adam_beta2 < 1:
        raise ValueError(f"--adam-beta2 must be in [0, 1), got {args.adam_beta2}")
    if not 0 <= args.answer_loss_weight < math.inf:
        raise ValueError(f"--answer-loss-weight must be a finite number >= 0 (0: plain language modelling), got {args.answer_loss_weight}")
    weights = args.default_task_weights
    if not all(0 <= w < math.inf for w in weights) or not sum(weights) > 0:
        raise ValueError(f"--default-task-weights must be three finite numbers >= 0 with a positive sum (passkey, key_value, text), got {' '.join(map(str, weights))}")
    if args.answer_loss_weight > 0 and args.sequence_parallel_size > 1:
        raise ValueError("--answer-loss-weight does not work with --sequence-parallel-size > 1 yet: use one of them")
    statements = args.default_passkey_statements
    if statements & (statements - 1):
        raise ValueError(f"--default-passkey-statements must be a power of two (1, 2, 4, 8, ...), got {statements}")
    if args.default_max_distance is not None and args.default_min_distance is not None and args.default_max_distance < args.default_min_distance:
        raise ValueError(
            f"--default-max-distance ({args.default_max_distance}) must be at least --default-min-distance ({args.default_min_distance})"
        )
    if args.stream_default_data:
        if args.train_files or args.dataset:
            raise ValueError("--stream-default-data streams the embedded default dataset: leave out --train-files and --dataset")
        if args.max_steps < 0:
            raise ValueError("--stream-default-data makes an endless stream of contexts: give the length of training with --max-steps")
        if args.tokenizer == "bpe":
            raise ValueError("--stream-default-data needs a ready tokenizer ('byte', or a folder / Hub id): 'bpe' would have to be trained on the whole data first")
    if args.default_curriculum is not None:
        if not args.stream_default_data:
            raise ValueError("--default-curriculum orders the streamed default dataset: add --stream-default-data")
        stages = parse_curriculum(args.default_curriculum)
        if sum(steps for _, steps in stages) >= args.max_steps:
            raise ValueError(
                f"--default-curriculum's stages take {sum(steps for _, steps in stages)} steps, --max-steps "
                f"{args.max_steps}: leave steps for the full-length documents (raise --max-steps or shorten the stages)"
            )
    if args.architecture == "llama":
        if args.model is not None:
            raise ValueError("--architecture llama trains a new Llama from --preset / --config: leave out --model")
        if args.sequence_parallel_size > 1:
            raise ValueError("--architecture llama does not support --sequence-parallel-size > 1 (LongNet's sequence parallelism)")
    if not (0 < args.learning_rate < math.inf):
        raise ValueError(f"--learning-rate must be a positive finite number, got {args.learning_rate}")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    parse_overrides(args.overrides)
    if args.model is None and args.config is None:  # else --preset is not used
        problem = unknown_preset_message("--preset", args.preset)
        if problem is not None:
            raise ValueError(problem)
    if args.attn_implementation is not None and args.architecture == "longnet":  # a Llama takes transformers' names
        problem = unknown_attention_message("--attn-implementation", args.attn_implementation)
        if problem is not None:
            raise ValueError(problem)
    check_output_folder("--output-dir", args.output_dir)
    if args.model is not None and (args.overrides or args.config):
        raise ValueError("--set and --config describe a new model; with --model the saved model's config is used")
    if args.train_files and args.dataset:
        raise ValueError("give either --train-files or --dataset, not both")
    if args.validation_files and not args.train_files:
        raise ValueError("--validation-files needs --train-files (the training data of the same kind)")
    for option, paths in (("--train-files", args.train_files), ("--validation-files", args.validation_files)):
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{option}: file {path!r} does not exist")
    if args.config is not None:
        path = Path(args.config)
        if not (path / "config.json" if path.is_dir() else path).is_file():
            raise FileNotFoundError(f"--config: {args.config!r} does not exist")
    if args.model is not None and looks_like_local_path(args.model) and not Path(args.model).expanduser().is_dir():
        raise FileNotFoundError(f"--model: folder {args.model!r} does not exist")
    if args.tokenizer not in (None, "byte", "bpe") and looks_like_local_path(args.tokenizer) and not Path(args.tokenizer).expanduser().exists():
        raise FileNotFoundError(f"--tokenizer: tokenizer folder {args.tokenizer!r} does not exist")
    if args.sequence_parallel_size > 1:
        size, world_size = args.sequence_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
        if world_size % size != 0:
            raise ValueError(
                f"--sequence-parallel-size {size} needs a multiple of {size} processes (launch with `accelerate launch "
                f"--num_processes N` or torchrun), got {world_size}"
            )
        if args.packing != "concat":
            raise ValueError(
                f"--sequence-parallel-size {size} needs --packing concat: the ranks split rows of one sequence, without "
                "padding or packed documents"
            )
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"--resume-from-checkpoint: checkpoint folder {args.resume_from_checkpoint!r} does not exist")


def check_transformers_names(args: argparse.Namespace) -> None:
    """Refuses a --lr-scheduler-type or --report-to that transformers does not know, right after importing it and
    before the data and the model (else the Trainer refuses it with a traceback). The names are read from the
    installed transformers, whose versions differ in them, rather than listed here."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.trainer_utils import SchedulerType

    schedules = [schedule.value for schedule in SchedulerType]
    if args.lr_scheduler_type not in schedules:
        raise ValueError(
            f"--lr-scheduler-type {args.lr_scheduler_type!r} is not a transformers scheduler; choose one of "
            f"{', '.join(schedules)}"
        )
    trackers = ["none", "all", *INTEGRATION_TO_CALLBACK]  # "all": every tracker that is installed
    if args.report_to not in trackers:
        raise ValueError(
            f"--report-to {args.report_to!r} is not a tracker transformers knows; choose one of {', '.join(trackers)}"
        )


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    """One warning line on stderr, from the first process only (every process of a launch runs this script)."""
    if _is_main_process():
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: a save cut short (a kill, a full disk) must not be resumed from
# ----------------------------------------------------------------------------------------------------------


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete Trainer checkpoint, or None if it is. The Trainer writes the weights, then
    the optimizer, scheduler and random states, and trainer_state.json last: a save that was cut short lacks that
    file, or leaves a weights file shorter than its header says."""
    state_file = folder / TRAINER_STATE_FILE
    if not state_file.is_file():
        return f"it has no {TRAINER_STATE_FILE} (which the Trainer writes last): its save was cut short"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as error:  # ValueError: invalid JSON or UTF-8
        return f"its {TRAINER_STATE_FILE} cannot be read ({one_line(error)}): its save was cut short"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"its {TRAINER_STATE_FILE} holds no global_step"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"its {index.name} cannot be read ({one_line(error)})"
        return next((problem for shard in shards if (problem := _safetensors_problem(folder / shard))), None)
    if (folder / "model.safetensors").exists():
        return _safetensors_problem(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file() or any(folder.glob("pytorch_model_fsdp_*")):
        return None  # other weight formats (FSDP's sharded state dicts): trainer_state.json came after them
    return "it holds no weights (model.safetensors)"


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, a JSON header giving every tensor's byte range, then the
    data, up to the largest end offset: a file cut short is shorter than that."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if 8 + length > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(file.read(length))
        expected = 8 + length + max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError) as error:
        return f"its {path.name} cannot be read ({one_line(error)})"
    if size != expected:
        return f"its {path.name} has {size:,} bytes where its header announces {expected:,}: it was cut short"
    return None


def read_trainer_state(checkpoint: str | None) -> dict:
    """The trainer_state.json of ``checkpoint`` ({} without one)."""
    return json.loads(Path(checkpoint, TRAINER_STATE_FILE).read_text()) if checkpoint else {}


def _step(checkpoint: Path) -> int:
    return int(CHECKPOINT_NAME.match(checkpoint.name).group(1))


def complete_checkpoints(output_dir: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The complete checkpoint-N folders of ``output_dir``, newest (largest N) first, and the incomplete ones with
    the reason."""
    folder = Path(output_dir)
    found = sorted(
        (path for path in (folder.iterdir() if folder.is_dir() else ()) if path.is_dir() and CHECKPOINT_NAME.match(path.name)),
        key=_step, reverse=True,
    )
    complete, incomplete = [], []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        else:
            incomplete.append((path, problem))
    return complete, incomplete


def resolve_checkpoint(option: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: ``option`` itself, or for "latest" the newest *complete* one of
    ``output_dir``, after a warning for each newer one that is skipped (a save that a kill cut short)."""
    if option is None:
        return None
    if option != "latest":
        problem = checkpoint_problem(Path(option))
        if problem is not None:
            raise ValueError(f"--resume-from-checkpoint: {option!r} is not a complete checkpoint: {problem}")
        return option
    complete, incomplete = complete_checkpoints(output_dir)
    if not complete and not incomplete:
        raise FileNotFoundError(f"--resume-from-checkpoint: no checkpoint-* folder in {output_dir!r} to resume from")
    if not complete:
        raise ValueError(
            f"--resume-from-checkpoint: no complete checkpoint in {output_dir!r}: "
            + "; ".join(f"{path.name}: {problem}" for path, problem in incomplete)
        )
    chosen = complete[0]
    for path, problem in incomplete:
        if _step(path) > _step(chosen):
            warn(f"skipping {path}: {problem}; resuming from {chosen.name}, the newest complete checkpoint")
    return str(Path(output_dir, chosen.name))


def check_resume(args: argparse.Namespace, checkpoint: str | None) -> None:
    """A resumed run must have steps left to train."""
    state = read_trainer_state(checkpoint)
    if args.max_steps > 0 and state.get("global_step", 0) >= args.max_steps:
        raise ValueError(
            f"--max-steps {args.max_steps}: {checkpoint} is already at step {state['global_step']}; nothing is left to "
            "train (raise --max-steps)"
        )


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict:
    """``["hidden_size=64", "segment_lengths=[8,16]"]`` -> ``{"hidden_size": 64, "segment_lengths": [8, 16]}``."""
    overrides = {}
    for item in items:
        name, separator, text = item.partition("=")
        if not separator or not name.strip():
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name.strip()] = text
    return overrides


def config_field_names() -> list[str]:
    """What ``--set`` may name: LongNetConfig's fields (its own and those of transformers' PreTrainedConfig) and the
    few other names it takes (``rope_theta``, folded into ``rope_parameters``)."""
    from modeling_longnet import LongNetConfig

    fields = {name for name in LongNetConfig.__dataclass_fields__ if not name.startswith("_")}
    return sorted(fields | set(LongNetConfig.attribute_map) | set(CONFIG_ALIASES))


def check_config_fields(overrides: dict) -> None:
    """Refuses a ``--set`` of a name that LongNetConfig would silently keep as an unused attribute (a typo)."""
    from modeling_longnet import LongNetConfig

    known = config_field_names()
    for name in overrides:
        if name not in known:
            own = list(LongNetConfig.__annotations__)  # the LongNet fields, in the class's order
            close = difflib.get_close_matches(name, own, n=3) or difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"LongNet's fields are {', '.join(own)}"
            raise ValueError(f"--set {name}=...: {name!r} is not a LongNetConfig field; {hint}")


def build_config(preset: str | None, config_path: str | None, overrides: dict):
    """A LongNetConfig from a config file (or folder) if given, else from a named preset, with ``overrides``."""
    from modeling_longnet import LongNetConfig

    if config_path:
        path = Path(config_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--config: {config_path!r} does not exist")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--config: {config_path!r} is not valid JSON ({error})") from error
        if not isinstance(values, dict):
            raise ValueError(f"--config: {config_path!r} must hold a JSON object of config fields")
        if values.get("model_type", "longnet") != "longnet":
            raise ValueError(f"--config: {config_path!r} is a {values['model_type']!r} config, not a LongNet one")
        values.pop("model_type", None)
        values.update(overrides)
        return LongNetConfig(**values)
    return LongNetConfig.from_preset(preset, **overrides)


def build_model(config=None, *, pretrained: str | None = None, attn_implementation: str | None = None, architecture: str = "longnet"):
    """A new LongNetForCausalLM from ``config``, or the saved one at ``pretrained`` (a folder or Hub id); with
    ``architecture="llama"`` a new LlamaForCausalLM of ``config``'s sizes (SDPA attention by default)."""
    from transformers import AutoModelForCausalLM

    from modeling_longnet import LongNetForCausalLM  # importing the package registers LongNet with the Auto classes

    if architecture == "llama":
        from transformers import LlamaForCausalLM

        from modeling_longnet.conversion import llama_config_from_longnet

        model = LlamaForCausalLM(llama_config_from_longnet(config))
        model.set_attn_implementation(attn_implementation or "sdpa")
        return model
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if pretrained is not None:
        if looks_like_local_path(pretrained) and not Path(pretrained).expanduser().is_dir():
            raise FileNotFoundError(f"--model: folder {pretrained!r} does not exist")
        return AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    model = LongNetForCausalLM(config)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model


def load_pretrained_config(name_or_path: str):
    from transformers import AutoConfig

    import modeling_longnet  # noqa: F401  (registers LongNet with the Auto classes)

    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"--model: folder {name_or_path!r} does not exist")
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type != "longnet":
        raise ValueError(f"--model: {name_or_path!r} is a {config.model_type!r} model, not a LongNet")
    return config


# ----------------------------------------------------------------------------------------------------------
# Sequence parallelism: the integration point with modeling_longnet/sequence_parallel.py
# ----------------------------------------------------------------------------------------------------------


def check_sequence_parallel(size: int, *, config, block_size: int):
    """Validates --sequence-parallel-size against the model: each row of ``block_size`` tokens is split into
    ``size`` chunks, one per rank of a group of ``size`` processes, and every segment length must fit a chunk.

    The launch (a multiple of ``size`` processes) and --packing concat are checked earlier, by
    :func:`check_arguments`, as they need neither the model nor an import."""
    from modeling_longnet import sequence_parallel

    if block_size % size != 0 or sequence_parallel.compatible_chunk_length(config.segment_lengths, size, block_size // size) != block_size // size:
        raise ValueError(
            f"--block-size {block_size} cannot be split into {size} chunks that every segment length "
            f"{config.segment_lengths} fits (each must divide the chunk, be a multiple of it, or cover the row); "
            f"a block size that fits: {size * sequence_parallel.compatible_chunk_length(config.segment_lengths, size, max(1, block_size // size))}"
        )


def apply_sequence_parallel(model, size: int):
    """Builds the (data-parallel x sequence-parallel) device mesh over the launched processes and makes the model's
    attention run across the ranks of its sequence-parallel group; returns that group (None for size 1)."""
    if size == 1:
        return None
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from modeling_longnet.sequence_parallel import apply_sequence_parallel as apply

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size() // size, size), mesh_dim_names=("dp", "sp"))
    apply(model, mesh["sp"])
    return mesh["sp"].get_group()


def _sequence_parallel_trainer(base):
    """A Trainer in which the ranks of a sequence-parallel group share each batch, each computing its chunk of every
    sequence (``shard_batch``), and add their shares into the batch's loss (``sequence_parallel_loss``)."""

    class SequenceParallelTrainer(base):
        def __init__(self, *args, sp_group, **kwargs):
            super().__init__(*args, **kwargs)
            self.sp_group = sp_group
            # The loss below is a mean over the whole batch: let the Trainer divide it by the accumulation steps
            # and not rescale it by token counts across devices.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch
            import torch.distributed as dist

            from modeling_longnet.sequence_parallel import sequence_parallel_loss, shard_batch

            # The data loader gives every process its own rows, as under plain data parallelism. The group trains on
            # all of its members' rows (none is skipped), each rank holding its chunk of every row: a step sees
            # world_size x batch rows, like DDP, and each rank computes batch x block_size tokens, like one DDP rank.
            batch = {}
            for key in ("input_ids", "labels"):
                parts = [torch.empty_like(inputs[key]) for _ in range(dist.get_world_size(self.sp_group))]
                dist.all_gather(parts, inputs[key].contiguous(), group=self.sp_group)
                batch[key] = torch.cat(parts)
            outputs = model(**shard_batch(batch, self.sp_group))
            loss = sequence_parallel_loss(outputs.loss, self.sp_group)
            return (loss, outputs) if return_outputs else loss

    return SequenceParallelTrainer


def answer_token_loss(logits, labels, answer_mask):
    """Mean cross-entropy of the tokens that ``answer_mask`` marks (0 when there are none), with the causal shift
    of the model's own loss: the logits at position t predict the label at t + 1."""
    import torch.nn.functional as F

    marked = answer_mask[:, 1:].bool() & (labels[:, 1:] != -100)
    if not marked.any():
        return logits.sum() * 0.0  # keeps the graph (and the gradient's dtype) when a batch holds no answer
    return F.cross_entropy(logits[:, :-1][marked].float(), labels[:, 1:][marked])


def _answer_weighted_trainer(base):
    """A Trainer whose loss adds ``answer_loss_weight`` times the mean loss of the answer tokens (the batch's
    ``answer_mask``) to the model's mean loss over all tokens."""

    class AnswerWeightedTrainer(base):
        def __init__(self, *args, answer_loss_weight, **kwargs):
            super().__init__(*args, **kwargs)
            self.answer_loss_weight = answer_loss_weight
            self.model_accepts_loss_kwargs = False  # the loss is a mean per batch: the Trainer scales accumulation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            answer_mask = inputs.pop("answer_mask", None)  # validation rows carry none: their loss stays plain
            outputs = model(**inputs)
            loss = outputs.loss
            if answer_mask is not None:
                loss = loss + self.answer_loss_weight * answer_token_loss(outputs.logits, inputs["labels"], answer_mask)
            return (loss, outputs) if return_outputs else loss

    return AnswerWeightedTrainer


# ----------------------------------------------------------------------------------------------------------
# Preparing everything that can fail on user input, before the (slow) Trainer starts
# ----------------------------------------------------------------------------------------------------------


def _check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:  # also refuses NaN
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def curriculum_stages(args: argparse.Namespace, tokenizer, block_size: int, document_settings: dict) -> list[dict]:
    """``--default-curriculum``'s stages as the stream's document counts: each stage's steps times the rows of a
    step (batch x accumulation x processes), times how many of its documents a row holds (measured on a sample)."""
    from modeling_longnet.data import default_documents_per_row, least_document_length

    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1"))
    least = least_document_length(document_settings["min_distance"], document_settings["passkey_statements"])
    stages = []
    for max_chars, steps in parse_curriculum(args.default_curriculum or []):
        if not least <= max_chars <= block_size - 1:
            raise ValueError(
                f"--default-curriculum's stage {max_chars}:{steps}: documents of at most {max_chars} characters must be "
                f"at least {least} (the least distance, the key's statements and the question) and at most "
                f"--block-size - 1 = {block_size - 1}"
            )
        per_row = default_documents_per_row(tokenizer, block_size, split="train", **{**document_settings, "max_chars": max_chars})
        stages.append({"max_chars": max_chars, "steps": steps, "documents": math.ceil(steps * rows_per_step * per_row)})
    return stages


def prepare(args: argparse.Namespace, checkpoint: str | None = None) -> dict:
    """The model, tokenizer and packed data, after :func:`check_arguments`; ``checkpoint`` is the folder to resume
    from (:func:`resolve_checkpoint`)."""
    if args.quiet:
        silence_progress_bars()
    from modeling_longnet.data import (
        DefaultDatasetStream, least_document_length, load_text_datasets, load_tokenizer, min_retrieval_distance,
        tokenize_and_pack,
    )

    overrides = parse_overrides(args.overrides)
    check_config_fields(overrides)
    if args.model is None:
        config = build_config(args.preset, args.config, overrides)
    else:
        config = load_pretrained_config(args.model)

    block_size = args.block_size or min(1024, config.max_position_embeddings)
    if block_size > config.max_position_embeddings:
        raise ValueError(f"--block-size {block_size} exceeds the model's max_position_embeddings ({config.max_position_embeddings})")
    min_distance = args.default_min_distance or min_retrieval_distance(config.segment_lengths)
    max_chars = args.default_max_chars or block_size - 1
    statements = args.default_passkey_statements
    if not (args.train_files or args.dataset) and max_chars < least_document_length(min_distance, statements):
        raise ValueError(
            f"the default dataset's documents (at most {max_chars} characters: --default-max-chars, by default "
            f"--block-size - 1) are too short for evidence {min_distance} characters before the answer "
            "(--default-min-distance, by default twice the smallest segment length); raise --block-size or "
            f"--default-max-chars to at least {least_document_length(min_distance, statements)} or lower --default-min-distance"
        )
    if args.default_max_distance is not None and args.default_max_distance < min_distance:
        raise ValueError(f"--default-max-distance ({args.default_max_distance}) must be at least the least distance ({min_distance})")
    # The default dataset's documents: generate_default_dataset's arguments (for the stream), and the same under
    # load_text_datasets' names, with the document counts (for the dataset made up front, and the summary).
    document_settings = {
        "max_chars": max_chars, "min_distance": min_distance, "task_weights": list(args.default_task_weights),
        "max_distance": args.default_max_distance, "passkey_statements": statements,
    }
    data_settings = {
        "default_documents": args.default_documents,
        "default_validation_documents": args.default_validation_documents,
        **{f"default_{name}": value for name, value in document_settings.items()},
    }
    tokenizer_name = args.tokenizer or (args.model if args.model else "byte")
    if args.stream_default_data:
        datasets = None
        tokenizer = load_tokenizer(tokenizer_name)
    else:
        datasets = load_text_datasets(
            train_files=args.train_files, validation_files=args.validation_files, dataset_name=args.dataset,
            dataset_config=args.dataset_config, text_column=args.text_column, sample_by=args.sample_by,
            validation_fraction=args.validation_fraction, seed=args.seed, **data_settings,
        )
        if len(datasets["train"]) == 0:
            raise ValueError("the training data is empty")
        tokenizer = load_tokenizer(tokenizer_name, texts=datasets["train"]["text"], vocab_size=args.vocab_size)

    from transformers import set_seed

    set_seed(args.seed)  # the initialisation of a new model
    if args.model is None:
        # A new model takes its vocabulary and special tokens from the tokenizer.
        config.vocab_size = len(tokenizer)
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
        )
        model = build_model(config, attn_implementation=args.attn_implementation, architecture=args.architecture)
    else:
        model = build_model(pretrained=args.model, attn_implementation=args.attn_implementation)
        if len(tokenizer) > model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if args.sequence_parallel_size > 1:
        check_sequence_parallel(args.sequence_parallel_size, config=model.config, block_size=block_size)

    if args.stream_default_data:
        document_settings = {"seed": args.seed, **document_settings}
        curriculum = curriculum_stages(args, tokenizer, block_size, document_settings)
        packed = {"train": DefaultDatasetStream(
            tokenizer, block_size, split="train", mark_answers=args.answer_loss_weight > 0,
            curriculum=[(stage["documents"], {"max_chars": stage["max_chars"]}) for stage in curriculum], **document_settings
        )}
        if args.default_validation_documents:
            packed["validation"] = list(DefaultDatasetStream(
                tokenizer, block_size, split="validation", num_documents=args.default_validation_documents, **document_settings
            ))
        documents = {"train": "streamed", "validation": args.default_validation_documents}
        if curriculum:
            documents["curriculum"] = curriculum
    else:
        packed = {
            split: tokenize_and_pack(
                datasets[split], tokenizer, block_size, mode=args.packing, num_proc=args.num_proc, description=f"{split} data",
                mark_answers=split == "train" and args.answer_loss_weight > 0,
            )
            for split in ("train", "validation")
            if len(datasets[split])
        }
        if not packed.get("train") or len(packed["train"]) == 0:
            raise ValueError(f"no training context of {block_size} tokens could be made: the data is too short for --block-size")
        documents = {split: len(datasets[split]) for split in datasets}
    source = (
        {"kind": "files", "train_files": args.train_files, "validation_files": args.validation_files}
        if args.train_files
        else {"kind": "hub", "dataset": args.dataset, "config": args.dataset_config}
        if args.dataset
        else {"kind": "default", **data_settings, "seed": args.seed}
    )
    return {
        "model": model,
        "checkpoint": checkpoint,
        "tokenizer": tokenizer,
        "tokenizer_name": tokenizer_name,
        "datasets": packed,
        "block_size": block_size,
        "data": {"source": source, "documents": documents, "packing": args.packing, "streamed": args.stream_default_data},
    }


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def training_arguments(args: argparse.Namespace, has_validation: bool):
    from transformers import TrainingArguments

    optional = {}
    if args.precision == "bf16":
        optional["bf16"] = True
    elif args.precision == "fp16":
        optional["fp16"] = True
    if args.gradient_checkpointing:
        # transformers 5.24 renamed it activation_checkpointing (5.17, the oldest we support, has the old name).
        fields = TrainingArguments.__dataclass_fields__
        optional["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    return TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta2=args.adam_beta2,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        max_grad_norm=args.max_grad_norm,
        eval_strategy="steps" if args.eval_steps and has_validation else "no",
        eval_steps=args.eval_steps or None,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=_has_accelerator(args),
        ddp_find_unused_parameters=False,  # every parameter takes part in every step
        report_to=args.report_to,
        use_cpu=args.use_cpu,
        disable_tqdm=args.quiet,
        # A NaN or infinite loss is logged as it is (by default the Trainer logs the mean of earlier steps in its
        # place), so that the training guard sees it.
        logging_nan_inf_filter=False,
        # the answer mask is no argument of the model's forward: keep it for the loss (the packed rows hold
        # nothing else the model would refuse)
        remove_unused_columns=not args.answer_loss_weight > 0,
        **optional,
    )


def silence_progress_bars() -> None:
    """--quiet: no progress bar of transformers (saving and loading shards), huggingface_hub (downloads) or datasets
    (tokenizing and packing); the Trainer's own bar is off through disable_tqdm."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        import datasets
    except ImportError:
        return  # prepare() says that loading data needs it
    datasets.disable_progress_bars()


def _has_accelerator(args) -> bool:
    import torch

    return torch.cuda.is_available() and not args.use_cpu


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler preempting the job): the run ends as after Ctrl-C, with exit status 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


class TrainingFailed(RuntimeError):
    """The training loss, the gradient norm or the weights stopped being finite numbers; nothing of that step was
    saved."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


ADVICE = (
    "Try a lower --learning-rate (now {lr:g}), more --warmup-steps or a smaller --max-grad-norm, --precision bf16 "
    "or fp32 rather than fp16, and check the data and the config (--set, --config)"
)


def training_guard(args: argparse.Namespace, checkpoint: str | None):
    """A TrainerCallback that stops the training at the first step whose loss or gradient norm (as the Trainer logs
    them) or whose weights are not finite, by raising :class:`TrainingFailed` before that step is saved; that records
    the step this run started from (for its throughput); and that warns when a resumed run changes --max-steps under a
    schedule that depends on it."""
    from transformers import TrainerCallback

    resumed_state = read_trainer_state(checkpoint)

    class TrainingGuard(TrainerCallback):
        def __init__(self):
            self.first_step = self.last_logged = 0
            self.accelerator = None  # set once the Trainer exists: to agree across processes on the weights' check
            self.started = time.perf_counter()
            self.stopped_at_time_limit = None  # the step after which --max-train-minutes stopped the training

        def on_train_begin(self, training_args, state, control, lr_scheduler=None, **kwargs):
            self.first_step = self.last_logged = state.global_step
            self.started = time.perf_counter()
            if checkpoint is not None:
                warn_on_schedule_change(args, checkpoint, resumed_state, state, training_args, lr_scheduler)

        def out_of_time(self) -> bool:
            if args.max_train_minutes is None:
                return False
            late = time.perf_counter() - self.started > 60 * args.max_train_minutes
            if self.accelerator is not None and self.accelerator.num_processes > 1:  # all processes stop at one step
                import torch

                late = bool(self.accelerator.gather(torch.tensor([float(late)], device=self.accelerator.device)).max())
            return late

        def on_step_end(self, training_args, state, control, **kwargs):
            if not control.should_training_stop and state.global_step < state.max_steps and self.out_of_time():
                control.should_training_stop = True
                self.stopped_at_time_limit = state.global_step
            if control.should_save or control.should_evaluate or control.should_training_stop:
                # Log (and so check, below) this step before anything is saved or evaluated.
                control.should_log = True
            return control

        def on_log(self, training_args, state, control, logs=None, model=None, **kwargs):
            if not logs or "loss" not in logs:  # evaluation and end-of-training metrics
                return
            self.check(training_args, state, logs)
            # The Trainer saves right after this log: the weights must be finite too (an update can overflow).
            if control.should_save and model is not None and not weights_finite(model, self.accelerator):
                raise TrainingFailed(
                    f"step {state.global_step}: the weights are no longer finite numbers (NaN or inf); training "
                    f"stopped before saving them. {ADVICE.format(lr=training_args.learning_rate)}",
                    state.global_step,
                )

        def check(self, training_args, state, logs):
            step, first = state.global_step, self.last_logged + 1
            self.last_logged = step
            loss, grad_norm = logs["loss"], logs.get("grad_norm")
            if not math.isfinite(loss):
                over = f"the mean of steps {first}-{step}" if first < step else "of this step"
                what = f"the training loss ({over}) is {loss}"
            elif grad_norm is not None and not math.isfinite(grad_norm) and not training_args.fp16:
                # (under fp16 an infinite gradient is the loss scaler's business: it skips the step and scales down)
                what = f"the gradient norm is {grad_norm}"
            else:
                return
            raise TrainingFailed(
                f"step {step}: {what}, not a finite number; training stopped before saving anything of this step. "
                f"{ADVICE.format(lr=training_args.learning_rate)}",
                step,
            )

    return TrainingGuard()


def weights_finite(model, accelerator=None) -> bool:
    """Whether every parameter is finite, agreed by all processes (each may hold only its shard)."""
    import torch

    bad = False
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter  # a DTensor's shard
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad = True
            break
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([float(bad)], device=accelerator.device)
        bad = bool(accelerator.gather(flag).max())
    return not bad


def warn_on_schedule_change(args, checkpoint: str, resumed_state: dict, state, training_args, lr_scheduler=None) -> None:
    """A resumed run of another --max-steps does not continue the interrupted run's learning-rate schedule: the
    scheduler is rebuilt for the new number of steps, and the learning rate jumps to where that schedule is."""
    old, new, step = resumed_state.get("max_steps"), state.max_steps, state.global_step
    schedule = str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type))
    depends_on_length = schedule not in SCHEDULES_WITHOUT_LENGTH and not (
        schedule == "constant_with_warmup" and not 0 < args.warmup_steps < 1
    )
    if not old or old == new or not depends_on_length:
        return
    change = ""
    try:  # the learning rate of the next step under the interrupted run's schedule, and under this one's
        import torch
        from transformers import get_scheduler

        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
        interrupted = get_scheduler(
            training_args.lr_scheduler_type, probe, num_warmup_steps=training_args.get_warmup_steps(old),
            num_training_steps=old, scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
        )
        before = interrupted.lr_lambdas[0](step) * training_args.learning_rate
        after = lr_scheduler.lr_lambdas[0](step) * lr_scheduler.base_lrs[0]
        change = f" (step {step + 1} trains with a learning rate of {after:.3g}, where the {old}-step run had {before:.3g})"
    except Exception:  # noqa: BLE001  (a scheduler without lambdas: the warning goes without the numbers)
        pass
    warn(
        f"{Path(checkpoint).name} was saved by a run of --max-steps {old}, and this run has --max-steps {new}: the "
        f"{schedule} learning-rate schedule restarts, stretched over {new} steps, instead of continuing where the "
        f"{old}-step run left it{change}, so the result differs from an uninterrupted {new}-step run. To finish "
        f"the interrupted run, resume with --max-steps {old}; to extend a run, train with --lr-scheduler-type constant"
    )


def train(args: argparse.Namespace, prepared: dict) -> dict:
    """Trains; returns the summary (also written to training_summary.json). Raises :class:`TrainingFailed`, after
    writing a summary of the failure and no model, when the loss, the gradient norm or the weights stop being
    finite."""
    from transformers import Trainer

    from modeling_longnet.data import PackedRowsCollator

    model, tokenizer, datasets = prepared["model"], prepared["tokenizer"], prepared["datasets"]
    has_validation = "validation" in datasets and len(datasets["validation"]) > 0
    training_args = training_arguments(args, has_validation)  # initialises torch.distributed under a launcher
    sp_group = apply_sequence_parallel(model, args.sequence_parallel_size)
    if sp_group is not None:
        trainer_class, extra = _sequence_parallel_trainer(Trainer), {"sp_group": sp_group}
    elif args.answer_loss_weight > 0:
        trainer_class, extra = _answer_weighted_trainer(Trainer), {"answer_loss_weight": args.answer_loss_weight}
    else:
        trainer_class, extra = Trainer, {}
    checkpoint = prepared["checkpoint"]
    guard = training_guard(args, checkpoint)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"] if has_validation else None,
        # Llama's rows stay rows, one causal context each (PackedRowsCollator says why it gets no position ids).
        data_collator=PackedRowsCollator(args.packing, flatten=args.architecture == "longnet"),
        processing_class=tokenizer,
        callbacks=[guard],
        **extra,
    )
    guard.accelerator = trainer.accelerator
    num_parameters = sum(p.numel() for p in model.parameters())
    if trainer.is_world_process_zero():
        print(
            f"{PROG}: {type(model).__name__} with {num_parameters / 1e6:.2f}M parameters; "
            f"{'streamed' if args.stream_default_data else len(datasets['train'])} "
            f"training contexts of {prepared['block_size']} tokens; {trainer.args.world_size} process(es)"
            + (f"; resuming from {checkpoint}" if checkpoint else ""),
            flush=True,
        )
    # Every process brings its own rows, also under sequence parallelism (its group trains on all of them).
    tokens_per_step = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer.args.world_size * prepared["block_size"]
    )
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if not weights_finite(model, trainer.accelerator):
            raise TrainingFailed(
                f"step {trainer.state.global_step}: the weights are no longer finite numbers (NaN or inf) at the end "
                f"of training; they were not saved. {ADVICE.format(lr=args.learning_rate)}",
                trainer.state.global_step,
            )
    except TrainingFailed as failure:
        summary = {
            **_run_description(args, prepared, model, num_parameters, trainer.args.world_size),
            "status": "failed",
            "error": str(failure),
            "failed_at_step": failure.step,
            "global_step": trainer.state.global_step,
            "steps_this_run": trainer.state.global_step - guard.first_step,
            "model_saved": False,
            "last_checkpoint": next((str(path) for path in complete_checkpoints(args.output_dir)[0]), None),
            "loss_history": _losses(trainer),
            "resumed_from": checkpoint,
        }
        if trainer.is_world_process_zero():
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            Path(args.output_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        raise
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate() if has_validation else {}
    model.config.use_cache = True  # the Trainer turns the KV cache off for training; generation wants it back
    if trainer.is_world_process_zero():
        # The model files are about to be replaced: a summary of an earlier run must not outlive them if this save
        # is cut short.
        Path(args.output_dir, SUMMARY_FILE).unlink(missing_ok=True)
    trainer.save_model(args.output_dir)  # the model with its code (LongNet's save_pretrained), and the tokenizer

    steps_this_run = trainer.state.global_step - guard.first_step
    summary = {
        **_run_description(args, prepared, model, num_parameters, trainer.args.world_size),
        "status": "completed",
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": trainer.state.global_step * tokens_per_step,
        # A resumed run trains only the steps after its checkpoint: its speed is theirs.
        "steps_this_run": steps_this_run,
        "tokens_this_run": steps_this_run * tokens_per_step,
        "train_seconds": seconds,
        "tokens_per_second": steps_this_run * tokens_per_step / max(seconds, 1e-9),
        "train_loss": result.training_loss,
        "loss_history": _losses(trainer),
        "eval_loss": metrics.get("eval_loss"),
        "eval_perplexity": math.exp(metrics["eval_loss"]) if "eval_loss" in metrics else None,
        "resumed_from": checkpoint,
        "resumed_at_step": guard.first_step if checkpoint else None,
        "max_steps": trainer.state.max_steps,
        "stopped_at_time_limit": guard.stopped_at_time_limit,
    }
    if trainer.is_world_process_zero():
        Path(args.output_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, args.output_dir)
    return summary


def _run_description(args, prepared: dict, model, num_parameters: int, world_size: int) -> dict:
    return {
        "model_class": type(model).__name__,
        "num_parameters": num_parameters,
        "config": {"preset": None if args.model or args.config else args.preset, "file": args.config, "pretrained": args.model,
                   "overrides": parse_overrides(args.overrides)},
        "tokenizer": prepared["tokenizer_name"],
        "data": prepared["data"],
        "block_size": prepared["block_size"],
        "precision": args.precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "fp32"),
        "world_size": world_size,
        "sequence_parallel_size": args.sequence_parallel_size,
    }


def _losses(trainer) -> list:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def print_summary(summary: dict, output_dir: str) -> None:
    losses = summary["loss_history"]
    first, last = (losses[0][1], losses[-1][1]) if losses else (float("nan"), float("nan"))
    minutes, seconds = divmod(summary["train_seconds"], 60)
    resumed = (
        f"; {summary['steps_this_run']} in this run, resumed at step {summary['resumed_at_step']}"
        if summary["resumed_from"] else ""
    )
    rows = [
        ("model", f"{summary['model_class']}, {summary['num_parameters'] / 1e6:.2f}M parameters"),
        ("steps", f"{summary['global_step']} ({summary['epochs']:.2f} epochs), {summary['train_tokens']:,} tokens of context {summary['block_size']}{resumed}"),
        ("time", f"{int(minutes)}m{seconds:04.1f}s, {summary['tokens_per_second']:,.0f} tokens/s"
                 + (f"; stopped by --max-train-minutes after step {summary['stopped_at_time_limit']} of {summary['max_steps']}"
                    if summary.get("stopped_at_time_limit") is not None else "")),
        ("training loss", f"{first:.3f} (step {losses[0][0] if losses else '-'}) -> {last:.3f} (step {losses[-1][0] if losses else '-'})"),
    ]
    if summary["eval_loss"] is not None:
        rows.append(("validation", f"loss {summary['eval_loss']:.3f}, perplexity {summary['eval_perplexity']:.3f}"))
    rows.append(("saved to", output_dir))
    width = max(len(name) for name, _ in rows)
    print("\nTraining summary")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_arguments(args)  # before the slow imports: a bad command line is answered at once
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        check_resume(args, checkpoint)
        check_transformers_names(args)
        prepared = prepare(args, checkpoint)
    except (FileNotFoundError, ValueError, TypeError, ImportError, ConnectionError, OSError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    # SIGTERM would otherwise end the process on the spot, mid-save; as an exception it takes Ctrl-C's way out
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        train(args, prepared)
    except TrainingFailed as failure:
        if _is_main_process():
            print(f"{PROG}: error: {one_line(failure)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        terminated = isinstance(interruption, Terminated)
        if _is_main_process():
            print(
                f"{PROG}: error: {'terminated (SIGTERM)' if terminated else 'interrupted'}; nothing was saved as the "
                f"model. Continue from the newest complete checkpoint with --output-dir {args.output_dir} "
                "--resume-from-checkpoint",
                file=sys.stderr,
            )
        return 143 if terminated else 130
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Each process of a multi-process run leaves the process group before it exits. Left to the interpreter's
    exit, gloo's threads could be destroyed while still joinable: in CI on 2026-12-07 one of two CPU processes of
    the sequence-parallel test ended in "terminate called without an active exception" (SIGABRT) after training."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
