"""Does one launch cost the host more while the GPU is busy? (issue 14: the FA2 floor's own host time per
forward+backward grows with N at the same 30 kernels, 1.37 ms at 32K and 1.78 at 128K in run 26, 2.42 at 1M in run
25; ours likewise.) A burst of ``--launches`` tiny kernels (an in-place add on 1K elements) is timed on the host
with the GPU idle before it, and again after ``--busy`` ms of matmuls were queued ahead of it (a handful of long
kernels, far below the queue's depth): "queued ahead". A third condition, "waited for", has the host wait in
``torch.cuda.synchronize`` for that much work first and then issue the burst to an idle GPU: if that is as slow as
"queued ahead", the cost comes from the host's long wait (a core's clock or caches after it), not from the GPU
being busy. A second burst allocates and frees tensors of a 1M call's sizes (the caching allocator's work) under
the same conditions. Rounds alternate; medians in us per launch or allocation.

    python experiments/host_overhead/busy_launch.py --busy 0,1,5,25,100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def queue_work(milliseconds: float, matrix: torch.Tensor, one_matmul_ms: float) -> None:
    for _ in range(round(milliseconds / one_matmul_ms)):
        torch.mm(matrix, matrix)


def timed(burst, count: int) -> float:
    started = time.perf_counter()
    burst()
    return (time.perf_counter() - started) / count * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,1,5,25,100", help="ms of GPU work queued before each burst")
    parser.add_argument("--launches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    tiny = torch.zeros(1024, device=device)
    matrix = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(matrix, matrix)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        torch.mm(matrix, matrix)
    torch.cuda.synchronize()
    one_matmul_ms = (time.perf_counter() - started) / 20 * 1e3
    print(f"one 4096^3 bf16 matmul: {one_matmul_ms:.3f} ms")

    def launches():
        for _ in range(args.launches):
            tiny.add_(1)

    # One 1M forward+backward's tensors (B=1, H=12, D=64, bf16): q, k, v, out, grads, the float32 LSE.
    shapes = [((1, 1 << 20, 12, 64), torch.bfloat16)] * 7 + [((1, 12, 1 << 20), torch.float32)] * 2

    def allocations():
        kept = [torch.empty(shape, device=device, dtype=dtype) for shape, dtype in shapes]
        del kept

    bursts = {"launch": (launches, args.launches), "allocate+free": (allocations, len(shapes))}
    for burst, _ in bursts.values():
        burst()
    busy_levels = [float(b) for b in args.busy.split(",")]
    # with nothing before the burst, "waited for" is "queued ahead": timed once
    cases = [(busy, condition) for busy in busy_levels for condition in ("queued ahead", "waited for")
             if busy > 0 or condition == "queued ahead"]
    results = {(name, busy, condition): [] for name in bursts for busy, condition in cases}
    for _ in range(args.rounds):
        for busy, condition in cases:
            for name, (burst, count) in bursts.items():
                torch.cuda.synchronize()
                queue_work(busy, matrix, one_matmul_ms)
                if condition == "waited for":
                    torch.cuda.synchronize()
                results[name, busy, condition].append(timed(burst, count))
        torch.cuda.synchronize()
    print("| burst | GPU work before (ms) | condition | host us per launch or allocation, median | p10 | p90 |")
    print("|---|---|---|---|---|---|")
    for (name, busy, condition), values in results.items():
        values = sorted(values)
        tenth = values[len(values) // 10]
        ninetieth = values[len(values) * 9 // 10]
        print(f"| {name} | {busy:g} | {condition} | {statistics.median(values):.2f} | {tenth:.2f} | {ninetieth:.2f} |")


if __name__ == "__main__":
    main()
