"""Host work that does not repeat (issue 14, point 1): a batch of whole rows has one layout per sizes, so the
tables a backend derives from it are built at the first call and reused by every later call and layer."""

from __future__ import annotations

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
