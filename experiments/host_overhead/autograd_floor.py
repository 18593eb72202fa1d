"""What torch's autograd itself costs on the host for one forward+backward through ``torch.autograd.grad`` (issue 14
asks at most 1 ms for ours): the same measure (benchmark.host_time: the GPU idle before each call, its work not
waited for) of calls that do almost nothing, next to the Triton backend's call, each with autograd's CUDA device
thread (the default) and on the calling thread (``torch.autograd.set_multithreading_enabled(False)``). Rounds
alternate between the calls so that a drift of the host's speed touches each alike.

    python experiments/host_overhead/autograd_floor.py --n 16K,32K
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import host_time  # noqa: E402
from benchmark_support import parse_size  # noqa: E402

from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


class _Doubled(torch.autograd.Function):
    """A Python autograd Function of one kernel each way: the engine's and the Function's own cost."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def calls(n: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    layout = TokenLayout.build(1, n, n, device=q.device)

    def aten_op():  # one aten op: no Python in the backward at all
        return torch.autograd.grad(leaves[0] * 2, leaves[0], g)

    def python_function():
        return torch.autograd.grad(_Doubled.apply(leaves[0]), leaves[0], g)

    def ours():
        out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)
        return torch.autograd.grad(out, leaves, g)

    def ours_public():  # no prepared layout
        return torch.autograd.grad(dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton"), leaves, g)

    return {"one aten op": aten_op, "a Python Function": python_function, "ours, prepared layout": ours,
            "ours, public call": ours_public}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="16K,32K")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for n in [parse_size(x) for x in args.n.split(",")]:
        named = calls(n)
        times = {(name, threaded): [] for name in named for threaded in (True, False)}
        for _ in range(args.rounds):
            for threaded in (True, False):
                torch.autograd.set_multithreading_enabled(threaded)
                for name, fn in named.items():
                    times[name, threaded].append(1e3 * host_time(fn, args.repeats))
        torch.autograd.set_multithreading_enabled(True)
        print(f"== N={n}: host us per forward+backward through torch.autograd.grad (median of {args.rounds} rounds "
              f"of {args.repeats} calls; in brackets the rounds' range)")
        print(f"  {'call':28s} {'device thread':>24s} {'calling thread':>24s}")
        for name in named:
            cells = []
            for threaded in (True, False):
                t = times[name, threaded]
                cells.append(f"{statistics.median(t):7.1f} [{min(t):6.1f}-{max(t):6.1f}]")
            print(f"  {name:28s} {cells[0]:>24s} {cells[1]:>24s}", flush=True)
        del named
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
