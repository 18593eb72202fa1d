"""ms per generated token of the paper-size model (bf16, Triton backend) on a GPU at a few prompt lengths:
LongNetBoundedCache eager, StaticCache eager, StaticCache compiled by generate (CUDA graphs, its default
"reduce-overhead"). Greedy; each figure is (time of generate with 1 + T new tokens - time with 1) / T, synced;
the tokens of the three must agree."""

import argparse
import json
import time

import torch
import torch._inductor.config
from transformers import CompileConfig

from modeling_longnet import LongNetBoundedCache, LongNetConfig, LongNetForCausalLM


def timed_generate(model, ids, new_tokens, **kwargs):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, **kwargs)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="4096,16384")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    # the attention op is tagged cudagraph_unsafe (it reads the mask on the host): partitioning captures the rest
    torch._inductor.config.graph_partition = True
    torch.manual_seed(0)
    model = LongNetForCausalLM(LongNetConfig.from_preset("longnet-paper", attn_implementation="triton")).cuda().to(torch.bfloat16).eval()
    results = []
    for context in (int(c) for c in args.contexts.split(",")):
        ids = torch.randint(3, 50000, (1, context), device="cuda", generator=torch.Generator("cuda").manual_seed(context))
        variants = {
            "bounded eager": lambda: {"cache": LongNetBoundedCache(model.config)},
            "static eager": lambda: {"cache_implementation": "static", "disable_compile": True},
            "static compiled": lambda: {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=True)},
        }
        tokens = {}
        for name, options in variants.items():
            try:
                timed_generate(model, ids, 4, **options())  # warm-up (compiles)
                _, one = timed_generate(model, ids, 1, **options())
                out, many = timed_generate(model, ids, 1 + args.new_tokens, **options())
            except Exception as error:  # report and go on with the other variants
                print({"context": context, "variant": name, "error": repr(error)[:400]}, flush=True)
                continue
            tokens[name] = out[0, context:].tolist()
            row = {"context": context, "variant": name, "ms_per_token": 1e3 * (many - one) / args.new_tokens, "prefill_s": one}
            results.append(row)
            print(row, flush=True)
        print("tokens agree:", len({tuple(t) for t in tokens.values()}) == 1, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
