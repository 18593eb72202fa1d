"""Where our backward's own host time goes (issue 14: run 14 put 0.29 ms of a forward+backward's host time at 8K in
``_backward``, which cProfile around ``autograd.grad`` cannot see: autograd runs it on its CUDA device thread).
Calls ``_backward`` directly on this thread after one forward: its host time (perf_counter, GPU idle before, work
not waited for), the same inside ``torch.cuda.device`` as the autograd Function calls it, and a cProfile of 200
calls by own time.

    python experiments/host_overhead/backward_parts.py --n 8192
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import host_time  # noqa: E402

import modeling_longnet.dilated_attention_triton as tb  # noqa: E402
from modeling_longnet import DilatedPattern, TokenLayout  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    args = parser.parse_args()
    n = args.n
    q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    pattern = DilatedPattern(PAPER_W, PAPER_R, "interleaved")
    layout = TokenLayout.build(1, n, n, device=q.device)
    scale = 64**-0.5
    out, _, row_max, row_sum = tb._forward(q, k, v, pattern, layout, True, scale, 0.0, 0)

    def backward():
        return tb._backward(q, k, v, out, row_max, row_sum, g, None, pattern, layout, True, scale, 0.0, 0)

    def backward_in_device():
        with torch.cuda.device(q.device):
            return backward()

    def forward():
        return tb._forward(q, k, v, pattern, layout, True, scale, 0.0, 0)

    print(f"N={n} _forward host {host_time(forward):.3f} ms; _backward host {host_time(backward):.3f} ms; "
          f"inside torch.cuda.device {host_time(backward_in_device):.3f} ms", flush=True)
    for name, fn in (("_backward", backward), ("_forward", forward)):
        fn()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        print(f"--- cProfile of 200 {name} calls, N = {n}", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
