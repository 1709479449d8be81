"""The ``vertical_slash_mass`` pattern: columns and diagonals kept by estimated mass, not by count.
Inputs with a few heavy columns and diagonals (random inputs attend almost uniformly), checked
against the float64 loop reference (``tests/naive.py``) and the float64 masked attention."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minference_flex as mf
from block_masks.estimate import select, vertical_slash_scores
from minference_flex.head_patterns import parse_patterns
from tests.naive import naive_mask, reference_attention
from tests.strategies import examples


@st.composite
def peaky_cases(draw):
    """(q, k, v, patterns): a few random keys share the queries' direction at random strengths (heavy
    columns), and the keys at a few random distances before each of the last queries are heavy too
    (heavy diagonals), so the mass is spread unevenly over columns and offsets."""
    Hkv = draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    Nk = draw(st.sampled_from([64, 100, 129, 200, 257, 300]))
    Nq = draw(st.one_of(st.just(Nk), st.integers(1, Nk)))
    D = draw(st.sampled_from([16, 32, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    pats = [["vertical_slash_mass",
             draw(st.one_of(st.sampled_from([300, 500, 800, 900, 990, 1000]), st.integers(1, 1000))),
             draw(st.sampled_from([0, 1, 31, 64, 101, 150, 10**6]))] for _ in range(Hq)]
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Hkv, 1, D, generator=g)
    strength = torch.zeros(Hkv, Nk)
    heavy = torch.randint(0, Nk, (Hkv, 8), generator=g)
    strength.scatter_(1, heavy, torch.rand(Hkv, 8, generator=g) * 4)
    k = torch.randn(1, Hkv, Nk, D, generator=g) + strength[None, ..., None] * u
    q = 0.5 * torch.randn(1, Hq, Nq, D, generator=g) + u.repeat_interleave(Hq // Hkv, 0)
    v = torch.randn(1, Hkv, Nk, D, generator=g)
    return q, k, v, pats


@settings(max_examples=examples(60), deadline=None)
@given(case=peaky_cases())
def test_mask_matches_naive(case):
    q, k, _, pats = case
    want, ambiguous = naive_mask(q, k, pats)
    assume(not ambiguous)
    got = mf.token_mask(q, k, pats)
    assert torch.equal(got, want), f"{(got != want).sum().item()} cells differ"


@settings(max_examples=examples(30), deadline=None)
@given(case=peaky_cases())
def test_attention_matches_masked_reference(case):
    q, k, v, pats = case
    out = mf.sparse_attention(q, k, v, pats, compiled=False)
    ref = reference_attention(q, k, v, mf.token_mask(q, k, pats))
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6


@settings(max_examples=examples(30), deadline=None)
@given(case=peaky_cases())
def test_kept_columns_and_offsets_reach_the_target(case):
    """The kept columns hold at least a/1000 of the column mass unless the cap stopped them, and
    no shorter prefix does: without the kept non-forced column of least mass they hold less. The
    same for the offsets."""
    q, k, _, pats = case
    Hq, Nk = q.shape[1], k.shape[2]
    sel = select(q, k, parse_patterns(pats, Hq), q.shape[-1] ** -0.5)
    vertical, slash = vertical_slash_scores(q, k, q.shape[-1] ** -0.5)
    for h, (_, a, b) in enumerate(pats):
        cols = torch.zeros(Nk + 1, dtype=torch.bool).index_fill_(0, sel.columns[0, h], True)[:Nk]
        for kept, scores, forced, cap in ((cols, vertical[0, h].double(), 30, max(b, 30)),
                                          (sel.offsets[0, h], slash[0, h].double(), 100, max(b, 100))):
            free = kept.clone()
            free[:forced] = False
            total = scores.sum()
            if kept.sum() < min(cap, Nk):                   # the cap did not stop it
                assert scores[kept].sum() >= a / 1000 * total * (1 - 1e-5)
            if free.any():
                assert scores[kept].sum() - scores[free].min() < a / 1000 * total * (1 + 1e-5)


def test_a_larger_target_keeps_more():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 256, 32, generator=g), torch.randn(1, 1, 256, 32, generator=g)
    counts = [mf.token_mask(q, k, [["vertical_slash_mass", a, 10**6]] * 2).sum().item() for a in (100, 500, 900, 999)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


@pytest.mark.parametrize("entry, match", [
    (["vertical_slash_mass", 0, 100], "1..1000"), (["vertical_slash_mass", 1001, 100], "1..1000"),
    (["vertical_slash_mass", -1, 100], ">= 0"), (["vertical_slash_mass", 900, -5], ">= 0"),
])
def test_bad_entries_raise(entry, match):
    with pytest.raises(ValueError, match=match):
        mf.Pattern.parse(entry)


def test_entries_round_trip():
    p = mf.Pattern.parse(["vertical_slash_mass", 950, 8192, 0.5])
    assert (p.kind, p.a, p.b) == ("vertical_slash_mass", 950, 8192)
    assert mf.Pattern.parse(p.to_list()) == p
