"""Superseded by scripts/benchmark_decode.py (kept: results/*_2026-12-03-run4.* came from this file).

ms per generated token of the paper-size model (bf16, Triton backend) on a GPU with the caches:
LongNetBoundedCache eager, LongNetStaticCache (the ring of max(segment_lengths) slots) eager and compiled by generate,
and below the largest segment transformers' StaticCache eager and compiled; against a Llama of the same size with the
HF StaticCache, compiled and eager. Greedy; each figure is (time of generate with 1 + T new tokens - time with 1) / T,
synced, after a warm-up generate of each variant; the tokens of the LongNet variants must agree.

Every generate call gets a new cache object. Rows are written to --json after each one, so a timeout keeps them."""

import argparse
import json
import time

import torch
import torch._dynamo.config
import torch._inductor.config
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from modeling_longnet import LongNetBoundedCache, LongNetConfig, LongNetForCausalLM, LongNetStaticCache


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, ids, new_tokens, **kwargs):
    sync()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, **kwargs)
    sync()
    return out, time.perf_counter() - start


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="4096,65536")
    parser.add_argument("--long-context", type=int, default=262144, help="added if the others took under --long-if-under s")
    parser.add_argument("--long-if-under", type=float, default=240.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup-tokens", type=int, default=None,
                        help="new tokens of the warm-up generate; default 1 + T, so that a static cache of the timed "
                             "call has the warm-up's shape (4, decode.py's, recompiles in the timed call)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--preset", default="longnet-paper")  # the others for a CPU smoke test only
    parser.add_argument("--attn", default="triton")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    warmup = args.warmup_tokens or 1 + args.new_tokens
    # the attention op is tagged cudagraph_unsafe (it reads the mask on the host): partitioning captures the rest
    torch._inductor.config.graph_partition = True
    torch._dynamo.config.cache_size_limit = 64  # several caches and contexts share one compiled forward per model
    torch.manual_seed(0)
    device = args.device
    longest = max([int(c) for c in args.contexts.split(",")] + [args.long_context])
    model = LongNetForCausalLM(LongNetConfig.from_preset(args.preset, attn_implementation=args.attn)).to(device).to(torch.bfloat16).eval()
    cfg = model.config
    llama_config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=longest + 1024,
                               attn_implementation="sdpa")
    llama = LlamaForCausalLM(llama_config).to(device).to(torch.bfloat16).eval()
    results, agreement = [], []

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": results, "agreement": agreement, "new_tokens": args.new_tokens, "warmup_tokens": warmup,
                           "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "preset": args.preset, "attn": args.attn}, f, indent=1)

    def run_context(context):
        ids = torch.randint(3, min(50000, cfg.vocab_size), (1, context), device=device,
                            generator=torch.Generator(device).manual_seed(context))
        variants = {
            "bounded eager": (model, lambda: {"cache": LongNetBoundedCache(model.config)}),
            "ring eager": (model, lambda: {"cache": LongNetStaticCache(model.config), "disable_compile": True}),
            "ring compiled": (model, lambda: {"cache": LongNetStaticCache(model.config),
                                              "compile_config": CompileConfig(fullgraph=True)}),
        }
        if context + 1 + args.new_tokens <= max(cfg.segment_lengths):
            variants["StaticCache eager"] = (model, lambda: {"cache_implementation": "static", "disable_compile": True})
            variants["StaticCache compiled"] = (model, lambda: {"cache_implementation": "static",
                                                                "compile_config": CompileConfig(fullgraph=True)})
        variants["llama StaticCache compiled"] = (llama, lambda: {"cache_implementation": "static",
                                                                  "compile_config": CompileConfig(fullgraph=True)})
        variants["llama StaticCache eager"] = (llama, lambda: {"cache_implementation": "static", "disable_compile": True})
        tokens = {}
        for name, (net, options) in variants.items():
            began = time.perf_counter()
            try:
                timed_generate(net, ids, warmup, **options())  # warm-up (compiles)
                _, one = timed_generate(net, ids, 1, **options())
                out, many = timed_generate(net, ids, 1 + args.new_tokens, **options())
            except Exception as error:  # report and go on with the other variants
                row = {"context": context, "variant": name, "error": repr(error)[:600]}
                results.append(row)
                print(row, flush=True)
                save()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if net is model:
                tokens[name] = out[0, context:].tolist()
            row = {"context": context, "variant": name, "ms_per_token": 1e3 * (many - one) / args.new_tokens,
                   "prefill_s": one, "wall_s": time.perf_counter() - began}
            results.append(row)
            print(row, flush=True)
            save()
            del out
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        names = list(tokens)
        differ = {}
        if names:
            reference = tokens[names[0]]
            for name in names[1:]:
                index = first_difference(reference, tokens[name])
                if index is not None:
                    differ[name] = {"first_differing_index": index, "reference": names[0],
                                    "reference_tokens": reference[index:index + 4], "tokens": tokens[name][index:index + 4]}
        entry = {"context": context, "variants": names, "agree": len({tuple(t) for t in tokens.values()}) == 1,
                 "differ": differ}
        agreement.append(entry)
        print("tokens agree:", entry, flush=True)
        save()

    start = time.perf_counter()
    for context in (int(c) for c in args.contexts.split(",")):
        run_context(context)
    elapsed = time.perf_counter() - start
    print({"first_contexts_s": elapsed}, flush=True)
    if args.long_context and elapsed < args.long_if_under:
        run_context(args.long_context)
    else:
        print({"skipped_context": args.long_context, "because_first_contexts_took_s": elapsed}, flush=True)
    save()


if __name__ == "__main__":
    main()
