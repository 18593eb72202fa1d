#!/usr/bin/env python
"""Convert a Llama causal LM checkpoint into a LongNet one (same weights, dilated attention).

    python scripts/convert_llama_to_longnet.py path/to/llama out/longnet \\
        --segment-lengths 2048 4096 8192 --dilation-rates 1 2 4

Without --segment-lengths / --dilation-rates the LongNet model has one branch covering the whole trained context
(w = max_position_embeddings, r = 1): it computes what the Llama model computes, ready for long-context fine-tuning
with the branches of your choice. The output folder loads with AutoModelForCausalLM (after `import modeling_longnet`,
or with trust_remote_code=True where the package is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "convert_llama_to_longnet.py"

# the shared checks beside this script (a run through runpy, as in main.py's isolated process, does not put
# the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import check_output_folder, looks_like_local_path, one_line  # noqa: E402

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before torch and transformers are imported (10-14 s)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="The converted model's branches can also be changed later in its config.json.",
    )
    parser.add_argument("model", help="folder written by LlamaForCausalLM.save_pretrained, or a Hub repo id")
    parser.add_argument("output_dir", help="folder to write the LongNet model (and the tokenizer, if any) into")
    parser.add_argument(
        "--segment-lengths",
        type=int,
        nargs="+",
        metavar="W",
        help="segment length of each branch (default: one branch of max_position_embeddings)",
    )
    parser.add_argument(
        "--dilation-rates",
        type=int,
        nargs="+",
        metavar="R",
        help="dilation rate of each branch, as many as --segment-lengths (default: 1)",
    )
    parser.add_argument(
        "--dilation-offsets",
        choices=("interleaved", "grouped"),
        default="interleaved",
        help="which positions head h takes in a branch of rate r: h mod r (interleaved, the paper's) or "
        "h // ceil(heads / r) (grouped, torchscale's); default: %(default)s",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the saved weights; 'auto' keeps the checkpoint's (default: %(default)s)",
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer into the output folder")
    args = parser.parse_args(argv)
    if (args.segment_lengths is None) != (args.dilation_rates is None):
        parser.error("give --segment-lengths and --dilation-rates together (one value per branch in each)")
    if args.segment_lengths is not None and len(args.segment_lengths) != len(args.dilation_rates):
        parser.error(
            f"--segment-lengths has {len(args.segment_lengths)} values and --dilation-rates "
            f"{len(args.dilation_rates)}: give one of each per branch"
        )
    if args.segment_lengths is not None and not all(value > 0 for value in args.segment_lengths + args.dilation_rates):
        parser.error("--segment-lengths and --dilation-rates must be positive")
    if looks_like_local_path(args.model):
        folder = os.path.expanduser(args.model)
        if not os.path.isdir(folder):
            parser.error(f"model: no such folder: {args.model}")
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            parser.error(f"model: cannot load a Llama checkpoint from {args.model!r}: it has no config.json")
        try:
            with open(config_file) as file:
                model_type = json.load(file).get("model_type")
        except (OSError, ValueError, AttributeError) as error:
            parser.error(f"model: cannot load a Llama checkpoint from {args.model!r}: its config.json cannot be read ({error})")
        if model_type != "llama":
            parser.error(f"model: {not_llama_message(args.model, model_type)}")
        if Path(args.output_dir).resolve() == Path(folder).resolve():  # save_pretrained would replace its config.json
            parser.error(
                f"output_dir: {args.output_dir!r} is the Llama checkpoint's own folder, which the conversion would "
                "overwrite; give another folder"
            )
    try:
        check_output_folder("output_dir", args.output_dir)  # save_pretrained only logs an error for a file, and returns
    except ValueError as error:
        parser.error(str(error))
    return args


def not_llama_message(name: str, model_type) -> str:
    """As modeling_longnet.conversion.not_llama_message (kept here to answer before the slow imports)."""
    already = " (it is a LongNet already: load it with AutoModelForCausalLM)" if model_type == "longnet" else ""
    return (
        f"{name!r} is not a Llama model: its config.json has model_type {model_type!r}{already}; the converter "
        "takes checkpoints of LlamaForCausalLM (model_type 'llama')"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from modeling_longnet import convert_llama_to_longnet
    from modeling_longnet.conversion import check_llama_checkpoint

    try:
        check_llama_checkpoint(args.model)  # a Hub id: its config.json, before the weights
        llama = LlamaForCausalLM.from_pretrained(args.model, dtype="auto")
    except OSError as error:
        print(f"{PROG}: error: model: cannot load a Llama checkpoint from {args.model!r}: {one_line(error)}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"{PROG}: error: model: {one_line(error)}", file=sys.stderr)
        return 2
    overrides = {"dilation_offsets": args.dilation_offsets}
    if args.segment_lengths is not None:
        overrides.update(segment_lengths=args.segment_lengths, dilation_rates=args.dilation_rates)
    try:
        longnet = convert_llama_to_longnet(llama, **overrides)
    except ValueError as error:  # an invalid branch layout, named by the config
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 2
    if args.dtype != "auto":
        longnet = longnet.to(getattr(torch, args.dtype))
    longnet.save_pretrained(args.output_dir)
    if not args.no_tokenizer:
        try:
            AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output_dir)
        except (OSError, ValueError):
            print(f"note: no tokenizer found beside {args.model}; the output folder has none", file=sys.stderr)
    config = longnet.config
    print(
        f"wrote {args.output_dir}: LongNet with {config.num_hidden_layers} layers, branches "
        f"w={config.segment_lengths} r={config.dilation_rates}, {longnet.num_parameters():,} parameters, "
        f"{longnet.dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
