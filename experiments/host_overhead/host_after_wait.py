"""Is the host time per call that grows with N the call's own, or the host's after a long wait? (issue 14.) Run 27:
the FA2 floor's forward+backward spends 1.37 ms on the host at 32K and 2.23 at 1M with the same 30 launches, and our
own stamps showed the gaps between launches (allocations, autograd) growing with N while the launches did not;
``busy_launch.py`` showed a launch and an allocation costing the host up to 1.5x more after the host waited 100 ms
in ``torch.cuda.synchronize``. ``benchmark.host_time`` waits that way before every timed call, for the previous
call's whole GPU time. Here the same calls are timed on the host after three kinds of wait for an idle GPU:

- ``synchronize``: ``torch.cuda.synchronize()`` alone (benchmark.py's host time);
- ``poll``: the host polls the stream in a Python loop until the GPU is done, then synchronizes (instantly);
- ``idle 50 ms``: synchronized, then 50 ms of ``time.sleep`` with the GPU idle.

If ``poll`` brings 1M down to 32K's figure, the growth is the host's state after waiting (a core's clock and caches),
which every method pays alike, and not work that our call does.

    python experiments/host_overhead/host_after_wait.py --n 32K,1M
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import benchmark  # noqa: E402
from modeling_longnet import DilatedPattern  # noqa: E402


def wait_synchronize():
    torch.cuda.synchronize()


def wait_poll():
    stream = torch.cuda.current_stream()
    while not stream.query():
        pass
    torch.cuda.synchronize()  # the side streams have joined the current one: returns at once


def wait_idle():
    torch.cuda.synchronize()
    time.sleep(0.05)


WAITS = {"synchronize": wait_synchronize, "poll": wait_poll, "idle 50 ms": wait_idle}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="32K,1M")
    parser.add_argument("--methods", default="triton,floor-fa2")
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args()
    args = benchmark.parse_args(["--n", options.n, "--methods", options.methods])
    pattern = DilatedPattern(args.segment_lengths, args.dilation_rates)
    print(f"host ms per call after each kind of wait (median of {options.repeats}, rounds alternate; in brackets "
          "p10-p90)")
    print("| N | method | mode | " + " | ".join(WAITS) + " |")
    print("|---|---|---|" + "---|" * len(WAITS))
    for n in args.n:
        problem = benchmark.problem_of_size(n, args, pattern)
        for method in args.methods:
            for mode in ("fwd", "fwd+bwd"):
                run = benchmark.make_method(method, problem, backward=mode == "fwd+bwd")
                for _ in range(3):
                    run()
                times = {name: [] for name in WAITS}
                for _ in range(options.repeats):
                    for name, wait in WAITS.items():
                        wait()
                        started = time.perf_counter()
                        run()
                        times[name].append((time.perf_counter() - started) * 1e3)
                torch.cuda.synchronize()
                cells = []
                for values in times.values():
                    values = sorted(values)
                    tenth, ninetieth = values[len(values) // 10], values[len(values) * 9 // 10]
                    cells.append(f"{statistics.median(values):.3f} [{tenth:.2f}-{ninetieth:.2f}]")
                label = benchmark.size_label(n)
                print(f"| {label} | {method} | {mode} | " + " | ".join(cells) + " |", flush=True)
    benchmark.release_problem()


if __name__ == "__main__":
    main()
