"""Host work per call of dilated attention on one GPU (issue 14): host milliseconds and CUDA kernels per call.

For each entry point (the public function with and without a prepared ``token_layout``, the standalone layer,
the model's attention through a LongNet forward) and N: the host time of one call (perf_counter around the call,
GPU work not waited for, after a warm-up and with the GPU idle before it), the single synced call and the
back-to-back time (CUDA events), and the number of CUDA kernels one call launches (torch.profiler).

    python experiments/host_overhead/probe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import host_time, kernels_per_call, time_back_to_back, time_call  # noqa: E402

from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def host_profile(calls: int, n: int = 8192):
    """cProfile of ``calls`` public calls (forward, then forward+backward) at N = n: the host functions by own time."""
    import cProfile
    import pstats

    q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for backward in (False, True):
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]

        def call():
            out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton")
            return torch.autograd.grad(out, leaves, g) if backward else out

        call()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
        torch.cuda.synchronize()
        print(f"--- host profile, {'fwd+bwd' if backward else 'fwd'}, N = {n}, {calls} calls", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _launch_ten(tb, launch, own, stream):
    with tb._descriptor_scratch(True):  # the branch kernels build TMA descriptors: Triton asks for scratch
        for _ in range(10):
            launch(own, stream, True)


def host_breakdown(n: int, repeats: int = 50) -> dict:
    """Host milliseconds per call of the parts of a forward+backward (the median of ``repeats``, the GPU idle before
    each): the public forward; the backward alone (torch.autograd.grad after a synced forward); the backend's own
    _forward and _backward without autograd; autograd's engine around a Function that only allocates; one launch."""
    import time

    import modeling_longnet.dilated_attention_triton as tb
    from modeling_longnet import DilatedPattern

    q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    layout = TokenLayout.build(1, n, n, device=q.device)
    pattern = DilatedPattern(PAPER_W, PAPER_R)
    scale = 64**-0.5

    def median_host(fn, before=None):
        times = []
        for _ in range(repeats + 1):
            state = before() if before else None
            torch.cuda.synchronize()
            started = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - started) * 1e3)
        torch.cuda.synchronize()
        return statistics.median(times[1:])

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward(_=None):
        return dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)

    class Allocating(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):
            return torch.empty_like(grad)

    x = q.detach().requires_grad_()
    saved = tb._forward(q, k, v, pattern, layout, True, scale, 0.0, 0)
    out, _, row_max, row_sum = saved
    plan = tb._forward_plan(q, k, v, pattern, layout, True, scale, 0.0)
    own = (q, k, v, out, torch.empty(q.shape, device="cuda"), row_max, row_sum, 0)
    stream = tb._GroupStream(None, torch.cuda.current_stream().cuda_stream)
    result = {
        "n": n,
        "public forward": median_host(forward),
        "backward alone (autograd.grad after a synced forward)": median_host(
            lambda out: torch.autograd.grad(out, leaves, g), before=forward
        ),
        "backend _forward (no autograd)": median_host(lambda _: tb._forward(q, k, v, pattern, layout, True, scale, 0.0, 0)),
        "backend _backward (no autograd)": median_host(
            lambda _: tb._backward(q, k, v, out, row_max, row_sum, g, None, pattern, layout, True, scale, 0.0, 0)
        ),
        "autograd engine, a Function that allocates (fwd+bwd)": median_host(
            lambda _: torch.autograd.grad(Allocating.apply(x), x, g)
        ),
        "one forward branch launch": median_host(lambda _: _launch_ten(tb, plan.launches[0], own, stream)) / 10,
        "torch.empty (B, N, H, D)": median_host(lambda _: [torch.empty(q.shape, device="cuda") for _ in range(10)]) / 10,
    }
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8192,32768,131072")
    parser.add_argument("--json", default=None)
    parser.add_argument("--cprofile", type=int, default=0, help="also print where the host time of N calls goes")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a call's host work")
    args = parser.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        layout = TokenLayout.build(1, n, n, device=q.device)
        for backward in (False, True):
            leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]

            def public(leaves=leaves, backward=backward, g=g):
                out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton")
                return torch.autograd.grad(out, leaves, g) if backward else out

            def prepared(leaves=leaves, backward=backward, g=g):
                out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)
                return torch.autograd.grad(out, leaves, g) if backward else out

            for name, fn in (("public", public), ("prepared layout", prepared)):
                single, chain = time_call(fn, 20, 0.0), time_back_to_back(fn, 20)
                count, names = kernels_per_call(fn)
                row = {"n": n, "mode": "fwd+bwd" if backward else "fwd", "entry": name, "host_ms": host_time(fn),
                       "single_ms": single, "back_to_back_ms": chain, "kernels": count, "kernel_names": names}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "kernel_names"}), flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()
    breakdown = [host_breakdown(n) for n in (8192, 32768)] if args.breakdown else []
    if args.cprofile:
        host_profile(args.cprofile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "breakdown": breakdown}, f, indent=1)


if __name__ == "__main__":
    main()
