#!/usr/bin/env python
"""Publish a trained LongNet on the Hugging Face Hub, or any Hub-compatible endpoint (HF_ENDPOINT).

The repository gets the weights (safetensors), the config, the model code (so that it loads with
AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True) without this package), the tokenizer, the
training summary, the evaluation files of scripts/evaluate.py and a model card (README.md) describing the
configuration, the data and the evaluation with its figures.

The token comes from --token, else HF_TOKEN, else the one saved by `hf auth login`.

Examples:
    python scripts/push_to_hub.py outputs/tiny --repo-id my-user/longnet-tiny
    HF_ENDPOINT=https://hub.example.org python scripts/push_to_hub.py outputs/tiny --repo-id team/longnet --private
    python scripts/push_to_hub.py outputs/tiny --repo-id my-user/longnet-tiny --dry-run --staging-dir /tmp/card
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

if importlib.util.find_spec("modeling_longnet") is None:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROG = "push_to_hub.py"

# the shared checks beside this script (a run through runpy, as in main.py's isolated process, does not put
# the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import check_output_folder, one_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", help="the model folder written by train.py")
    parser.add_argument("--repo-id", required=True, help="the repository: user/name (or name alone, for the token's user)")
    parser.add_argument("--evaluation-dir", default=None, help="folder with evaluate.py's files (default: MODEL_DIR/evaluation)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--commit-message", default="Upload LongNet model", help="the commit's message")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or the saved login)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--staging-dir", default=None, help="prepare the repository's files here (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="prepare the files (needs --staging-dir to keep them) but upload nothing")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses a bad command line before torch and transformers are imported (10-14 s)."""
    if args.dry_run and args.staging_dir is None:
        raise ValueError("--dry-run keeps nothing without --staging-dir")
    parts = args.repo_id.split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"--repo-id must be user/name or name, got {args.repo_id!r}")
    from huggingface_hub.utils import validate_repo_id  # light (no torch): the Hub's own rules for the names

    try:
        validate_repo_id(args.repo_id)
    except ValueError as error:  # HFValidationError
        raise ValueError(f"--repo-id {args.repo_id!r} is not a valid Hub repository id: {one_line(error)}") from None
    if args.staging_dir is not None:
        check_output_folder("--staging-dir", args.staging_dir)
    model_dir = Path(args.model_dir).expanduser()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {args.model_dir!r} does not exist")
    if args.evaluation_dir is not None and not Path(args.evaluation_dir).expanduser().is_dir():
        raise FileNotFoundError(f"--evaluation-dir: folder {args.evaluation_dir!r} does not exist")
    summary_file = model_dir / "training_summary.json"
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    if isinstance(summary, dict) and summary.get("status") == "failed":
        raise ValueError(
            f"model folder {args.model_dir!r} holds no finished model: its training failed at step "
            f"{summary.get('failed_at_step')} ({summary_file.name}: {summary.get('error', 'no reason recorded')})"
        )


def run(args: argparse.Namespace) -> str | None:
    from modeling_longnet.hub import prepare_upload_folder, upload_to_hub

    with tempfile.TemporaryDirectory(prefix="longnet-upload-") as temporary:
        staging = Path(args.staging_dir or temporary)
        folder = prepare_upload_folder(args.model_dir, staging, repo_id=args.repo_id, evaluation_dir=args.evaluation_dir)
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        print(f"{PROG}: prepared {len(files)} files in {folder}: {', '.join(files)}")
        if args.dry_run:
            return None
        url = upload_to_hub(
            folder, args.repo_id, token=args.token, endpoint=args.endpoint, private=args.private,
            commit_message=args.commit_message,
        )
    print(f"{PROG}: uploaded to {url}")
    return url


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)  # before the slow imports: a bad command line is answered at once
    except (FileNotFoundError, ValueError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    from modeling_longnet.hub import HubPublishError

    try:
        run(args)
    except (HubPublishError, FileNotFoundError, ValueError, OSError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
