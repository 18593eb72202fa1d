"""What the two Triton backends share: the prefill kernels (``dilated_attention_triton``) and the decoding kernel
(``dilated_attention_decode``). Triton itself, or ``None`` where it is not installed (the package then runs on
PyTorch alone); whether Triton's interpreter runs the kernels; and the host arithmetic both use. Like
``dilated_attention_pattern`` it is a ground-floor module: it imports nothing of the package."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the backends say so in `supports`; the model falls back to PyTorch
    triton = tl = None

__all__ = ["LOG2E", "cdiv", "interpreting", "tl", "triton"]

LOG2E = 1.4426950408889634  # the kernels take exponentials in base 2: exp(x) = exp2(x * log2 e)


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1``, as the tests set it on a
    machine without a GPU). Read at each call: a test may switch it off to check the refusal of CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints: ``triton.cdiv`` without its cost as a constexpr function (2 us)."""
    return -(-a // b)
