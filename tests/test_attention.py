"""sparse_attention(compiled=False) against a float64 dense reference restricted to token_mask."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from tests.naive import causal_mask, reference_attention
from tests.strategies import cases, examples


@settings(max_examples=examples(60))
@given(case=cases())
def test_float32_matches_masked_reference(case):
    q, k, v = case.tensors(torch.float32)
    out = mf.sparse_attention(q, k, v, case.patterns, scale=case.scale, compiled=False)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    mask = mf.token_mask(q, k, case.patterns, scale=case.scale)
    ref = reference_attention(q, k, v, mask, case.scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err


@settings(max_examples=examples(40))
@given(case=cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_matches_masked_reference(case, dtype):
    q, k, v = case.tensors(dtype)
    out = mf.sparse_attention(q, k, v, case.patterns, scale=case.scale, compiled=False)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    mask = mf.token_mask(q, k, case.patterns, scale=case.scale)
    ref = reference_attention(q, k, v, mask, case.scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # Where sparsity changes the result substantively, the output must follow the sparse mask,
    # not dense causal attention.
    dense = reference_attention(q, k, v, causal_mask(case.Nq, case.Nk), case.scale)
    gap = (dense - ref).abs().amax(-1)
    rows = gap > 0.2
    if rows.any():
        err = (out.double() - ref).abs().amax(-1)
        assert (err[rows] < 0.25 * gap[rows]).all()


@settings(max_examples=examples(25))
@given(case=cases(scales=False))
def test_scale_none_is_inverse_sqrt_head_dim(case):
    q, k, v = case.tensors(torch.float32)
    implicit = mf.sparse_attention(q, k, v, case.patterns, compiled=False)
    explicit = mf.sparse_attention(q, k, v, case.patterns, scale=case.D ** -0.5, compiled=False)
    torch.testing.assert_close(implicit, explicit, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_no_nan(dtype):
    """Big scores (scale 1, |q.k| in the hundreds) must not overflow the softmax or the merge."""
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(1, 4, 100, 64, generator=g) * 4).to(dtype)
    k = (torch.randn(1, 2, 257, 64, generator=g) * 4).to(dtype)
    v = torch.randn(1, 2, 257, 64, generator=g).to(dtype)
    pats = [["vertical_and_slash", 40, 120], ["stream_llm", 4, 16], ["block_sparse", 2, 0], ["dense", 0, 0]]
    out = mf.sparse_attention(q, k, v, pats, scale=1.0, compiled=False)
    assert torch.isfinite(out).all()
    mask = mf.token_mask(q, k, pats, scale=1.0)
    ref = reference_attention(q, k, v, mask, 1.0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
