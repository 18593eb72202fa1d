"""LongNet (dilated attention) for Hugging Face transformers."""

from .dilated_attention import (
    DilatedPattern,
    TokenLayout,
    available_backends,
    dilated_attention,
    head_offsets,
    uncovered_positions,
)

__version__ = "0.1.0"

__all__ = [
    "DilatedPattern",
    "TokenLayout",
    "available_backends",
    "dilated_attention",
    "head_offsets",
    "uncovered_positions",
]
