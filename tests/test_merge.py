"""The Triton merge of two parts (run by Triton's interpreter on CPU) against its PyTorch definition."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minference_flex.kernels.flex import merge
from minference_flex.kernels.merge import merge_pair
from tests.strategies import examples

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the merge kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests/conftest.py)")


@settings(max_examples=examples(10), deadline=None)
@given(M=st.integers(1, 150), D=st.sampled_from([16, 24, 64]), seed=st.integers(0, 2**16))
def test_merge_pair_matches_the_definition(M, D, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 3
    outs = [torch.randn(B, H, M + 5, D, generator=g)[:, :, 5:] for _ in range(2)]   # strided views, as run_plan's
    lses = [torch.randn(B, H, M, generator=g) * 20 for _ in range(2)]
    lses[0][0, 0, :M // 2] = float("-inf")                  # rows empty in one part
    lses[1][0, 0, : M // 3] = float("-inf")                 # ... and in both
    parts = [(o.to(device), lse.to(device)) for o, lse in zip(outs, lses)]
    out, lse = merge_pair(parts[0], parts[1], torch.float32)
    expected = merge([(o, lse) for o, lse in zip(outs, lses)], torch.float32)     # CPU: the definition
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), torch.logaddexp(lses[0], lses[1]), atol=1e-5, rtol=1e-5)
    assert not out.isnan().any() and (out.cpu()[0, 0, : M // 3] == 0).all()
