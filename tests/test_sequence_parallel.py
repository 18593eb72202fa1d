"""Sequence parallelism against the single-process function: values, gradients, traffic, errors, the model.

The module starts two process groups (gloo on 127.0.0.1, 2 and 4 processes) when first needed, and every case
runs on them: the parent draws a case, the ranks compute their chunks, and the parent compares the concatenated
chunks with the single-process result.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import queue
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from cases import relative_error
from reference import reference_dilated_attention

from modeling_longnet import available_backends, dilated_attention
from modeling_longnet.sequence_parallel import compatible_chunk_length, sequence_parallel_dilated_attention

# ---------------------------------------------------------------------------------------------------------
# spawned process groups
# ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, requests, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    while (request := requests.get()) is not None:
        function, args = request
        try:
            results.put((rank, True, function(*args)))
        except Exception:  # noqa: BLE001 -- any failure goes back to the test, which fails with the traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class SpawnedGroup:
    """``world_size`` processes in one gloo group; ``run(f, *args)`` calls ``f(*args)`` on every rank.

    ``f`` must be a module-level function of this file (it is pickled by name). A failure on any rank tears the
    group down (the other ranks may be stuck in a collective) and the next ``run`` starts a fresh one.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.processes = []

    def _start(self) -> None:
        # A fork server imports this module and the package (seconds) once; each rank is then a fork of it.
        # (Forking the test process itself is unsafe once torch has started its thread pools.) The fork server
        # finds this module through PYTHONPATH: it does not inherit sys.path.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        port = _free_port()
        self.requests = [context.SimpleQueue() for _ in range(self.world_size)]
        self.results = context.Queue()
        self.processes = [
            context.Process(
                target=_serve, args=(rank, self.world_size, port, self.requests[rank], self.results), daemon=True
            )
            for rank in range(self.world_size)
        ]
        python_path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
        try:
            for process in self.processes:
                process.start()
        finally:
            if python_path is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = python_path

    def run(self, function, *args, timeout: float = 120.0) -> list:
        if not self.processes:
            self._start()
        for requests in self.requests:
            requests.put((function, args))
        values, failures = [None] * self.world_size, []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                if ok:
                    values[rank] = value
                else:
                    failures.append(f"rank {rank}:\n{value}")
                    break
        except queue.Empty:
            failures.append(f"no answer within {timeout} s")
        if failures:
            self.close()
            raise AssertionError("\n".join(failures))
        return values

    def close(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join()
        self.processes = []


@pytest.fixture(scope="module")
def groups():
    spawned = {2: SpawnedGroup(2), 4: SpawnedGroup(4)}
    yield spawned
    for group in spawned.values():
        if group.processes:
            for requests in group.requests:
                requests.put(None)
            for process in group.processes:
                process.join(timeout=30)
        group.close()


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def sequence_parallel_cases(draw, world_size: int, max_chunk: int = 8, head_ranges: bool = False):
    """Branches whose segments are shorter than a chunk, equal to it, span several ranks, or exceed the sequence;
    with ``head_ranges``, sometimes the heads of one tensor-parallel rank (``heads=(first, total)``)."""
    chunk_length = draw(st.integers(1, max_chunk))
    sequence_length = chunk_length * world_size
    segment_lengths = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["inside", "spanning", "beyond"]))
        if kind == "inside":
            segment_lengths.append(draw(st.sampled_from(_divisors(chunk_length))))
        elif kind == "spanning":
            segment_lengths.append(chunk_length * draw(st.integers(2, world_size + 1)))
        else:
            segment_lengths.append(draw(st.integers(sequence_length, 2 * sequence_length + 3)))
    num_kv_heads = draw(st.integers(1, 3))
    num_heads = num_kv_heads * draw(st.integers(1, 3))
    heads = None
    if head_ranges and draw(st.booleans()):  # heads first .. first + num_heads - 1 of a layer of `total`
        first = draw(st.integers(0, 5))
        heads = (first, first + num_heads + draw(st.integers(0, 3)))
    return {
        "batch": draw(st.integers(1, 2)),
        "chunk_length": chunk_length,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": draw(st.sampled_from([4, 8])),
        "segment_lengths": segment_lengths,
        "dilation_rates": [draw(st.integers(1, 5)) for _ in segment_lengths],
        "causal": draw(st.booleans()),
        "offsets": draw(st.sampled_from(["interleaved", "grouped"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "heads": heads,
    }


def _full_inputs(case, world_size: int, dtype):
    """q, k, v of the whole sequence and the gradients sent into the output and the LSE, from the case's seed."""
    generator = torch.Generator().manual_seed(case["seed"])
    length = case["chunk_length"] * world_size
    batch, heads, kv_heads, head_dim = case["batch"], case["num_heads"], case["num_kv_heads"], case["head_dim"]
    q = torch.randn(batch, length, heads, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, length, kv_heads, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, length, kv_heads, head_dim, generator=generator, dtype=dtype)
    grad_out = torch.randn(batch, length, heads, head_dim, generator=generator, dtype=dtype)
    grad_lse = torch.randn(batch, length, heads, generator=generator, dtype=dtype)
    return q, k, v, grad_out, grad_lse


def _attention_kwargs(case):
    heads = case.get("heads")
    return {"causal": case["causal"], "offsets": case["offsets"], **({"heads": heads} if heads is not None else {})}


def _backward(out, lse, grad_out, grad_lse, inputs):
    """Gradients of <out, grad_out> + <lse, grad_lse> over the queries that see something (finite LSE)."""
    seen = torch.isfinite(lse)
    loss = (out * grad_out).sum() + (torch.where(seen, lse, 0.0) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, inputs, materialize_grads=True)  # a chunk may hold no query that sees a key


def _rank_chunk(case, dtype_name: str, group_size: int | None = None, lse_gradient: bool = True):
    """Run on every rank: this rank's output, LSE and input gradients under sequence parallelism.

    ``group_size``: run on consecutive blocks of that many ranks instead of the whole world. ``lse_gradient``:
    also send a gradient into the LSE."""
    group = None if group_size is None else _subgroup(group_size)
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    q, k, v, grad_out, grad_lse = _full_inputs(case, world_size, getattr(torch, dtype_name))
    chunk = slice(rank * case["chunk_length"], (rank + 1) * case["chunk_length"])
    inputs = [t[:, chunk].clone().requires_grad_() for t in (q, k, v)]
    out, lse = sequence_parallel_dilated_attention(
        *inputs,
        case["segment_lengths"],
        case["dilation_rates"],
        group=group,
        backend=case.get("backend", "auto"),
        return_lse=True,
        **_attention_kwargs(case),
    )
    grads = _backward(out, lse, grad_out[:, chunk], grad_lse[:, chunk] * lse_gradient, inputs)
    return [t.detach() for t in (out, lse, *grads)]


_SUBGROUPS = {}


def _subgroup(size: int):
    """This rank's group among consecutive blocks of ``size`` ranks (created once, by every rank)."""
    if size not in _SUBGROUPS:
        world = dist.get_world_size()
        blocks = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
        _SUBGROUPS[size] = blocks[dist.get_rank() // size]
    return _SUBGROUPS[size]


def _gather_chunks(per_rank):
    return [torch.cat(parts, dim=1) for parts in zip(*per_rank)]


def _assert_lse_equal(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "different queries see nothing"
    seen = torch.isfinite(want)
    assert relative_error(got[seen], want[seen]) <= tolerance


def _assert_matches_single_process(case, world_size: int, got) -> None:
    """The ranks' gathered chunks equal the single-process core in float32 (PyTorch backend): output, LSE and the
    gradients of q, k, v."""
    q, k, v, grad_out, grad_lse = _full_inputs(case, world_size, torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out, lse = dilated_attention(
        *inputs,
        case["segment_lengths"],
        case["dilation_rates"],
        backend="torch",
        return_lse=True,
        **_attention_kwargs(case),
    )
    want = [out.detach(), lse.detach(), *_backward(out, lse, grad_out, grad_lse, inputs)]
    assert relative_error(got[0], want[0]) <= 1e-5
    _assert_lse_equal(got[1], want[1], 1e-5)
    for name, g, w in zip("qkv", got[2:], want[2:]):
        assert relative_error(g, w) <= 1e-5, f"d{name}"


# ---------------------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
@given(data=st.data())
def test_matches_single_process_function(groups, world_size, data):
    """float32, 2 and 4 ranks: outputs, LSEs and the gradients of q, k, v equal the single-process ones, also for
    the heads of one tensor-parallel rank (``heads``), whose offsets follow their global index."""
    case = data.draw(sequence_parallel_cases(world_size, head_ranges=True))
    _assert_matches_single_process(
        case, world_size, _gather_chunks(groups[world_size].run(_rank_chunk, case, "float32"))
    )


@given(case=sequence_parallel_cases(world_size=2, max_chunk=6))
def test_matches_reference_in_float64(groups, case):
    got = _gather_chunks(groups[2].run(_rank_chunk, case, "float64", None, False))
    q, k, v, grad_out, _ = _full_inputs(case, 2, torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    want = reference_dilated_attention(
        *inputs, case["segment_lengths"], case["dilation_rates"], **_attention_kwargs(case)
    )
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    assert relative_error(got[0], want.detach()) <= 1e-10
    for name, g, w in zip("qkv", got[2:], want_grads):
        assert relative_error(g, w) <= 1e-10, f"d{name}"


@pytest.mark.parametrize(
    "segment_lengths, dilation_rates",
    [
        ([4, 8, 16, 32], [1, 2, 4, 8]),  # shorter, equal, two chunks, the whole sequence of 4 chunks
        ([16, 64], [3, 5]),  # only branches that cross chunks, one longer than the sequence
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("offsets", ["interleaved", "grouped"])
def test_gqa_on_four_ranks_in_every_mode(groups, segment_lengths, dilation_rates, causal, offsets):
    """The acceptance grid, explicitly: GQA (6 query heads over 2 key/value heads) on 4 ranks of 8 tokens."""
    case = {
        "batch": 2,
        "chunk_length": 8,
        "num_heads": 6,
        "num_kv_heads": 2,
        "head_dim": 8,
        "segment_lengths": segment_lengths,
        "dilation_rates": dilation_rates,
        "causal": causal,
        "offsets": offsets,
        "seed": 7,
    }
    _assert_matches_single_process(case, 4, _gather_chunks(groups[4].run(_rank_chunk, case, "float32")))


@pytest.mark.skipif("triton" not in available_backends(), reason="needs triton (or its interpreter)")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_backend_under_sequence_parallelism(groups, causal):
    """The pieces each rank computes (its local branches, the one-branch problems of the crossing ones) run on
    the fused kernels as on a GPU (here in Triton's interpreter)."""
    case = {
        "batch": 1,
        "chunk_length": 16,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "segment_lengths": [8, 32, 64],
        "dilation_rates": [1, 2, 4],
        "causal": causal,
        "offsets": "interleaved",
        "seed": 11,
        "backend": "triton",
    }
    _assert_matches_single_process(case, 2, _gather_chunks(groups[2].run(_rank_chunk, case, "float32")))


# ---------------------------------------------------------------------------------------------------------
# communication volume
# ---------------------------------------------------------------------------------------------------------


def _traffic(case, group_size: int | None):
    """Run on every rank: (bytes sent to, bytes received from) other ranks, per collective call, forward and
    backward, counted from the tensors and split sizes handed to ``all_to_all_single``."""
    calls = []
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        rank = dist.get_rank(group)
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        sent = sum(n for peer, n in enumerate(input_split_sizes) if peer != rank)
        received = sum(n for peer, n in enumerate(output_split_sizes) if peer != rank)
        calls.append((sent * row_bytes, received * row_bytes))
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        _rank_chunk(case, "float32", group_size)
    finally:
        dist.all_to_all_single = original
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_traffic_per_rank_does_not_grow_with_the_sequence(groups, causal):
    """Segments up to two chunks: each rank exchanges the same bytes for N = 2C (2 ranks) and N = 4C (4 ranks)."""
    chunk, dilation, head_dim = 16, 4, 8
    case = {
        "batch": 1,
        "chunk_length": chunk,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": head_dim,
        "segment_lengths": [8, 16, 2 * chunk],
        "dilation_rates": [1, 2, dilation],
        "causal": causal,
        "offsets": "interleaved",
        "seed": 3,
    }
    on_two = groups[2].run(_traffic, case, None)
    on_four = groups[4].run(_traffic, case, None)
    on_two_of_four = groups[4].run(_traffic, case, 2)
    for rank in range(4):
        assert on_four[rank] == on_two[rank % 2] == on_two_of_four[rank]

    # Only the branch of two-chunk segments crosses ranks. Heads 0..3 read key/value heads 0, 0, 1, 1 at offsets
    # 0, 1, 2, 3: four (key/value head, offset) pairs of chunk / dilation rows each, keys and values, float32.
    message = 4 * (chunk // dilation) * 2 * head_dim * 4
    assert message < chunk * 2 * 2 * head_dim * 4  # less than the chunk's whole keys and values
    (forward_even, backward_even), (forward_odd, backward_odd) = on_two
    if causal:  # keys go forward in the sequence only; their gradients come back
        assert forward_even == (message, 0) and forward_odd == (0, message)
        assert backward_even == (0, message) and backward_odd == (message, 0)
    else:
        assert forward_even == forward_odd == backward_even == backward_odd == (message, message)


# ---------------------------------------------------------------------------------------------------------
# chunk lengths and errors
# ---------------------------------------------------------------------------------------------------------


def _no_segment_cut_inside_a_rank(segment_lengths, world_size: int, chunk_length: int) -> bool:
    """Brute force: every segment (clipped to the sequence) that meets a chunk contains it or lies inside it."""
    length = world_size * chunk_length
    for w in segment_lengths:
        for start in range(0, length, chunk_length):
            end = start + chunk_length
            for segment_start in range(start // w * w, end, w):
                segment_end = min(segment_start + w, length)
                inside = start <= segment_start and segment_end <= end
                contains = segment_start <= start and end <= segment_end
                if not (inside or contains):
                    return False
    return True


@given(
    segment_lengths=st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 48]), min_size=1, max_size=4),
    world_size=st.integers(1, 5),
    chunk_length=st.integers(1, 40),
)
def test_compatible_chunk_length_is_the_smallest_that_cuts_no_segment(segment_lengths, world_size, chunk_length):
    fit = compatible_chunk_length(segment_lengths, world_size, chunk_length)
    assert fit >= chunk_length
    assert _no_segment_cut_inside_a_rank(segment_lengths, world_size, fit)
    assert not any(_no_segment_cut_inside_a_rank(segment_lengths, world_size, c) for c in range(chunk_length, fit))


def _error_of(case):
    """Run on every rank: the type and message of the error that sequence parallelism raises."""
    try:
        _rank_chunk(case, "float32")
    except (ValueError, TypeError) as error:
        return type(error).__name__, str(error)
    return None


def test_chunk_length_that_cuts_a_segment_is_a_clear_error(groups):
    case = {
        "batch": 1,
        "chunk_length": 6,
        "num_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 4,
        "segment_lengths": [2, 4],
        "dilation_rates": [1, 2],
        "causal": True,
        "offsets": "interleaved",
        "seed": 0,
    }
    for kind, message in groups[2].run(_error_of, case):
        assert kind == "ValueError"
        assert "chunk of 6 tokens (the length of `q`)" in message and "segment_lengths[1] = 4" in message
        assert "Pad the sequence to 16 tokens (chunks of 8" in message


def test_argument_errors():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(TypeError, match="`group` must be a torch.distributed.ProcessGroup"):
        sequence_parallel_dilated_attention(q, q, q, 4, 1, group="sp")
    with pytest.raises(ValueError, match="`q` and `k` must hold the same chunk"):
        sequence_parallel_dilated_attention(q[:, :4], q, q, 4, 1)
    with pytest.raises(TypeError, match="`causal` must be a bool"):
        sequence_parallel_dilated_attention(q, q, q, 4, 1, causal=1)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            sequence_parallel_dilated_attention(q, q, q, 4, 1)
    with pytest.raises(ValueError, match="`world_size` must be a positive int"):
        compatible_chunk_length([4], 0)
    with pytest.raises(ValueError, match="`chunk_length` must be a positive int"):
        compatible_chunk_length([4], 2, 0)
    with pytest.raises(ValueError, match="`segment_lengths` is empty"):
        compatible_chunk_length([], 2)


# ---------------------------------------------------------------------------------------------------------
# a model under sequence parallelism, with data parallelism
# ---------------------------------------------------------------------------------------------------------

MODEL_CASES = {
    # tiny preset: 4 query heads over 2 key/value heads. 32 tokens: chunks of 16 on 2 ranks, of 8 on 4.
    "causal_interleaved": {"segment_lengths": [4, 8, 16, 64], "dilation_rates": [1, 2, 4, 8]},
    "bidirectional_grouped": {
        "segment_lengths": [2, 8, 32],
        "dilation_rates": [1, 3, 2],
        "causal": False,
        "dilation_offsets": "grouped",
    },
    "checkpointed_chunked_loss": {"segment_lengths": [4, 16, 32], "dilation_rates": [1, 2, 4], "loss_chunk_size": 5},
}
MODEL_SEQUENCE_LENGTH = 32
MODEL_BATCH_SIZE = 2


def _tiny_model(case_name: str):
    """The tiny preset with the case's branches: a causal LM, or a bidirectional encoder (LongNetModel)."""
    from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetModel

    config = LongNetConfig.from_preset("tiny", attn_implementation="torch", **MODEL_CASES[case_name])
    torch.manual_seed(0)
    model = (LongNetForCausalLM if config.causal else LongNetModel)(config)
    if case_name == "checkpointed_chunked_loss":  # newer transformers renamed gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model.train()


def _model_batch(replica: int, causal: bool) -> dict:
    generator = torch.Generator().manual_seed(100 + replica)
    input_ids = torch.randint(3, 128, (MODEL_BATCH_SIZE, MODEL_SEQUENCE_LENGTH), generator=generator)
    if not causal:
        return {"input_ids": input_ids}
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = -100  # unequal target counts across chunks
    return {"input_ids": input_ids, "labels": labels}


def _loss_and_outputs(model, inputs: dict, positions: slice):
    """The LM loss and logits; for an encoder, a fixed random probe of the hidden states (its mean over every
    position of the batch: the rank's share of it when ``inputs`` hold a chunk) and the hidden states."""
    output = model(**inputs, use_cache=False) if "labels" in inputs else model(**inputs)
    if hasattr(output, "loss"):
        return output.loss, output.logits
    hidden = output.last_hidden_state
    probe = torch.randn(
        MODEL_BATCH_SIZE, MODEL_SEQUENCE_LENGTH, hidden.shape[-1], generator=torch.Generator().manual_seed(1)
    )
    return (hidden * probe[:, positions]).sum() / probe[..., 0].numel(), hidden


_MESHES = {}


def _train_step(case_name: str, sp_size: int, wrapper: str):
    """Run on every rank: one forward and backward of the tiny model on a (dp, sp) mesh of the world, wrapped for
    data parallelism over every rank (``"ddp"``: DistributedDataParallel, ``"fsdp"``: FSDP2, one unit per layer).

    Returns (the dp replica, this rank's loss, its chunk of the outputs, the parameter gradients after the
    wrapper's reduction)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from modeling_longnet.sequence_parallel import apply_sequence_parallel, sequence_parallel_loss, shard_batch

    world_size = dist.get_world_size()
    for shape in ((world_size // sp_size, sp_size), (world_size,)):
        if shape not in _MESHES:
            _MESHES[shape] = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "sp")[-len(shape) :])
    mesh = _MESHES[world_size // sp_size, sp_size]
    model = apply_sequence_parallel(_tiny_model(case_name), mesh["sp"])
    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=_MESHES[(world_size,)])
        wrapped = fully_shard(model, mesh=_MESHES[(world_size,)])
    replica, sp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("sp")
    chunk = shard_batch(_model_batch(replica, model.config.causal), mesh["sp"])
    chunk_length = MODEL_SEQUENCE_LENGTH // sp_size
    share, outputs = _loss_and_outputs(wrapped, chunk, slice(sp_rank * chunk_length, (sp_rank + 1) * chunk_length))
    loss = sequence_parallel_loss(share, mesh["sp"])
    loss.backward()
    outputs = outputs.detach() if outputs is not None else None
    grads = {
        name: p.grad.full_tensor() if wrapper == "fsdp" else p.grad.detach() for name, p in model.named_parameters()
    }
    return replica, float(loss.detach()), outputs, grads


def _single_process_step(case_name: str, replica: int):
    model = _tiny_model(case_name)
    loss, outputs = _loss_and_outputs(model, _model_batch(replica, model.config.causal), slice(None))
    loss.backward()
    outputs = outputs.detach() if outputs is not None else None
    return float(loss.detach()), outputs, {name: p.grad.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("case_name", sorted(MODEL_CASES))
@pytest.mark.parametrize("world_size, sp_size, wrapper", [(2, 2, "ddp"), (4, 4, "ddp"), (4, 2, "ddp"), (4, 2, "fsdp")])
def test_model_under_sequence_and_data_parallelism_matches_one_process(groups, case_name, world_size, sp_size, wrapper):
    """Loss, outputs and averaged parameter gradients equal one process's on each replica's whole batch."""
    results = groups[world_size].run(_train_step, case_name, sp_size, wrapper)
    replicas = sorted({replica for replica, *_ in results})
    assert replicas == list(range(world_size // sp_size))
    single = {replica: _single_process_step(case_name, replica) for replica in replicas}
    for replica in replicas:
        ranks = [r for r in results if r[0] == replica]  # in rank order, so in chunk order
        want_loss, want_outputs, _ = single[replica]
        for _, loss, _, _ in ranks:
            assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
        if want_outputs is not None:
            assert relative_error(torch.cat([outputs for _, _, outputs, _ in ranks], dim=1), want_outputs) <= 1e-5
    # DDP and FSDP average over the replicas
    want_grads = {name: sum(single[r][2][name] for r in replicas) / len(replicas) for name in single[0][2]}
    for _, _, _, grads in results:
        for name, want in want_grads.items():
            assert relative_error(grads[name], want) <= 1e-5, name


def _distributed_errors():
    """Run on every rank: the messages of the errors of shard_batch, the model's attention and apply (those that
    need a process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    from modeling_longnet.sequence_parallel import apply_sequence_parallel, shard_batch

    messages = []
    batch = _model_batch(0, causal=True)
    for bad in (
        {"input_ids": batch["input_ids"][:, :31]},
        {
            **batch,
            "attention_mask": torch.ones(MODEL_BATCH_SIZE, MODEL_SEQUENCE_LENGTH).index_fill(1, torch.tensor([0]), 0),
        },
        {**batch, "position_ids": torch.arange(MODEL_SEQUENCE_LENGTH).remainder(10).expand(MODEL_BATCH_SIZE, -1)},
    ):
        try:
            shard_batch(bad)
        except ValueError as error:
            messages.append(str(error))
    model = apply_sequence_parallel(_tiny_model("causal_interleaved"))
    chunk = shard_batch(batch)
    try:
        model(**chunk, attention_mask=torch.ones(MODEL_BATCH_SIZE, 16).index_fill(1, torch.tensor([0]), 0))
    except ValueError as error:
        messages.append(str(error))
    if (1, 2) not in _MESHES:
        _MESHES[1, 2] = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "sp"))
    try:
        apply_sequence_parallel(_tiny_model("causal_interleaved"), _MESHES[1, 2])
    except ValueError as error:
        messages.append(str(error))
    return messages


def test_distributed_errors(groups):
    for messages in groups[2].run(_distributed_errors):
        assert len(messages) == 5
        assert "batch['input_ids'] has 31 positions" in messages[0] and "multiple of 2 (e.g. 32)" in messages[0]
        assert "batch['attention_mask'] marks padding" in messages[1]
        assert "batch['position_ids'] restart at 0" in messages[2]
        assert "no `attention_mask` with padding" in messages[3]
        assert "`sp_group` must be a 1-D device mesh (e.g. mesh['sp'])" in messages[4]


def test_apply_errors():
    from modeling_longnet import LongNetConfig, LongNetForCausalLM
    from modeling_longnet.sequence_parallel import apply_sequence_parallel, sequence_parallel_loss

    model = LongNetForCausalLM(LongNetConfig.from_preset("tiny"))
    with pytest.raises(TypeError, match="`sp_group` must be a torch.distributed ProcessGroup"):
        apply_sequence_parallel(model, 2)
    with pytest.raises(TypeError, match="`model` must be a LongNet model"):
        apply_sequence_parallel(torch.nn.Linear(2, 2))
    xpos = LongNetForCausalLM(LongNetConfig.from_preset("tiny", position_encoding="xpos"))
    with pytest.raises(ValueError, match="position_encoding='xpos'"):
        apply_sequence_parallel(xpos)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation='eager' cannot be split over ranks"):
        apply_sequence_parallel(model)
    with pytest.raises(ValueError, match="`loss` must be a scalar tensor"):
        sequence_parallel_loss(torch.ones(2))


# ---------------------------------------------------------------------------------------------------------
# the benchmark script, launched as on the GPU machine
# ---------------------------------------------------------------------------------------------------------

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK_SCRIPT = os.path.join(REPOSITORY, "scripts", "benchmark_sequence_parallel.py")
ACCELERATE_CONFIG = os.path.join(REPOSITORY, "configuration", "accelerate_sequence_parallel.yaml")
BENCHMARK_ARGUMENTS = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--sequence-length",
    "256",
    "--layers",
    "2",
    "--hidden-size",
    "32",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--segment-lengths",
    "16,64,256",
    "--dilation-rates",
    "1,4,16",
    "--vocab-size",
    "64",
    "--loss-chunk-size",
    "100",
    "--steps",
    "2",
    "--warmup",
    "1",
]


def test_benchmark_script_under_accelerate_launch_trains_as_one_process(tmp_path):
    """The accelerate config starts 2 processes (gloo here); their losses are those of one process training on
    the whole sequence, and each rank receives what the other sends."""
    import importlib.util
    import json
    import subprocess

    result_file = tmp_path / "result.json"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([REPOSITORY, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG, BENCHMARK_SCRIPT]
    subprocess.run(
        [*command, *BENCHMARK_ARGUMENTS, "--json", str(result_file)], check=True, timeout=300, env=environment
    )
    results = json.loads(result_file.read_text())["results"]
    assert [r["sp_rank"] for r in results] == [0, 1] and [r["tokens"] for r in results] == [128, 128]

    spec = importlib.util.spec_from_file_location("benchmark_sequence_parallel", BENCHMARK_SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    args = benchmark.build_parser().parse_args(BENCHMARK_ARGUMENTS)
    model = benchmark.build_model(args, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=True)
    batch = benchmark.make_batch(args, 0, torch.device("cpu"))
    losses = []
    for _ in range(args.warmup + args.steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    for result in results:
        assert relative_error(torch.tensor(result["losses"]), torch.tensor(losses)) <= 1e-5
    assert losses[-1] < losses[0]
    first, second = results
    assert first["bytes_sent_per_step"] == second["bytes_received_per_step"] > 0
    assert second["bytes_sent_per_step"] == first["bytes_received_per_step"] > 0
