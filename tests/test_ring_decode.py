"""The fused decoding kernel (``dilated_attention_decode``) against the brute-force reference: one query per row
read against a ring of keys, any pattern, offsets, grouped-query heads, padding queries, xPos or none.

Without a GPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1). The ring's slots that
hold no position the query may see are NaN, so a kernel that read one would fail every case.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from cases import relative_error
from reference import reference_dilated_attention

decode = pytest.importorskip("modeling_longnet.dilated_attention_decode")
if decode.triton is None or not (torch.cuda.is_available() or decode.interpreting()):
    pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def xpos_rates(head_dim: int, scale_base: float) -> torch.Tensor:
    """xPos's decay per dimension, written from the paper (Sun et al. 2022): zeta_i = (i / (D / 2) + 0.4) / 1.4 for
    the D / 2 rotary pairs, in rotate_half order (both halves of the head take the same rates), float64."""
    half = head_dim // 2
    zeta = torch.tensor([(i / half + 0.4) / 1.4 for i in range(half)], dtype=torch.float64)
    return torch.cat([zeta, zeta]).log() / scale_base


@st.composite
def ring_problems(draw):
    branches = draw(st.integers(1, 3))
    segment_lengths = [draw(st.integers(1, 40)) for _ in range(branches)]
    num_kv_heads = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    slots = max(segment_lengths) + draw(st.integers(0, 5))
    return dict(
        segment_lengths=segment_lengths,
        dilation_rates=[draw(st.integers(1, 6)) for _ in range(branches)],
        offsets=draw(st.sampled_from(["interleaved", "grouped"])),
        num_kv_heads=num_kv_heads,
        num_heads=num_kv_heads * draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([8, 16, 24])),  # 24: not a power of two
        slots=slots,
        positions=[draw(st.integers(0, 4 * slots)) for _ in range(batch)],
        real=[draw(st.booleans()) or b == 0 for b in range(batch)],
        xpos_scale_base=draw(st.sampled_from([None, 4.0, 32.0])),
        decay_shift=draw(st.sampled_from([0, 3])),  # xPos positions may differ from the pattern's by a constant
        softmax_scale=draw(st.sampled_from([None, 0.7])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def ring_inputs(problem, dtype):
    """q (B, 1, H, D); rings (B, H_kv, slots + 1, D) with the keys of positions ``t - slots < p <= t`` in slot
    ``p % slots`` and NaN everywhere else; each row's keys in position order (float64) for the reference."""
    generator = torch.Generator().manual_seed(problem["seed"])
    batch, heads, kv_heads, head_dim, slots = (
        len(problem["positions"]), problem["num_heads"], problem["num_kv_heads"], problem["head_dim"], problem["slots"]
    )
    q = torch.randn(batch, 1, heads, head_dim, generator=generator).to(dtype)
    rings = [torch.full((batch, kv_heads, slots + 1, head_dim), float("nan"), dtype=dtype) for _ in range(2)]
    sequences = []
    for b, t in enumerate(problem["positions"]):
        first = max(0, t - slots + 1)
        keys, values = (torch.randn(t - first + 1, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
        for i, p in enumerate(range(first, t + 1)):
            rings[0][b, :, p % slots] = keys[i]
            rings[1][b, :, p % slots] = values[i]
        sequences.append((first, keys.double(), values.double()))
    return q, rings[0], rings[1], sequences


def expected_output(problem, q, sequences):
    """Row by row: the reference over the row's keys in position order (the query is the last of them), xPos
    applied in float64 centred on the query."""
    rows = []
    for b, (first, keys, values) in enumerate(sequences):
        t = problem["positions"][b]
        query = q[b : b + 1].double()
        keys = keys[None]
        if not problem["real"][b]:
            rows.append(torch.zeros_like(query))
            continue
        if problem["xpos_scale_base"] is not None:  # exp((n - m) * rate) split as query and key factors about t
            rates = xpos_rates(problem["head_dim"], problem["xpos_scale_base"])
            key_positions = torch.arange(first, t + 1, dtype=torch.float64)[:, None, None]
            query = query * torch.exp(problem["decay_shift"] * rates)
            keys = keys * torch.exp((t - key_positions) * rates)
        rows.append(
            reference_dilated_attention(
                query, keys, values[None], problem["segment_lengths"], problem["dilation_rates"], causal=True,
                softmax_scale=problem["softmax_scale"], offsets=problem["offsets"],
                position_offset=torch.tensor([first]),
            )
        )
    return torch.cat(rows)


def run_kernel(problem, q, key_ring, value_ring):
    batch = q.shape[0]
    positions = torch.tensor(problem["positions"], device=DEVICE)
    decay = {}
    if problem["xpos_scale_base"] is not None:
        decay = dict(
            decay_rates=xpos_rates(problem["head_dim"], problem["xpos_scale_base"]).float().to(DEVICE),
            decay_positions=positions + problem["decay_shift"],
        )
    return decode.ring_decode_attention(
        q.to(DEVICE), key_ring.to(DEVICE), value_ring.to(DEVICE), positions, torch.tensor(problem["real"], device=DEVICE),
        problem["segment_lengths"], problem["dilation_rates"], offsets=problem["offsets"],
        softmax_scale=problem["softmax_scale"], **decay,
    ).cpu()


@settings(max_examples=60, deadline=None)
@given(problem=ring_problems(), small_blocks=st.booleans())
def test_the_fused_decoding_step_equals_the_reference(problem, small_blocks):
    """``small_blocks``: 4 keys per program and 2 blocks per step of the mix, so that a row's keys span many blocks
    and the mix many steps (the paper's pattern makes about 180 blocks of 64)."""
    q, key_ring, value_ring, sequences = ring_inputs(problem, torch.float32)
    sizes = dict(_BLOCK_N=4, _COMBINE_BLOCK=2) if small_blocks else {}
    with mock.patch.multiple(decode, **sizes) if sizes else contextlib.nullcontext():
        out = run_kernel(problem, q, key_ring, value_ring)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected_output(problem, q, sequences), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rings_accumulate_in_float32(dtype):
    """Inputs rounded to 16 bits, the output within one 16-bit rounding of the float64 result on those inputs."""
    problem = dict(
        segment_lengths=[8, 16, 48], dilation_rates=[1, 2, 5], offsets="interleaved", num_kv_heads=2, num_heads=4,
        head_dim=16, slots=48, positions=[5, 100, 47], real=[True, True, True], xpos_scale_base=32.0,
        decay_shift=0, softmax_scale=None, seed=3,
    )
    q, key_ring, value_ring, sequences = ring_inputs(problem, dtype)
    out = run_kernel(problem, q, key_ring, value_ring)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected_output(problem, q, sequences), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("small_blocks", [False, True], ids=["blocks of 64", "blocks of 4"])
def test_large_logits_stay_finite_and_pick_the_largest_key(small_blocks):
    """Products of 1e30 (any shift of the softmax but the largest product would overflow exp): the blocks keep their
    largest product apart and mix by weights that add up to one, so the output is the value of the key with the
    largest product."""
    problem = dict(
        segment_lengths=[128], dilation_rates=[1], offsets="interleaved", num_kv_heads=1, num_heads=1, head_dim=8,
        slots=128, positions=[127], real=[True], xpos_scale_base=None, decay_shift=0, softmax_scale=None, seed=0,
    )
    q, key_ring, value_ring, _ = ring_inputs(problem, torch.float32)
    q = q.abs() * 1e15
    key_ring[..., :128, :] = key_ring[..., :128, :].abs() * 1e15
    key_ring[0, 0, 77] *= 2  # the largest product, in the second of two blocks of 64 (of 32 blocks of 4)
    sizes = dict(_BLOCK_N=4, _COMBINE_BLOCK=2) if small_blocks else {}
    with mock.patch.multiple(decode, **sizes) if sizes else contextlib.nullcontext():
        out = run_kernel(problem, q, key_ring, value_ring)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], value_ring[0, 0, 77])


