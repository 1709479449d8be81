"""Budgets that cover the whole prompt give exactly dense causal attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from tests.naive import causal_mask
from tests.strategies import Case, LENGTHS, examples


@st.composite
def full_budget_cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([g for g in (1, 2, 3) if Hkv * g <= 8]))
    Hq = Hkv * G
    Nk = draw(st.sampled_from(LENGTHS))
    Nq = draw(st.one_of(st.sampled_from([n for n in LENGTHS if n <= Nk]), st.integers(1, Nk)))
    D = draw(st.sampled_from([16, 32, 64, 128]))
    big = st.integers(Nk, 2 * Nk + 200)
    anything = st.integers(0, 2 * Nk + 200)
    pats = []
    for _ in range(Hq):
        kind = draw(st.sampled_from(["vertical_and_slash", "stream_llm_a", "stream_llm_b", "block_sparse",
                                     "dense"]))
        if kind == "vertical_and_slash":
            pats.append(mf.Pattern(draw(st.sampled_from(["vertical_and_slash", "vertical_slash"])),
                                   draw(big), draw(big)))
        elif kind == "stream_llm_a":
            pats.append(["stream_llm", draw(big), draw(anything)])
        elif kind == "stream_llm_b":
            pats.append(["a_shape", draw(anything), draw(big)])
        elif kind == "block_sparse":
            bs = draw(st.sampled_from([64, 128, 192, 256]))
            n_blocks = -(-Nk // bs)
            pats.append(mf.Pattern("block_sparse", draw(st.integers(n_blocks, n_blocks + 5)), draw(anything), bs))
        else:
            pats.append(["dense", draw(anything), draw(anything)])
    scale = draw(st.one_of(st.none(), st.sampled_from([0.05, 0.3])))
    return Case(B, Hq, Hkv, Nq, Nk, D, pats, scale, draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=examples(40))
@given(case=full_budget_cases())
def test_full_budgets_are_dense_causal(case):
    q, k, v = case.tensors(torch.float32)
    causal = causal_mask(case.Nq, case.Nk)
    mask = mf.token_mask(q, k, case.patterns, scale=case.scale)
    assert torch.equal(mask, causal.expand_as(mask))

    out = mf.sparse_attention(q, k, v, case.patterns, scale=case.scale, compiled=False)
    G = case.Hq // case.Hkv
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=causal, scale=case.scale)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_budget_exactly_at_boundary():
    """Budgets equal to Nk (not above) are enough; one less drops cells for stream_llm and
    block_sparse."""
    g = torch.Generator().manual_seed(3)
    Nk = 257
    q = torch.randn(1, 3, Nk, 32, generator=g)
    k = torch.randn(1, 3, Nk, 32, generator=g)
    pats = [["vertical_and_slash", Nk, 0], ["stream_llm", 0, Nk], ["stream_llm", Nk, 0]]
    mask = mf.token_mask(q, k, pats)
    assert torch.equal(mask, causal_mask(Nk, Nk).expand_as(mask))
    pats = [["vertical_and_slash", 30, Nk], ["stream_llm", Nk - 1, 0], ["block_sparse", 5, 0]]
    mask = mf.token_mask(q, k, pats)
    assert torch.equal(mask, causal_mask(Nk, Nk).expand_as(mask))
    mask = mf.token_mask(q, k, [["dense", 0, 0], ["stream_llm", Nk - 2, 0], ["block_sparse", 4, 0]])
    causal = causal_mask(Nk, Nk)
    # stream_llm(Nk - 2, 0): row Nk-1 misses key Nk-2 (not a sink, offset 1 >= window 1).
    assert not mask[0, 1, Nk - 1, Nk - 2] and mask[0, 1, Nk - 1, Nk - 3]
    # block_sparse(4) with 5 key blocks: the last query block drops one block.
    assert (mask[0, 2, -1] != causal[-1]).any()
