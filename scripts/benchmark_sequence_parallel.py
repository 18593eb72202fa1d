#!/usr/bin/env python
"""Sequence parallelism: a LongNet trained on one long sequence split over the ranks, per-rank time and memory.

The model is the paper's (12 layers, 768 wide, 12 heads; rotary positions instead of xPos, which sequence
parallelism cannot split), in bf16 with activation checkpointing and a chunked loss. Its branches go up to a
segment of the whole sequence: w = 2K, 8K, 32K, 128K, 512K, 2M with r = 1, 4, 16, 64, 256, 1024 (every
(segment, head) holds 2048 rows), so with 1M tokens per rank the longest branch crosses ranks and the others stay
local. The sequence is a random block of 4096 tokens repeated, which the model learns to copy: the loss falls.

Each rank reports its step time (forward, backward, optimizer), its peak memory, and the bytes its attention sent
and received (counted at ``all_to_all_single``); rank 0 prints the table and writes JSON.

    # two GPUs, 2M tokens (1M per GPU), and the baseline: one GPU with 1M tokens
    torchrun --nproc_per_node 2 scripts/benchmark_sequence_parallel.py --sequence-length 2M --json sp2.json
    python scripts/benchmark_sequence_parallel.py --sequence-length 1M --json sp1.json
    # the same through accelerate
    accelerate launch --config_file configuration/accelerate_sequence_parallel.yaml \\
        scripts/benchmark_sequence_parallel.py --sequence-length 2M
    # a smoke test on the CPU (gloo)
    torchrun --nproc_per_node 2 scripts/benchmark_sequence_parallel.py --device cpu --dtype float32 \\
        --sequence-length 512 --layers 2 --hidden-size 64 --heads 4 --segment-lengths 16,64,512 \\
        --dilation-rates 1,4,16 --vocab-size 128 --steps 2 --warmup 1

With more ranks than ``--sp-size`` the rest is data parallelism: a (dp, sp) mesh, DDP over every rank, and each
data-parallel replica trains on its own sequence.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("modeling_longnet") is None:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# the shared checks beside this script (tests load it as a module, without the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import parse_size, size_list  # noqa: E402

DEFAULT_SEGMENT_LENGTHS = "2K,8K,32K,128K,512K,2M"
DEFAULT_DILATION_RATES = "1,4,16,64,256,1024"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sequence-length",
        type=parse_size,
        default=parse_size("2M"),
        help="tokens of one sequence (K/M suffixes), split over --sp-size ranks",
    )
    parser.add_argument("--sp-size", type=int, default=None, help="ranks per sequence (default: all of them)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: 4 x hidden)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--segment-lengths", type=size_list, default=size_list(DEFAULT_SEGMENT_LENGTHS))
    parser.add_argument("--dilation-rates", type=size_list, default=size_list(DEFAULT_DILATION_RATES))
    parser.add_argument(
        "--loss-chunk-size", type=parse_size, default=parse_size("8K"), help="tokens per chunk of the loss"
    )
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", help="keep every activation")
    parser.add_argument("--attn-implementation", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="parameters and activations"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring (kernel compilation, tables)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the settings and every rank's figures here (rank 0)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a collective may wait before the run aborts")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before torch is imported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("sequence_length", "sp_size", "layers", "hidden_size", "heads", "kv_heads", "intermediate_size",
                 "vocab_size", "loss_chunk_size", "timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error(
            f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}: each key/value head serves a group "
            "of query heads"
        )
    if args.hidden_size % args.heads:
        parser.error(
            f"--hidden-size {args.hidden_size} must be a multiple of --heads {args.heads}: each head takes an equal share"
        )
    if args.hidden_size // args.heads % 2:  # the model has rotary positions
        parser.error(
            f"--hidden-size {args.hidden_size} / --heads {args.heads} = {args.hidden_size // args.heads} dimensions per "
            "head: rotary positions need an even number; change --hidden-size or --heads"
        )
    if len(args.segment_lengths) != len(args.dilation_rates):
        parser.error("--segment-lengths and --dilation-rates need one entry per branch")
    if not all(value > 0 for value in (*args.segment_lengths, *args.dilation_rates)):
        parser.error("--segment-lengths and --dilation-rates must be positive")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


if __name__ == "__main__":
    parse_args()  # a bad command line is refused here, before the slow imports below

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def build_model(args, device, dtype):
    from modeling_longnet import LongNetConfig, LongNetForCausalLM

    config = LongNetConfig.from_preset(
        "longnet-paper",
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        segment_lengths=args.segment_lengths,
        dilation_rates=args.dilation_rates,
        position_encoding="rope",
        max_position_embeddings=max(args.sequence_length, 32768),
        loss_chunk_size=args.loss_chunk_size,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=args.attn_implementation,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = LongNetForCausalLM(config).to(device=device, dtype=dtype)
    if args.checkpointing:  # newer transformers renamed gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model.train()


def make_batch(args, replica: int, device) -> dict:
    """A random block of 4096 tokens repeated over the sequence: learnable by copying from one block back."""
    generator = torch.Generator().manual_seed(args.seed + 1 + replica)
    period = min(4096, args.sequence_length)
    block = torch.randint(0, args.vocab_size, (period,), generator=generator)
    input_ids = block.repeat(math.ceil(args.sequence_length / period))[: args.sequence_length][None].to(device)
    return {"input_ids": input_ids, "labels": input_ids}


class CommunicationCounter:
    """Bytes a rank's attention sends to and receives from other ranks, counted at ``all_to_all_single``."""

    def __init__(self):
        self.sent = self.received = 0
        self._original = dist.all_to_all_single

    def __enter__(self):
        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rank = dist.get_rank(group)
            row_bytes = math.prod(input.shape[1:]) * input.element_size()
            self.sent += sum(n for peer, n in enumerate(input_split_sizes) if peer != rank) * row_bytes
            self.received += sum(n for peer, n in enumerate(output_split_sizes) if peer != rank) * row_bytes
            return self._original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._original


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from modeling_longnet.sequence_parallel import apply_sequence_parallel, sequence_parallel_loss, shard_batch

    world_size, rank = dist.get_world_size(), dist.get_rank()
    sp_size = args.sp_size or world_size
    if world_size % sp_size:
        raise ValueError(f"--sp-size {sp_size} must divide the number of ranks ({world_size})")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    mesh = init_device_mesh(device.type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))

    model = apply_sequence_parallel(build_model(args, device, dtype), mesh["sp"])
    parameters = sum(p.numel() for p in model.parameters())
    replicated = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=True)
    chunk = shard_batch(make_batch(args, mesh.get_local_rank("dp"), device), mesh["sp"])
    synchronize(device)
    static_memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    losses, timings = [], []
    counter = CommunicationCounter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        measured = step >= args.warmup
        sent, received = counter.sent, counter.received
        synchronize(device)
        start = time.perf_counter()
        with counter:
            loss = sequence_parallel_loss(replicated(**chunk).loss, mesh["sp"])
            synchronize(device)
            forward_done = time.perf_counter()
            loss.backward()
        synchronize(device)
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        end = time.perf_counter()
        losses.append(float(loss.detach()))
        if measured:
            timings.append(
                {
                    "step": end - start,
                    "forward": forward_done - start,
                    "backward": backward_done - forward_done,
                    "optimizer": end - backward_done,
                    "sent": counter.sent - sent,
                    "received": counter.received - received,
                }
            )
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.4f}, {end - start:.3f} s", flush=True)

    median = {key: statistics.median(t[key] for t in timings) for key in timings[0]} if timings else {}
    return {
        "rank": rank,
        "sp_rank": mesh.get_local_rank("sp"),
        "dp_rank": mesh.get_local_rank("dp"),
        "tokens": chunk["input_ids"].numel(),
        "parameters": parameters,
        "losses": losses,
        "median_seconds": {key: median[key] for key in ("step", "forward", "backward", "optimizer")} if median else {},
        "bytes_sent_per_step": int(median.get("sent", 0)),
        "bytes_received_per_step": int(median.get("received", 0)),
        "static_memory_bytes": static_memory,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
    }


