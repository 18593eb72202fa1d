#!/usr/bin/env python
"""Evaluate a causal language model on long contexts: perplexity by position and retrieval accuracy by distance.

Writes evaluation.json, evaluation.md (the tables) and evaluation.png (the plots) to --output-dir, and prints the
tables. By default the data is the "test" split of the embedded default dataset, generated with the settings the
model was trained with (read from its training_summary.json); retrieval is scored on every record that carries
evidence/answer spans (the default dataset's passkey and key_value documents, or JSON lines with the fields
evidence_start, evidence_end, answer_start, answer_end as character offsets).

Examples:
    python scripts/evaluate.py outputs/tiny
    python scripts/evaluate.py outputs/tiny --files held_out.jsonl --block-size 2048 --output-dir outputs/eval
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
from cli_support import check_model, one_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a saved model: folder (as written by train.py) or Hub id")
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
    data.add_argument("--seed", type=int, default=None, help="seed of the default dataset (default: as trained, else 0)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--block-size", type=int, default=None, help="context length in tokens (default: as trained, else min(1024, max_position_embeddings))")
    evaluation.add_argument("--num-position-buckets", type=int, default=8, help="equal-width position buckets for perplexity")
    evaluation.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    evaluation.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    evaluation.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights' dtype")
    evaluation.add_argument("--output-dir", default=None, help="where the results go (default: MODEL/evaluation for a folder, else ./evaluation)")
    return parser


def _training_summary(model: str) -> dict:
    path = Path(model, "training_summary.json")
    return json.loads(path.read_text()) if path.is_file() else {}






def check_arguments(args: argparse.Namespace) -> None:
    """Refuses a bad command line before torch and transformers are imported (10-14 s)."""
    for name in ("documents", "num_position_buckets", "batch_size", "block_size", "max_documents", "max_chars", "min_distance"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.files and args.dataset:
        raise ValueError("give either --files or --dataset, not both")
    for path in args.files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--files: file {path!r} does not exist")
    check_model(args.model, args.revision)


def load(args: argparse.Namespace) -> dict:
    """Everything that can fail on user input: the model, its tokenizer and the data."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_longnet  # noqa: F401  (registers LongNet with the Auto classes)
    from modeling_longnet.data import load_records

    summary = _training_summary(args.model)
    trained_data = summary.get("data", {}).get("source", {})
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, dtype=dtype).to(device)
    block_size = args.block_size or summary.get("block_size") or min(1024, model.config.max_position_embeddings)

    records = load_records(
        files=args.files, dataset_name=args.dataset, dataset_config=args.dataset_config, split=args.split,
        text_column=args.text_column, sample_by=args.sample_by, default_documents=args.documents,
        default_max_chars=args.max_chars or trained_data.get("default_max_chars", 1024),
        default_min_distance=args.min_distance or trained_data.get("default_min_distance")
        or 2 * min(getattr(model.config, "segment_lengths", [64])),
        seed=args.seed if args.seed is not None else trained_data.get("seed", 0),
    )
    if args.max_documents:
        records = records[: args.max_documents]
    if not records:
        raise ValueError("the evaluation data is empty")
    output_dir = Path(args.output_dir or (Path(args.model, "evaluation") if Path(args.model).is_dir() else "evaluation"))
    return {"model": model, "tokenizer": tokenizer, "records": records, "block_size": block_size, "output_dir": output_dir}


def run(args: argparse.Namespace, model, tokenizer, records: list[dict], block_size: int, output_dir: Path) -> Path:
    from modeling_longnet.data import is_retrieval_record
    from modeling_longnet.evaluation import evaluate_model, plot_report

    report = evaluate_model(
        model, tokenizer, [r["text"] for r in records], block_size=block_size,
        retrieval_records=[r for r in records if is_retrieval_record(r)],
        num_position_buckets=args.num_position_buckets, batch_size=args.batch_size,
        metadata={"model": args.model, "documents": len(records), "data": args.files or args.dataset or f"default/{args.split}"},
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    report.save(output_dir / "evaluation.json")
    (output_dir / "evaluation.md").write_text(report.to_markdown())
    plot_report(report, output_dir / "evaluation.png", title=f"{Path(args.model).name}: {len(records)} documents, context {block_size}")
    print(report.to_markdown())
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
