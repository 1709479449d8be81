"""The strip layout covers exactly the kept diagonals, sinks and vertical columns; the strip kernel
(Triton, run by Triton's interpreter on CPU) and plans with strips match the float64 reference."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from block_masks import Selection, select
from block_masks.strip_build_kernel import CHUNK, strip_layout_triton
from block_masks.build import column_flags
from block_masks.strips import (ALLOWED_FRONT, NO_STRIP, SEGMENT_WIDTHS, STRIP, segment_cells, strip_cells, strip_layout,
                                strip_segments, strip_tops)
from minference_flex.head_patterns import parse_patterns
from minference_flex.kernels.dispatch import strip_attention
from minference_flex.kernels.triton_strips import triton_strips
from tests.naive import reference_attention
from tests.strategies import cases, examples

interpreted = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the strip kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests/conftest.py)")


def strip_kernel_cells(selection) -> torch.Tensor:
    """[B, H, Nq, Nk]: causal cells with a kept offset, a sink key or a kept column (independent of
    the strips)."""
    p = selection.q_offset + torch.arange(selection.nq)[:, None]
    j = torch.arange(selection.nk)
    o = p - j
    kept = selection.offsets[:, :, o.clamp(min=0)] | (j < selection.sink[:, None, None])
    if selection.columns is not None:
        kept = kept | column_flags(selection.columns, selection.nk)[:, :, None, :]
    return kept & (o >= 0)


@settings(max_examples=examples(80))
@given(case=cases(max_nk=300))
def test_strips_cover_exactly_the_kept_diagonals_sinks_and_columns(case):
    q, k = case.tensors(value=False)
    selection = select(q, k, parse_patterns(case.patterns, case.Hq), case.effective_scale)
    strips = strip_layout(selection)
    assert torch.equal(strip_cells(strips), strip_kernel_cells(selection).to(torch.int32))
    # No more strips than kept offsets, ascending, padding past every block.
    kept = selection.offsets.sum(-1)
    real = strips.sigma != NO_STRIP
    assert (real.sum(-1) <= kept.clamp(min=1)).all()
    assert (strips.sigma[..., 1:] >= strips.sigma[..., :-1]).all()
    assert (strips.sigma[real] >= -(STRIP - 1)).all()


@settings(max_examples=examples(200))
@given(offsets=st.lists(st.integers(0, 400), min_size=1, max_size=40, unique=True))
def test_chain_length_per_cluster(offsets):
    """A cluster a..b (gaps under STRIP) costs (b - a + STRIP - 1) // STRIP + 1 strips."""
    flags = torch.zeros(1, 1, 401, dtype=torch.bool)
    flags[0, 0, offsets] = True
    tops, _ = strip_tops(flags, len(offsets))
    s = sorted(offsets)
    clusters, start = [], s[0]
    for prev, cur in zip(s, s[1:]):
        if cur - prev >= STRIP:
            clusters.append((start, prev))
            start = cur
    clusters.append((start, s[-1]))
    expected = sum((b - a + STRIP - 1) // STRIP + 1 for a, b in clusters)
    assert int((tops != NO_STRIP).sum()) == expected
    assert int((tops != NO_STRIP).sum()) <= len(offsets)


@interpreted
@settings(max_examples=examples(20))
@given(gaps=st.lists(st.one_of(st.integers(1, 8), st.integers(STRIP - 2, STRIP + 2), st.integers(100, 130)),
                     min_size=40, max_size=60),
       spare=st.integers(0, 3), chunk=st.sampled_from([16, 32, CHUNK]), data=st.data())
def test_triton_strip_builder_matches_the_definition(gaps, spare, chunk, data):
    """The one-program-per-head builder gives the tops, owned ranges, words, allowed offsets and
    per-block counts of the definition. Head 0 keeps the offsets the gaps lay out (clusters split
    exactly at STRIP), head 1 every offset up to 500, head 2 none; small chunks put many clusters
    across chunk borders; the columns and the number of queries are drawn."""
    kept = torch.tensor(gaps).cumsum(0) - gaps[0]
    Nk = int(kept[-1]) + 1 + gaps[-1] % 7
    nq = data.draw(st.integers(1, Nk))
    offsets = torch.zeros(1, 3, Nk, dtype=torch.bool)
    offsets[0, 0, kept] = True
    offsets[0, 1, :500] = True
    cols = data.draw(st.lists(st.integers(0, Nk - 1), max_size=200, unique=True))
    columns = torch.full((1, 3, max(1, len(cols))), Nk, dtype=torch.int64)
    columns[0, 0, :len(cols)] = torch.tensor(sorted(cols), dtype=torch.int64)
    columns[0, 2, :len(cols) // 2] = torch.tensor(sorted(cols)[:len(cols) // 2], dtype=torch.int64)
    K = Nk if spare == 0 else int(offsets.sum(-1).max())
    selection = Selection(nq=nq, nk=Nk, offsets=offsets, sink=torch.zeros(3, dtype=torch.int32),
                          block_sparse=torch.zeros(3, dtype=torch.bool), columns=columns, blocks=(), max_sink=0,
                          max_offsets=K)
    expected = strip_layout(selection)  # the definition on the CPU
    _, owned = strip_tops(offsets, K)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tops, t_owned, words, allowed, counts, col_counts = (t.cpu() for t in strip_layout_triton(
        offsets.to(device), columns.to(device), Nk - nq, nq, K, STRIP, NO_STRIP, ALLOWED_FRONT, chunk))
    assert torch.equal(tops, expected.sigma)
    real = tops != NO_STRIP
    assert torch.equal(t_owned[real], owned[real]) and torch.equal(words[real], expected.words[real])
    assert torch.equal(allowed, expected.allowed)
    assert torch.equal(counts, expected.counts) and torch.equal(col_counts, expected.col_counts)


@settings(max_examples=examples(40))
@given(case=cases(max_nk=300))
def test_plan_with_strips_matches_reference(case):
    """Strips + block-sparse main mask + gathered verticals, merged: the eager emulation."""
    q, k, v = case.tensors(torch.float32)
    plan = mf.plan_attention(q, k, case.patterns, scale=case.scale, strips=True, fold_columns=False,
                             full_width=False)
    assert plan.strips is not None
    assert (plan.main is not None) == bool(plan.selection.blocks)
    out = mf.run_plan(plan, q, k, v, compiled=False)
    ref = reference_attention(q, k, v, mf.token_mask(q, k, case.patterns, scale=case.scale), case.scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err


@interpreted
@settings(max_examples=examples(12))
@given(case=cases(max_nk=200, head_dims=(16, 24, 64, 80)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]))
def test_strip_kernel_matches_reference(case, dtype):
    """The Triton kernel itself against float64 over the strip cells (which the test above proves
    equal to the kept diagonals, sinks and columns). On CPU Triton's interpreter runs it, in float32 only:
    the interpreter mis-converts float32 to bfloat16 (seen with triton 3.9)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in case.tensors(dtype))
    plan = mf.plan_attention(q, k, case.patterns, scale=case.scale, strips=True, fold_columns=False,
                             full_width=False)
    out_s, lse_s = strip_attention(q, k, v, plan.strips, plan.scale)
    cells = strip_cells(plan.strips) > 0
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), cells.cpu(), case.scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    empty = ~cells.any(-1).cpu()
    torch.testing.assert_close(out_s.cpu().double().masked_fill(empty[..., None], 0), ref.masked_fill(empty[..., None], 0),
                               atol=tol, rtol=tol)
    assert torch.isinf(lse_s.cpu()[empty]).all() and torch.isfinite(lse_s.cpu()[~empty]).all()
    scores = (q.cpu().double() @ k.cpu().double().repeat_interleave(case.Hq // case.Hkv, 1).transpose(-1, -2))
    ref_lse = (scores * case.effective_scale).masked_fill(~cells.cpu(), -math.inf).logsumexp(-1)
    torch.testing.assert_close(lse_s.cpu().double()[~empty], ref_lse[~empty], atol=tol, rtol=tol)


@st.composite
def offset_sets(draw, max_nk: int = 700):
    """A Selection of 2 heads with offsets drawn directly (head 0: scattered diagonals and a sink,
    head 1: runs, and some columns), so that clusters lie close to each other, chains of neighbours
    share keys and columns cross kept diagonals."""
    nk = draw(st.integers(1, max_nk))
    nq = draw(st.integers(1, nk))
    kept = draw(st.lists(st.integers(0, nk - 1), max_size=120, unique=True))
    runs = draw(st.lists(st.tuples(st.integers(0, nk - 1), st.integers(1, 200)), max_size=3))
    offsets = torch.zeros(1, 2, nk, dtype=torch.bool)
    offsets[0, 0, kept] = True
    for start, length in runs:
        offsets[0, 1, start:start + length] = True
    sink = torch.tensor([draw(st.integers(0, nk)), 0], dtype=torch.int32)
    cols = draw(st.lists(st.integers(0, nk - 1), max_size=150, unique=True))
    columns = None
    if cols:  # head 1's columns; head 0 only padding (as for a head of another kind)
        columns = torch.full((1, 2, len(cols)), nk, dtype=torch.int64)
        columns[0, 1] = torch.tensor(sorted(cols))
    return Selection(nq=nq, nk=nk, offsets=offsets, sink=sink, block_sparse=torch.zeros(2, dtype=torch.bool),
                     columns=columns, blocks=(), max_sink=int(sink.max()), max_offsets=nk)


@settings(max_examples=examples(60))
@given(selection=offset_sets())
def test_strips_of_random_offset_sets(selection):
    """Every kept diagonal, sink and column cell is computed exactly once, nothing else."""
    assert torch.equal(strip_cells(strip_layout(selection)), strip_kernel_cells(selection).to(torch.int32))


@settings(max_examples=examples(40))
@given(selection=offset_sets(max_nk=400), width=st.sampled_from(SEGMENT_WIDTHS))
def test_segments_cover_exactly_the_kept_diagonals(selection, width):
    """The Hopper kernel's segments (``strip_segments``) compute every kept diagonal cell whose key is
    no sink exactly once and nothing else, in no more keys than the strips they are cut from."""
    strips = strip_layout(selection)
    segments = strip_segments(strips, width)
    p = selection.q_offset + torch.arange(selection.nq)[:, None]
    j = torch.arange(selection.nk)
    o = p - j
    diagonal = selection.offsets[:, :, o.clamp(min=0)] & (o >= 0) & (j >= selection.sink[:, None, None])
    assert torch.equal(segment_cells(segments, strips), diagonal.to(torch.int32))
    assert (segments.tops[..., 1:] >= segments.tops[..., :-1]).all()
    assert segments.counts.long().sum() * width <= strips.counts.long().sum() * STRIP


def test_segments_of_a_narrow_cluster_hold_fewer_keys():
    """Offsets 100..102: a chain of two strips (128 keys per query block), three segments of 32 keys."""
    offsets = torch.zeros(1, 1, 1000, dtype=torch.bool)
    offsets[0, 0, 100:103] = True
    selection = Selection(nq=1000, nk=1000, offsets=offsets, sink=torch.zeros(1, dtype=torch.int32),
                          block_sparse=torch.zeros(1, dtype=torch.bool), columns=None, blocks=(), max_sink=0, max_offsets=1000)
    strips = strip_layout(selection)
    segments = strip_segments(strips, 32)
    assert strips.counts[0, 0, -1] == 2 and segments.counts[0, 0, -1] == 3
    with pytest.raises(ValueError, match="segment width"):
        strip_segments(strips, 64)


@interpreted
@settings(max_examples=examples(12))
@given(selection=offset_sets(max_nk=500), seed=st.integers(0, 2**31 - 1))
def test_strip_kernel_on_random_offset_sets(selection, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, selection.nq, 16, generator=g)
    k, v = torch.randn(2, 1, 1, selection.nk, 16, generator=g)
    on_device = dataclasses.replace(selection, offsets=selection.offsets.to(device), sink=selection.sink.to(device),
                                    block_sparse=selection.block_sparse.to(device),
                                    columns=None if selection.columns is None else selection.columns.to(device))
    strips = strip_layout(on_device)
    out, _ = strip_attention(q.to(device), k.to(device), v.to(device), strips, 0.25)
    ref = reference_attention(q, k, v, strip_kernel_cells(selection), 0.25)
    torch.testing.assert_close(out.cpu().double(), ref.nan_to_num(0), atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("columns", [True, False])
@settings(max_examples=examples(8))
@given(selection=offset_sets(max_nk=300), seed=st.integers(0, 2**31 - 1))
def test_triton_kernel_resumes_from_the_hopper_part(columns, selection, seed):
    """With ``resume`` (the Hopper kernel's output and log-sum-exp: over the diagonal strips, and with
    ``columns=False`` over the columns too; here the float64 attention over those cells) the Triton
    kernel adds the rest (the sink strips, and the columns if ``columns``): the result is the
    attention over all strip cells."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, selection.nq, 16, generator=g)
    k, v = torch.randn(2, 1, 1, selection.nk, 16, generator=g)
    strips = strip_layout(selection)
    o = selection.q_offset + torch.arange(selection.nq)[:, None] - torch.arange(selection.nk)
    sink_cells = (torch.arange(selection.nk) < selection.sink[:, None, None]) & (o >= 0)
    diagonal = strip_cells(dataclasses.replace(strips, col_counts=torch.zeros_like(strips.col_counts))) - sink_cells.int()
    assert diagonal.min() >= 0
    cells = strip_cells(strips) > 0
    done = diagonal > 0 if columns else cells & ~sink_cells
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    lse0 = scores.masked_fill(~done, -math.inf).logsumexp(-1)
    out0 = reference_attention(q, k, v, done, 0.25).nan_to_num(0)
    on = dataclasses.replace(strips, **{f: getattr(strips, f).to(device) for f in
                                        ("sigma", "counts", "words", "sink", "columns", "col_counts", "allowed")})
    out, lse = triton_strips(q.to(device), k.to(device), v.to(device), on, 0.25,
                             resume=(out0.float().to(device), lse0.float().to(device)), columns=columns)
    torch.testing.assert_close(out.cpu().double(), reference_attention(q, k, v, cells, 0.25).nan_to_num(0),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), scores.masked_fill(~cells, -math.inf).logsumexp(-1),
                               atol=1e-5, rtol=1e-5)


@interpreted
def test_strip_kernel_counts_shared_keys_once():
    """Clusters 0..40 and 110..111 get chains (40, -24) and (111, 47): strips 40 and 47 share keys,
    and each must count only its own cluster's offsets."""
    nk = 256
    offsets = torch.zeros(1, 2, nk, dtype=torch.bool)
    offsets[0, :, :41] = True
    offsets[0, :, [110, 111]] = True
    selection = Selection(nq=nk, nk=nk, offsets=offsets, sink=torch.zeros(2, dtype=torch.int32),
                          block_sparse=torch.zeros(2, dtype=torch.bool), columns=None, blocks=(), max_sink=0,
                          max_offsets=nk)
    assert strip_layout(selection).sigma[0, 0, :4].tolist() == [-24, 40, 47, 111]
    test_strip_kernel_on_random_offset_sets.hypothesis.inner_test(selection, seed=3)


@interpreted
@pytest.mark.parametrize("layout", ["sequence-major", "unaligned"])
def test_strip_kernel_reads_any_key_layout(layout, caplog):
    """Keys and values reach the kernel as TMA tiles: a sequence-major view (aligned strides) is read
    in place, an unaligned base or a head dim of 18 float32 (72-byte rows) through a padded copy;
    every layout gives the float64 result."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    N, D = 150, (16 if layout == "sequence-major" else 18)
    q = torch.randn(1, 4, N, D, generator=g)
    if layout == "sequence-major":
        k, v = (torch.randn(1, N, 2, D, generator=g).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(2 * N * D + 1, generator=g)[1:].view(1, 2, N, D) for _ in range(2))
    patterns = [["vertical_and_slash", 4, 20], ["a_shape", 64, 64], ["vertical_and_slash", 10, 40], ["dense", 0, 0]]
    q, k, v = (t.to(device) for t in (q, k, v))
    plan = mf.plan_attention(q, k, patterns, strips=True, fold_columns=False, full_width=False)
    with caplog.at_level("WARNING", logger="minference_flex.kernels.contract"):
        out, _ = strip_attention(q, k, v, plan.strips, plan.scale)
    assert ("not 16-byte aligned" in caplog.text) == (layout == "unaligned")  # a copy is never silent
    cells = strip_cells(plan.strips) > 0
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), cells.cpu(), plan.scale)
    torch.testing.assert_close(out.cpu().double(), ref.nan_to_num(0), atol=1e-5, rtol=1e-5)


def test_bad_strip_requests_raise_value_error(monkeypatch):
    q, k, v = torch.randn(3, 1, 2, 100, 16).unbind(0)
    with pytest.raises(ValueError, match="fold_columns=False"):
        mf.plan_attention(q, k, [["vertical_and_slash", 30, 100]] * 2, strips=True, fold_columns=True)
    plan = mf.plan_attention(q, k, [["vertical_and_slash", 30, 100]] * 2, strips=True, fold_columns=False)
    with pytest.raises(ValueError, match="cannot run on"):
        strip_attention(q[:, :, :50], k, v, plan.strips, plan.scale)
    assert plan.strip_backend == "triton" and plan.segments is None  # float32, head dim 16: not the Hopper kernel's
    with pytest.raises(ValueError, match="backend must be one of"):
        strip_attention(q, k, v, plan.strips, plan.scale, backend="gluon")
    with pytest.raises(ValueError, match="strip_kernel must be one of"):  # decided when planning
        mf.plan_attention(q, k, [["vertical_and_slash", 30, 100]] * 2, strips=True, fold_columns=False,
                          strip_kernel="gluon")
    with pytest.raises(ValueError, match="segments"):  # the Hopper backend runs the plan's segments
        strip_attention(q, k, v, plan.strips, plan.scale, backend="hopper")
    # The Hopper kernel runs on sm_90 GPUs, bf16/fp16, head dim 64/128 only, and says so when planning.
    with pytest.raises(ValueError, match="compute-capability 9"):
        mf.plan_attention(q, k, [["vertical_and_slash", 30, 100]] * 2, strips=True, fold_columns=False,
                          strip_kernel="hopper")
    with pytest.raises(ValueError, match="strip_backend must be one of"):
        mf.attention.plan_selection(plan.selection, scale=plan.scale, full_width=False, fold_columns=False,
                                    strips=True, strip_backend="auto")
    with pytest.raises(ValueError, match="columns=False"):  # leaving the columns out needs a part that holds them
        triton_strips(q, k, v, plan.strips, plan.scale, columns=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA"):
        mf.attention._strip_part(plan, q, k, v, compiled=True)
