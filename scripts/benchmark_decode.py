#!/usr/bin/env python
"""Decoding speed: ms per generated token of a LongNet (the paper's 12 x 768 by default) with each cache, eager and
compiled, against a Llama of the same size with transformers' static cache, at several context lengths, in one run.

Each figure is what a user's ``generate`` costs per token, measured two ways in the same calls, greedy, after a
warm-up generate of the same length (a static cache then has the timed call's shape, so nothing recompiles inside
it): the median interval between the starts of consecutive decoding steps within a generate call (generate waits
for each token before it asks for the next, so an interval is a token's whole cost: the step and generate's own
work around it), and in brackets (time of generate with 1 + T new tokens - time with 1) / T, synchronised, each time
the median of ``--repeats`` alternating calls. The interval is the headline: the subtraction carries the noise of
two prefills (a 1M prefill varies by more than 32 tokens take). Every call gets a fresh cache. Prompts longer than ``--prefill-chunk`` are prefilled
in chunks (``generate(prefill_chunk_size=...)``: one xPos call spans at most about 64K positions in bf16). On a GPU,
compiled variants get a second row: the median decoding step's own forward (CUDA events around the compiled calls
of one token per row that generate makes, and the host time of issuing them; prefill chunks are not counted); the
rest of a token's time is generate's work around it.

The LongNet variants must generate the same tokens; where they do not, the row says at which step, and by how much
the logits of the two differ there against the margin between the reference's two best tokens (a near tie in 16-bit
arithmetic flips on rounding; a real difference does not look like one).

    python scripts/benchmark_decode.py                                    # 4K .. 1M, bf16, on the GPU
    python scripts/benchmark_decode.py --contexts 40000 --dtype float32 --llama-max-context 0 --new-tokens 16
    python scripts/benchmark_decode.py --preset tiny --attn torch --contexts 40 --new-tokens 4 --compile-backend aot_eager
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

from benchmark_support import (
    add_model_options, cache_argument, environment, llama_twin, refuse_below_one, refuse_unknown_model_options,
    refuse_unwritable_outputs, sync,
)
from cli_support import parse_size, parse_sizes

# The variants timed (the table's rows), in order; variants() builds them. The last three hold every token (a full
# StaticCache): they run only at contexts up to --llama-max-context.
VARIANTS = (
    "LongNet, bounded cache, eager",
    "LongNet, static bounded cache, eager",
    "LongNet, static bounded cache, compiled",
    "LongNet, StaticCache, compiled",
    "Llama, StaticCache, compiled",
    "Llama, StaticCache, eager",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4K,64K,256K,1M", help="prompt lengths, comma-separated (K = 1024)")
    parser.add_argument("--new-tokens", type=int, default=32, help="T: tokens timed per variant and context")
    parser.add_argument("--repeats", type=int, default=3, help="generate calls of 1 and of 1 + T tokens, alternating; medians")
    add_model_options(parser)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--prefill-chunk", type=parse_size, default=32768, help="prefill longer prompts in chunks of this")
    parser.add_argument("--llama-max-context", type=parse_size, default=262144,
                        help="the Llama twin and LongNet with a full StaticCache only up to this context; 0: never")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled variants")
    parser.add_argument(
        "--variants", default=None, help=f"semicolon-separated subset of the variants: {'; '.join(VARIANTS)}"
    )
    parser.add_argument("--json", default=None, help="write every row to this JSON file (after each one)")
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    args = parser.parse_args(argv)
    args.contexts = parse_sizes(parser, "--contexts", args.contexts, "4K,64K,1M")
    refuse_below_one(parser, args, "new_tokens", "repeats", "prefill_chunk")
    if args.llama_max_context < 0:
        parser.error(f"--llama-max-context must be >= 0 (0: no Llama), got {args.llama_max_context}")
    if args.variants is not None:  # kept as the list of names
        args.variants = wanted = [part.strip() for part in args.variants.split(";")]
        unknown = [name for name in wanted if name not in VARIANTS]
        if unknown:
            parser.error(
                f"--variants: unknown variant {unknown[0]!r}; give names separated by ';' from: {'; '.join(VARIANTS)}"
            )
        if set(wanted) <= set(VARIANTS[3:]) and min(args.contexts) > args.llama_max_context:  # an empty table
            parser.error(
                f"--variants: {'; '.join(wanted)} run only at contexts up to --llama-max-context "
                f"({args.llama_max_context}), and --contexts has none: raise --llama-max-context, or add another variant"
            )
    refuse_unknown_model_options(parser, args)
    refuse_unwritable_outputs(parser, args, "json", "markdown")
    return args


def compile_backend_problem(name: str) -> str | None:
    """Why torch.compile has no backend ``name`` (after torch is imported, before a model is built), or None. Its
    debug backends (eager, aot_eager) count: they time the graph capture without a compiler."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    if name in backends:
        return None
    return f"--compile-backend {name!r} is not a torch.compile backend; choose one of {', '.join(backends)}"


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch._dynamo.config  # noqa: E402
import torch._inductor.config  # noqa: E402
from transformers import CompileConfig, LlamaForCausalLM  # noqa: E402

