"""Tensors or addresses in the direct launches (issue 14: host time per forward+backward above 1 ms). Triton's
launcher takes a pointer argument as an int as it is; for a tensor it calls ``data_ptr`` and asks the driver
(``cuPointerGetAttribute``) whether the address is on the GPU, for each of the 9-20 tensors of each launch. The
variants, each with its own layout (so its own plans), rounds alternating between them in one process:

* ``before``: the launchers get the tensors, and the forward allocates ``out`` and the LSE before its first launch
  (the code before this experiment);
* ``addresses, early allocation``: the launchers get ints (``_addresses``);
* ``addresses, late output``: also ``out`` and the LSE allocated after the early launches (``_forward`` now).

For each: host ms per call (benchmark.host_time) and the single synced call (benchmark.time_call), forward and
forward+backward; and whether the output is bitwise that of ``before``, the gradients too in torch's deterministic
mode (the default backward adds dQ, dK and dV atomically, in any order: there the largest difference is printed
next to ``before``'s own from one call to the next).

    python experiments/host_overhead/launch_addresses.py --n 16K,32K
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import host_time, time_call  # noqa: E402
from benchmark_support import parse_size  # noqa: E402

import modeling_longnet.dilated_attention_triton as tb  # noqa: E402
from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
ADDRESSES, FORWARD = tb._addresses, tb._forward


def _forward_early_allocation(q, k, v, pattern, layout, causal, softmax_scale, dropout_p, seed):
    """tb._forward as it was before this experiment: `out` and the LSE allocated before the first launch."""
    plan = tb._forward_plan(q, k, v, pattern, layout, causal, softmax_scale, dropout_p)
    batch, num_queries, num_heads, _ = q.shape
    stats = torch.empty((2, batch, num_queries, num_heads), dtype=torch.float32, device=q.device)
    stats.copy_(tb._row_stats_start(q.device))
    row_max, row_sum = stats.unbind()
    out = (torch.zeros if plan.zero_out else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    running = out if plan.running_dtype is None else torch.empty(q.shape, dtype=plan.running_dtype, device=q.device)
    lse = torch.empty(row_max.shape, dtype=torch.float32, device=q.device)
    own = (q, k, v, out, running, row_max, row_sum, lse, seed)
    own_addresses = tb._addresses(own) if tb._direct_launches() else None
    with tb._group_streams(q.device, plan.num_groups) as streams, tb._descriptor_scratch(plan.tma):
        for launch in plan.launches:
            launch(own, streams[launch.group], own_addresses)
    if plan.epilogue is not None:
        epilogue_own = (row_max, row_sum, lse, running, out)
        plan.epilogue(epilogue_own, streams[0], None if own_addresses is None else tb._addresses(epilogue_own))
    return out, lse, row_max, row_sum


VARIANTS = {
    "before: tensors, early allocation": (lambda arguments: tuple(arguments), _forward_early_allocation),
    "addresses, early allocation": (ADDRESSES, _forward_early_allocation),
    "addresses, late output (now)": (ADDRESSES, FORWARD),
}


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic mode: the backward recomputes dQ, one launch per branch, no atomic additions."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _largest_difference(tensors, others) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(tensors, others))


def use(variant):
    tb._addresses, tb._forward = VARIANTS[variant]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="16K,32K")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for n in [parse_size(x) for x in args.n.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        layouts = {name: TokenLayout.build(1, n, n, device=q.device) for name in VARIANTS}
        calls, results, deterministic = {}, {}, {}
        for name, layout in layouts.items():
            def fwd(layout=layout):  # no gradient recorded: the inference path
                return dilated_attention(q, k, v, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)

            def fwd_bwd(layout=layout):
                out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)
                return torch.autograd.grad(out, leaves, g)

            calls[name] = {"fwd": fwd, "fwd+bwd": fwd_bwd}
            use(name)
            for _ in range(2):  # the first call of a plan goes through Triton's entry point, the second launches directly
                results[name] = (fwd(), *fwd_bwd())
            with _deterministic():
                for _ in range(2):  # its own plans (dQ recomputed, no atomics): again entry point, then direct
                    deterministic[name] = fwd_bwd()
        before = "before: tensors, early allocation"
        use(before)
        again = (calls[before]["fwd"](), *calls[before]["fwd+bwd"]())  # the run-to-run spread of the atomic backward
        use("addresses, late output (now)")
        spread = _largest_difference(again[1:], results[before][1:])
        for name in VARIANTS:
            out_same = torch.equal(results[name][0], results[before][0])
            det_same = all(torch.equal(a, b) for a, b in zip(deterministic[name], deterministic[before]))
            diff = _largest_difference(results[name][1:], results[before][1:])
            print(f"N={n} {name}: output bitwise that of `before`: {out_same}; gradients bitwise in torch's "
                  f"deterministic mode: {det_same}; default mode (atomic dQ/dK/dV): max |diff| {diff:.3g} "
                  f"(`before` against itself: {spread:.3g})", flush=True)
        times = {(name, mode, kind): [] for name in VARIANTS for mode in ("fwd", "fwd+bwd") for kind in ("host", "single")}
        for _ in range(args.rounds):
            for name in VARIANTS:
                use(name)
                for mode, fn in calls[name].items():
                    times[name, mode, "host"].append(host_time(fn, args.repeats))
                    times[name, mode, "single"].append(time_call(fn, args.repeats, 0.0))
        use("addresses, late output (now)")
        print(f"== N={n}: ms per call, median of {args.rounds} rounds (each the median of {args.repeats} calls); "
              "in brackets the rounds' range")
        print(f"  {'variant':36s} {'':8s} {'host':>22s} {'single call':>22s}")
        for name in VARIANTS:
            for mode in ("fwd", "fwd+bwd"):
                cells = []
                for kind in ("host", "single"):
                    t = times[name, mode, kind]
                    cells.append(f"{statistics.median(t):6.3f} [{min(t):5.3f}-{max(t):5.3f}]")
                print(f"  {name:36s} {mode:8s} {cells[0]:>22s} {cells[1]:>22s}", flush=True)
        del calls, results, deterministic, again
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
