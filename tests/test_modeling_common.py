"""What transformers' common model tests (ModelTesterMixin, GenerationTesterMixin, the export and parallelism
mixins) check, in our words, for every head class and every attention implementation (issue 10 point 7): a mask
0 is no token wherever it stands, ``output_attentions`` as the SDPA integration gives it, tuple and dict outputs,
the renamed cache argument, ``torch.export``, the static caches, every parameter trained. Generation from padded
prompts is tests/test_generation.py's; tensor parallelism over every head class is tests/test_tensor_parallel.py's.

The flash implementation runs on the pure-PyTorch stand-in of tests/fake_flash_attn.py, cuDNN's on PyTorch's CPU
flash-attention kernels (tests/cpu_attention_kernels.py), Triton in its interpreter."""

from __future__ import annotations

import contextlib

import cpu_attention_kernels
import fake_flash_attn
import pytest
from cases import holes_mask, static_cache_supported
import torch
from transformers import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from modeling_longnet import (
    LongNetConfig,
    LongNetForCausalLM,
    LongNetForSequenceClassification,
    LongNetModel,
    LongNetStaticCache,
)

HEAD_CLASSES = [LongNetModel, LongNetForCausalLM, LongNetForSequenceClassification]
IMPLEMENTATIONS = ["eager", "torch", "triton", "cudnn", "flash"]
# transformers 5.24 renamed `past_key_values` to `cache`
RENAMED = "cache" in BaseModelOutputWithPast.__dataclass_fields__
CACHE_KWARG = "cache" if RENAMED else "past_key_values"


def implementation_runs(implementation):
    """The context in which an implementation runs here: flash and cuDNN on their stand-ins, the others as they are."""
    if implementation == "flash":
        return fake_flash_attn.installed()
    if implementation == "cudnn":
        return cpu_attention_kernels.installed()
    return contextlib.nullcontext()