def environment(device_type: str) -> dict:
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device_type == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = platform.processor() or platform.machine()
    return env


def format_table(results: list[dict]) -> str:
    gib = 1 << 30
    columns = (
        "rank (dp, sp)",
        "tokens",
        "step s",
        "forward s",
        "backward s",
        "peak GiB",
        "sent MB/step",
        "received MB/step",
        "loss first -> last",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        t = r["median_seconds"]
        lines.append(
            f"| {r['rank']} ({r['dp_rank']}, {r['sp_rank']}) | {r['tokens']:,} | {t.get('step', float('nan')):.3f} | {t.get('forward', float('nan')):.3f} "
            f"| {t.get('backward', float('nan')):.3f} | {r['peak_memory_bytes'] / gib:.1f} | "
            f"{r['bytes_sent_per_step'] / 1e6:.3f} | {r['bytes_received_per_step'] / 1e6:.3f} | "
            f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{Path(__file__).name}: error: --device cuda needs a GPU; use --device cpu (gloo) for a smoke test", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # started as a plain process: a group of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    # A rank that fails (out of memory, say) must not leave the others waiting in a collective for long.
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        result = run(args)
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        if dist.get_rank() == 0:
            print(format_table(results))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"env": environment(args.device), "args": vars(args), "results": results}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
