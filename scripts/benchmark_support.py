"""What the model-level benchmark scripts share: their model options and argument checks, a synchronised clock,
and the Llama of the same sizes that a LongNet is timed against.

The command-line helpers come first and need nothing heavy: the scripts check their arguments before they import
torch or transformers (a bad command line is refused in a moment), so those are imported where they are used."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from cli_support import LONGNET_ATTENTIONS, check_output_file, unknown_attention_message, unknown_preset_message

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from modeling_longnet import LongNetConfig


def add_model_options(parser) -> None:
    """The options that pick the LongNet both benchmarks time (its Llama twin takes its sizes)."""
    parser.add_argument("--preset", default="longnet-paper", help="the LongNet preset (its Llama twin takes its sizes)")
    parser.add_argument(
        "--attn", default="auto", help=f"the LongNet attn_implementation: {', '.join(LONGNET_ATTENTIONS)}"
    )


def refuse_unknown_model_options(parser, args) -> None:
    """``parser.error`` for a --preset or --attn that LongNet does not have (answered before the slow imports)."""
    problem = unknown_preset_message("--preset", args.preset) or unknown_attention_message("--attn", args.attn)
    if problem is not None:
        parser.error(problem)


def refuse_unwritable_outputs(parser, args, *names: str) -> None:
    """``parser.error`` for a result file (dest names ``names``) whose folder does not exist: found before the run,
    not when it is written at the end."""
    for name in names:
        if getattr(args, name) is not None:
            try:
                check_output_file(f"--{name}", getattr(args, name))
            except ValueError as error:
                parser.error(str(error))


def refuse_below_one(parser, args, *names: str) -> None:
    """``parser.error`` naming the first of the int options ``names`` (dest names) that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def cache_argument() -> str:
    """generate's name for a cache object: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llama_twin(config: LongNetConfig, max_positions: int) -> LlamaConfig:
    """A Llama with the LongNet's sizes (width, depth, heads, MLP, vocabulary) and dense SDPA attention; unlike
    ``llama_config_from_longnet`` it does not ask for Llama blocks (the paper's model has xPos and sub-LN)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )


def environment(args, **extra) -> dict:
    """What a result depends on: the card, the versions, the model and the date, and ``extra``."""
    import torch
    import transformers

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "preset": args.preset,
        "attn": args.attn,
        **extra,
        "date": datetime.date.today().isoformat(),
    }
