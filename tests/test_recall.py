"""attention_recall (the search's measure) against the float64 softmax mass on token_cells."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from block_masks import Pattern, attention_recall, diagonal_sums, select, token_cells
from minference_flex.head_patterns import parse_patterns
from tests.strategies import cases, examples


def reference_recall(q, k, selection, scale) -> torch.Tensor:
    """[B, Hq] mean over query rows of the float64 causal softmax mass on the kept cells."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) * scale
    causal = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs * token_cells(selection)).sum(dim=(-1, -2)) / Nq


@settings(max_examples=examples(60), deadline=None)
@given(case=cases(), chunk=st.sampled_from([1, 7, 64, 100, 1000]), n_sel=st.integers(1, 3),
       data=st.data())
def test_recall_matches_float64_mass_on_token_cells(case, chunk, n_sel, data):
    q, k = case.tensors(torch.float32, value=False)
    scale = case.effective_scale
    selections = [select(q, k, parse_patterns(case.patterns, case.Hq), scale)]
    for _ in range(n_sel - 1):  # further selections with other per-head patterns, scored in the same pass
        from tests.strategies import patterns

        pats = [data.draw(patterns(case.Nk)) for _ in range(case.Hq)]
        selections.append(select(q, k, parse_patterns(pats, case.Hq), scale))
    got = attention_recall(q, k, selections, scale, chunk=chunk)
    assert got.shape == (n_sel, case.B, case.Hq) and got.dtype == torch.float64
    for s, selection in enumerate(selections):
        want = reference_recall(q, k, selection, scale)
        assert torch.allclose(got[s], want, atol=2e-5, rtol=0), (s, (got[s] - want).abs().max())


def test_recall_is_one_when_everything_is_kept_and_drops_with_small_budgets():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g)
    scale = 1 / math.sqrt(32)
    full = [Pattern("dense"), Pattern("vertical_and_slash", 300, 300), Pattern("stream_llm", 0, 300),
            Pattern("block_sparse", 5)]
    small = [Pattern("stream_llm", 1, 1), Pattern("vertical_and_slash", 30, 100), Pattern("block_sparse", 1),
             Pattern("stream_llm", 4, 16)]
    got = attention_recall(q, k, [select(q, k, tuple(full), scale), select(q, k, tuple(small), scale)], scale)
    assert torch.allclose(got[0], torch.ones(1, 4, dtype=torch.float64), atol=1e-6)
    assert (got[1] < 0.9).all()


def test_diagonal_sums_match_a_loop():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 5, 40, generator=g)
    for first in (0, 3, 35):
        got = diagonal_sums(probs, first)
        want = torch.zeros(2, 40)
        for r in range(5):
            for o in range(40):
                if 0 <= first + r - o < 40:
                    want[:, o] += probs[:, r, first + r - o]
        assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="need at least"):
        diagonal_sums(probs, 36)


def test_recall_rejects_a_selection_for_other_inputs():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    other = select(q[:, :, :32], k[:, :, :32], (Pattern("dense"),) * 2, 0.25)
    with pytest.raises(ValueError, match="does not fit"):
        attention_recall(q, k, [other], 0.25)