from modeling_longnet import LongNetBoundedCache, LongNetConfig, LongNetForCausalLM, LongNetStaticCache  # noqa: E402


def variants(args, model, llama, context: int) -> dict:
    """name -> (model, generate options, the options' factory builds a fresh cache per call)."""
    compiled = CompileConfig(fullgraph=True, backend=args.compile_backend)
    compiled._compile_all_devices = True  # generate compiles on CUDA only, unless told

    def ring():  # allocated before generate: a chunked prefill runs the compiled forward, which must not allocate it
        cache = LongNetStaticCache(model.config)
        config = model.config
        cache.early_initialization(1, config.num_key_value_heads, config.head_dim, dtype=model.dtype, device=model.device)
        return cache

    cache = cache_argument()
    bounded, static_bounded, static_bounded_compiled, static_compiled, llama_compiled, llama_eager = VARIANTS
    table = {
        bounded: (model, lambda: {cache: LongNetBoundedCache(model.config)}),
        static_bounded: (model, lambda: {cache: ring(), "disable_compile": True}),
        static_bounded_compiled: (model, lambda: {cache: ring(), "compile_config": compiled}),
    }
    if context <= args.llama_max_context:  # transformers' StaticCache holds every token, as the Llama's does
        table[static_compiled] = (model, lambda: {"cache_implementation": "static", "compile_config": compiled})
    if llama is not None and context <= args.llama_max_context:
        table[llama_compiled] = (llama, lambda: {"cache_implementation": "static", "compile_config": compiled})
        table[llama_eager] = (llama, lambda: {"cache_implementation": "static", "disable_compile": True})
    if args.variants is not None:
        table = {name: value for name, value in table.items() if name in args.variants}
    return table


