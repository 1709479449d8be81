"""The estimation scores of block_masks against the float64 loops of tests/naive.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import block_masks
from block_masks.score_kernel import vertical_slash_scores_triton
from tests import naive
from tests.strategies import cases, examples


def _triton_scores(q, k, scale):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(t.cpu() for t in vertical_slash_scores_triton(q.to(device), k.to(device), scale))


TRITON = pytest.param(_triton_scores, id="triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the score kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests/conftest.py)"))


@pytest.mark.parametrize("scores", [pytest.param(block_masks.vertical_slash_scores, id="torch"), TRITON])
@settings(max_examples=examples(40))
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_vertical_slash_scores(scores, case, dtype):
    """Both implementations (the PyTorch definition, CPU here, and the Triton passes) against float64."""
    # Triton's CPU interpreter mis-converts bfloat16 operands of tl.dot (triton 3.9).
    assume(scores is not _triton_scores or dtype == torch.float32 or torch.cuda.is_available())
    q, k = case.tensors(dtype, value=False)
    vertical, slash = scores(q, k, case.effective_scale)
    assert vertical.shape == slash.shape == (case.B, case.Hq, case.Nk)
    assert vertical.dtype == slash.dtype == torch.float32
    m = min(64, case.Nq)
    G = case.Hq // case.Hkv
    qn, kn = q.double().numpy(), k.double().numpy()
    for b in range(case.B):
        for h in range(case.Hq):
            v_ref, s_ref = naive.vertical_slash_scores(qn[b, h], kn[b, h // G], case.effective_scale)
            np.testing.assert_allclose(vertical[b, h].double().numpy(), v_ref, rtol=1e-4, atol=1e-5 * m)
            np.testing.assert_allclose(slash[b, h].double().numpy(), s_ref, rtol=1e-4, atol=1e-5 * m)
            # Each of the m rows is a distribution: both scores sum to m.
            assert abs(v_ref.sum() - m) < 1e-9 and abs(s_ref.sum() - m) < 1e-9


@settings(max_examples=examples(40))
@given(N=st.integers(1, 300), start=st.integers(0, 300), block=st.sampled_from([64, 128, 192, 256]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_block_means(N, start, block, dtype, seed):
    x = torch.randn(2, 3, N, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = block_masks.block_means(x, start, block)
    assert got.dtype == torch.float32
    xn = x.double().numpy()
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(got[b, h].double().numpy(), naive.block_means(xn[b, h], start, block),
                                       rtol=1e-5, atol=1e-6)


def test_vertical_scores_see_no_future_key():
    """The last key is visible to the last query only: its vertical score is that row's weight."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 64, 16, generator=g)
    k = torch.randn(1, 1, 100, 16, generator=g)
    k[0, 0, -1] = 50 * q[0, 0, -2]  # huge for row 62 if it could see it
    vertical, _ = block_masks.vertical_slash_scores(q, k, 1.0)
    v_ref, _ = naive.vertical_slash_scores(q[0, 0].double().numpy(), k[0, 0].double().numpy(), 1.0)
    assert vertical[0, 0, -1].item() <= 1.0 + 1e-6
    np.testing.assert_allclose(vertical[0, 0].double().numpy(), v_ref, rtol=1e-4, atol=1e-5)


@TRITON.marks[0]
def test_triton_scores_over_many_key_chunks():
    """Past 32 * 64 keys pass 1 splits the keys into chunks whose statistics pass 2 combines."""
    g = torch.Generator().manual_seed(3)
    Nq, Nk = 50, 2 * 32 * 64 + 37
    q, k = torch.randn(1, 2, Nq, 16, generator=g), torch.randn(1, 1, Nk, 16, generator=g)
    k[0, 0, 3000] = q[0, 1, -1] * 2                                   # a strong column in a late chunk
    vertical, slash = _triton_scores(q, k, 0.5)
    for h in range(2):
        v_ref, s_ref = naive.vertical_slash_scores(q[0, h].double().numpy(), k[0, 0].double().numpy(), 0.5)
        np.testing.assert_allclose(vertical[0, h].double().numpy(), v_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(slash[0, h].double().numpy(), s_ref, rtol=1e-4, atol=1e-6)
