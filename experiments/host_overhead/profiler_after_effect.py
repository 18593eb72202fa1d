"""Does a torch.profiler session leave later calls slower on the host? (run 24: a 32K forward's host time went
168 -> 377 us in the process after one profiler session; no control ran.)

One process per arm: the host time of a forward (median of --repeats calls, the GPU idle before each) measured,
then either one torch.profiler session around a call (arm "profiler") or a pause of the same length (arm "control"),
then measured again three times. Run the arms alternately, in fresh processes:

    for arm in control profiler control profiler; do python experiments/host_overhead/profiler_after_effect.py --arm $arm; done
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import host_time  # noqa: E402

from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def host_us(fn, repeats: int) -> float:
    return 1e3 * host_time(fn, repeats)  # benchmark.py's measure: the GPU idle before each call, not waited for


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arm", choices=("control", "profiler"), required=True)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    q, k, v = (torch.randn(1, args.n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = TokenLayout.build(1, args.n, args.n, device=q.device)

    def forward():
        return dilated_attention(q, k, v, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)

    for _ in range(10):
        forward()
    before = host_us(forward, args.repeats)
    started = time.perf_counter()
    if args.arm == "profiler":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]):
            forward()
            torch.cuda.synchronize()
        print(f"profiler session {time.perf_counter() - started:.2f} s")
    else:
        time.sleep(2.0)
    after = [host_us(forward, args.repeats) for _ in range(3)]
    print(f"== arm={args.arm} N={args.n}: forward host us before {before:.1f}, after "
          + ", ".join(f"{a:.1f}" for a in after) + f" (ratio {statistics.median(after) / before:.2f})", flush=True)


if __name__ == "__main__":
    main()