class StepTimer:
    """Times the decoding steps ``generate`` makes: the calls of one token per row, eager (the model's forward) or
    compiled (the call ``generate`` asks the model for with ``get_compiled_call``); prefill chunks are not counted.
    For each step: its start on the host clock, whence the intervals between consecutive steps of one generate call
    (a token's whole cost); for compiled steps on a GPU, CUDA events around the call (what the step costs on the
    GPU's timeline, idle gaps within it included) and the host time of issuing it."""

    def __init__(self, model, gpu: bool):
        self.model, self.gpu = model, gpu
        self.events, self.host, self.intervals, self.last_start = [], [], [], None

    def begin_generate(self) -> None:
        """A generate call starts: the interval to its first step would span a prefill, not a token."""
        self.last_start = None

    def _started(self) -> float:
        started = time.perf_counter()
        if self.last_start is not None:
            self.intervals.append(started - self.last_start)
        self.last_start = started
        return started

    def __enter__(self):
        original_compiled_call, original_forward = self.model.get_compiled_call, self.model.forward

        def one_token(args, kwargs) -> bool:
            ids = kwargs.get("input_ids", args[0] if args else None)
            return ids is not None and ids.shape[-1] == 1

        @functools.wraps(original_forward)  # generate reads the forward's signature (logits_to_keep)
        def forward(*args, **kwargs):  # eager steps; traced alike by a compiler, which leaves this branch out
            if not torch.compiler.is_compiling() and one_token(args, kwargs):
                self._started()
            return original_forward(*args, **kwargs)

        def instrumented(compile_config):
            call = original_compiled_call(compile_config)

            def timed(*args, **kwargs):
                if not one_token(args, kwargs):
                    return call(*args, **kwargs)
                if not self.gpu:  # no CUDA events: the step's start only
                    self._started()
                    return call(*args, **kwargs)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                started = self._started()
                start.record()
                out = call(*args, **kwargs)
                end.record()
                self.host.append(time.perf_counter() - started)
                self.events.append((start, end))
                return out

            return timed

        self.model.get_compiled_call, self.model.forward = instrumented, forward
        return self

    def __exit__(self, *exc):
        del self.model.get_compiled_call, self.model.forward  # the class's own methods again

    def interval_ms(self) -> float | None:
        return 1e3 * statistics.median(self.intervals) if self.intervals else None

    def medians_ms(self) -> tuple[float, float] | None:
        if not self.events:
            return None
        sync()
        gpu = sorted(start.elapsed_time(end) for start, end in self.events)
        host = sorted(1e3 * t for t in self.host)
        return gpu[len(gpu) // 2], host[len(host) // 2]


def timed_generate(model, ids, new_tokens, prefill_chunk, **options):
    chunk = {"prefill_chunk_size": prefill_chunk} if ids.shape[1] > prefill_chunk else {}
    sync()
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True, **chunk, **options,
    )
    sync()
    return out, time.perf_counter() - start


