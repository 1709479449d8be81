"""The compiled CPU kernel (compiled=True) matches the float64 reference. One test, so that the
compile (tens of seconds) is paid once for all the pattern mixes."""
from __future__ import annotations

import pytest
import torch

import minference_flex as mf
from tests.naive import naive_mask, reference_attention

CAPABLE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

MIXES = [
    # (Nq, Nk, patterns): every kind, vertical columns (folded into one mask on CPU),
    # block sizes 64 and 128 (query padding to 128), lengths off the tile grid.
    (100, 100, [["vertical_and_slash", 31, 100], ["stream_llm", 4, 16], ["block_sparse", 1, 0], ["dense", 0, 0]]),
    (77, 200, [mf.Pattern("block_sparse", 1, 0, 128), ["a_shape", 3, 40], ["vertical_slash", 35, 101],
               ["block_sparse", 2, 0]]),
]


@pytest.mark.skipif(not CAPABLE, reason="the compiled CPU FlexAttention kernel needs AVX2")
def test_compiled_cpu_kernel_matches_reference():
    g = torch.Generator().manual_seed(0)
    for Nq, Nk, pats in MIXES:
        q = torch.randn(1, 4, Nq, 64, generator=g)
        k = torch.randn(1, 4, Nk, 64, generator=g)
        v = torch.randn(1, 4, Nk, 64, generator=g)
        with torch.no_grad():
            out = mf.sparse_attention(q, k, v, pats)  # compiled=True is the default
        mask, ambiguous = naive_mask(q, k, pats)
        assert not ambiguous
        assert torch.equal(mf.token_mask(q, k, pats), mask)
        ref = reference_attention(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == q.dtype
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err
        eager = mf.sparse_attention(q, k, v, pats, compiled=False)
        torch.testing.assert_close(out, eager, atol=2e-6, rtol=1e-5)
