#!/usr/bin/env python
"""Evaluate a causal language model on long contexts: perplexity by position and retrieval accuracy by distance.

Writes evaluation.json, evaluation.md (the tables) and evaluation.png (the plots) to --output-dir, and prints the
tables. By default the data is the "test" split of the embedded default dataset, generated with the settings the
model was trained with (read from its training_summary.json); retrieval is scored on every record that carries
evidence/answer spans (the default dataset's passkey and key_value documents, or JSON lines with the fields
evidence_start, evidence_end, answer_start, answer_end as character offsets).

Several models are scored on the same documents, one curve each in the plot and a column each in the tables
(the documents are made with the first model's training settings). Every question of a document is scored,
each on the text up to its own answer.

Examples:
    python scripts/evaluate.py outputs/tiny
    python scripts/evaluate.py outputs/tiny --files held_out.jsonl --block-size 2048 --output-dir outputs/eval
    python scripts/evaluate.py outputs/main/longnet outputs/main/local --labels LongNet local-only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("modeling_longnet") is None:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROG = "evaluate.py"

# the shared checks beside this script (a run through runpy, as in main.py's isolated process, does not put
# the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import check_device, check_device_name, check_model, check_output_folder, one_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="+", metavar="model", help="saved models: folders (as written by train.py) or Hub ids")
    parser.add_argument("--labels", nargs="+", default=None, help="a name for each model in the tables and the plot (default: the folder names)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model")
    data = parser.add_argument_group("data (default: the embedded default dataset)")
    data.add_argument("--files", nargs="+", default=[], help="evaluation files: .txt/.md, .json/.jsonl or .parquet")
    data.add_argument("--dataset", help="a Hub dataset name (needs network access)")
    data.add_argument("--dataset-config", help="the configuration name of the Hub dataset")
    data.add_argument("--split", default="test", help="split of the Hub or default dataset (default: test)")
    data.add_argument("--text-column", default="text", help="column holding the text in JSON, parquet and Hub data")
    data.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document", help="what one example of a text file is")
    data.add_argument("--max-documents", type=int, default=None, help="evaluate at most this many documents")
    data.add_argument("--documents", type=int, default=200, help="documents of the default dataset")
    data.add_argument("--max-chars", type=int, default=None, help="longest default-dataset document (default: as trained, else 1024)")
    data.add_argument("--min-distance", type=int, default=None, help="least evidence distance of the default dataset (default: as trained)")
    data.add_argument("--max-distance", type=int, default=None, help="longest evidence distance of the default dataset's pass-key questions, drawn log-uniformly from --min-distance (default: as trained)")
    data.add_argument("--seed", type=int, default=None, help="seed of the default dataset (default: as trained, else 0)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--block-size", type=int, default=None, help="context length in tokens (default: as trained, else min(1024, max_position_embeddings))")
    evaluation.add_argument("--num-position-buckets", type=int, default=8, help="equal-width position buckets for perplexity")
    evaluation.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    evaluation.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    evaluation.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights' dtype")
    evaluation.add_argument(
        "--output-dir", default=None,
        help="where the results go (default: MODEL/evaluation for one model folder, the first model's parent "
        "folder/evaluation for several, else ./evaluation)",
    )
    return parser


def _training_summary(model: str) -> dict:
    path = Path(model, "training_summary.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses a bad command line before torch and transformers are imported (10-14 s)."""
    for name in ("documents", "num_position_buckets", "batch_size", "block_size", "max_documents", "max_chars", "min_distance", "max_distance"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.files and args.dataset:
        raise ValueError("give either --files or --dataset, not both")
    if args.max_distance is not None and args.min_distance is not None and args.max_distance < args.min_distance:
        raise ValueError(f"--max-distance ({args.max_distance}) must be at least --min-distance ({args.min_distance})")
    for path in args.files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--files: file {path!r} does not exist")
    check_device_name(args.device)
    if args.output_dir is not None:
        check_output_folder("--output-dir", args.output_dir)
    if args.labels is not None and len(args.labels) != len(args.models):
        raise ValueError(f"--labels names {len(args.labels)} model(s) but {len(args.models)} were given: give one label per model")
    labels = model_labels(args)
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models have the same label ({', '.join(labels)}): name them apart with --labels")
    for model in args.models:
        check_model(model, args.revision)


def model_labels(args: argparse.Namespace) -> list[str]:
    return list(args.labels) if args.labels else [Path(model).name or model for model in args.models]


def load(args: argparse.Namespace) -> dict:
    """Everything that can fail on user input: the models, their tokenizers and the data."""
    import torch

    check_device(args.device)  # before the models are loaded for it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_longnet  # noqa: F401  (registers LongNet with the Auto classes)
    from modeling_longnet.data import DEFAULT_TASK_WEIGHTS, PASSKEY_STATEMENTS, load_records, min_retrieval_distance

    first = args.models[0]
    summary = _training_summary(first)
    trained_data = summary.get("data", {}).get("source", {})
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = {}
    for label, name in zip(model_labels(args), args.models):
        tokenizer = AutoTokenizer.from_pretrained(name, revision=args.revision)
        model = AutoModelForCausalLM.from_pretrained(name, revision=args.revision, dtype=dtype).to(device)
        models[label] = (name, model, tokenizer)
    config = models[model_labels(args)[0]][1].config
    block_size = args.block_size or summary.get("block_size") or min(1024, config.max_position_embeddings)

    records = load_records(
        files=args.files, dataset_name=args.dataset, dataset_config=args.dataset_config, split=args.split,
        text_column=args.text_column, sample_by=args.sample_by, default_documents=args.documents,
        default_max_chars=args.max_chars or trained_data.get("default_max_chars", 1024),
        default_min_distance=args.min_distance or trained_data.get("default_min_distance")
        or min_retrieval_distance(getattr(config, "segment_lengths", [64])),
        seed=args.seed if args.seed is not None else trained_data.get("seed", 0),
        default_task_weights=trained_data.get("default_task_weights", DEFAULT_TASK_WEIGHTS),
        default_max_distance=args.max_distance or trained_data.get("default_max_distance"),
        default_passkey_statements=trained_data.get("default_passkey_statements", PASSKEY_STATEMENTS),
    )
    if args.max_documents:
        records = records[: args.max_documents]
    if not records:
        raise ValueError("the evaluation data is empty")
    if args.output_dir:
        output_dir = Path(args.output_dir)
    elif len(args.models) == 1:
        output_dir = Path(first, "evaluation") if Path(first).is_dir() else Path("evaluation")
    else:
        output_dir = Path(first).parent / "evaluation" if Path(first).is_dir() else Path("evaluation")
    return {"models": models, "records": records, "block_size": block_size, "output_dir": output_dir}


def comparison_edges(segment_lengths: list[int], block_size: int) -> list[int]:
    """Distance buckets shared by the compared models: edges at every segment length and at the powers of two
    from the smallest one, so that the curves show where each model stops reaching."""
    inner = set(segment_lengths)
    edge = min(segment_lengths, default=64)
    while edge < block_size:
        inner.add(edge)
        edge *= 2
    return [0, *sorted(w for w in inner if 0 < w < block_size), block_size + 1]


def run(args: argparse.Namespace, models: dict, records: list[dict], block_size: int, output_dir: Path) -> Path:
    from modeling_longnet.data import min_retrieval_distance, question_records
    from modeling_longnet.evaluation import comparison_markdown, evaluate_model, plot_comparison, plot_report

    questions = question_records(records)
    # The same distance buckets for every model: edges at all of their segment lengths.
    segment_lengths = sorted({w for _, model, _ in models.values() for w in getattr(model.config, "segment_lengths", [])})
    smallest = [min(model.config.segment_lengths) for _, model, _ in models.values() if getattr(model.config, "segment_lengths", None)]
    reports = {}
    for label, (name, model, tokenizer) in models.items():
        reports[label] = evaluate_model(
            model, tokenizer, [r["text"] for r in records], block_size=block_size, retrieval_records=questions,
            num_position_buckets=args.num_position_buckets, batch_size=args.batch_size,
            distance_bucket_edges=comparison_edges(segment_lengths, block_size) if len(models) > 1 else None,
            far_distance=min_retrieval_distance(smallest) if smallest else None,
            metadata={"model": name, "documents": len(records), "data": args.files or args.dataset or f"default/{args.split}"},
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"{len(records)} documents, {len(questions)} questions, context {block_size}"
    if len(models) == 1:
        (label, report), = reports.items()
        report.save(output_dir / "evaluation.json")
        (output_dir / "evaluation.md").write_text(report.to_markdown())
        plot_report(report, output_dir / "evaluation.png", title=f"{Path(args.models[0]).name}: {title}")
        print(report.to_markdown())
    else:
        (output_dir / "evaluation.json").write_text(json.dumps({label: r.to_dict() for label, r in reports.items()}, indent=2) + "\n")
        table = comparison_markdown(reports)
        (output_dir / "evaluation.md").write_text(table)
        plot_comparison(reports, output_dir / "evaluation.png", title=f"{' vs '.join(reports)}: {title}", segment_lengths=segment_lengths)
        print(table)
    print(f"{PROG}: wrote {output_dir / 'evaluation.json'}, evaluation.md and evaluation.png")
    return output_dir


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)  # before the slow imports: a bad command line is answered at once
        loaded = load(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError, ConnectionError, OSError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    run(args, **loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
