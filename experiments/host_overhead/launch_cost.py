"""The host cost of one direct launch, tensors or addresses (issue 14; run 26's A/B of whole calls could not see the
20-70 us per forward+backward predicted for addresses: its rounds spread by 0.15-0.3 ms). Here one launch of a 16K
forward's plan is issued back to back, ``--launches`` times with the GPU idle before the burst (the queue stays far
below its depth), and the host time per launch is the burst's over its count: with the call's own and the kept
arguments as tensors (what the launcher then resolves with ``data_ptr`` and ``cuPointerGetAttribute``), or as ints
(``_addresses``, what ``_Launch`` passes now). Rounds alternate; medians in us.

    python experiments/host_overhead/launch_cost.py --n 16K
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark_support import parse_size  # noqa: E402

import modeling_longnet.dilated_attention_triton as tb  # noqa: E402
from modeling_longnet import DilatedPattern, TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def burst(launch, own, stream, own_arguments, count):
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count):
        launch(own, stream, own_arguments)
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed / count * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="16K")
    parser.add_argument("--launches", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    n = parse_size(args.n)
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = TokenLayout.build(1, n, n, device=q.device)
    for _ in range(2):  # the plan built, its kernels compiled and found through the entry point
        dilated_attention(q, k, v, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)
    pattern = DilatedPattern(PAPER_W, PAPER_R)
    plan = tb._forward_plan(q, k, v, pattern, layout, True, 64**-0.5, 0.0)
    launch = plan.launches[0]
    assert launch.compiled is not None, "the launch has not kept its compiled kernel"
    stats = torch.empty((2, 1, n, 12), dtype=torch.float32, device=q.device)
    row_max, row_sum = stats.unbind()
    out = torch.empty_like(q)
    running = out if plan.running_dtype is None else torch.empty(q.shape, dtype=plan.running_dtype, device=q.device)
    own = (q, k, v, out, running, row_max, row_sum, row_max, 0)
    kept_addresses = launch.kept_addresses
    times = {"tensors": [], "addresses": [], "_addresses(own) alone": []}
    # the scratch allocator, as _forward lends it: kernels that build TMA descriptors ask for it at launch
    with tb._group_streams(q.device, plan.num_groups) as streams, tb._descriptor_scratch(plan.tma):
        stream = streams[launch.group]
        for _ in range(args.rounds):
            launch.kept_addresses = launch.kept  # the kept arguments as tensors too
            times["tensors"].append(burst(launch, own, stream, tuple(own), args.launches))
            launch.kept_addresses = kept_addresses
            times["addresses"].append(burst(launch, own, stream, tb._addresses(own), args.launches))
            started = time.perf_counter()
            for _ in range(args.launches):
                tb._addresses(own)
            times["_addresses(own) alone"].append((time.perf_counter() - started) / args.launches * 1e6)
    tensors = sum(isinstance(a, torch.Tensor) for a in (*own, *launch.kept))
    print(f"N={n}: launch {launch.fn.__name__} (grid {launch.grid}), {tensors} tensor arguments of "
          f"{len(own) + len(launch.kept)}; host us per launch, median of {args.rounds} rounds of {args.launches} "
          f"(in brackets the range)")
    for name, t in times.items():
        print(f"  {name:24s} {statistics.median(t):7.2f} [{min(t):.2f}-{max(t):.2f}]", flush=True)


if __name__ == "__main__":
    main()
