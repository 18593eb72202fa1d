"""Where the cuDNN backend's time goes at one N (issue 14): CUDA time by kernel, for a forward and a
forward+backward, against the cuDNN floor (the same attention on pre-gathered segments).

    python experiments/cudnn/where_time_goes.py --n 1M --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark_support import parse_size  # noqa: E402

from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

W, R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", default="1M")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = parse_size(args.n)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    layout = TokenLayout.build(1, n, n, device=q.device)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def forward():
        return dilated_attention(*leaves, W, R, causal=True, backend="cudnn", token_layout=layout)

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, grad)

    report = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                label = event.name[:90]
                total, count = kernels.get(label, (0.0, 0))
                kernels[label] = (total + event.device_time_total / 1e3, count + 1)
        top = sorted(kernels.items(), key=lambda item: -item[1][0])
        total = sum(t for t, _ in kernels.values())
        attention = sum(t for label, (t, _) in kernels.items() if "cudnn" in label.lower() or "sm90" in label.lower() or "fmha" in label.lower())
        report[name] = dict(total_ms=total, attention_kernels_ms=attention, kernels=sum(c for _, c in kernels.values()),
                            top=[(label, round(t, 3), c) for label, (t, c) in top[:15]])
        print(f"== {name}: {total:.2f} ms of CUDA time in {report[name]['kernels']} kernels; attention kernels {attention:.2f} ms")
        for label, t, c in report[name]["top"]:
            print(f"  {t:8.3f} ms  x{c:<4d} {label}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
