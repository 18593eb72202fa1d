"""Where a decoding step's GPU time goes (issue 14: run 14 timed the compiled ring's step at 4.12 ms on the GPU's
timeline against 1.12 for the Llama twin's, H100): one eager step of the paper's model with a LongNetStaticCache
after a 4K prefill, under torch.profiler; the CUDA kernels by total time. Eager, so each op is its own kernel (the
compiled step fuses some of them): this says which ops move the bytes.

    python experiments/host_overhead/decode_step_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark_support import CACHE_ARGUMENT  # noqa: E402

from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetStaticCache


def main():
    torch.manual_seed(0)
    config = LongNetConfig.from_preset("longnet-paper", attn_implementation="triton")
    model = LongNetForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    cache = LongNetStaticCache(config)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, config.vocab_size, (1, 4096), device="cuda")
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_ARGUMENT: cache})
        token = ids[:, -1:]
        for _ in range(3):
            model(token, use_cache=True, **{CACHE_ARGUMENT: cache})
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(token, use_cache=True, **{CACHE_ARGUMENT: cache})
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table)


if __name__ == "__main__":
    main()
