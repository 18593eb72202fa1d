"""Test-wide settings.

Without a GPU, Triton kernels run in its interpreter (TRITON_INTERPRET=1), which Triton reads when a kernel is
defined: set it before anything imports the package's Triton module.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # `-n 2` on 2 cores: one thread per worker; more oversubscribes the machine

sys.path.insert(0, os.path.dirname(__file__))  # `from reference import ...`

from hypothesis import HealthCheck, settings  # noqa: E402

# CI has two cores: a bounded number of examples per property, no per-example deadline (first calls compile).
# derandomize: the same examples at every run, so that a run passes or fails for the code, not for the draw
# (HYPOTHESIS_PROFILE=thorough draws fresh ones, many more).
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
