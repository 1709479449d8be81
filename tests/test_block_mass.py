"""The mass kinds (``block_mass``, ``antidiagonal_mass``) on inputs whose attention concentrates on a
few key blocks (random inputs attend almost uniformly, so every block would be kept and nothing
tested)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minference_flex as mf
from block_masks.antidiagonal_kernel import antidiagonal_mass_estimate_triton
from block_masks.estimate import antidiagonal_mass_estimate, antidiagonal_squares, block_mass_estimate, sampled_rows
from block_masks.mass_kernel import block_mass_estimate_triton
from tests.naive import causal_mask, naive_mask, reference_attention
from tests.strategies import LENGTHS, examples


@st.composite
def peaky_cases(draw):
    """(q, k, v, patterns): keys of random blocks share a direction with the queries, at random
    strengths, so each query block's mass sits in a few key blocks."""
    Hkv = draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    Nk = draw(st.sampled_from([n for n in LENGTHS if n >= 64] + [400, 513]))
    Nq = draw(st.one_of(st.just(Nk), st.integers(1, Nk)))
    D = draw(st.sampled_from([16, 32, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    pats = [[draw(st.sampled_from(["block_mass", "antidiagonal_mass"])),
             draw(st.one_of(st.sampled_from([300, 500, 800, 900, 980]), st.integers(1, 1000))),
             draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))] for _ in range(Hq)]
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Hkv, 1, D, generator=g)
    strength = torch.randint(0, 4, (Hkv, -(-Nk // 64)), generator=g).float().repeat_interleave(64, 1)[:, :Nk, None]
    k = torch.randn(1, Hkv, Nk, D, generator=g) + strength * u
    q = 0.5 * torch.randn(1, Hq, Nq, D, generator=g) + u.repeat_interleave(Hq // Hkv, 0)
    v = torch.randn(1, Hkv, Nk, D, generator=g)
    return q, k, v, pats


@settings(max_examples=examples(60), deadline=None)
@given(case=peaky_cases())
def test_mass_kinds_mask_matches_naive(case):
    q, k, _, pats = case
    got = mf.token_mask(q, k, pats)
    want, ambiguous = naive_mask(q, k, pats)
    assume(not ambiguous)
    assert torch.equal(got, want), f"{(got != want).sum().item()} cells differ"


@settings(max_examples=examples(30), deadline=None)
@given(case=peaky_cases())
def test_mass_kinds_attention_matches_masked_reference(case):
    q, k, v, pats = case
    out = mf.sparse_attention(q, k, v, pats, compiled=False)
    mask = mf.token_mask(q, k, pats)
    ref = reference_attention(q, k, v, mask)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6


@pytest.mark.parametrize("kind,b", [("block_mass", 8), ("antidiagonal_mass", 8), ("antidiagonal_mass", 64)])
def test_mass_kinds_are_sparse_where_the_mass_is_concentrated(kind, b):
    """On the peaky inputs a 90% target drops blocks (a check that the tests above test something),
    a 100% target keeps every block holding mass, and the kept blocks hold at least the target of
    the estimate."""
    q, k, _ = _fixed_peaky()
    causal = causal_mask(q.shape[2], k.shape[2])
    m90 = mf.token_mask(q, k, [[kind, 900, b]] * q.shape[1])
    m100 = mf.token_mask(q, k, [[kind, 1000, 1 if kind == "antidiagonal_mass" else 64]] * q.shape[1])
    assert m90.sum() < 0.7 * causal.sum() * q.shape[1]
    assert torch.equal(m100[0, 0], causal)
    estimate = block_mass_estimate if kind == "block_mass" else antidiagonal_mass_estimate
    mass = estimate(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), q.shape[-1] ** -0.5, b)
    kept = m90[0, :, ::64, ::64] | m90[0, :, 63::64, ::64]  # any row of a query block tells its key blocks
    assert ((mass[0] * kept).sum(-1) >= 0.9 - 1e-6).all()


def test_antidiagonal_estimate_of_side_one_is_the_exact_block_mass():
    """Squares of one cell are single cells: the estimate is every row's exact softmax, summed per
    key block and averaged over the block's rows (``block_mass`` with all 64 rows sampled; whole
    blocks, where its clamping of absent rows does not weigh any row twice)."""
    q, k, _ = _fixed_peaky()
    k = k.expand(-1, 2, -1, -1)
    for nq in (640, 128):
        torch.testing.assert_close(antidiagonal_mass_estimate(q[:, :, -nq:], k, 0.2, 1),
                                   block_mass_estimate(q[:, :, -nq:], k, 0.2, 64), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("q_offset,nq,side,want", [
    (0, 128, 16, [[True] * 4, [True] * 4]),
    (30, 50, 8, [[False, False, False, True, True, True, True, True], [True, True, False, False] + [False] * 4]),
    (64, 1, 64, [[True]]),
])
def test_antidiagonal_squares(q_offset, nq, side, want):
    """A square holds a query when one of its positions is among the call's (here 30..79: the
    square 24..31 of block 0 holds 30 and 31, block 1's squares from position 80 hold none)."""
    assert antidiagonal_squares(q_offset, nq, side).tolist() == want


def _fixed_peaky():
    g = torch.Generator().manual_seed(3)
    Nk, D = 640, 32
    u = torch.randn(1, 1, D, generator=g)
    strength = torch.tensor([3.0 if i % 4 == 1 else 0.0 for i in range(Nk // 64)]).repeat_interleave(64)[None, :, None]
    k = torch.randn(1, 1, Nk, D, generator=g) + strength * u
    q = 0.5 * torch.randn(1, 2, Nk, D, generator=g) + u
    return q, k, torch.randn(1, 1, Nk, D, generator=g)


@pytest.mark.parametrize("q_offset,nq,rows,want", [
    (0, 128, 1, [[63], [127]]),
    (0, 128, 4, [[15, 31, 47, 63], [79, 95, 111, 127]]),
    (30, 50, 2, [[1, 33], [49, 49]]),       # positions 30..79: block 1's rows clamped to the last
    (64, 10, 64, [[min(t, 9) for t in range(64)]]),
])
def test_sampled_rows(q_offset, nq, rows, want):
    assert sampled_rows(q_offset, nq, rows).tolist() == want


@pytest.mark.parametrize("kind", ["block_mass", "antidiagonal_mass"])
@pytest.mark.parametrize("a,b,message", [(0, 8, "1..1000"), (1001, 8, "1..1000"), (900, 3, "one of")])
def test_mass_kinds_reject_bad_parameters(kind, a, b, message):
    with pytest.raises(ValueError, match=message):
        mf.Pattern.parse([kind, a, b])
    with pytest.raises(ValueError, match="block_size"):
        mf.Pattern(kind, 900, 8, block_size=128)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests/conftest.py)")
@settings(max_examples=examples(25), deadline=None)
@given(case=peaky_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data())
def test_mass_kernels_match_definitions(case, dtype, data):
    """Each Triton estimate against its PyTorch definition, for any subset of the query heads."""
    # Triton's CPU interpreter mis-converts bfloat16 operands of tl.dot (triton 3.9).
    assume(dtype == torch.float32 or torch.cuda.is_available())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, _, pats = case
    q, k = q.to(device, dtype), k.to(device, dtype)
    Hq, group = q.shape[1], q.shape[1] // k.shape[1]
    heads = data.draw(st.lists(st.integers(0, Hq - 1), min_size=1, max_size=Hq, unique=True))
    b = data.draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    kernel, definition = data.draw(st.sampled_from([(block_mass_estimate_triton, block_mass_estimate),
                                                    (antidiagonal_mass_estimate_triton, antidiagonal_mass_estimate)]))
    index = torch.tensor(heads, device=device)
    scale = q.shape[-1] ** -0.5
    got = kernel(q, k, scale, b, index)
    want = definition(q[:, index], k[:, index // group], scale, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)


def test_block_estimates_example(tmp_path):
    """examples/block_estimates.py on a small capture: the oracle at 100% keeps all the attention, at
    90% at least 90% of it (mean over rows) with fewer blocks; 64 sampled rows are the oracle."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "block_estimates.py"
    spec = importlib.util.spec_from_file_location("block_estimates", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    g = torch.Generator().manual_seed(0)
    torch.save({"query": torch.randn(1, 2, 1024, 16, generator=g), "key": torch.randn(1, 1, 1024, 16, generator=g),
                "layer": [5], "length": 1024}, tmp_path / "cap.pt")
    r = example.main([str(tmp_path / "cap.pt"), "--estimates", "oracle", "rows-64", "anti-8", "pooled", "pooled-q",
                      "--targets", "0.9", "1.0", "--device", "cpu"])["estimates"]
    assert r["oracle@1.0"]["recall"] == pytest.approx(1.0, abs=1e-5)
    assert r["oracle@0.9"]["recall"] >= 0.9 and r["oracle@0.9"]["blocks"] < r["oracle@1.0"]["blocks"]
    assert r["rows-64@0.9"] == r["oracle@0.9"]
    assert all(0 < v["blocks"] <= 1 for v in r.values()) and set(r["anti-8@0.9"]["per_layer"]) == {"5"}
