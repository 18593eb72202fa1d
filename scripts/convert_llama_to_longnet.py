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
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    looks_like_path = os.path.isabs(args.model) or args.model.startswith(".") or args.model.count("/") > 1
    if looks_like_path and not os.path.isdir(args.model):
        parser.error(f"model: no such folder: {args.model}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from modeling_longnet import convert_llama_to_longnet

    try:
        llama = LlamaForCausalLM.from_pretrained(args.model, dtype="auto")
    except OSError as error:
        print(f"error: model: cannot load a Llama checkpoint from {args.model!r}: {error}", file=sys.stderr)
        return 2
    overrides = {"dilation_offsets": args.dilation_offsets}
    if args.segment_lengths is not None:
        overrides.update(segment_lengths=args.segment_lengths, dilation_rates=args.dilation_rates)
    try:
        longnet = convert_llama_to_longnet(llama, **overrides)
    except ValueError as error:  # an invalid branch layout, named by the config
        print(f"error: {error}", file=sys.stderr)
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