def test_ring_decode_errors_name_the_fix():
    q = torch.zeros(1, 1, 2, 8, device=DEVICE)
    ring = torch.zeros(1, 1, 9, 8, device=DEVICE)
    position, real = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.ones(1, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="a ring needs at least max\\(segment_lengths\\) slots"):
        decode.ring_decode_attention(q, ring, ring, position, real, [4, 16], [1, 2])
    with pytest.raises(ValueError, match="rings \\(batch, kv_heads, slots \\+ 1, head_dim\\)"):
        decode.ring_decode_attention(torch.zeros(1, 2, 2, 8), ring, ring, position, real, [4], [1])
    with pytest.raises(ValueError, match="`softmax_scale` must be a positive finite number"):
        decode.ring_decode_attention(q, ring, ring, position, real, [4], [1], softmax_scale=math.inf)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decoding_steps_of_the_paper_pattern_match_the_gathered_candidates():
    """A 2-layer model with the paper's branches (scaled down to w <= 2048) in bfloat16 on the GPU: 600 decoding
    steps through the fused kernel against the same steps through the gathered candidates (the torch path)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetStaticCache

    cache_kwarg = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

    torch.manual_seed(0)
    config = LongNetConfig.from_preset(
        "tiny", segment_lengths=[128, 256, 512, 1024, 2048], dilation_rates=[1, 2, 4, 6, 12], num_attention_heads=12,
        num_key_value_heads=12, hidden_size=768, position_encoding="xpos", attn_implementation="triton",
    )
    model = LongNetForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, config.vocab_size, (2, 600), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    logits = {}
    for implementation in ("triton", "torch"):
        model.set_attn_implementation(implementation)
        cache = LongNetStaticCache(config)
        with torch.no_grad(), mock.patch.object(decode, "_launch", wraps=decode._launch) as launches:
            logits[implementation] = torch.cat(
                [model(ids[:, i : i + 1], **{cache_kwarg: cache}, use_cache=True).logits.float() for i in range(ids.shape[1])], dim=1
            )
        assert launches.call_count == (ids.shape[1] * config.num_hidden_layers if implementation == "triton" else 0)
    assert relative_error(logits["triton"], logits["torch"]) < 2e-2