def compare(reference, other) -> dict | None:
    """Where two LongNet variants' greedy tokens part, and whether it looks like a near tie."""
    tokens_a, tokens_b = reference["tokens"], other["tokens"]
    step = next((i for i, (a, b) in enumerate(zip(tokens_a, tokens_b)) if a != b), None)
    if step is None:
        return None
    logits_a, logits_b = reference["logits"][step], other["logits"][step]
    top = logits_a.topk(2).values
    return {
        "first_differing_step": step,
        "max_logit_difference": float((logits_a - logits_b).abs().max()),
        "reference_top2_margin": float(top[0] - top[1]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = compile_backend_problem(args.compile_backend)
    if problem is not None:  # as parse_args' errors, which could not ask torch
        print(f"{Path(__file__).name}: error: {problem}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    # The attention op of a prefill chunk stays out of CUDA graphs (it reads the mask on the host): partition there.
    torch._inductor.config.graph_partition = True
    torch._dynamo.config.cache_size_limit = 64  # several caches and contexts share each model's compiled forward
    contexts = args.contexts
    torch.manual_seed(0)
    config = LongNetConfig.from_preset(args.preset, attn_implementation=args.attn)
    model = LongNetForCausalLM(config).to(device=device, dtype=dtype).eval()
    llama = None
    if args.llama_max_context and min(contexts) <= args.llama_max_context:
        llama = LlamaForCausalLM(llama_twin(config, max(contexts) + args.new_tokens + 64)).to(device=device, dtype=dtype).eval()
    env = environment(args, new_tokens=args.new_tokens)
    rows, agreement = [], []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "rows": rows, "agreement": agreement}, f, indent=1)

    for context in contexts:
        ids = torch.randint(3, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context)).to(device)
        outputs = {}
        for name, (net, options) in variants(args, model, llama, context).items():
            try:
                timed_generate(net, ids, 1 + args.new_tokens, args.prefill_chunk, **options())  # warm-up, compiles
                ones, manys = [], []
                with StepTimer(net, gpu=device == "cuda") as steps:
                    for _ in range(args.repeats):  # alternating; medians, since a long prefill varies by more than T tokens take
                        steps.begin_generate()
                        ones.append(timed_generate(net, ids, 1, args.prefill_chunk, **options())[1])
                        steps.begin_generate()
                        out, seconds = timed_generate(net, ids, 1 + args.new_tokens, args.prefill_chunk, **options())
                        manys.append(seconds)
                one, many = statistics.median(ones), statistics.median(manys)
            except Exception as error:  # report, and go on with the other variants
                rows.append({"context": context, "variant": name, "error": repr(error)[:600]})
                print(rows[-1], file=sys.stderr, flush=True)
                save()
                continue
            rows.append({"context": context, "variant": name, "ms_per_token": steps.interval_ms(),
                         "ms_per_token_by_subtraction": 1e3 * (many - one) / args.new_tokens, "prefill_s": one})
            step = steps.medians_ms()
            if step is not None:  # compiled variants: the forward of a decoding step itself
                rows[-1].update(step_ms=step[0], step_host_ms=step[1])
            print(rows[-1], file=sys.stderr, flush=True)
            if net is model:
                outputs[name] = {"tokens": out.sequences[0, context:].tolist(), "logits": [s[0].float().cpu() for s in out.logits]}
            del out
            if device == "cuda":
                torch.cuda.empty_cache()
            save()
        names = list(outputs)
        differences = {name: compare(outputs[names[0]], outputs[name]) for name in names[1:]}
        agreement.append({"context": context, "reference": names[0] if names else None,
                          "differences": {name: d for name, d in differences.items() if d is not None}})
        print(agreement[-1], file=sys.stderr, flush=True)
        save()
    table = markdown(rows, agreement, env)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


def per_token(row) -> str:
    """A row's ms per token: the median step interval, and in brackets the subtraction of two generate times."""
    interval = "-" if row["ms_per_token"] is None else f"{row['ms_per_token']:.2f}"  # T = 1 has no interval
    return f"{interval} ({row['ms_per_token_by_subtraction']:.2f})"


def markdown(rows, agreement, env) -> str:
    contexts = sorted({row["context"] for row in rows})
    names = list(dict.fromkeys(row["variant"] for row in rows))
    cell = {(row["context"], row["variant"]): row for row in rows}
    lines = [
        f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}, preset "
        f"{env['preset']}, attn {env['attn']}, T = {env['new_tokens']}, {env['date']}. ms per generated token: the "
        "median interval between decoding steps (in brackets: the difference of generate times with 1 + T and 1 new "
        "tokens, over T).",
        "",
        "| variant | " + " | ".join(f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts) + " |",
        "|---|" + "---|" * len(contexts),
    ]
    for name in names:
        values = []
        for context in contexts:
            row = cell.get((context, name))
            values.append("-" if row is None else ("error" if "error" in row else per_token(row)))
        lines.append(f"| {name} | " + " | ".join(values) + " |")
        if any("step_ms" in row for row in rows if row["variant"] == name):
            steps = [cell.get((context, name), {}) for context in contexts]
            lines.append(f"| {name}: the step's forward, GPU timeline / host | " + " | ".join(
                f"{row['step_ms']:.2f} / {row['step_host_ms']:.2f}" if "step_ms" in row else "-" for row in steps
            ) + " |")
    for entry in agreement:
        for name, d in entry["differences"].items():
            lines.append(
                f"\nAt {entry['context']}: {name} parts from {entry['reference']} at step {d['first_differing_step']} "
                f"(logits differ by up to {d['max_logit_difference']:.3g}; the reference's two best differ by "
                f"{d['reference_top2_margin']:.3g})."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
