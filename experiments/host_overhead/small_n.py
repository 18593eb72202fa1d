"""Backward tails at small N (issue 14: 8K forward+backward is 1.66x the FA2 floor, run 12): the same calls timed
with the head groups on two streams at every size (the default splits only from 2^20 query rows) and with smaller
dK/dV key blocks (more, shorter programs for the long, few programs of the branches of large w / r).

    python experiments/host_overhead/small_n.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark import time_back_to_back, time_call  # noqa: E402

import modeling_longnet.dilated_attention_triton as tb  # noqa: E402
from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8192,16384,32768")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    forward_config, backward_config = tb.forward_config, tb.backward_config
    variants = {
        "default": ({}, {}, None),
        "groups everywhere": ({}, {}, 0),
        "block_n1 64": ({}, {"block_n1": 64}, None),
        "groups everywhere, block_n1 64": ({}, {"block_n1": 64}, 0),
        "block_n1 64, block_m1 16": ({}, {"block_n1": 64, "block_m1": 16}, None),
    }
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        layout = TokenLayout.build(1, n, n, device=q.device)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        for name, (fwd_change, bwd_change, threshold) in variants.items():
            tb.forward_config = lambda *a, c=fwd_change: dataclasses.replace(forward_config(*a), **c)
            tb.backward_config = lambda *a, c=bwd_change: dataclasses.replace(backward_config(*a), **c)
            saved_threshold = tb._MIN_QUERY_ROWS_FOR_HEAD_GROUPS
            if threshold is not None:
                tb._MIN_QUERY_ROWS_FOR_HEAD_GROUPS = threshold
            try:
                def fwd():
                    return dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout)

                def fwd_bwd():
                    return torch.autograd.grad(fwd(), leaves, g)

                row = {"n": n, "variant": name}
                for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    row[f"{mode} single"] = time_call(fn, 20, 0.0)
                    row[f"{mode} back to back"] = time_back_to_back(fn, 20)
            except Exception as error:  # a configuration the compiler refuses: say so, go on
                row["error"] = repr(error)[:300]
            finally:
                tb.forward_config, tb.backward_config = forward_config, backward_config
                tb._MIN_QUERY_ROWS_FOR_HEAD_GROUPS = saved_threshold
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
