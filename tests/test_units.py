"""Small deterministic tests with hand-built inputs and hand-written expectations."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from tests.naive import causal_mask, naive_mask, reference_attention
from tests.strategies import cases, examples


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def positions(Nq, Nk):
    return Nk - Nq + torch.arange(Nq)


# ----------------------------------------------------------------------------------- stream_llm

STREAM_2_3 = torch.tensor([  # Nq=5, Nk=8, a=2 sinks, b=3 window; rows are positions 3..7
    [1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 0, 1, 1, 1, 0, 0],
    [1, 1, 0, 0, 1, 1, 1, 0],
    [1, 1, 0, 0, 0, 1, 1, 1],
], dtype=torch.bool)


@pytest.mark.parametrize("entry", [["stream_llm", 2, 3], ["a_shape", 2, 3], ["stream_llm", 2, 3, 0.9],
                                   mf.Pattern("stream_llm", 2, 3), mf.Pattern("a_shape", 2, 3)])
def test_stream_llm_hand_written(entry):
    q, k = randn(1, 1, 5, 16, seed=1), randn(1, 1, 8, 16, seed=2)
    assert torch.equal(mf.token_mask(q, k, [entry])[0, 0], STREAM_2_3)
    assert torch.equal(naive_mask(q, k, [entry])[0][0, 0], STREAM_2_3)


def test_stream_llm_zero_budgets_keep_only_the_diagonal():
    q, k = randn(2, 2, 70, 16, seed=1), randn(2, 2, 130, 16, seed=2)
    mask = mf.token_mask(q, k, [["stream_llm", 0, 0], ["stream_llm", 0, 1]])
    diag = torch.zeros(70, 130, dtype=torch.bool)
    diag[torch.arange(70), positions(70, 130)] = True
    assert torch.equal(mask, diag.expand_as(mask))


def test_stream_llm_sinks_and_window_across_tiles():
    Nq, Nk, a, b = 150, 300, 70, 65
    q, k, v = randn(1, 1, Nq, 32, seed=3), randn(1, 1, Nk, 32, seed=4), randn(1, 1, Nk, 32, seed=5)
    p = positions(Nq, Nk)[:, None]
    j = torch.arange(Nk)
    want = ((j < a) | (p - j < b)) & (j <= p)
    assert torch.equal(mf.token_mask(q, k, [["stream_llm", a, b]])[0, 0], want)
    out = mf.sparse_attention(q, k, v, [["stream_llm", a, b]], compiled=False)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, want, None), atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------- vertical_and_slash

def heavy_column_inputs(Nq=128, Nk=400, col=200, D=32):
    g = torch.Generator().manual_seed(11)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = 0.1 * torch.randn(1, 1, Nq, D, generator=g) + u
    k = 0.1 * torch.randn(1, 1, Nk, D, generator=g)
    k[0, 0, col] = 8 * u
    return q, k


def test_vertical_heavy_column_is_kept():
    Nq, Nk, col = 128, 400, 200
    q, k = heavy_column_inputs(Nq, Nk, col)
    p = positions(Nq, Nk)
    mask = mf.token_mask(q, k, [["vertical_and_slash", 31, 100]], scale=1.0)[0, 0]
    assert mask[:, col].all()  # every query is after column 200
    # Exactly: forced columns 0..29, column 200, forced offsets 0..99.
    j = torch.arange(Nk)
    o = p[:, None] - j
    want = ((j < 30) | (j == col) | (o < 100)) & (o >= 0)
    assert torch.equal(mask, want)


def test_vertical_forced_only_drops_heavy_column():
    Nq, Nk, col = 128, 400, 200
    q, k = heavy_column_inputs(Nq, Nk, col)
    p = positions(Nq, Nk)
    mask = mf.token_mask(q, k, [["vertical_slash", 30, 0]], scale=1.0)[0, 0]
    assert torch.equal(mask[:, col], p - col < 100)
    assert not mask[:, col].all()


def slash_inputs(Nk=300, offset=150, D=64, amp=0.5):
    """RoPE-like q/k whose dot product peaks sharply where p_i - j == offset."""
    g = torch.Generator().manual_seed(5)
    w = 0.3 + (math.pi - 0.3) * torch.rand(D // 2, generator=g, dtype=torch.float64)
    pos = torch.arange(Nk, dtype=torch.float64)[:, None]
    q = torch.cat([torch.cos(w * pos), torch.sin(w * pos)], -1) * amp
    k = torch.cat([torch.cos(w * (pos + offset)), torch.sin(w * (pos + offset))], -1)
    return q.float()[None, None], k.float()[None, None]


@pytest.mark.parametrize("Nq", [300, 64, 100])
def test_slash_peak_offset_is_kept(Nq):
    Nk, offset = 300, 150
    q, k = slash_inputs(Nk, offset)
    q = q[:, :, Nk - Nq:]
    p = positions(Nq, Nk)
    j = torch.arange(Nk)
    o = p[:, None] - j
    mask = mf.token_mask(q, k, [["vertical_and_slash", 30, 101]], scale=1.0)[0, 0]
    want = ((j < 30) | (o < 100) | (o == offset)) & (o >= 0)
    assert torch.equal(mask, want)
    assert torch.equal(naive_mask(q, k, [["vertical_and_slash", 30, 101]], 1.0)[0][0, 0], want)


def test_vertical_and_slash_zero_budgets_keep_forced_ones():
    Nq, Nk = 200, 257
    q, k = randn(2, 3, Nq, 16, seed=8), randn(2, 3, Nk, 16, seed=9)
    mask = mf.token_mask(q, k, [["vertical_and_slash", 0, 0]] * 3)
    o = positions(Nq, Nk)[:, None] - torch.arange(Nk)
    want = ((torch.arange(Nk) < 30) | (o < 100)) & (o >= 0)
    assert torch.equal(mask, want.expand_as(mask))


def test_vertical_and_slash_tiny_prompt_is_dense():
    """Fewer than 30 keys: the forced columns alone cover everything."""
    q, k = randn(1, 2, 20, 16, seed=1), randn(1, 2, 29, 16, seed=2)
    mask = mf.token_mask(q, k, [["vertical_and_slash", 0, 0]] * 2)
    assert torch.equal(mask, causal_mask(20, 29).expand_as(mask))


# --------------------------------------------------------------------------------- block_sparse

def block_inputs(Nq=256, Nk=256, D=32, hot=1, bs=64):
    g = torch.Generator().manual_seed(21)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = 0.3 * torch.randn(1, 1, Nk, D, generator=g) + u
    k = 0.3 * torch.randn(1, 1, Nk, D, generator=g)
    k[0, 0, hot * bs:(hot + 1) * bs] += 3 * u
    return q[:, :, Nk - Nq:], k


@pytest.mark.parametrize("a,blocks", [
    (2, [{0}, {0, 1}, {1, 2}, {1, 3}]),
    (1, [{0}, {1}, {2}, {3}]),
    (0, [{0}, {1}, {2}, {3}]),
    (3, None),  # checked below: 3 blocks, so {1, qb} plus the better of the rest
    (4, [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}]),
    (99, [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}]),
])
def test_block_sparse_hot_block(a, blocks):
    q, k = block_inputs()
    mask = mf.token_mask(q, k, [["block_sparse", a, 7]])[0, 0]
    p = torch.arange(256)
    if blocks is None:
        row = mask[255]  # query block 3 keeps 3 of its 4 blocks, including 1 and 3
        kept = {int(b) for b in range(4) if row[b * 64: (b + 1) * 64].any()}
        assert len(kept) == 3 and {1, 3} <= kept
        return
    j = torch.arange(256)
    want = torch.zeros(256, 256, dtype=torch.bool)
    for i in range(256):
        want[i] = torch.tensor([(int(jj) // 64) in blocks[i // 64] for jj in j]) & (j <= p[i])
    assert torch.equal(mask, want)
    assert torch.equal(naive_mask(q, k, [["block_sparse", a, 7]])[0][0, 0], want)


def test_block_sparse_block_size_128():
    q, k = block_inputs(hot=0, bs=128)  # keys 0..127 are hot: block 0 of 128
    pats = [mf.Pattern("block_sparse", 1, 0, 128), mf.Pattern("block_sparse", 2, 0, 128),
            mf.Pattern("block_sparse", 1, 0, 64)]
    q, k = q.expand(1, 3, -1, -1), k.expand(1, 3, -1, -1)
    mask = mf.token_mask(q, k, pats)
    p = torch.arange(256)[:, None]
    j = torch.arange(256)
    assert torch.equal(mask[0, 0], (j // 128 == p // 128) & (j <= p))
    assert torch.equal(mask[0, 1], causal_mask(256, 256))  # 2 blocks of 128 = everything
    assert torch.equal(mask[0, 2], (j // 64 == p // 64) & (j <= p))
    assert torch.equal(mask, naive_mask(q, k, pats)[0])


def test_block_sparse_partial_last_key_block():
    """Nk = 200: the last key block has 8 keys (it is only ever kept as a diagonal block)."""
    Nk = 200
    g = torch.Generator().manual_seed(4)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    q = 0.1 * torch.randn(1, 1, Nk, 32, generator=g) + u
    k = 0.1 * torch.randn(1, 1, Nk, 32, generator=g)
    k[0, 0, 64:128] += u  # block 1 hot
    mask = mf.token_mask(q, k, [["block_sparse", 2, 0]])[0, 0]
    # query block 3 (positions 192..199) keeps itself and block 1
    row = mask[199]
    assert row[64:128].all() and row[192:200].all() and not row[:64].any() and not row[128:192].any()


# ------------------------------------------------------------------------------------ parsing

def test_aliases_give_the_same_results():
    q, k, v = randn(2, 4, 100, 32, seed=1), randn(2, 2, 190, 32, seed=2), randn(2, 2, 190, 32, seed=3)
    canon = [["vertical_and_slash", 40, 120], ["stream_llm", 5, 30], ["vertical_and_slash", 31, 101],
             ["stream_llm", 0, 64]]
    alias = [["vertical_slash", 40, 120], ["a_shape", 5, 30], mf.Pattern("vertical_slash", 31, 101),
             mf.Pattern("a_shape", 0, 64)]
    assert torch.equal(mf.token_mask(q, k, canon), mf.token_mask(q, k, alias))
    assert torch.equal(mf.sparse_attention(q, k, v, canon, compiled=False),
                       mf.sparse_attention(q, k, v, alias, compiled=False))
    assert mf.Pattern("vertical_slash", 1, 2) == mf.Pattern("vertical_and_slash", 1, 2)
    assert mf.Pattern("a_shape", 1, 2).kind == "stream_llm"


def test_list_forms_parse_alike():
    q, k, v = randn(1, 4, 80, 16, seed=1), randn(1, 4, 150, 16, seed=2), randn(1, 4, 150, 16, seed=3)
    three = [["vertical_and_slash", 35, 110], ["stream_llm", 3, 9], ["block_sparse", 2, 0], ["dense", 0, 0]]
    four = [p + [0.73] for p in three]
    objs = [mf.Pattern(*p) for p in three]
    tuples = [tuple(p) for p in four]
    ref_mask = mf.token_mask(q, k, three)
    ref_out = mf.sparse_attention(q, k, v, three, compiled=False)
    for pats in (four, objs, tuples, tuple(objs)):
        assert torch.equal(mf.token_mask(q, k, pats), ref_mask)
        assert torch.equal(mf.sparse_attention(q, k, v, pats, compiled=False), ref_out)
    assert [mf.Pattern.parse(p) for p in four] == objs
    assert [mf.Pattern.parse(p.to_list(0.5)) for p in objs] == objs
    assert mf.parse_patterns(four, 4) == tuple(objs)


def test_default_pattern():
    assert mf.DEFAULT_PATTERN == mf.Pattern("vertical_and_slash", 1000, 6096)


def test_dense_is_causal_whatever_the_budgets():
    q, k = randn(1, 3, 65, 16, seed=1), randn(1, 3, 129, 16, seed=2)
    mask = mf.token_mask(q, k, [["dense", 0, 0], ["dense", 5, 3], ["dense", 10**6, 1]])
    assert torch.equal(mask, causal_mask(65, 129).expand_as(mask))


# --------------------------------------------------------------------------------------- GQA

def test_gqa_equals_repeated_kv_heads():
    Hq, Hkv = 6, 2
    q, k, v = randn(2, Hq, 100, 32, seed=1), randn(2, Hkv, 230, 32, seed=2), randn(2, Hkv, 230, 32, seed=3)
    pats = [["vertical_and_slash", 40, 110], ["block_sparse", 2, 0], ["stream_llm", 4, 20]] * 2
    G = Hq // Hkv
    k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    assert torch.equal(mf.token_mask(q, k, pats), mf.token_mask(q, k_rep, pats))
    torch.testing.assert_close(mf.sparse_attention(q, k, v, pats, compiled=False),
                               mf.sparse_attention(q, k_rep, v_rep, pats, compiled=False), atol=1e-6, rtol=1e-5)


def test_gqa_head_mapping():
    """Query heads 0..2 read key head 0, heads 3..5 key head 1 (not h % Hkv)."""
    Nk = 300
    k = torch.cat([heavy_column_inputs(200, Nk, col=250)[1], heavy_column_inputs(200, Nk, col=150)[1]], 1)
    q = heavy_column_inputs(200, Nk)[0].expand(1, 6, -1, -1).contiguous()
    mask = mf.token_mask(q, k, [["vertical_and_slash", 31, 100]] * 6, scale=1.0)[0]
    for h in range(6):
        col = 250 if h < 3 else 150
        other = 150 if h < 3 else 250
        o = positions(200, Nk)
        assert mask[h, :, col][o - col >= 0].all()
        assert not mask[h, :, other][o - other >= 100].any()


# --------------------------------------------------------------------------- chunked prefill

CHUNK_CASES = [
    # (Nq, patterns): stream_llm and dense always; block_sparse when the chunk starts on one of its
    # blocks; vertical_and_slash when the chunk holds the last 64 queries.
    (1, [["stream_llm", 4, 30], ["dense", 0, 0], ["a_shape", 100, 1], ["dense", 1, 1]]),
    (37, [["stream_llm", 4, 30], ["dense", 0, 0], ["a_shape", 100, 1], ["stream_llm", 0, 200]]),
    (64, [["vertical_and_slash", 40, 120], mf.Pattern("block_sparse", 2, 0, 128), ["block_sparse", 3, 0],
          ["stream_llm", 64, 64]]),
    (128, [["vertical_and_slash", 31, 101], ["block_sparse", 2, 0], ["dense", 0, 0], ["stream_llm", 2, 2]]),
    (192, [["vertical_slash", 60, 150], mf.Pattern("block_sparse", 1, 0, 128), ["block_sparse", 2, 0],
           ["dense", 0, 0]]),
    (100, [["vertical_and_slash", 45, 130], ["vertical_and_slash", 0, 0], ["stream_llm", 1, 1], ["dense", 0, 0]]),
]


@pytest.mark.parametrize("Nq,pats", CHUNK_CASES)
def test_chunked_prefill_rows_match_full_prompt(Nq, pats):
    Nk = 320
    q, k, v = randn(2, 4, Nk, 32, seed=Nq), randn(2, 2, Nk, 32, seed=2), randn(2, 2, Nk, 32, seed=3)
    full_mask = mf.token_mask(q, k, pats)
    full_out = mf.sparse_attention(q, k, v, pats, compiled=False)
    chunk = q[:, :, Nk - Nq:]
    assert torch.equal(mf.token_mask(chunk, k, pats), full_mask[:, :, Nk - Nq:])
    torch.testing.assert_close(mf.sparse_attention(chunk, k, v, pats, compiled=False),
                               full_out[:, :, Nk - Nq:], atol=1e-6, rtol=1e-5)


def test_block_sparse_chunk_uses_only_its_queries():
    """A chunk that starts mid-block pools only its own queries of that block."""
    Nk, D = 256, 32
    g = torch.Generator().manual_seed(9)
    u, w = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=1)
    w = torch.nn.functional.normalize(w - (w @ u) * u, dim=0)  # orthogonal to u
    k = 0.05 * torch.randn(1, 1, Nk, D, generator=g)
    k[0, 0, 0:64] += u
    k[0, 0, 64:128] += w
    q = 0.05 * torch.randn(1, 1, Nk, D, generator=g)
    q[0, 0, 128:160] += 3 * w   # first half of query block 2 likes key block 1
    q[0, 0, 160:256] += u        # the rest likes key block 0
    pats = [["block_sparse", 2, 0]]
    full = mf.token_mask(q, k, pats)[0, 0]
    assert full[150, 64:128].all() and not full[150, :64].any()  # block 2 pooled over all its queries
    chunk = mf.token_mask(q[:, :, 160:], k, pats)[0, 0]           # block 2 holds only 160..191 now
    assert chunk[0, :64].all() and not chunk[0, 64:128].any()
    assert torch.equal(chunk, naive_mask(q[:, :, 160:], k, pats)[0][0, 0])


def test_vertical_and_slash_short_chunk_estimates_from_its_own_queries():
    """With fewer than 64 queries the estimate uses just those: a heavy column seen only by the
    chunk's queries is kept, although the full prompt's last 64 queries would agree."""
    Nq, Nk = 10, 300
    q, k = heavy_column_inputs(Nq, Nk, col=150)
    mask = mf.token_mask(q, k, [["vertical_and_slash", 31, 100]], scale=1.0)[0, 0]
    assert mask[:, 150].all()
    assert torch.equal(mask, naive_mask(q, k, [["vertical_and_slash", 31, 100]], 1.0)[0][0, 0])


# ---------------------------------------------------------------------------- more properties

def _scaled(p, da, db):
    p = mf.Pattern.parse(p)
    if p.kind in ("block_mass", "antidiagonal_mass"):  # a larger target keeps a longer prefix; b is the estimate
        return mf.Pattern(p.kind, min(p.a + da, 1000), p.b)
    if p.kind == "vertical_slash_mass":  # a larger target or cap keeps a longer prefix
        return mf.Pattern(p.kind, min(p.a + da, 1000), p.b + db)
    return mf.Pattern(p.kind, p.a + da, p.b + db, p.block_size)


@settings(max_examples=examples(30))
@given(case=cases(), da=st.integers(0, 80), db=st.integers(0, 80))
def test_masks_grow_with_budgets(case, da, db):
    q, k = case.tensors(torch.float32, value=False)
    small = mf.token_mask(q, k, case.patterns, scale=case.scale)
    big = mf.token_mask(q, k, [_scaled(p, da, db) for p in case.patterns], scale=case.scale)
    assert not (small & ~big).any()


@settings(max_examples=examples(25))
@given(case=cases(kinds=("stream_llm", "block_sparse", "dense")), scale=st.floats(0.01, 3.0))
def test_only_vertical_and_slash_depends_on_scale(case, scale):
    q, k = case.tensors(torch.float32, value=False)
    assert torch.equal(mf.token_mask(q, k, case.patterns), mf.token_mask(q, k, case.patterns, scale=scale))


def test_single_query_decode_step():
    q, k, v = randn(2, 4, 1, 64, seed=1), randn(2, 2, 257, 64, seed=2), randn(2, 2, 257, 64, seed=3)
    pats = [["vertical_and_slash", 40, 120], ["stream_llm", 4, 16], ["block_sparse", 2, 0], ["dense", 0, 0]]
    mask = mf.token_mask(q, k, pats)
    want, ambiguous = naive_mask(q, k, pats)
    assert not ambiguous and torch.equal(mask, want)
    out = mf.sparse_attention(q, k, v, pats, compiled=False)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask, None), atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------ block sizes far apart

@pytest.mark.parametrize("sizes", [(64, 256), (64, 192), (128, 384)])
def test_mixed_block_sizes_far_apart(sizes):
    """Block sizes 64 and 256 pad the queries to a multiple of 256: for 1 query at position 128 the
    first (all-padding) query tile lies two 64-blocks before the first query block."""
    small, large = sizes
    Nk = 2 * small + 1
    q, k, v = randn(1, 2, 1, 16, seed=1), randn(1, 1, Nk, 16, seed=2), randn(1, 1, Nk, 16, seed=3)
    pats = [mf.Pattern("block_sparse", 1, 0, small), mf.Pattern("block_sparse", 1, 0, large)]
    mask = mf.token_mask(q, k, pats)  # fine: no BlockMask involved
    out = mf.sparse_attention(q, k, v, pats, compiled=False)  # all-padding tiles before the first block
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------ the reference's tie detection

def test_naive_flags_ties_at_the_selection_boundary():
    """Identical keys tie every vertical score: the reference must say the selection is ambiguous
    when the budget cuts through the tie, and not when the budget keeps everything."""
    q = randn(1, 1, 64, 16, seed=1)
    k = randn(1, 1, 1, 16, seed=2).expand(1, 1, 200, 16).contiguous()
    assert naive_mask(q, k, [["vertical_and_slash", 31, 100]])[1]
    assert not naive_mask(q, k, [["vertical_and_slash", 200, 200]])[1]
    assert not naive_mask(q, k, [["stream_llm", 3, 5]])[1]
    kb = torch.zeros(1, 1, 256, 16)  # all pooled scores 0: block choice is a tie
    assert naive_mask(randn(1, 1, 256, 16, seed=3), kb, [["block_sparse", 2, 0]])[1]
    assert not naive_mask(randn(1, 1, 256, 16, seed=3), kb, [["block_sparse", 1, 0]])[1]
