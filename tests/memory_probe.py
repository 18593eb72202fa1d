"""The largest tensor any operation makes while a block runs: how the tests hold memory to "nothing quadratic"."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """``with LargestTensor() as probe: ...`` then ``probe.elements`` / ``probe.bytes`` of the largest result."""

    def __init__(self):
        super().__init__()
        self.elements = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.elements = max(self.elements, t.numel())
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out
