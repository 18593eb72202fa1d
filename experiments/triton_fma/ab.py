"""A/B on one GPU, one process: the Triton kernels before and after the explicit-fma exponent (issue 11, point 2).

Before: the kernels computed ``s = (q.k) * scale`` and ``exp2(s - max)`` and left fusing to the compiler, which
may fuse the multiply and the subtraction in one kernel and not in another; the backward clamped the exponent at
0. After: the exponent is one explicit ``fma(q.k, scale, -max)`` in the forward and in both backward programs.

Timed: B = 1, H = 12, D = 64, bf16, causal, the paper's branches; each variant both as a single synced call
(synchronise, time one call with CUDA events; what one user call costs) and back-to-back (10 calls between one
pair of events), three alternating rounds, median of each. The FA2 floor (benchmark.py's) is timed in the same
rounds. Also: the dV error at logits 1e1 .. 1e9 (float32, the stability test's problem) for both variants.

    git show 1f0f1b3:modeling_longnet/dilated_attention_triton.py > experiments/triton_fma/baseline/dilated_attention_triton_before.py
    python experiments/triton_fma/ab.py --baseline experiments/triton_fma/baseline/dilated_attention_triton_before.py

(the baseline folder is git-ignored: name it in the device call's ``carry``). Results of 2026-12-02 in results/,
read in docs/triton_notes.md, "Mixing at any logit scale".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import benchmark  # noqa: E402  (the floor and the problem shapes)
from modeling_longnet import DilatedPattern, TokenLayout  # noqa: E402
from modeling_longnet import dilated_attention_triton as after  # noqa: E402


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def single_and_back_to_back(fn, repeats: int = 10, chain: int = 10) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    single = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        single.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    start.record()
    for _ in range(chain):
        fn()
    end.record()
    end.synchronize()
    return statistics.median(single), start.elapsed_time(end) / chain


def kernel_call(module, q, k, v, pattern, layout, backward, grad):
    scale = q.shape[-1] ** -0.5

    def run():
        out, _ = module.dilated_attention_triton(q, k, v, pattern, layout, causal=True, softmax_scale=scale, dropout_p=0.0)
        return torch.autograd.grad(out, (q, k, v), grad) if backward else out

    return run


def timing(modules, sizes, rounds):
    rows = []
    for n in sizes:
        args = argparse.Namespace(batch=1, heads=12, kv_heads=12, head_dim=64, causal=True)
        pattern = DilatedPattern(benchmark.PAPER_SEGMENT_LENGTHS, benchmark.PAPER_DILATION_RATES)
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v, grad = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        problem = benchmark.Problem(n, args, pattern, {"q": q, "k": k, "v": v, "grad": grad})
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            layout = TokenLayout.build(1, n, n, device=q.device)
            calls = {name: kernel_call(m, *leaves, pattern, layout, backward, grad) for name, m in modules.items()}
            calls["floor-fa2"] = benchmark.make_method("floor-fa2", problem, backward)
            results = {name: [] for name in calls}
            for round_ in range(rounds):
                order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
                for name in order:
                    results[name].append(single_and_back_to_back(calls[name]))
            row = {"n": n, "mode": mode}
            for name, values in results.items():
                row[name] = {"single_ms": statistics.median(v[0] for v in values),
                             "back_to_back_ms": statistics.median(v[1] for v in values)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        benchmark.free_problem(problem)
        del q, k, v, grad
        torch.cuda.empty_cache()
    return rows


def large_logit_errors(modules):
    import test_stability as ts
    from reference import reference_dilated_attention

    table = []
    for scale in ts.SCALES:
        problems = [ts._inputs(scale, seed) for seed in range(4)]
        truth = lambda q, k, v: reference_dilated_attention(q, k, v, ts.SEGMENTS, ts.RATES, causal=True)  # noqa: E731
        row = {"scale": scale}
        for name, module in modules.items():
            def ours(q, k, v, module=module):
                pattern = DilatedPattern(ts.SEGMENTS, ts.RATES)
                layout = TokenLayout.build(q.shape[0], q.shape[1], q.shape[1], device="cuda")
                out, _ = module.dilated_attention_triton(
                    q.cuda(), k.cuda(), v.cuda(), pattern, layout, causal=True, softmax_scale=q.shape[-1] ** -0.5,
                    dropout_p=0.0,
                )
                return out.cpu()
            errors, out, values, gradients = ts._errors(ours, truth, problems, torch.float32)
            row[name] = {"out": errors[0], "dq": errors[1], "dk": errors[2], "dv": errors[3],
                         "convex": float(out.abs().max()) <= float(values.abs().max()) * (1 + 1e-6),
                         "finite": all(bool(g.isfinite().all()) for g in gradients)}
        dense, _, _, _ = ts._errors(ts._dense_sdpa, truth, problems, torch.float32)
        row["dense_sdpa_cpu"] = {"out": dense[0], "dq": dense[1], "dk": dense[2], "dv": dense[3]}
        table.append(row)
        print(json.dumps(row), flush=True)
    return table


def registers(modules):
    """Registers and spills of each compiled backward and forward kernel (Triton's per-device cache)."""
    found = {}
    for name, module in modules.items():
        for kernel_name in ("_forward_kernel", "_backward_kernel"):
            try:
                caches = getattr(module, kernel_name).device_caches
                compiled = [k for cache in caches.values() for k in cache[0].values()]
                found[f"{name}.{kernel_name}"] = sorted({(k.n_regs, k.n_spills) for k in compiled})
            except Exception as error:  # a Triton version without these attributes
                found[f"{name}.{kernel_name}"] = repr(error)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the kernels' file before the change")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="another version of the kernels' file to time alongside (repeatable)")
    parser.add_argument("--skip-logits", action="store_true", help="time only")
    parser.add_argument("--sizes", default="32768,131072,1048576")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    modules = {"before": load_baseline(args.baseline), "after": after}
    for spec in args.variant:
        name, path = spec.split("=", 1)
        modules[name] = load_baseline(path)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__}
    if not args.skip_logits:
        result["large_logits"] = large_logit_errors(modules)
    result["timing"] = timing(modules, [int(s) for s in args.sizes.split(",")], args.rounds)
    result["registers"] = registers(modules)
    print(json.dumps(result["registers"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
