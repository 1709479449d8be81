"""Shared pytest configuration: deterministic Hypothesis profiles and the ``gpu`` marker."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" (default): derandomized, no example database, so every run draws the same examples.
# "dev": random exploration with more examples (HYPOTHESIS_PROFILE=dev pytest).
# Without a GPU, Triton kernels (the strip kernel) run under Triton's CPU interpreter. Set before
# anything imports triton: the choice is made when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _grad_mode_left_on():
    """No test may leave autograd switched off for the tests after it (the process is shared)."""
    yield
    assert torch.is_grad_enabled(), "this test left autograd disabled for the rest of the process"
