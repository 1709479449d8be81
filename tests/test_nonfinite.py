"""Non-finite inputs: a NaN or an infinity among the scored queries or in a key never costs a forced
cell (the diagonal, the first columns and offsets, the diagonal block), and the output is
non-finite exactly where float64 attention under the same mask is: in the rows with a NaN score or
a +inf score among their kept cells. A row whose every kept score is -inf has no weight anywhere:
it is empty and gives zeros, as FlexAttention and fused SDPA kernels give for a fully masked row
(the float64 softmax would give NaN there)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from tests.naive import causal_mask, naive_mask, reference_attention
from tests.strategies import cases, examples

FORCED_COLUMNS, FORCED_OFFSETS = 30, 100


def _poison(case, data, q, k):
    """Put a NaN or an infinity into one of the last 64 queries, or into one key (in place)."""
    bad = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value")
    b = data.draw(st.integers(0, case.B - 1), label="batch")
    d = data.draw(st.integers(0, case.D - 1), label="dim")
    if data.draw(st.booleans(), label="in a query"):
        h = data.draw(st.integers(0, case.Hq - 1), label="query head")
        i = data.draw(st.integers(max(0, case.Nq - 64), case.Nq - 1), label="query")
        q[b, h, i, d] = bad
    else:
        h = data.draw(st.integers(0, case.Hkv - 1), label="key head")
        j = data.draw(st.integers(0, case.Nk - 1), label="key")
        k[b, h, j, d] = bad


def _forced(case) -> torch.Tensor:
    """[Hq, Nq, Nk] bool: the cells each head keeps whatever the scores."""
    Nq, Nk = case.Nq, case.Nk
    p = (Nk - Nq + torch.arange(Nq))[:, None]
    j = torch.arange(Nk)
    causal = j <= p
    out = []
    for entry in case.patterns:
        pat = mf.Pattern.parse(entry)
        cells = p == j
        if pat.kind in ("vertical_and_slash", "vertical_slash_mass"):
            cells = cells | (j < FORCED_COLUMNS) | ((p - j) < FORCED_OFFSETS)
        elif pat.kind in ("block_sparse", "block_mass", "antidiagonal_mass"):
            cells = cells | ((j // pat.block_size) == (p // pat.block_size))
            if pat.kind != "block_sparse":
                cells = cells | (j < 64)
        elif pat.kind == "dense":
            cells = cells | causal
        out.append(cells & causal)
    return torch.stack(out)


def _reference(q, k, v, mask, case):
    """float64 attention under ``mask``, with the rows whose every kept score is -inf empty (zeros)."""
    ref = reference_attention(q, k, v, mask, case.scale)
    G = case.Hq // case.Hkv
    scores = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) * case.effective_scale
    empty = torch.where(mask, scores, float("-inf")).eq(float("-inf")).all(-1)
    return ref.masked_fill(empty[..., None], 0.0)


@settings(max_examples=examples(60))
@given(case=cases(), data=st.data())
def test_nonfinite_inputs_keep_forced_cells_and_follow_dense(case, data):
    q, k, v = case.tensors(torch.float32)
    _poison(case, data, q, k)
    mask = mf.token_mask(q, k, case.patterns, scale=case.scale)
    assert not (mask & ~causal_mask(case.Nq, case.Nk)).any(), "a kept cell is in the future"
    assert mask[:, _forced(case)].all(), "a forced cell was dropped"
    want, ambiguous = naive_mask(q, k, case.patterns, case.scale)
    if not ambiguous:
        assert torch.equal(mask, want), f"{int((mask != want).sum())} cells differ from the naive mask"
    out = mf.sparse_attention(q, k, v, case.patterns, scale=case.scale, compiled=False)
    ref = _reference(q, k, v, mask, case)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "non-finite in other rows than dense under the mask"
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_nan_query_keeps_the_diagonal():
    """The reproduction: one NaN among the last queries used to rank NaN above the forced columns
    and offsets, and 129 of 256 rows came out as silent zeros."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 256, 64, generator=g) for h in (4, 2, 2))
    q[0, 0, 250, 3] = float("nan")
    pats = [["vertical_and_slash", 30, 100]] * 4
    mask = mf.token_mask(q, k, pats)
    assert mask.any(-1).all(), "an empty row"
    rows = torch.arange(256)
    assert mask[:, :, rows, rows].all(), "a diagonal cell is dropped"
    out = mf.sparse_attention(q, k, v, pats, compiled=False)
    ref = reference_attention(q, k, v, mask)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 0, 250]).all() and torch.isfinite(out[0, 1:]).all()
