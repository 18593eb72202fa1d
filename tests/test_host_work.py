"""Host work that does not repeat (issue 14, point 1): a batch of whole rows has one layout per sizes, so the
tables a backend derives from it are built at the first call and reused by every later call and layer."""

from __future__ import annotations

import pytest
import torch

import modeling_longnet.dilated_attention_torch as torch_backend
from modeling_longnet import TokenLayout, dilated_attention


def test_whole_rows_share_one_layout_whatever_says_so():
    layout = TokenLayout.build(2, 24)
    assert TokenLayout.build(2, 24) is layout
    assert TokenLayout.build(2, 24, 24, attention_mask=torch.ones(2, 24, dtype=torch.long)) is layout
    assert TokenLayout.build(2, 24, position_offset=0) is layout
    assert TokenLayout.build(2, 24, position_offset=5) is TokenLayout.build(2, 24, position_offset=5)
    assert TokenLayout.build(2, 24, position_offset=5) is not layout
    assert TokenLayout.build(2, 24, 1) is not layout  # a decoding step: other sizes
    padded = torch.ones(2, 24, dtype=torch.long)
    padded[0, :3] = 0
    assert TokenLayout.build(2, 24, attention_mask=padded) is not layout


def test_the_public_function_builds_branch_tables_once_per_shape(monkeypatch):
    built = []
    original = torch_backend._branch_tables

    def counting(layout, w, r, offsets, num_heads, num_kv_heads, device):
        fresh = len(layout.cache)
        tables = original(layout, w, r, offsets, num_heads, num_kv_heads, device)
        if len(layout.cache) > fresh:  # a table was built and kept, not found
            built.append((w, r))
        return tables

    monkeypatch.setattr(torch_backend, "_branch_tables", counting)
    q, k, v = (torch.randn(1, 40, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    first = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True, backend="torch")
    tables_after_first_call = len(built)
    second = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True, backend="torch")
    assert tables_after_first_call == 2
    assert len(built) == 2, "the second call rebuilt its tables"
    assert torch.equal(first, second)


class _HostReads:
    """Makes every read of a tensor's value on the host (``bool``, ``int``, ``float``, ``item``, ``tolist``) raise:
    on a GPU each would wait for the device, and none could be captured in a CUDA graph."""

    NAMES = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(name):
            def read(tensor, *args, **kwargs):
                raise AssertionError(f"Tensor.{name} read a value on the host")

            return read

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse(name))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


def test_a_decoding_step_with_the_static_bounded_cache_reads_nothing_on_the_host():
    """The model's forward for one new token per row (xPos, a left-padded row, the ring already wrapped): its
    layout is a PositionLayout of device tensors, so no value is read on the host, whatever the length."""
    from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetStaticCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache_kwarg = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    torch.manual_seed(0)
    model = LongNetForCausalLM(LongNetConfig.from_preset("tiny", position_encoding="xpos", attn_implementation="torch")).eval()
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    cache = LongNetStaticCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True, **{cache_kwarg: cache})
        step = dict(attention_mask=torch.ones(2, 1, dtype=torch.long), use_cache=True, **{cache_kwarg: cache})
        with _HostReads():
            logits = model(ids[:, -1:], **step).logits
    assert logits.shape == (2, 1, model.config.vocab_size)


class _FakeCompiledKernel:
    """What a Triton launch returns: the compiled kernel, with the launcher that the direct launches call."""

    function, packed_metadata = "function handle", "packed metadata"

    def __init__(self):
        self.direct_launches = []

    def run(self, *arguments):
        self.direct_launches.append(arguments)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid)


class _FakeJitFunction:
    """A ``@triton.jit`` kernel of parameters (X, n, seed, BLOCK), not specialized on ``seed``."""

    arg_names = ["X", "n", "seed", "BLOCK"]

    def __init__(self):
        from types import SimpleNamespace

        self.params = [SimpleNamespace(num=i, do_not_specialize=name == "seed") for i, name in enumerate(self.arg_names)]
        self.compiled = []  # one kernel per launch through the JIT entry point

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.compiled.append(_FakeCompiledKernel())
            return self.compiled[-1]

        return launch


def test_triton_launches_reuse_the_compiled_kernel_until_what_triton_specializes_on_changes(monkeypatch):
    triton_backend = pytest.importorskip("modeling_longnet.dilated_attention_triton")
    monkeypatch.setattr(triton_backend, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_backend, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(triton_backend, "_launch_hooks", lambda: (None, None))
    fn = _FakeJitFunction()
    launch = triton_backend._CompiledLauncher(fn)
    launch.direct = True  # what it is off the interpreter
    storage = torch.zeros(64)
    x, other_x, unaligned_x = storage[:32], storage[32:], storage[1:33]

    launch((4, 2), x, 5, 7, BLOCK=16, num_warps=4)
    assert len(fn.compiled) == 1
    launch((4, 2), other_x, 5, 123456, BLOCK=16, num_warps=4)  # new data, new seed: the same kernel
    assert len(fn.compiled) == 1
    assert fn.compiled[0].direct_launches == [
        (4, 2, 1, 1234, "function handle", "packed metadata", None, None, None, other_x, 5, 123456, 16)
    ]
    specialized_anew = [
        ((4, 2), (unaligned_x, 5, 7), dict(BLOCK=16, num_warps=4)),  # an address no longer 16-byte aligned
        ((4, 2), (x.half(), 5, 7), dict(BLOCK=16, num_warps=4)),  # another dtype
        ((4, 2), (x, 6, 7), dict(BLOCK=16, num_warps=4)),  # another value of a specialized int
        ((4, 2), (x, 5, 1 << 40), dict(BLOCK=16, num_warps=4)),  # a seed past 32 bits: an i64 parameter
        ((4, 2), (x, 5, 7), dict(BLOCK=32, num_warps=4)),  # another constexpr
        ((4, 2), (x, 5, 7), dict(BLOCK=16, num_warps=8)),  # another launch option
    ]
    for number, (grid, args, constexprs) in enumerate(specialized_anew, start=2):
        launch(grid, *args, **constexprs)
        assert len(fn.compiled) == number, (args, constexprs)
    launch((9,), x, 6, 8, BLOCK=16, num_warps=4)  # a kept specialization, another grid
    assert fn.compiled[3].direct_launches == [
        (9, 1, 1, 1234, "function handle", "packed metadata", None, None, None, x, 6, 8, 16)
    ]
    hook = object()
    monkeypatch.setattr(triton_backend, "_launch_hooks", lambda: (hook, None))  # a profiler's hook gets metadata
    launch((9,), x, 6, 8, BLOCK=16, num_warps=4)
    assert fn.compiled[3].direct_launches[-1][6:9] == (("metadata", (9,)), hook, None)
