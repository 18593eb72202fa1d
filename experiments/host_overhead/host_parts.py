"""Where a single call's host time goes, function by function (issue 14: the single call at 16K-32K is over the FA2
floor by the host time before the first launch; run 21's host_timeline.py: 0.09-0.24 ms from the call's start to the
backend's ``_forward``, 0.14-0.29 ms more to the first launch).

Each function of the path is wrapped with a timer (inclusive time per call; nested functions are inside their
callers); every call is issued with the GPU idle (synchronized before it). Medians in us over --repeats calls. Then
the cost of the primitive operations the path uses; the same after a torch.profiler session; the standalone layer
and the paper's model's training step (each attention call's host time inside it); cProfile's own-time ranking of
a forward+backward.

    python experiments/host_overhead/host_parts.py --n 32K
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import functools
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmark_support import parse_size  # noqa: E402

import importlib  # noqa: E402

dispatcher = importlib.import_module("modeling_longnet.dilated_attention")  # the package exports a function so named
pattern_module = importlib.import_module("modeling_longnet.dilated_attention_pattern")
tb = importlib.import_module("modeling_longnet.dilated_attention_triton")
from modeling_longnet import TokenLayout, dilated_attention  # noqa: E402

PAPER_W, PAPER_R = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
TIMES: dict[str, list[float]] = collections.defaultdict(list)

WRAPPED = {
    dispatcher: ["_autocast_inputs", "_check_qkv", "DilatedPattern", "is_tracing", "_select_backend", "_autocast_off"],
    tb: ["check_supported", "dilated_attention_triton", "_forward_call", "_forward", "_forward_plan", "_plan_key",
         "forward_config", "backward_config", "_group_streams", "_descriptor_scratch", "_direct_launches",
         "_backward", "_backward_plan", "_runnable_backward_config", "_on_device_of", "_row_stats_start"],
}


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t0)
    return wrapper


def install():
    for module, names in WRAPPED.items():
        for name in names:
            setattr(module, name, timed(f"{module.__name__.rsplit('.', 1)[-1]}.{name}", getattr(module, name)))
    tb._Launch.__call__ = timed("_Launch.__call__", tb._Launch.__call__)
    tb._TritonDilatedAttention.apply = timed("Function.apply", tb._TritonDilatedAttention.apply)
    TokenLayout.build = staticmethod(timed("TokenLayout.build", TokenLayout.build))
    pattern_module.TokenLayout.build = TokenLayout.build


def host_times(run, repeats: int) -> list[float]:
    """Seconds the host spends issuing each of ``repeats`` calls of ``run``, the GPU idle before each."""
    values = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        values.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return values


def table(title, run, repeats):
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    TIMES.clear()
    totals = host_times(run, repeats)
    print(f"\n== {title}: whole call {1e6 * statistics.median(totals):.1f} us (median of {repeats})")
    for name, values in sorted(TIMES.items(), key=lambda item: -statistics.median(item[1]) * len(item[1])):
        per_call = len(values) / repeats
        print(f"  {name:44s} {1e6 * statistics.median(values):8.1f} us x {per_call:g}")


def primitive(title, fn, repeats=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    values = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    print(f"  {title:60s} {1e6 * statistics.median(values):8.1f} us")


def model_step(n: int, repeats: int):
    """The paper's 12 x 768 model (bf16, attn "triton"), one training step (forward, loss, backward) at N: the host
    time of each attention call inside it, where a user's training pays it (autograd's hand-over to its device
    thread happens once per step, not per layer)."""
    from modeling_longnet import LongNetConfig, LongNetForCausalLM

    config = LongNetConfig.from_preset("longnet-paper", attn_implementation="triton")
    model = LongNetForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, n), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    TIMES.clear()
    wall = host_times(step, repeats)
    print(f"\n== the paper's model, one training step at N={n // 1024}K: host {1e3 * statistics.median(wall):.2f} ms "
          f"to issue (median of {repeats}); per attention call:")
    for name in ("dilated_attention_triton.dilated_attention_triton", "dilated_attention_triton._forward",
                 "dilated_attention_triton._backward", "_Launch.__call__"):
        values = TIMES.get(name, [])
        if values:
            print(f"  {name:52s} {1e6 * statistics.median(values):8.1f} us x {len(values) / repeats:g} per step")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="32K")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    n = parse_size(args.n)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, g = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    layout = TokenLayout.build(1, n, n, device=q.device)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def forward(layout_=layout, inputs=(q, k, v)):
        return dilated_attention(*inputs, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout_)

    def forward_backward(layout_=layout):
        out = dilated_attention(*leaves, PAPER_W, PAPER_R, causal=True, backend="triton", token_layout=layout_)
        return torch.autograd.grad(out, leaves, g)

    print("== primitives (host us per call, the GPU idle)")
    primitive("torch.empty((1, N, 12, 64), bf16)", lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device))
    primitive("torch.empty((2, 1, N, 12), f32) + copy_ of a (2,1,1,1)",
              lambda: torch.empty((2, 1, n, 12), dtype=torch.float32, device=q.device).copy_(tb._row_stats_start(q.device)))
    primitive("torch.cuda.current_device()", torch.cuda.current_device)
    primitive("torch.cuda.get_device_capability(q.device)", lambda: torch.cuda.get_device_capability(q.device))
    primitive("torch._C._cuda_getCurrentRawStream(0)", lambda: torch._C._cuda_getCurrentRawStream(0))
    primitive("torch.is_grad_enabled()", torch.is_grad_enabled)
    primitive("a (1, N, 12, 64) bf16 add (one kernel)", lambda: q.add(k))
    try:
        from flash_attn import flash_attn_func

        primitive("flash_attn_func(q, k, v, causal=True) at N", lambda: flash_attn_func(q, k, v, causal=True))
    except ImportError:
        print("  flash_attn not installed")

    install()
    table(f"N={n // 1024}K forward, prepared layout", forward, args.repeats)
    table(f"N={n // 1024}K forward, no layout (the public call)", lambda: forward(None), args.repeats)
    table(f"N={n // 1024}K forward+backward, prepared layout", forward_backward, args.repeats)
    torch.autograd.set_multithreading_enabled(False)
    table(f"N={n // 1024}K forward+backward, prepared layout, autograd on the calling thread", forward_backward, args.repeats)
    torch.autograd.set_multithreading_enabled(True)

    # benchmark.py counts kernels with torch.profiler after timing each method: does a profiler session leave the
    # host slower for later calls? (its forward+backward host times, 1.0-1.45 ms, were over this script's 0.68)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]):
        forward_backward()
        torch.cuda.synchronize()
    table(f"N={n // 1024}K forward+backward, prepared layout, after one torch.profiler session", forward_backward, args.repeats)
    table(f"N={n // 1024}K forward, prepared layout, after one torch.profiler session", forward, args.repeats)

    # the original LongNet layer's interface (issue 14: the same speed from the function, the layer and the model)
    from modeling_longnet import DilatedAttention

    layer = DilatedAttention(768, 12, list(PAPER_R), list(PAPER_W), causal=True, attn_implementation="triton")
    layer = layer.to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        table(f"N={n // 1024}K the layer DilatedAttention(768, 12, ...), forward (no grad)", lambda: layer(x), args.repeats)
    table(f"N={n // 1024}K the layer, forward+backward", lambda: layer(x).sum().backward(), args.repeats)
    del layer, x

    model_step(n, args.repeats // 10)

    profiler = cProfile.Profile()
    for _ in range(5):
        forward_backward()
    torch.cuda.synchronize()
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        profiler.enable()
        forward_backward()
        profiler.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    print(f"\n== cProfile, forward+backward, {args.repeats} calls, by own time")
    print("\n".join(line for line in stream.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