def tiny_model(model_class, implementation="torch", seed=0, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("head_dim", 16)  # the Triton kernels' smallest (the tiny preset's is 8)
    config = LongNetConfig.from_preset("tiny", attn_implementation=implementation, pad_token_id=0, **overrides)
    return model_class(config).eval()


def random_ids(batch, seq_len, seed=0):
    return torch.randint(3, 128, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def per_token_output(model_class, out):
    """The output that has one row per token (a classifier's has one per sequence)."""
    return out.last_hidden_state if model_class is LongNetModel else out.logits


@pytest.fixture
def transformers_warnings(caplog):
    """The warnings transformers' loggers emit during the test, each `warning_once` message fresh."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            yield lambda fragment: [r.getMessage() for r in caplog.records if fragment in r.getMessage()]
    finally:
        hf_logging.disable_propagation()


# ---------------------------------------------------------------------------------------------------------
# masks with holes: transformers' padding and batching tests, with 0s anywhere
# ---------------------------------------------------------------------------------------------------------

VARIANTS = {
    "causal": {},
    "bidirectional": {"causal": False},
    "xPos": {"position_encoding": "xpos", "xpos_scale_base": 8.0},
    "relative position bias": {"use_relative_position_bias": True},  # eager only
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_a_mask_with_holes_gives_each_row_what_it_gives_without_those_tokens(model_class, implementation, variant):
    """mask 0 means "not a token", wherever it stands: every head class, every implementation."""
    overrides = VARIANTS[variant]
    if model_class is LongNetForCausalLM and overrides.get("causal") is False:
        pytest.skip("a causal LM is causal")
    if variant == "relative position bias" and implementation != "eager":
        pytest.skip("the relative position bias runs with the eager implementation only")
    with implementation_runs(implementation), torch.no_grad():
        model = tiny_model(model_class, implementation, **overrides)
        ids, mask = random_ids(3, 19, seed=4), holes_mask(3, 19, seed=5)
        batched = model(ids, attention_mask=mask)
        for row in range(3):
            kept = mask[row].bool()
            alone = model(ids[row : row + 1, kept])
            if model_class is LongNetForSequenceClassification:  # the score of the last real token
                got, want = batched.logits[row], alone.logits[0]
            else:
                got, want = per_token_output(model_class, batched)[row, kept], per_token_output(model_class, alone)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"row {row}")


@pytest.mark.transformers_versions
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_a_batch_gives_each_row_what_it_gives_alone(model_class):
    """transformers' batching-equivalence test: rows do not see each other."""
    model = tiny_model(model_class)
    ids = random_ids(4, 23, seed=1)
    with torch.no_grad():
        batched = model(ids).logits if model_class is not LongNetModel else model(ids).last_hidden_state
        for row in range(4):
            alone = model(ids[row : row + 1])
            torch.testing.assert_close(batched[row], per_token_output(model_class, alone)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# outputs: attentions, hidden states, tuples
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.transformers_versions
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_output_attentions_on_every_implementation(model_class, implementation, transformers_warnings):
    """eager returns the dense weights of each layer (a distribution over real keys for each real query, 0 on
    padding); the kernels form no weight matrix, so, as transformers' SDPA integration does, the call runs, one
    warning names the fix, and no weights come back. The output is the same either way."""
    with implementation_runs(implementation), torch.no_grad():
        model = tiny_model(model_class, implementation)
        ids = random_ids(2, 21)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        out = model(ids, attention_mask=mask, output_attentions=True)
        again = model(ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, attention_mask=mask)
    torch.testing.assert_close(per_token_output(model_class, out), per_token_output(model_class, plain), rtol=0, atol=0)
    warnings = transformers_warnings("returns no attention weights")
    if implementation == "eager":
        config = model.config
        assert warnings == []
        assert len(out.attentions) == config.num_hidden_layers
        for weights in out.attentions:
            assert weights.shape == (2, config.num_attention_heads, 21, 21)
            torch.testing.assert_close(weights[0].sum(-1), torch.ones(config.num_attention_heads, 21))
            torch.testing.assert_close(weights[1, :, 5:].sum(-1), torch.ones(config.num_attention_heads, 16))
            assert bool((weights[1, :, :, :5] == 0).all())  # nobody attends padding
    else:
        assert len(warnings) == 1 and "attn_implementation='eager'" in warnings[0]
        assert not [w for w in (out.attentions or ()) + (again.attentions or ()) if w is not None]


@pytest.mark.transformers_versions
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_tuple_outputs_equal_dict_outputs(model_class):
    """transformers' output-equivalence test: ``return_dict=False`` gives the same tensors, in field order."""
    model = tiny_model(model_class, "eager")
    ids = random_ids(2, 13)
    options = dict(output_hidden_states=True, output_attentions=True, use_cache=False)
    with torch.no_grad():
        as_dict = model(ids, **options)
        as_tuple = model(ids, return_dict=False, **options)
    fields = [value for value in as_dict.to_tuple()]
    assert len(as_tuple) == len(fields)
    for got, want in zip(as_tuple, fields):
        if isinstance(want, tuple):
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
        else:
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# the cache argument, static caches
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.transformers_versions
@pytest.mark.parametrize("model_class", [LongNetModel, LongNetForCausalLM], ids=lambda c: c.__name__)
def test_the_old_cache_name_warns_where_transformers_renamed_it(model_class, transformers_warnings):
    """transformers 5.24 renamed `past_key_values` to `cache`, and its models warn on the old name; LongNet accepts
    both and warns the same way there, and says nothing under older versions, where the old name is the only one."""
    model = tiny_model(model_class)
    ids = random_ids(1, 6)
    if model_class is LongNetForCausalLM:  # generate passes the cache under its own version's name: no warning
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert transformers_warnings("deprecated") == []
    with torch.no_grad():
        old = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        assert len(transformers_warnings("Use `cache` instead")) == (1 if RENAMED else 0)
        new = model(ids, use_cache=True, **{CACHE_KWARG: DynamicCache(config=model.config)})
    assert torch.equal(per_token_output(model_class, old), per_token_output(model_class, new))
    assert len(transformers_warnings("Use `cache` instead")) == (1 if RENAMED else 0)


@pytest.mark.transformers_versions
@pytest.mark.parametrize("kind", ["LongNetStaticCache"] + (["StaticCache"] if static_cache_supported() else []))
@pytest.mark.parametrize("model_class", [LongNetModel, LongNetForCausalLM], ids=lambda c: c.__name__)
def test_a_static_cache_fed_token_by_token_equals_one_forward(model_class, kind):
    """Both static caches, from the base model too: the ring of LongNetStaticCache (16 slots here) wraps twice."""
    model = tiny_model(model_class, position_encoding="xpos", xpos_scale_base=8.0)
    ids, mask = random_ids(2, 40, seed=3), holes_mask(2, 40, seed=3)
    with torch.no_grad():
        expected = per_token_output(model_class, model(ids, attention_mask=mask))
        cache = LongNetStaticCache(model.config) if kind == "LongNetStaticCache" else StaticCache(model.config, max_cache_len=48)
        steps = [
            per_token_output(model_class, model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], use_cache=True, **{CACHE_KWARG: cache}))
            for i in range(40)
        ]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], expected[real], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# export, training
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static shapes", "dynamic shapes"])
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_torch_export_equals_eager(model_class, dynamic):
    """One exported program for any mask of 0s and 1s (and, with dynamic shapes, any batch and length)."""
    model = tiny_model(model_class)
    ids, mask = random_ids(2, 24), holes_mask(2, 24, seed=0)
    dynamic_shapes = None
    if dynamic:
        batch, length = torch.export.Dim("batch", max=8), torch.export.Dim("length", min=2, max=512)
        dynamic_shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}, "use_cache": None}
    with torch.no_grad():
        program = torch.export.export(
            model, (ids,), kwargs={"attention_mask": mask, "use_cache": False}, dynamic_shapes=dynamic_shapes, strict=False
        )
    for shape in [(2, 24)] + ([(3, 41), (1, 5)] if dynamic else []):
        ids, mask = random_ids(*shape, seed=shape[1]), holes_mask(*shape, seed=shape[0])
        with torch.no_grad():
            exported = program.module()(ids, attention_mask=mask, use_cache=False)
            eager = model(ids, attention_mask=mask, use_cache=False)
        torch.testing.assert_close(per_token_output(model_class, exported), per_token_output(model_class, eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_every_parameter_is_trained(model_class, implementation):
    """transformers' training test: a loss reaches every parameter, and one optimiser step lowers it."""
    with implementation_runs(implementation):
        model = tiny_model(model_class, implementation).train()
        ids = random_ids(2, 20)
        labels = torch.tensor([0, 1]) if model_class is LongNetForSequenceClassification else ids
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

        def loss():
            out = model(ids, attention_mask=holes_mask(2, 20, seed=2), use_cache=False, **({} if model_class is LongNetModel else {"labels": labels}))
            return out.last_hidden_state.square().mean() if model_class is LongNetModel else out.loss

        first = loss()
        first.backward()
        untrained = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert untrained == []
        optimizer.step()
        with torch.no_grad():
            assert float(loss()) < float(first)
