"""Random dilated-attention problems for hypothesis, shared by the tests of every backend, and the small helpers
that several test files share."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

LAYOUTS = ("none", "left", "right", "padded_rows", "packed", "decode", "holes", "holes_decode")


@st.composite
def attention_cases(
    draw,
    max_len: int = 300,
    max_heads: int = 8,
    head_dims=(8, 16, 64),
    max_branches: int = 5,
    short_segments: tuple[int, int] = (1, 64),
    max_rate: int = 8,
    max_batch: int = 3,
    max_documents: int = 6,
    max_position_offset: int = 200,
):
    """A problem: shapes, branches (segments up to ``short_segments`` or longer than the sequence), causal or not,
    an offset mode, and where the tokens are: no mask, left or right padding, a row of nothing but padding, packed
    documents (``cu_seqlens``), KV-cache queries (the last ``num_queries`` positions, with ``position_offset``), or
    a mask with holes (0s anywhere), alone or with KV-cache queries."""
    num_keys = draw(st.integers(1, max_len))
    layout = draw(st.sampled_from(LAYOUTS))
    batch = 1 if layout == "packed" else draw(st.integers(1, max_batch))
    num_kv_heads = draw(st.integers(1, max_heads))
    group = draw(st.sampled_from([g for g in range(1, max_heads + 1) if num_kv_heads * g <= max_heads]))
    branches = draw(st.integers(1, max_branches))
    segment_lengths = [
        draw(st.one_of(st.integers(*short_segments), st.integers(num_keys, 2 * num_keys + 8))) for _ in range(branches)
    ]
    case = dict(
        batch=batch,
        num_keys=num_keys,
        num_queries=num_keys,
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from(head_dims)),
        segment_lengths=segment_lengths,
        dilation_rates=[draw(st.integers(1, max_rate)) for _ in range(branches)],
        causal=draw(st.booleans()),
        offsets=draw(st.sampled_from(["interleaved", "grouped"])),
        attention_mask=None,
        cu_seqlens=None,
        position_offset=None,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if layout in ("left", "right", "padded_rows", "decode"):
        mask = torch.ones(batch, num_keys, dtype=torch.long)
        for b in range(batch):
            pad = num_keys if layout == "padded_rows" and b == 0 else draw(st.integers(0, num_keys))
            if layout == "right":
                mask[b, num_keys - pad :] = 0
            else:
                mask[b, :pad] = 0
        case["attention_mask"] = mask
    if layout in ("holes", "holes_decode"):  # 0s anywhere: each real token kept with probability `density`
        density = draw(st.sampled_from([0.3, 0.7, 0.9]))
        keep = torch.rand(batch, num_keys, generator=torch.Generator().manual_seed(case["seed"] + 1)) < density
        case["attention_mask"] = keep.long()
    if layout == "packed":
        cuts = sorted(draw(st.lists(st.integers(0, num_keys), max_size=max_documents)))
        case["cu_seqlens"] = torch.tensor([0, *cuts, num_keys], dtype=torch.int32)
    if layout in ("decode", "holes_decode"):
        case["num_queries"] = draw(st.integers(1, num_keys))
        case["position_offset"] = torch.tensor([draw(st.integers(0, max_position_offset)) for _ in range(batch)])
    return case


def make_inputs(case, dtype=torch.float64, requires_grad: bool = False, device="cpu"):
    """q, k, v of the case, drawn from its seed."""
    generator = torch.Generator().manual_seed(case["seed"])
    shape_q = (case["batch"], case["num_queries"], case["num_heads"], case["head_dim"])
    shape_kv = (case["batch"], case["num_keys"], case["num_kv_heads"], case["head_dim"])
    tensors = [torch.randn(shape, generator=generator, dtype=dtype) for shape in (shape_q, shape_kv, shape_kv)]
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


def layout_kwargs(case, device="cpu"):
    """Where the tokens are: the keyword arguments of ``dilated_attention`` (and the reference) for the case."""

    def moved(t):
        return None if t is None else t.to(device)

    return dict(
        attention_mask=moved(case["attention_mask"]),
        cu_seqlens=moved(case["cu_seqlens"]),
        position_offset=moved(case["position_offset"]),
    )


def call_kwargs(case, device="cpu"):
    """Every keyword argument of the case but the branches, for ``dilated_attention`` and the reference."""
    return dict(causal=case["causal"], offsets=case["offsets"], **layout_kwargs(case, device))


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / max(||y||, 1): relative, except for (near-)zero references such as uncovered queries or a
    gradient through a softmax over one key."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return float((x - y).norm() / max(float(y.norm()), 1.0))


def holes_mask(batch: int, length: int, seed: int, keep: float = 0.8) -> torch.Tensor:
    """A ``(batch, length)`` mask of 0s anywhere (each token kept with probability ``keep``), ending in a real
    token (a classifier pools the last one)."""
    mask = (torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < keep).long()
    mask[:, -1] = 1
    return mask


def static_cache_supported() -> bool:
    """Whether LongNet takes this transformers version's StaticCache (its layers must count their tokens; 5.17, the oldest supported, does)."""
    from transformers import StaticCache

    from modeling_longnet import LongNetConfig
    from modeling_longnet.cache_longnet import check_cache

    try:
        config = LongNetConfig.from_preset("tiny")
        check_cache(StaticCache(config=config, max_cache_len=1), config)
    except TypeError:
        return False
    return True


def check_backend_against_reference(case, backend: str, running, heads=None, tolerance: float = 1e-10) -> None:
    """A backend's output, LSE, and the gradients of both (weighted at random) against the float64 reference, the
    backend run inside ``running()`` (the context its kernels need here). ``heads`` = (first, total): the call holds
    a shard of a layer's heads (one key/value head per query head), held against the reference over ``first``
    more heads in front."""
    from reference import reference_dilated_attention

    from modeling_longnet import dilated_attention

    branches = (case["segment_lengths"], case["dilation_rates"])
    extra = {} if heads is None else dict(heads=heads)
    q, k, v = make_inputs(case, requires_grad=True)
    with running():
        out, lse = dilated_attention(q, k, v, *branches, backend=backend, return_lse=True, **call_kwargs(case), **extra)
    if heads is None:
        ref = reference_dilated_attention(q, k, v, *branches, **call_kwargs(case))
    else:
        front = lambda t: torch.cat([t.new_zeros(t.shape[:2] + (heads[0],) + t.shape[3:]), t], dim=2)  # noqa: E731
        ref = reference_dilated_attention(front(q), front(k), front(v), *branches, **call_kwargs(case))[:, :, heads[0] :]
    assert relative_error(out, ref) <= tolerance
    _, torch_lse = dilated_attention(q, k, v, *branches, backend="torch", return_lse=True, **call_kwargs(case), **extra)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(torch_lse))
    finite = torch.isfinite(torch_lse)
    assert relative_error(lse[finite], torch_lse[finite]) <= tolerance
    weights = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(case["seed"]))
    loss = ((out.sum(-1) + torch.where(finite, lse, 0.0)) * weights).sum()
    with running():
        got = torch.autograd.grad(loss, (q, k, v))
    ref_loss = ((ref.sum(-1) + torch.where(finite, torch_lse, 0.0)) * weights).sum()
    want = torch.autograd.grad(ref_loss, (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert relative_error(g, w) <= tolerance, name
