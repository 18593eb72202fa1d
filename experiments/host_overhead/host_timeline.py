"""Where a single call's time goes between the host and the GPU (issue 14: single calls at 16K-32K were 1.00-1.08x
the FA2 floor while their GPU time, replayed from a CUDA graph, was under it). One call of the public function,
forward or forward+backward through ``torch.autograd.grad``, with every launch of the Triton backend stamped twice:
when the host issued it (perf_counter) and when the GPU finished it (a CUDA event recorded after it). Where a
launch was issued after the previous one finished, the GPU waited for the host. Also when the call reached the
backend's ``_forward`` and ``_backward``. Medians over repeated calls, in ms from the call's start.

    python experiments/host_overhead/host_timeline.py --n 16K,32K --variants default,grouped-32K
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import host_time, time_call  # noqa: E402
from benchmark_support import parse_size  # noqa: E402

import modeling_longnet.dilated_attention_triton as tb  # noqa: E402
from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
VARIANTS = {
    "default": {},
    "grouped-32K": {"_MAX_QUERY_ROWS_FOR_GROUPED_BRANCHES": 1 << 19},  # the default since run 21
    "per-branch-32K": {"_MAX_QUERY_ROWS_FOR_GROUPED_BRANCHES": 1 << 18},  # the default before
    "ungrouped": {"_MAX_QUERY_ROWS_FOR_GROUPED_BRANCHES": 0},
}


class Stamps:
    """The events are created before the call: creating one inside it cost tens of microseconds of host time (run 21
    showed 0.43 ms from a 32K forward's start to its first launch, where the unstamped call spends about 0.12)."""

    def __init__(self):
        self.host, self.events, self.labels, self.active = [], [], [], False
        self.pool = [torch.cuda.Event(enable_timing=True) for _ in range(64)]
        self.original_launch, self.original_forward, self.original_backward = tb._Launch.__call__, tb._forward, tb._backward

    def mark(self, label):
        if self.active:
            event = self.pool[len(self.events)]
            event.record()
            self.host.append(time.perf_counter())
            self.events.append(event)
            self.labels.append(label)

    def install(self):
        stamps = self

        def launch(self_, own, stream, own_addresses):
            stamps.original_launch(self_, own, stream, own_addresses)
            stamps.mark(getattr(self_.fn, "__name__", str(self_.fn)).replace("_kernel", ""))

        def forward(*args, **kwargs):
            stamps.mark("enter _forward")
            out = stamps.original_forward(*args, **kwargs)
            stamps.mark("leave _forward")
            return out

        def backward(*args, **kwargs):
            stamps.mark("enter _backward")
            out = stamps.original_backward(*args, **kwargs)
            stamps.mark("leave _backward")
            return out

        tb._Launch.__call__, tb._forward, tb._backward = launch, forward, backward

    def one_call(self, run):
        torch.cuda.synchronize()
        self.host, self.events, self.labels, self.active = [], [], [], True
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        run()
        end.record()
        t_end = time.perf_counter()
        self.active = False
        end.synchronize()
        rows = [(label, 1e3 * (h - t0), start.elapsed_time(e)) for label, h, e in zip(self.labels, self.host, self.events)]
        return rows + [("call returns / GPU done", 1e3 * (t_end - t0), start.elapsed_time(end))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="8K,16K,32K")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calling-thread", action="store_true",
                        help="run backwards on the calling thread (torch.autograd.set_multithreading_enabled(False)): "
                        "how much of the wait before the backward's first launch is autograd's device thread")
    args = parser.parse_args()
    if args.calling_thread:
        torch.autograd.set_multithreading_enabled(False)
    stamps = Stamps()
    stamps.install()
    for n in [parse_size(x) for x in args.n.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        layout = TokenLayout.build(1, n, n, device=q.device)
        for variant in args.variants.split(","):
            saved = {name: getattr(tb, name) for name in VARIANTS[variant]}
            for name, value in VARIANTS[variant].items():
                setattr(tb, name, value)
            layout.cache.clear()  # plans rebuilt under the variant's constants
            for backward in (False, True):
                leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]

                def run():
                    out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)
                    return torch.autograd.grad(out, leaves, g) if backward else out

                def run_public():  # no prepared layout: what a user's plain call costs
                    out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton")
                    return torch.autograd.grad(out, leaves, g) if backward else out

                for _ in range(3):
                    run()
                calls = [stamps.one_call(run) for _ in range(args.repeats)]
                mode = "fwd+bwd" if backward else "fwd"
                print(f"\n== N={n // 1024}K {mode} variant={variant}: single {time_call(run, 20, 0.2):.3f} ms, "
                      f"host {host_time(run):.3f} ms; without a layout: single {time_call(run_public, 20, 0.2):.3f} ms, "
                      f"host {host_time(run_public):.3f} ms", flush=True)
                print(f"{'stamp':28s} {'host issued':>12s} {'GPU done':>10s}  (median ms from the call's start)")
                for i, (label, _, _) in enumerate(calls[0]):
                    host_ms = statistics.median(c[i][1] for c in calls)
                    gpu_ms = statistics.median(c[i][2] for c in calls)
                    print(f"{label:28s} {host_ms:12.3f} {gpu_ms:10.3f}")
            for name, value in saved.items():
                setattr(tb, name, value)
            layout.cache.clear()


if __name__ == "__main__":
    main()
