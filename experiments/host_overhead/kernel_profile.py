"""Where a small call's GPU time goes (issue 14, 8K-32K): each CUDA kernel's duration in one call (torch.profiler),
their sum (the GPU's busy time), the span from the first kernel's start to the last one's end, and the replay time
of the call captured in a CUDA graph (the GPU time with no host in the way), for the Triton backend and the FA2
floor (the same FLOPs on pre-gathered segments, benchmark.py's floor-fa2). Method "triton-per-branch" is the Triton
backward with one launch per branch (``BackwardConfig.group_branches`` off; the default groups small problems); each
row also gives the single synced call, back-to-back and host times.

    python experiments/host_overhead/kernel_profile.py --sizes 8192,16384,32768 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import call_kernels, drawn_problem, host_time, make_method, parse_args as benchmark_args, time_back_to_back, time_call  # noqa: E402

import modeling_longnet.dilated_attention_triton as tb  # noqa: E402

from modeling_longnet import DilatedPattern  # noqa: E402


def profile_call(run) -> dict:
    kernels = call_kernels(run)
    starts = [e.time_range.start for e in kernels]
    ends = [e.time_range.end for e in kernels]
    return {
        "kernels": [(e.name[:50], round(e.time_range.elapsed_us(), 1)) for e in kernels],
        "busy_us": round(sum(e.time_range.elapsed_us() for e in kernels), 1),
        "span_us": round(max(ends) - min(starts), 1) if kernels else 0.0,
    }


def graph_replay_ms(run, replays: int = 50) -> float | str:
    """Median ms of a replay of ``run`` captured in a CUDA graph (its inputs fixed), or why it could not be."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return round(statistics.median(times), 4)
    except Exception as error:  # noqa: BLE001 - reported, not raised: the profile is still useful
        return f"capture failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8192,16384,32768")
    parser.add_argument("--methods", default="triton,triton-per-branch,floor-fa2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bargs = benchmark_args([])
    if isinstance(bargs.dtype, str):
        bargs.dtype = getattr(torch, bargs.dtype)
    pattern = DilatedPattern(bargs.segment_lengths, bargs.dilation_rates)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        problem = drawn_problem(n, bargs, pattern)
        default_backward = tb.backward_config
        for method in args.methods.split(","):
            per_branch = method == "triton-per-branch"
            tb.backward_config = (
                (lambda *a: dataclasses.replace(default_backward(*a), group_branches=False))
                if per_branch else default_backward
            )
            for backward in (False, True):
                if per_branch and not backward:
                    continue  # the forward is the default's
                run = make_method("triton" if per_branch else method, problem, backward)
                row = {"n": n, "method": method, "mode": "fwd+bwd" if backward else "fwd", **profile_call(run)}
                row["single_ms"] = round(time_call(run, 20, 0.2), 4)
                row["back_to_back_ms"] = round(time_back_to_back(run), 4)
                row["host_ms"] = round(host_time(run), 4)
                row["graph_ms"] = graph_replay_ms(run)
                rows.append(row)
                print(f"N={n} {method} {row['mode']}: single {row['single_ms']} ms, back to back "
                      f"{row['back_to_back_ms']} ms, host {row['host_ms']} ms, graph {row['graph_ms']} ms; busy {row['busy_us']:.0f} us, "
                      f"span {row['span_us']:.0f} us, {len(row['kernels'])} kernels", flush=True)
                for name, us in row["kernels"]:
                    print(f"    {us:8.1f} us  {name}")
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
        tb.backward_config = default_backward
        problem.tensors.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
