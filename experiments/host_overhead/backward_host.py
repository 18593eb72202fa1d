"""Where the host time of a Triton backward goes between autograd.grad and our _backward (issue 14: run 14 on an
H100 measured 0.69 ms for the backward alone at 8K against 0.19 for _backward and 0.09 for autograd's engine around
a Function that only allocates). Times autograd.grad after a synced forward: as it is, with autograd's device
threads off (the backward then runs on the calling thread), and the time from the call to _backward's entry and
from its return to autograd.grad's return.

    python experiments/host_overhead/backward_host.py
"""

from __future__ import annotations

import statistics
import time

import torch

import modeling_longnet.dilated_attention_triton as tb
from modeling_longnet import TokenLayout, dilated_attention

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def main():
    n = 8192
    q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    layout = TokenLayout.build(1, n, n, device=q.device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    marks = {}
    original = tb._backward

    def marked(*args, **kwargs):
        marks["enter"] = time.perf_counter()
        result = original(*args, **kwargs)
        marks["leave"] = time.perf_counter()
        return result

    tb._backward = marked
    for threads in (True, False):
        torch.autograd.set_multithreading_enabled(threads)
        rows = []
        for _ in range(60):
            out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)
            torch.cuda.synchronize()
            started = time.perf_counter()
            torch.autograd.grad(out, leaves, g)
            ended = time.perf_counter()
            rows.append(((ended - started) * 1e3, (marks["enter"] - started) * 1e3, (marks["leave"] - marks["enter"]) * 1e3,
                         (ended - marks["leave"]) * 1e3))
            torch.cuda.synchronize()
        median = [round(statistics.median(r[i] for r in rows[10:]), 4) for i in range(4)]
        print(f"device threads {'on' if threads else 'off'}: autograd.grad {median[0]} ms = to _backward {median[1]}"
              f" + _backward {median[2]} + after {median[3]}", flush=True)
    torch.autograd.set_multithreading_enabled(True)


if __name__ == "__main__":
    main()
