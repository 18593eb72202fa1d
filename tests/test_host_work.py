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
    # The layout of whole rows is shared process-wide: an earlier test in this worker may have built these tables.
    monkeypatch.setattr(TokenLayout.build(1, 40), "cache", {})
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


class _FakeJitFunction:
    """A ``@triton.jit`` kernel of parameters (X, seed, TABLE, n, BLOCK): the call's own X and seed first, as ours,
    then the kept TABLE and n."""

    arg_names = ["X", "seed", "TABLE", "n", "BLOCK"]

    def __init__(self):
        self.entry_point_launches = []  # (grid, args, constexprs) of each launch through the JIT entry point

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.entry_point_launches.append((grid, args, constexprs))
            return _FakeCompiledKernel()

        return launch


def test_a_launch_calls_the_kernel_its_first_launch_compiled_directly():
    """The first launch of a plan's launch goes through Triton's entry point (which compiles or finds the kernel),
    with the tensors themselves; every later one calls that kernel's launcher with the call's own arguments, the
    kept ones and the constexprs, in signature order, on the group's stream, each tensor passed as its address;
    without direct launches (the interpreter, a profiler's hooks) every launch goes through the entry point."""
    triton_backend = pytest.importorskip("modeling_longnet.dilated_attention_triton")
    fn = _FakeJitFunction()
    table = torch.arange(4)
    launch = triton_backend._Launch(fn, (4, 2), (table, 5), dict(BLOCK=16, num_warps=4), group=1)
    stream = triton_backend._GroupStream(None, 1234)
    x, other_x = torch.zeros(8), torch.ones(8)

    launch((x, 7), stream, triton_backend._addresses((x, 7)))
    assert fn.entry_point_launches == [((4, 2, 1), (x, 7, table, 5), dict(BLOCK=16, num_warps=4))]
    kernel_run = launch.compiled[0]
    launch((other_x, 123456), stream, triton_backend._addresses((other_x, 123456)))
    assert len(fn.entry_point_launches) == 1
    assert kernel_run.__self__.direct_launches == [(
        4, 2, 1, 1234, "function handle", "packed metadata", None, None, None,
        other_x.data_ptr(), 123456, table.data_ptr(), 5, 16,
    )]
    launch((x, 8), stream, None)  # a profiler's hooks are set: they fire from the entry point
    assert len(fn.entry_point_launches) == 2 and len(kernel_run.__self__.direct_launches) == 1
    assert fn.entry_point_launches[1][1] == (x, 8, table, 5)

    interpreted = triton_backend._Launch(fn, (3,), (table, 5), dict(BLOCK=16))
    for _ in range(2):
        interpreted((x, 7), stream, None)
    assert interpreted.compiled is None and len(fn.entry_point_launches) == 4


def test_the_triton_backend_keeps_one_plan_per_call_kind_and_what_triton_specializes_on():
    """Every launch of a call is planned once per key: calls of other data reuse the plan; an input no longer
    16-byte aligned, another stride, dtype or scale, or a gradient on the LSE, gets a plan of its own."""
    triton_backend = pytest.importorskip("modeling_longnet.dilated_attention_triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = TokenLayout.build(1, 48, device=device)
    # the layout of whole rows is shared by every call of these sizes: other tests' plans may lie in it already
    earlier = {id(v) for v in layout.cache.values()}

    def plans():
        kinds = (triton_backend._ForwardPlan, triton_backend._BackwardPlan)
        return [v for v in layout.cache.values() if isinstance(v, kinds) and id(v) not in earlier]

    def call(q, k, v, scale=None, with_lse=False):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = dilated_attention(*leaves, [16, 32], [1, 2], causal=True, backend="triton", token_layout=layout,
                                     softmax_scale=scale, return_lse=True)
        torch.autograd.grad((out, lse) if with_lse else out, leaves,
                            (torch.ones_like(out), torch.ones_like(lse)) if with_lse else torch.ones_like(out))

    storage = torch.randn(3 * 48 * 2 * 16 + 4, device=device)
    q, k, v = (storage[i * 1536 : (i + 1) * 1536].view(1, 48, 2, 16) for i in range(3))
    call(q, k, v)
    first = plans()
    assert len(first) == 2  # one forward plan, one backward plan
    call(torch.randn_like(q), torch.randn_like(k), torch.randn_like(v))  # new data: the same plans
    assert plans() == first
    unaligned = storage[1 : 1 + 1536].view(1, 48, 2, 16)  # 4 bytes past a 16-byte boundary
    changed = [
        (unaligned, k, v, None, False),
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, False),
        (q.half(), k.half(), v.half(), None, False),
        (q, k, v, 0.1, False),
        (q, k, v, None, True),
    ]
    for number, (cq, ck, cv, scale, with_lse) in enumerate(changed):
        before = len(plans())
        call(cq, ck, cv, scale, with_lse)
        # the LSE gradient changes only the backward; the others both
        assert len(plans()) == before + (1 if with_lse else 2), number
