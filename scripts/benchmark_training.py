#!/usr/bin/env python
"""A model's training step at long sequence lengths: tokens per second and peak memory of a LongNet (the paper's
12 x 768 by default) against a Llama of the same sizes with SDPA attention, one row of N tokens, in one run.

Both take the same step: bf16 autocast, the base model's hidden states, the causal-LM loss in chunks of
``--loss-chunk`` tokens (``chunked_causal_lm_loss``: a (tokens x vocabulary) logits tensor at 1M tokens would not
fit), backward, AdamW; gradient checkpointing per layer unless ``--no-gradient-checkpointing``. Each step is
synchronised; the figure is the median of ``--steps`` after one warm-up step. Dense attention grows as N^2, so
the Llama runs only up to ``--llama-max-n``.

    python scripts/benchmark_training.py                                  # 32K, 128K, 1M on the GPU
    python scripts/benchmark_training.py --n 128K --compile               # the LongNet compiled too
    python scripts/benchmark_training.py --preset tiny --attn torch --n 256 --steps 2 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmark_support import (
    add_model_options, environment, llama_twin, refuse_below_one, refuse_unknown_model_options,
    refuse_unwritable_outputs, sync,
)
from cli_support import parse_size, parse_sizes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="32K,128K,1M", help="sequence lengths, comma-separated (K = 1024, M = 1024K)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and length (after one warm-up)")
    add_model_options(parser)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="autocast dtype (float32: none)")
    parser.add_argument("--position-encoding", choices=("rope", "xpos"), default="rope",
                        help="the LongNet's positions (xPos covers at most about 64K positions per call; its Llama twin has rope)")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="tokens per chunk of the loss")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute each layer in the backward pass (activations of 1M tokens do not fit otherwise)")
    parser.add_argument("--compile", action="store_true", help="also the LongNet under torch.compile(fullgraph=True)")
    parser.add_argument("--llama-max-n", type=parse_size, default=131072, help="the Llama twin only up to this length")
    parser.add_argument("--json", default=None, help="write every row to this JSON file (after each one)")
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    args = parser.parse_args(argv)
    args.n = parse_sizes(parser, "--n", args.n, "32K,128K,1M")
    refuse_below_one(parser, args, "steps", "loss_chunk")
    refuse_unknown_model_options(parser, args)
    refuse_unwritable_outputs(parser, args, "json", "markdown")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from modeling_longnet import LongNetConfig, LongNetForCausalLM  # noqa: E402
from modeling_longnet.modeling_longnet import chunked_causal_lm_loss  # noqa: E402


def training_step(model, forward, optimizer, ids, args, device) -> float:
    sync()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        hidden = forward(ids, use_cache=False).last_hidden_state
        loss = chunked_causal_lm_loss(hidden, model.lm_head, ids, chunk_size=args.loss_chunk)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {float(loss)}")
    return time.perf_counter() - start


def measure(name, model, forward, n, args, device) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    training_step(model, forward, optimizer, ids, args, device)  # warm-up (compiles, autotunes)
    times = [training_step(model, forward, optimizer, ids, args, device) for _ in range(args.steps)]
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del optimizer
    return {"n": n, "model": name, "step_s": step, "tokens_per_s": n / step, "peak_gib": peak}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = args.n
    torch.manual_seed(0)
    config = LongNetConfig.from_preset(args.preset, attn_implementation=args.attn, position_encoding=args.position_encoding)
    models = {"LongNet": LongNetForCausalLM(config).to(device).train()}
    if min(lengths) <= args.llama_max_n:
        models["Llama (SDPA)"] = LlamaForCausalLM(llama_twin(config, max(lengths))).to(device).train()
    if args.gradient_checkpointing:
        for model in models.values():
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
    forwards = {name: model.model for name, model in models.items()}
    if args.compile:
        models["LongNet, compiled"] = models["LongNet"]
        forwards["LongNet, compiled"] = torch.compile(models["LongNet"].model, fullgraph=True)
    env = environment(args, gradient_checkpointing=args.gradient_checkpointing, position_encoding=args.position_encoding)
    rows = []
    for n in lengths:
        for name, model in models.items():
            if name.startswith("Llama") and n > args.llama_max_n:
                continue
            try:
                rows.append(measure(name, model, forwards[name], n, args, device))
            except Exception as error:  # out of memory, say: report, and go on with the others
                rows.append({"n": n, "model": name, "error": repr(error)[:600]})
            print(rows[-1], file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"env": env, "rows": rows}, f, indent=1)
    table = markdown(rows, env)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


def markdown(rows, env) -> str:
    lines = [
        f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{'bf16 autocast' if env['dtype'] == 'bfloat16' else 'float32'}, preset "
        f"{env['preset']} with {env['position_encoding']} positions, attn {env['attn']}, gradient checkpointing {env['gradient_checkpointing']}, {env['date']}.",
        "",
        "| N | model | step | tokens/s | peak memory |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['n']} | {row['model']} | error: {row['error'][:80]} | | |")
            continue
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
        lines.append(f"| {row['n']} | {row['model']} | {row['step_s'] * 1e3:.1f} ms | {row['tokens_per_s']:,.0f} | {peak} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
