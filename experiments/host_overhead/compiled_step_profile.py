"""Where a compiled decoding step's GPU time goes (run 16, H100: the compiled ring step took 3.1 ms of GPU timeline
at 4K while an eager step's kernels summed to 1.3 ms). The paper's model, a LongNetStaticCache after a 4K prefill,
the forward compiled with fullgraph as generate compiles it (mode "default": every kernel its own launch, so the
profiler names them; then "reduce-overhead", CUDA graphs, as generate runs it): CUDA events around 20 steps, and the
kernels of one step by total time.

    python experiments/host_overhead/compiled_step_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark_support import CACHE_ARGUMENT  # noqa: E402

from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetStaticCache  # noqa: E402


def main():
    torch.manual_seed(0)
    torch._inductor.config.graph_partition = True
    config = LongNetConfig.from_preset("longnet-paper", attn_implementation="triton")
    model = LongNetForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(3, config.vocab_size, (1, 4096), device="cuda")
    for mode in ("default", "reduce-overhead"):
        cache = LongNetStaticCache(config)
        cache.early_initialization(1, config.num_key_value_heads, config.head_dim, dtype=torch.bfloat16, device="cuda")
        step = torch.compile(model.forward, fullgraph=True, mode=mode)
        with torch.no_grad():
            model(ids, use_cache=True, **{CACHE_ARGUMENT: cache})
            token = ids[:, -1:].clone()
            for _ in range(4):
                step(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: cache})
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                step(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: cache})
            end.record()
            torch.cuda.synchronize()
            print(f"== mode {mode}: {start.elapsed_time(end) / 20:.3f} ms per step back to back", flush=True)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                step(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: cache})
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70), flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
