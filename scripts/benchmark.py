#!/usr/bin/env python
"""Dilated attention on one GPU: the Triton and cuDNN backends against the PyTorch path, dense SDPA, and the floor.

Every method runs in the same process on the same card, forward and forward+backward, over a range of sequence
lengths; the tables give the median time of a single synced call (what one user call costs) and per call of 10
calls issued back to back, the rate over the FLOPs the definition requires (SPEC.md: per branch, every (segment,
head) is a dense attention of about w/r rows; causal counts half; backward counts 2.5x forward), the peak memory
above the inputs, the host time of one call (issued with the GPU idle, not waited for) and the CUDA kernels it
launches (counted with torch.profiler once every timing is taken, so that no profiler session runs between two
timings).

The *floor* runs the same attention FLOPs as batched SDPA calls on segments already gathered into contiguous
tensors (FlashAttention-2 and cuDNN backends of ``scaled_dot_product_attention``): what any kernel of that class
would take with zero gather, scatter and merge cost. Dense SDPA is full causal attention over all N tokens.

    python scripts/benchmark.py                                 # the paper's configuration, N = 8K .. 1M
    python scripts/benchmark.py --check                         # correctness at realistic sizes, then exit
    python scripts/benchmark.py --check --check-cases 0,5       # some of the cases (one process per case runs in parallel)
    python scripts/benchmark.py --sweep --n 128K                # launch configurations of the kernels
    python scripts/benchmark.py --heads 8 --head-dim 128 --markdown docs/bench.md --plot docs/bench.png
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# the shared checks beside this script (tests load it as a module, without the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import check_output_file, parse_size, parse_sizes  # noqa: E402

PAPER_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES = (1, 2, 4, 6, 12)
METHODS = ("triton", "cudnn", "torch", "dense", "floor-fa2", "floor-cudnn")
METHOD_NAMES = {
    "triton": "Triton (ours)",
    "cudnn": "cuDNN (ours)",
    "torch": "PyTorch path",
    "dense": "dense causal SDPA" ,
    "floor-fa2": "floor, FA2",
    "floor-cudnn": "floor, cuDNN",
}

# The cases of --check (correctness at realistic sizes), by index for --check-cases; beside them the named checks
# "dropout" and "logits".
CHECK_CASES = [
    # name, B, N, H, Hkv, D, segments, rates, causal, offsets, layout
    ("paper config", 1, 65536, 4, 4, 64, PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES, True, "interleaved", None),
    ("paper config, non-causal", 1, 32768, 4, 4, 64, PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES, False, "interleaved", None),
    ("GQA 8/2, left padding, D=128", 2, 12000, 8, 2, 128, (1000, 3000), (2, 3), False, "grouped", "left"),
    ("MQA, packed documents, D=32", 1, 20000, 4, 1, 32, (512, 4096), (1, 4), True, "interleaved", "packed"),
    ("right padding, D=16", 3, 5000, 2, 2, 16, (256, 1024, 4096), (1, 2, 4), True, "grouped", "right"),
    ("KV cache: 300 queries of 40000 keys", 2, 40000, 6, 3, 64, (2048, 8192), (1, 4), True, "interleaved", "decode"),
    ("D=256", 1, 8192, 2, 2, 256, (1024, 4096), (1, 2), True, "interleaved", None),
    # one query head per kv head at D = 64: the backward's TMA reduce-add path, with padding and packing
    ("left padding, D=64, H=Hkv", 2, 20000, 4, 4, 64, (2048, 8192), (1, 4), True, "interleaved", "left"),
    ("packed documents, D=64, H=Hkv", 1, 20000, 4, 4, 64, (512, 4096), (1, 4), True, "interleaved", "packed"),
    ("right padding, non-causal, D=64, H=Hkv", 3, 9000, 2, 2, 64, (256, 1024, 4096), (1, 2, 4), False, "grouped", "right"),
]
CHECK_NAMES = ("dropout", "logits")

# The fields of the Triton kernels' ForwardConfig and BackwardConfig (modeling_longnet/dilated_attention_triton.py;
# a test keeps them alike) in their order, as --forward-config(s) / --backward-config(s) take them: a type, or the
# tuple of the allowed words. The first REQUIRED are required. Spelled here to check a command line before torch.
DQ_MODES = ("recompute", "atomic", "tma-atomic")
FORWARD_CONFIG_FIELDS = (
    ("block_m", int), ("block_n", int), ("num_warps", int), ("num_stages", int), ("tensor_descriptors", bool),
    ("head_groups", int), ("merge_in_input_dtype", bool),
)
BACKWARD_CONFIG_FIELDS = (
    ("block_n1", int), ("block_m1", int), ("block_m2", int), ("block_n2", int), ("num_warps", int), ("num_stages", int),
    ("interleave_roles", bool), ("tensor_descriptors", bool), ("dq_mode", DQ_MODES), ("head_groups", int),
    ("group_branches", bool),
)
FORWARD_REQUIRED, BACKWARD_REQUIRED = 4, 6


def size_label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def config_format(fields, required: int) -> str:
    """How a launch configuration is written: ``block_m,block_n,num_warps,num_stages[,tensor_descriptors(0/1)[,...]]``."""

    def shown(name, kind):
        return f"{name}(0/1)" if kind is bool else f"{name}({'/'.join(kind)})" if isinstance(kind, tuple) else name

    optional = "".join(f"[,{shown(*field)}" for field in fields[required:]) + "]" * (len(fields) - required)
    return ",".join(shown(*field) for field in fields[:required]) + optional


def config_values(text: str, fields, required: int) -> list:
    """The values of one launch configuration (``config_format``), checked; a ValueError says what is wrong."""
    values = [v.strip() for v in text.split(",")]
    if not required <= len(values) <= len(fields):
        raise ValueError(
            f"{text!r} has {len(values)} value{'s' * (len(values) != 1)}, where {config_format(fields, required)} takes "
            f"{required} to {len(fields)}"
        )
    parsed = []
    for value, (name, kind) in zip(values, fields):
        if kind is int:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{text!r}: {name} must be a positive integer, got {value!r}")
            parsed.append(int(value))
        elif kind is bool:
            if value not in ("0", "1"):
                raise ValueError(f"{text!r}: {name} must be 0 or 1, got {value!r}")
            parsed.append(value == "1")
        else:
            if value not in kind:
                raise ValueError(f"{text!r}: {name} must be one of {', '.join(kind)}, got {value!r}")
            parsed.append(value)
    return parsed


def forward_config_from(text: str):
    """``config_format(FORWARD_CONFIG_FIELDS, FORWARD_REQUIRED)`` -> ForwardConfig."""
    from modeling_longnet.dilated_attention_triton import ForwardConfig

    return ForwardConfig(*config_values(text, FORWARD_CONFIG_FIELDS, FORWARD_REQUIRED))


def backward_config_from(text: str):
    """``config_format(BACKWARD_CONFIG_FIELDS, BACKWARD_REQUIRED)`` -> BackwardConfig."""
    from modeling_longnet.dilated_attention_triton import BackwardConfig

    return BackwardConfig(*config_values(text, BACKWARD_CONFIG_FIELDS, BACKWARD_REQUIRED))


def config_text(config) -> str:
    """The command-line form of a ForwardConfig or BackwardConfig (what --forward-config/--backward-config take)."""
    values = [int(v) if isinstance(v, bool) else v for v in dataclasses.astuple(config)]
    return ",".join(str(v) for v in values)


def use_configs(args, forward=None, backward=None):
    """Run the kernels with these launch configurations for inputs of --head-dim and --dtype's width; other head
    dimensions and dtypes (those of --check) keep their defaults."""
    from modeling_longnet import dilated_attention_triton as kernels

    def scoped(default, config):
        def choose(head_dim, dtype):
            if head_dim == args.head_dim and dtype.itemsize == args.dtype.itemsize:
                return config
            return default(head_dim, dtype)

        return choose

    if forward is not None:
        kernels.forward_config = scoped(kernels.forward_config, forward)
    if backward is not None:
        kernels.backward_config = scoped(kernels.backward_config, backward)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Sizes accept K and M suffixes (128K = 131072).",
    )
    parser.add_argument("--n", default="8K,16K,32K,64K,128K,256K,512K,1M",
                        help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--heads", type=int, default=12, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention); default H")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="input dtype")
    parser.add_argument("--segment-lengths", type=int_list, default=PAPER_SEGMENT_LENGTHS,
                        help="comma-separated segment lengths w_i (the paper's by default)")
    parser.add_argument("--dilation-rates", type=int_list, default=PAPER_DILATION_RATES,
                        help="comma-separated dilation rates r_i (the paper's by default)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal attention")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
    parser.add_argument("--torch-max-n", type=parse_size, default=65536,
                        help="largest N for the PyTorch path (it is timed only to show the gap)")
    parser.add_argument("--dense-max-n", type=parse_size, default=131072, help="largest N for dense SDPA")
    parser.add_argument("--max-seconds", type=float, default=3.0,
                        help="a method that took longer than this for one call is skipped at larger N")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed calls at least (median reported)")
    parser.add_argument("--min-time", type=float, default=0.5, help="keep repeating until this many seconds were timed")
    parser.add_argument("--check", action="store_true",
                        help="check the Triton kernels against the PyTorch path at realistic sizes (float32, "
                             "bfloat16, float16, every layout), print the table and exit; status 1 on a failure. "
                             "--forward-config/--backward-config apply to the 16-bit rows of --head-dim")
    parser.add_argument("--check-cases", default=None,
                        help=f"for --check: comma-separated indices of the cases to run (0 to {len(CHECK_CASES) - 1}, "
                             "in table order) and/or 'dropout', 'logits' (logits 1e1 .. 1e9); all by default")
    parser.add_argument("--sweep", action="store_true",
                        help="first time the launch configurations below at --sweep-n and keep the fastest")
    parser.add_argument("--sweep-n", type=parse_size, default=131072, help="sequence length of the --sweep")
    forward_format = config_format(FORWARD_CONFIG_FIELDS, FORWARD_REQUIRED)
    backward_format = config_format(BACKWARD_CONFIG_FIELDS, BACKWARD_REQUIRED)
    parser.add_argument("--forward-configs", default="64,64,4,3,1,2;128,64,4,3,1,2;64,64,4,3,0,2;64,64,4,3,1,1",
                        help=f"for --sweep: '{forward_format}' entries separated by ';'")
    parser.add_argument("--backward-configs",
                        default="128,32,64,64,4,3,1,1,tma-atomic,2;128,32,64,64,4,3,1,1,tma-atomic,1;"
                                "128,32,64,64,4,3,1,0,recompute,2;128,32,64,64,4,4,1,1,tma-atomic,2",
                        help=f"for --sweep: '{backward_format}' entries separated by ';'")
    parser.add_argument("--forward-config", default=None,
                        help=f"use this '{forward_format}' for the Triton forward instead of the default")
    parser.add_argument("--backward-config", default=None,
                        help=f"use this '{backward_format}' for the Triton backward")
    parser.add_argument("--markdown", default=None, help="write the result table (markdown) to this file")
    parser.add_argument("--plot", default=None, help="write a log-log plot of time against N to this PNG file")
    parser.add_argument("--json", default=None, help="write every measurement to this JSON file")
    parser.add_argument("--title", default=None, help="heading of the markdown section")
    args = parser.parse_args(argv)
    args.n = parse_sizes(parser, "--n", args.n, "8K,16K,1M")
    for name in ("batch", "heads", "kv_heads", "head_dim", "min_repeats", "torch_max_n", "dense_max_n", "sweep_n"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.max_seconds > 0 or not args.min_time >= 0:
        parser.error("--max-seconds must be positive and --min-time >= 0")
    if not all(v > 0 for v in (*args.segment_lengths, *args.dilation_rates)):
        parser.error("--segment-lengths and --dilation-rates must be positive")
    if args.kv_heads is not None and args.heads % args.kv_heads != 0:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown method {m!r}; choose from {METHODS}")
    for m in args.modes:
        if m not in ("fwd", "fwd+bwd"):
            parser.error(f"--modes: unknown mode {m!r}; choose from fwd, fwd+bwd")
    if len(args.segment_lengths) != len(args.dilation_rates):
        parser.error("--segment-lengths and --dilation-rates need one entry per branch")
    # The launch configurations: checked here, though built (with the kernels' module) only once CUDA is set up.
    for option, texts, fields, required in (
        ("--forward-config", [args.forward_config], FORWARD_CONFIG_FIELDS, FORWARD_REQUIRED),
        ("--backward-config", [args.backward_config], BACKWARD_CONFIG_FIELDS, BACKWARD_REQUIRED),
        ("--forward-configs", args.forward_configs.split(";"), FORWARD_CONFIG_FIELDS, FORWARD_REQUIRED),
        ("--backward-configs", args.backward_configs.split(";"), BACKWARD_CONFIG_FIELDS, BACKWARD_REQUIRED),
    ):
        for text in texts:
            try:
                if text is not None:
                    config_values(text, fields, required)
            except ValueError as error:
                parser.error(f"{option}: {error}")
    if args.check_cases is not None:
        if not args.check:
            parser.error("--check-cases applies only with --check: add it, or drop --check-cases")
        valid = [str(index) for index in range(len(CHECK_CASES))] + list(CHECK_NAMES)
        unknown = [case for case in (part.strip() for part in args.check_cases.split(",")) if case not in valid]
        if unknown:  # else every case would be skipped, and the check pass
            parser.error(
                f"--check-cases: unknown case {unknown[0]!r}; give comma-separated indices 0 to {len(CHECK_CASES) - 1} "
                f"and/or {', '.join(CHECK_NAMES)}"
            )
    for name in ("json", "markdown", "plot"):  # written at the end of a run: their folders must exist now
        if getattr(args, name) is not None:
            try:
                check_output_file(f"--{name}", getattr(args, name))
            except ValueError as error:
                parser.error(str(error))
    args.kv_heads = args.kv_heads or args.heads
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modeling_longnet import DilatedPattern, TokenLayout, dilated_attention  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# FLOPs the definition requires
# ----------------------------------------------------------------------------------------------------------


def required_forward_flops(n: int, batch: int, heads: int, head_dim: int, pattern: DilatedPattern, causal: bool) -> float:
    """Matrix FLOPs of QK^T and PV over the (query, key) pairs that the definition lets attend."""
    total = 0
    for branch, (w, r) in enumerate(pattern.branches):
        for offset in pattern.head_offsets(branch, heads):
            for length, count in ((w, n // w), (n % w, 1)):
                rows = max(0, -(-(length - offset) // r)) if length > 0 else 0
                pairs = rows * (rows + 1) // 2 if causal else rows * rows
                total += count * pairs
    return 4.0 * head_dim * batch * total


# ----------------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------------


def time_call(fn, min_repeats: int, min_time: float) -> float:
    """Median milliseconds of ``fn`` after a warm-up call, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(times) < min_repeats or (sum(times) < min_time * 1e3 and len(times) < 100):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_back_to_back(fn, calls: int = 10) -> float:
    """Milliseconds per call of ``calls`` calls issued back to back (the host runs ahead of the GPU), CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def host_time(fn, repeats: int = 20) -> float:
    """Median milliseconds the host spends issuing one call (the GPU idle before it; its work not waited for)."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def call_kernels(fn) -> list:
    """The CUDA kernel events of one call of ``fn`` after a warm-up call (torch.profiler), in launch order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernels_per_call(fn) -> tuple[int, list[str]]:
    """The CUDA kernels one call launches: how many, and their names."""
    events = call_kernels(fn)
    return len(events), sorted({e.name[:60] for e in events})


def peak_memory(fn) -> int:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


@dataclass
class Problem:
    n: int
    args: argparse.Namespace
    pattern: DilatedPattern
    tensors: dict = field(default_factory=dict)

    @property
    def shape_q(self):
        return (self.args.batch, self.n, self.args.heads, self.args.head_dim)

    @property
    def shape_kv(self):
        return (self.args.batch, self.n, self.args.kv_heads, self.args.head_dim)


def gather_segments(x: torch.Tensor, pattern: DilatedPattern, num_heads: int) -> list[torch.Tensor]:
    """Per branch, the (segment, head) rows gathered into a contiguous (B * segments, H, w // r, D) tensor."""
    batch, n, heads_x, head_dim = x.shape
    group = num_heads // heads_x
    gathered = []
    for branch, (w, r) in enumerate(pattern.branches):
        span = min(w, n)
        segments, rows = max(1, n // w), span // r
        offsets = torch.tensor(pattern.head_offsets(branch, num_heads), device=x.device)
        index = (
            torch.arange(segments, device=x.device).view(-1, 1, 1) * w
            + offsets.view(1, -1, 1)
            + torch.arange(rows, device=x.device).view(1, 1, -1) * r
        )
        heads = (torch.arange(num_heads, device=x.device) // group).view(1, -1, 1)
        gathered.append(x[:, index, heads].reshape(batch * segments, num_heads, rows, head_dim).contiguous())
    return gathered


def make_method(name: str, problem: Problem, backward: bool):
    """A zero-argument callable running one forward (and backward) of the method on prepared inputs."""
    args, pattern = problem.args, problem.pattern
    t = problem.tensors
    if name in ("triton", "cudnn", "torch"):
        layout = t.setdefault("layout", TokenLayout.build(args.batch, problem.n, problem.n, device=t["q"].device))
        q, k, v = (t[x].requires_grad_(backward) for x in "qkv")

        def run():
            out = dilated_attention(
                q, k, v, pattern.segment_lengths, pattern.dilation_rates, causal=args.causal, backend=name,
                token_layout=layout,
            )
            return torch.autograd.grad(out, (q, k, v), t["grad"]) if backward else out

        return run
    if name == "dense":
        if "dense_q" not in t:
            group = args.heads // args.kv_heads
            t["dense_q"] = t["q"].detach().transpose(1, 2).contiguous()
            t["dense_k"], t["dense_v"] = (
                t[x].detach().repeat_interleave(group, dim=2).transpose(1, 2).contiguous() for x in "kv"
            )
            t["dense_grad"] = t["grad"].transpose(1, 2).contiguous()
        leaves = [t[f"dense_{x}"].requires_grad_(backward) for x in "qkv"]
        backends = [torch.nn.attention.SDPBackend.FLASH_ATTENTION]

        def run():
            with torch.nn.attention.sdpa_kernel(backends):
                out = F.scaled_dot_product_attention(*leaves, is_causal=args.causal)
            return torch.autograd.grad(out, leaves, t["dense_grad"]) if backward else out

        return run
    # the floor: the same FLOPs on pre-gathered contiguous segments
    if "floor_q" not in t:
        t["floor_q"] = gather_segments(t["q"].detach(), pattern, args.heads)
        t["floor_k"] = gather_segments(t["k"].detach(), pattern, args.heads)
        t["floor_v"] = gather_segments(t["v"].detach(), pattern, args.heads)
        t["floor_grad"] = [torch.randn_like(x) for x in t["floor_q"]]
    branches = [
        [t[f"floor_{x}"][i].requires_grad_(backward) for x in "qkv"] for i in range(len(pattern.branches))
    ]
    backend = {
        "floor-fa2": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
        "floor-cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    }[name]

    def run():
        results = []
        with torch.nn.attention.sdpa_kernel([backend]):
            for leaves, grad in zip(branches, t["floor_grad"]):
                out = F.scaled_dot_product_attention(*leaves, is_causal=args.causal)
                results.append(torch.autograd.grad(out, leaves, grad) if backward else out)
        return results

    return run


def drawn_problem(n: int, args: argparse.Namespace, pattern: DilatedPattern) -> Problem:
    """The problem of size ``n``: q, k, v and an output gradient drawn on the GPU from a generator seeded by n."""
    problem = Problem(n, args, pattern)
    gen = torch.Generator(device="cuda").manual_seed(n)
    problem.tensors.update(
        q=torch.randn(problem.shape_q, device="cuda", dtype=args.dtype, generator=gen),
        k=torch.randn(problem.shape_kv, device="cuda", dtype=args.dtype, generator=gen),
        v=torch.randn(problem.shape_kv, device="cuda", dtype=args.dtype, generator=gen),
        grad=torch.randn(problem.shape_q, device="cuda", dtype=args.dtype, generator=gen),
    )
    return problem


def free_problem(problem: Problem):
    problem.tensors.clear()
    torch.cuda.empty_cache()


def benchmark(args, progress=print) -> list[dict]:
    pattern = DilatedPattern(args.segment_lengths, args.dilation_rates)
    results = []
    too_slow: set[tuple[str, str]] = set()
    steps = [(n, m, mode) for n in args.n for m in args.methods for mode in args.modes]
    for index, (n, method, mode) in enumerate(steps, 1):
        problem = problem_of_size(n, args, pattern)
        flops = required_forward_flops(n, args.batch, args.heads, args.head_dim, pattern, args.causal)
        flops *= 3.5 if mode == "fwd+bwd" else 1.0
        row = dict(n=n, method=method, mode=mode, flops=flops)
        skip = None
        if method == "torch" and n > args.torch_max_n:
            skip = f"N > --torch-max-n ({size_label(args.torch_max_n)})"
        elif method == "dense" and n > args.dense_max_n:
            skip = f"N > --dense-max-n ({size_label(args.dense_max_n)})"
        elif (method, mode) in too_slow:
            skip = f"over --max-seconds ({args.max_seconds} s) at a smaller N"
        if skip is None:
            try:
                run = make_method(method, problem, backward=mode == "fwd+bwd")
                run()  # compiles, plans and caches stay out of the measurements
                torch.cuda.synchronize()
                started = time.perf_counter()
                run()
                torch.cuda.synchronize()
                if time.perf_counter() - started > args.max_seconds:
                    too_slow.add((method, mode))
                row["ms"] = time_call(run, args.min_repeats, args.min_time)
                row["ms_back_to_back"] = time_back_to_back(run)
                row["host_ms"] = host_time(run)
                row["peak_bytes"] = peak_memory(run)
                row["tflops"] = flops / row["ms"] * 1e-9
            except torch.OutOfMemoryError:
                skip = "out of memory"
                too_slow.add((method, mode))
            except RuntimeError as error:  # e.g. an SDPA backend that refuses the shape
                skip = f"failed: {str(error).splitlines()[0][:80]}"
            finally:
                torch.cuda.empty_cache()
        if skip is not None:
            row["skipped"] = skip
        results.append(row)
        shown = (
            f"{row['ms']:.2f} ms ({row['ms_back_to_back']:.2f} back to back), {row['tflops']:.0f} TFLOP/s, peak "
            f"+{row['peak_bytes'] / 2**30:.2f} GiB, host {row['host_ms']:.3f} ms"
            if "ms" in row else f"skipped: {skip}"
        )
        progress(f"[{index}/{len(steps)}] N={size_label(n)} {method} {mode}: {shown}")
    count_kernels(args, pattern, results, progress)
    release_problem()
    return results


def problem_of_size(n: int, args: argparse.Namespace, pattern: DilatedPattern) -> Problem:
    """The problem of size ``n``, drawn once and kept while consecutive steps share ``n`` (the one before, freed)."""
    problem = getattr(benchmark, "_problem", None)
    if problem is None or problem.n != n:
        release_problem()
        problem = benchmark._problem = drawn_problem(n, args, pattern)
    return problem


def release_problem() -> None:
    problem = getattr(benchmark, "_problem", None)
    if problem is not None:
        free_problem(problem)
        benchmark._problem = None


def count_kernels(args, pattern: DilatedPattern, results: list[dict], progress=print) -> None:
    """The CUDA kernels of one call of each timed row, counted with torch.profiler after every timing is taken, so
    that no profiler session runs between two timings. (Run 24 saw a 32K forward's host time go 168 -> 377 us after
    one; run 25's control, a pause of the same length, slowed the host as much: the slowdown follows any idle spell,
    not the profiler. Counting last keeps the question out of the timings either way.)"""
    timed = [row for row in results if "ms" in row]
    for index, row in enumerate(timed, 1):
        problem = problem_of_size(row["n"], args, pattern)
        try:
            row["kernels"] = kernels_per_call(make_method(row["method"], problem, backward=row["mode"] == "fwd+bwd"))[0]
        except (torch.OutOfMemoryError, RuntimeError) as error:  # the profiler's own memory, at the largest N
            row["kernels"] = None
            progress(f"[kernels {index}/{len(timed)}] not counted: {str(error).splitlines()[0][:80]}")
            continue
        finally:
            torch.cuda.empty_cache()
        progress(f"[kernels {index}/{len(timed)}] N={size_label(row['n'])} {row['method']} {row['mode']}: {row['kernels']} kernels")


# ----------------------------------------------------------------------------------------------------------
# launch-configuration sweep
# ----------------------------------------------------------------------------------------------------------


def sweep_outputs(args, n: int) -> list[torch.Tensor]:
    """One forward+backward of the Triton kernels, as configured now, on the inputs the benchmark draws for N = n."""
    pattern = DilatedPattern(args.segment_lengths, args.dilation_rates)
    gen = torch.Generator(device="cuda").manual_seed(n)
    shape_q, shape_kv = (args.batch, n, args.heads, args.head_dim), (args.batch, n, args.kv_heads, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=args.dtype, generator=gen).requires_grad_()
               for shape in (shape_q, shape_kv, shape_kv))
    grad = torch.randn(shape_q, device="cuda", dtype=args.dtype, generator=gen)
    out = dilated_attention(q, k, v, pattern.segment_lengths, pattern.dilation_rates, causal=args.causal, backend="triton")
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]


def sweep(args, progress=print) -> tuple[object, object, list[str]]:
    """Time each launch configuration at --sweep-n and keep the fastest whose outputs and gradients agree with those
    of the default configuration (relative error <= 1e-2, what bfloat16 rounding leaves)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from modeling_longnet import dilated_attention_triton as kernels

    n = args.sweep_n
    sweep_args = argparse.Namespace(**{**vars(args), "n": [n], "methods": ["triton"]})
    lines = [f"Launch configurations at N={size_label(n)} (median ms; error against the default configuration):", ""]
    default_forward, default_backward = kernels.forward_config, kernels.backward_config
    # the reference: the default tiles through the plain paths (pointer loads, dQ recomputed)
    plain_forward = dataclasses.replace(default_forward(args.head_dim, args.dtype), tensor_descriptors=False)
    plain_backward = dataclasses.replace(
        default_backward(args.head_dim, args.dtype), tensor_descriptors=False, dq_mode="recompute"
    )
    kernels.forward_config, kernels.backward_config = (lambda *a: plain_forward), (lambda *a: plain_backward)
    reference = sweep_outputs(args, n)  # the forward candidates run with the plain backward too

    def measure(mode: str, config_name: str) -> float | None:
        try:
            ms = benchmark(argparse.Namespace(**{**vars(sweep_args), "modes": [mode]}), progress)[0].get("ms")
            if ms is None:
                lines.append(f"- {config_name}: skipped")
                return None
            got = sweep_outputs(args, n)
            error = max(float((g.float() - r.float()).norm() / r.float().norm()) for g, r in zip(got, reference))
            del got
        except (RuntimeError, ValueError, CompilationError, OutOfResources) as exc:  # not a candidate then
            lines.append(f"- {config_name}: failed: {str(exc).splitlines()[0][:100]}")
            progress(lines[-1])
            return None
        agrees = error <= 1e-2
        lines.append(f"- {config_name}: {ms:.3f} ms, error {error:.1e}{'' if agrees else ' FAIL'}")
        progress(lines[-1])
        return ms if agrees else None

    def keep_fastest(role: str, candidates: str, parse, mode: str, label: str, default):
        """Time each candidate configuration of `role` ("forward_config" or "backward_config"), then install the
        fastest that agrees (the default where none does); returns (config, ms) or None."""
        best = None
        for text in candidates.split(";"):
            config = parse(text)
            setattr(kernels, role, lambda *a, c=config: c)
            ms = measure(mode, f"{label} {config_text(config)}")
            if ms is not None and (best is None or ms < best[1]):
                best = (config, ms)
        setattr(kernels, role, (lambda *a, c=best[0]: c) if best else default)
        return best

    # the forward first: the backward candidates then run behind the fastest forward
    best_forward = keep_fastest(
        "forward_config", args.forward_configs, forward_config_from, "fwd", "forward", default_forward
    )
    best_backward = keep_fastest(
        "backward_config", args.backward_configs, backward_config_from, "fwd+bwd", "forward+backward",
        default_backward,
    )
    kept = [config_text(best[0]) if best else "default" for best in (best_forward, best_backward)]
    lines += ["", f"kept: forward {kept[0]}; backward {kept[1]}"]
    return best_forward, best_backward, lines


# ----------------------------------------------------------------------------------------------------------
# correctness at realistic sizes (CHECK_CASES: at the top, for parse_args)
# ----------------------------------------------------------------------------------------------------------


def _poison_allocator(num_bytes: int):
    """Fill the caching allocator's free blocks with NaN bytes, so that an output element no kernel wrote shows."""
    torch.cuda.empty_cache()
    junk = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    del junk


def check_dropout() -> tuple[bool, str]:
    """Dropout is reproducible by seed, and the backward drops what the forward dropped.

    The output is linear in v with the dropped weights A, so <dO, A v> = <A^T dO, v> = <dV, v> holds exactly (up to
    float32 rounding) only if the backward regenerates the forward's mask.
    """
    shape = (1, 16384, 4, 64)
    q, k, v = (torch.randn(shape, device="cuda", requires_grad=True) for _ in range(3))

    def dropped(seed):
        torch.manual_seed(seed)
        return dilated_attention(q, k, v, PAPER_SEGMENT_LENGTHS[:3], PAPER_DILATION_RATES[:3], causal=True, dropout_p=0.1)

    first, again, other = dropped(0), dropped(0), dropped(1)
    grad = torch.randn_like(first)
    (grad_v,) = torch.autograd.grad(first, (v,), grad)
    lhs, rhs = float((first * grad).detach().sum()), float((grad_v * v).detach().sum())
    same, differs = torch.equal(first, again), not torch.equal(first, other)
    ok = same and differs and abs(lhs - rhs) <= 1e-4 * (abs(lhs) + abs(rhs)) + 1e-3
    return ok, (
        f"Dropout (p = 0.1, float32, N = 16K): the same seed gives the same output: {same}; another seed another: "
        f"{differs}; <dO, O> = {lhs:.4f} against <dV, V> = {rhs:.4f} (equal iff the backward reuses the forward's "
        f"mask): {'pass' if ok else 'FAIL'}"
    )


def check(progress=print, cases: str | None = None) -> tuple[bool, list[str]]:
    """The CHECK_CASES (all, or the comma-separated indices in ``cases``) and, unless ``cases`` omits it, dropout."""
    chosen = None if cases is None else {c.strip() for c in cases.split(",")}

    def error(x, y):
        x, y = x.detach().double(), y.detach().double()
        return float((x - y).norm() / max(float(y.norm()), 1.0))

    lines = [
        "| case | dtype | out | LSE | dQ | dK | dV | tolerance | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    all_ok = True
    for index, (name, b, n, h, hkv, d, segments, rates, causal, offsets, layout) in enumerate(CHECK_CASES):
        if chosen is not None and str(index) not in chosen:
            continue
        gen = torch.Generator(device="cuda").manual_seed(n)
        nq = 300 if layout == "decode" else n
        q = torch.randn(b, nq, h, d, device="cuda", generator=gen)
        k, v = (torch.randn(b, n, hkv, d, device="cuda", generator=gen) for _ in range(2))
        kwargs = dict(causal=causal, offsets=offsets)
        if layout in ("left", "right"):
            mask = torch.ones(b, n, dtype=torch.long, device="cuda")
            mask[0, : n // 3] = 0 if layout == "left" else 1
            if layout == "right":
                mask[-1, n - n // 5 :] = 0
            kwargs["attention_mask"] = mask
        elif layout == "packed":
            kwargs["cu_seqlens"] = torch.tensor([0, 100, 7000, 7001, 15000, n], dtype=torch.int32, device="cuda")
        elif layout == "decode":
            kwargs["position_offset"] = torch.tensor([0, 5000], device="cuda")
        grad = torch.randn(b, nq, h, d, device="cuda", generator=gen)
        reference_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = dilated_attention(*reference_leaves, segments, rates, backend="torch", return_lse=True, **kwargs)
        want = torch.autograd.grad(ref, reference_leaves, grad)
        for dtype, tolerance in ((torch.float32, 2e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 4e-3)):
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            _poison_allocator(8 * q.numel() * 4)
            out, lse = dilated_attention(*leaves, segments, rates, backend="triton", return_lse=True, **kwargs)
            got = torch.autograd.grad(out, leaves, grad.to(dtype))
            finite = torch.isfinite(ref_lse)
            errors = [
                error(out, ref),
                error(lse[finite], ref_lse[finite]) if torch.equal(finite, torch.isfinite(lse)) else float("inf"),
                *(error(g, w) for g, w in zip(got, want)),
            ]
            if dtype != torch.float32:
                # 16-bit inputs: measure against the reference on the same rounded inputs, in float32
                rounded = [t.detach().float().requires_grad_() for t in leaves]
                ref16, ref16_lse = dilated_attention(*rounded, segments, rates, backend="torch", return_lse=True, **kwargs)
                want16 = torch.autograd.grad(ref16, rounded, grad.to(dtype).float())
                errors = [
                    error(out, ref16),
                    error(lse[finite], ref16_lse[finite]) if torch.equal(finite, torch.isfinite(lse)) else float("inf"),
                    *(error(g, w) for g, w in zip(got, want16)),
                ]
            ok = all(e <= tolerance for e in errors)
            all_ok &= ok
            cells = " | ".join(f"{e:.1e}" for e in errors)
            lines.append(f"| {name} | {str(dtype).replace('torch.', '')} | {cells} | {tolerance:.0e} | {'pass' if ok else 'FAIL'} |")
            progress(lines[-1])
        del q, k, v, ref, want
        torch.cuda.empty_cache()

    if chosen is None or "dropout" in chosen:
        dropout_ok, dropout_line = check_dropout()
        all_ok &= dropout_ok
        lines += ["", dropout_line]
        progress(lines[-1])
    if chosen is None or "logits" in chosen:
        logits_ok, logit_lines = check_large_logits()
        all_ok &= logits_ok
        lines += ["", *logit_lines]
        for line in logit_lines:
            progress(line)
    return all_ok, lines


LOGIT_SCALES = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)
HALF_MAGNITUDES = (1e1, 1e2, 1e3, 1e4, 3e4)


def _multiset_bias(segments, rates, heads: int, n: int, causal: bool, device) -> torch.Tensor:
    """(1, H, N, N): log of how many branches hold key j for query i (SPEC.md, offsets "interleaved"), -inf where
    none does: with it as an additive mask one dense softmax is the same function as the dilated attention."""
    t = torch.arange(n, device=device)
    count = torch.zeros(heads, n, n, dtype=torch.float64, device=device)
    for w, r in zip(segments, rates):
        for h in range(heads):
            holds = (t % w) % r == h % r
            allowed = holds[:, None] & holds[None, :] & ((t // w)[:, None] == (t // w)[None, :])
            if causal:
                allowed &= t[None, :] <= t[:, None]
            count[h] += allowed
    return torch.where(count > 0, count.log(), float("-inf")).unsqueeze(0)


def check_large_logits(device="cuda", problems: int = 4) -> tuple[bool, list[str]]:
    """The Triton kernels at logits 1e1 .. 1e9 (attention logits grow in training; weights taken against a rounded
    LSE once let outputs leave the convex hull of the values): fp32 outputs convex (|O| <= max |v|), gradients finite,
    and every error against float64 within 4x of a dense softmax's in float32 (SDPA with the multiset mask);
    fp16 / bf16 inputs of magnitude up to 3e4 give finite outputs and gradients. The problem of
    tests/test_stability.py: B = 2, N = 32, H = 4, D = 16, w = 8/16/32, r = 1/2/4, causal."""
    segments, rates, shape = (8, 16, 32), (1, 2, 4), (2, 32, 4, 16)
    bias = _multiset_bias(segments, rates, shape[2], shape[1], True, device)

    def ours(q, k, v):
        return dilated_attention(q, k, v, segments, rates, causal=True, backend="triton")

    def dense(q, k, v):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.to(q.dtype)
        )
        return out.transpose(1, 2)

    def run(function, inputs, grad):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = function(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]

    def error(got, want):
        # relative, except for (near-)zero references (a gradient through a softmax that is one-hot), as in the tests
        got, want = torch.cat([g.flatten() for g in got]).double(), torch.cat([w.flatten() for w in want])
        return float((got - want).norm() / max(float(want.norm()), 1.0))

    lines = [
        "| logits | out | dQ | dK | dV (Triton, fp32) | out | dQ | dK | dV (dense softmax, fp32) | convex, finite | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_ok = True
    floor = 2 * len(segments) * torch.finfo(torch.float32).eps
    for scale in LOGIT_SCALES:
        results = {"ours": [], "dense": [], "truth": []}
        convex_and_finite = True
        for seed in range(problems):
            gen = torch.Generator().manual_seed(seed)
            factor = scale**0.5 * shape[3] ** 0.25  # scores q.k / sqrt(D) of the order of `scale`
            q, k = (torch.randn(shape, generator=gen, dtype=torch.float64) * factor for _ in range(2))
            v, grad = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
            inputs32 = [t.float().to(device) for t in (q, k, v)]
            exact = [t.double() for t in inputs32]
            got = run(ours, inputs32, grad.to(device))
            results["ours"].append(got)
            results["dense"].append(run(dense, inputs32, grad.to(device)))
            results["truth"].append(run(dense, exact, grad.to(device).double()))
            convex_and_finite &= float(got[0].abs().max()) <= float(inputs32[2].abs().max()) * (1 + floor)
            convex_and_finite &= all(bool(g.isfinite().all()) for g in got)
        ours_errors = [error([r[i] for r in results["ours"]], [r[i] for r in results["truth"]]) for i in range(4)]
        dense_errors = [error([r[i] for r in results["dense"]], [r[i] for r in results["truth"]]) for i in range(4)]
        # where the dense softmax itself breaks (NaN), it sets no bound: convex and finite is then the requirement,
        # as in tests/test_stability.py
        ok = convex_and_finite and all(o <= 4 * max(d if d == d else float("inf"), floor) for o, d in zip(ours_errors, dense_errors))
        all_ok &= ok
        cells = " | ".join(f"{e:.1e}" for e in (*ours_errors, *dense_errors))
        lines.append(f"| {scale:.0e} | {cells} | {convex_and_finite} | {'pass' if ok else 'FAIL'} |")
    for dtype in (torch.float16, torch.bfloat16):
        finite = True
        for magnitude in HALF_MAGNITUDES:
            gen = torch.Generator().manual_seed(int(magnitude))
            inputs = [
                (torch.randn(shape, generator=gen).clamp(-3, 3) * (magnitude / 3)).to(dtype).to(device) for _ in range(3)
            ]
            got = run(ours, inputs, torch.ones(shape, device=device))
            finite &= all(bool(g.isfinite().all()) for g in got)
        all_ok &= finite
        lines.append(
            f"{str(dtype).replace('torch.', '')} inputs of magnitude {', '.join(f'{m:.0e}' for m in HALF_MAGNITUDES)}: "
            f"outputs and gradients finite: {'pass' if finite else 'FAIL'}"
        )
    return all_ok, lines


# ----------------------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import triton

    return dict(
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
    )


def markdown_table(args, results: list[dict], env: dict, title: str) -> str:
    kv = f", {args.kv_heads} kv-heads" if args.kv_heads != args.heads else ""
    lines = [
        f"### {title}",
        "",
        (
            f"{env['card']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"cuDNN {env['cudnn']}, {env['date']}. B = {args.batch}, H = {args.heads}{kv}, D = {args.head_dim}, "
            f"{str(args.dtype).replace('torch.', '')}, {'causal' if args.causal else 'non-causal'}, "
            f"branches w = {list(args.segment_lengths)}, r = {list(args.dilation_rates)}. Median time in ms "
            "of a single synced call / back to back (TFLOP/s of the single call over the required FLOPs); peak "
            "memory above the inputs in GiB."
        ),
        "",
    ]
    methods = [m for m in args.methods]
    by_key = {(r["n"], r["method"], r["mode"]): r for r in results}
    for mode in args.modes:
        header = "| N | " + " | ".join(METHOD_NAMES[m] for m in methods) + " | Triton peak GiB |"
        lines += [f"**{mode}**", "", header, "|---" * (len(methods) + 2) + "|"]
        for n in args.n:
            cells, peak = [], "-"
            for m in methods:
                row = by_key[(n, m, mode)]
                cells.append(
                    f"{row['ms']:.2f} / {row['ms_back_to_back']:.2f} ({row['tflops']:.0f})" if "ms" in row else f"- ({row['skipped']})"
                )
                if m == "triton" and "peak_bytes" in row:
                    peak = f"{row['peak_bytes'] / 2**30:.2f}"
            lines.append(f"| {size_label(n)} | " + " | ".join(cells) + f" | {peak} |")
        lines.append("")
        lines += [f"Host ms per call / CUDA kernels per call, {mode}:", "", "| N | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |"]
        lines.append("|---" * (len(methods) + 1) + "|")
        for n in args.n:
            rows = [by_key[(n, m, mode)] for m in methods]
            cells = [f"{r['host_ms']:.2f} / {r.get('kernels') or '-'}" if "host_ms" in r else "-" for r in rows]
            lines.append(f"| {size_label(n)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(args, results: list[dict], env: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.modes), figsize=(6 * len(args.modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], args.modes):
        for m in args.methods:
            points = [(r["n"], r["ms"]) for r in results if r["method"] == m and r["mode"] == mode and "ms" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=METHOD_NAMES[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("time (ms)")
        ax.set_title(f"{mode}, H={args.heads}, D={args.head_dim}, {'causal' if args.causal else 'non-causal'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Dilated attention, paper branches, {env['card']} ({env['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if not torch.cuda.is_available():
        print("benchmark.py needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    def progress(text):
        print(text, file=sys.stderr, flush=True)

    progress(f"{env}")
    use_configs(
        args,
        forward_config_from(args.forward_config) if args.forward_config else None,
        backward_config_from(args.backward_config) if args.backward_config else None,
    )
    if args.check:
        ok, lines = check(progress, args.check_cases)
        text = "\n".join(lines)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(f"### Correctness at realistic sizes\n\n{env['card']}, torch {env['torch']}, triton {env['triton']}, "
                        f"{env['date']}. Relative error ||x - ref|| / ||ref|| against the PyTorch path in float32 "
                        f"(16-bit rows: on the same rounded inputs).\n\n{text}\n")
        return 0 if ok else 1
    sweep_lines, kept = [], {}
    if args.sweep:
        best_forward, best_backward, sweep_lines = sweep(args, progress)
        kept = {f"{role}_config": config_text(best[0]) for role, best in (("forward", best_forward),
                                                                             ("backward", best_backward)) if best}
        print("\n".join(sweep_lines))
    results = benchmark(args, progress)
    title = args.title or (
        f"{'Causal' if args.causal else 'Non-causal'}, H = {args.heads}, D = {args.head_dim}"
    )
    table = markdown_table(args, results, env, title)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + ("\n" + "\n".join(sweep_lines) + "\n" if sweep_lines else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, args={k: str(v) for k, v in vars(args).items()}, kept=kept, results=results), f,
                      indent=1)
    if args.plot:
        plot(args, results, env, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
