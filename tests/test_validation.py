"""Bad inputs raise ValueError (TypeError for non-tensors and non-integer budgets), from every
public entry point."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import minference_flex as mf

DENSE = ["dense", 0, 0]


def qkv(B=1, Hq=2, Hkv=1, Nq=8, Nk=16, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


def call_all(q, k, v, patterns, exc, match=None, **kw):
    """sparse_attention, token_mask and plan_attention all reject the input."""
    with pytest.raises(exc, match=match):
        mf.sparse_attention(q, k, v, patterns, compiled=False, **kw)
    with pytest.raises(exc, match=match):
        mf.sparse_attention(q, k, v, patterns, compiled=True, **kw)  # validation precedes compiling
    with pytest.raises(exc, match=match):
        mf.token_mask(q, k, patterns, **kw)
    with pytest.raises(exc, match=match):
        mf.plan_attention(q, k, patterns, **kw)


def test_valid_baseline_runs():
    q, k, v = qkv()
    out = mf.sparse_attention(q, k, v, [DENSE, DENSE], compiled=False)
    assert out.shape == q.shape


@pytest.mark.parametrize("Hq,Hkv", [(3, 2), (2, 4), (5, 3), (2, 0)])
def test_heads_not_multiple(Hq, Hkv):
    q, k, v = qkv(Hq=Hq, Hkv=Hkv)
    call_all(q, k, v, [DENSE] * Hq, ValueError, "multiple")


@pytest.mark.parametrize("n", [0, 1, 3])
def test_wrong_number_of_patterns(n):
    q, k, v = qkv(Hq=2)
    call_all(q, k, v, [DENSE] * n, ValueError, "entries")


@pytest.mark.parametrize("patterns", ["dense", None, 3, ({"dense": 1}, DENSE), (p for p in [DENSE, DENSE])])
def test_patterns_not_a_list(patterns):
    q, k, v = qkv(Hq=2)
    with pytest.raises((ValueError, TypeError)):
        mf.sparse_attention(q, k, v, patterns, compiled=False)
    with pytest.raises((ValueError, TypeError)):
        mf.token_mask(q, k, patterns)


@pytest.mark.parametrize("bad", [["sparse", 1, 1], ["Dense", 0, 0], ["", 0, 0], ["vertical", 1, 2],
                                 ["dense", 0], ["dense", 0, 0, 0.5, 1], []])
def test_bad_pattern_entry(bad):
    q, k, v = qkv(Hq=2)
    call_all(q, k, v, [DENSE, bad], ValueError)


def test_unknown_pattern_type_object():
    with pytest.raises(ValueError, match="unknown pattern type"):
        mf.Pattern("sliding_window", 1, 2)
    with pytest.raises(TypeError):
        mf.Pattern(None, 1, 2)


@pytest.mark.parametrize("a,b", [(-1, 0), (0, -1), (-100, 5), (5, -100)])
@pytest.mark.parametrize("kind", ["vertical_and_slash", "stream_llm", "block_sparse", "dense"])
def test_negative_budgets(kind, a, b):
    with pytest.raises(ValueError):
        mf.Pattern(kind, a, b)
    q, k, v = qkv(Hq=2)
    call_all(q, k, v, [DENSE, [kind, a, b]], ValueError, ">= 0")


@pytest.mark.parametrize("value", [1.5, "3", None, True])
def test_non_integer_budget(value):
    with pytest.raises(TypeError):
        mf.Pattern("stream_llm", value, 4)
    with pytest.raises(TypeError):
        mf.Pattern("stream_llm", 4, value)


def test_integral_float_budget_accepted():
    assert mf.Pattern("stream_llm", 4.0, 8.0) == mf.Pattern("stream_llm", 4, 8)


@pytest.mark.parametrize("block_size", [0, 32, 65, 96, -64, 100])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError):
        mf.Pattern("block_sparse", 1, 0, block_size=block_size)


@pytest.mark.parametrize("block_size", [64, 128, 192, 256])
def test_good_block_size(block_size):
    assert mf.Pattern("block_sparse", 1, 0, block_size=block_size).block_size == block_size


@pytest.mark.parametrize("Nq,Nk", [(17, 16), (2, 1), (65, 64)])
def test_more_queries_than_keys(Nq, Nk):
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    call_all(q, k, v, [DENSE, DENSE], ValueError, "query length")


def test_head_dim_mismatch():
    q, k, v = qkv(D=16)
    k2, v2 = torch.randn(1, 1, 16, 32), torch.randn(1, 1, 16, 32)
    call_all(q, k2, v2, [DENSE, DENSE], ValueError, "head dim")


@pytest.mark.parametrize("shape", [(1, 1, 16, 32), (1, 1, 15, 16), (1, 2, 16, 16), (2, 1, 16, 16)])
def test_value_shape_differs_from_key(shape):
    q, k, _ = qkv(D=16, Nk=16)
    with pytest.raises(ValueError, match="value shape"):
        mf.sparse_attention(q, k, torch.randn(shape), [DENSE, DENSE], compiled=False)


@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mismatched_dtypes(which, dtype):
    q, k, v = qkv()
    if which == "key":
        k = k.to(dtype)
    else:
        v = v.to(dtype)
    with pytest.raises(ValueError, match="dtype"):
        mf.sparse_attention(q, k, v, [DENSE, DENSE], compiled=False)
    if which == "key":
        with pytest.raises(ValueError, match="dtype"):
            mf.token_mask(q, k, [DENSE, DENSE])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    call_all(q, k, v, [DENSE, DENSE], ValueError, "dtype")


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_not_4d(which, ndim):
    q, k, v = qkv()
    tensors = {"query": q, "key": k, "value": v}
    t = tensors[which]
    tensors[which] = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) if ndim == 3 else (
        t[None] if ndim == 5 else t.reshape(-1, t.shape[-1]))
    with pytest.raises(ValueError, match="4-D"):
        mf.sparse_attention(tensors["query"], tensors["key"], tensors["value"], [DENSE, DENSE], compiled=False)


@pytest.mark.parametrize("qb,kb", [(1, 2), (2, 1)])
def test_batch_mismatch(qb, kb):
    q, _, _ = qkv(B=qb)
    _, k, v = qkv(B=kb)
    call_all(q, k, v, [DENSE, DENSE], ValueError, "batch")


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [[[1.0]], 3.0, "tensor", None])
def test_non_tensor(which, bad):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v}
    args[which] = bad
    with pytest.raises(TypeError):
        mf.sparse_attention(args["query"], args["key"], args["value"], [DENSE, DENSE], compiled=False)
    if which != "value":
        with pytest.raises(TypeError):
            mf.token_mask(args["query"], args["key"], [DENSE, DENSE])
        with pytest.raises(TypeError):
            mf.plan_attention(args["query"], args["key"], [DENSE, DENSE])


@pytest.mark.parametrize("scale", [-1.0, 0.0, -0.5, math.nan, math.inf, -math.inf, np.float32("nan"),
                                   np.float64(-1.0), np.float32(0.0), torch.tensor(math.nan), torch.tensor(-0.1),
                                   torch.tensor(0.0), -3])
def test_bad_scale(scale):
    q, k, v = qkv()
    call_all(q, k, v, [DENSE, DENSE], ValueError, "scale", scale=scale)


@pytest.mark.parametrize("scale", [True, False, np.bool_(True), torch.tensor(True), "0.1", b"1", [0.1],
                                   torch.tensor([0.1]), torch.ones(1, 1), torch.tensor(0.1j), 1j])
def test_scale_wrong_type(scale):
    q, k, v = qkv()
    call_all(q, k, v, [DENSE, DENSE], TypeError, "scale", scale=scale)


@pytest.mark.parametrize("scale", [0.1, 1, 2.5])
def test_good_scale(scale):
    q, k, v = qkv()
    out = mf.sparse_attention(q, k, v, [DENSE, DENSE], scale=scale, compiled=False)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_device_mismatch():
    q, k, v = qkv()
    call_all(q, k.cuda(), v.cuda(), [DENSE, DENSE], ValueError, "device")
    call_all(q.cuda(), k, v.cuda(), [DENSE, DENSE], ValueError, "device")
    with pytest.raises(ValueError, match="device"):
        mf.sparse_attention(q.cuda(), k.cuda(), v, [DENSE, DENSE], compiled=False)


# ---- Empty inputs (batch 0, no query heads, no queries): an empty output, like SDPA ----

MIXED = [["vertical_and_slash", 30, 100], ["stream_llm", 4, 8], ["block_sparse", 2, 0], ["block_mass", 900, 8]]


@pytest.mark.parametrize("B,Nq,Nk", [(0, 8, 16), (0, 64, 200), (1, 0, 16), (2, 0, 130), (0, 0, 16), (1, 0, 0),
                                     (0, 0, 0)])
@pytest.mark.parametrize("compiled", [False, True])
def test_empty_input_gives_empty_output(B, Nq, Nk, compiled):
    q, k, v = qkv(B=B, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, dtype=torch.bfloat16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out = mf.sparse_attention(q, k, v, MIXED, compiled=compiled)
    assert out.shape == ref.shape == (B, 4, Nq, 16)
    assert out.dtype == q.dtype and out.device == q.device
    mask = mf.token_mask(q, k, MIXED)
    assert mask.shape == (B, 4, Nq, Nk) and mask.dtype == torch.bool and not mask.any()


def test_no_query_heads_gives_empty_output():
    q, k, v = qkv(Hq=0, Hkv=1)
    for compiled in (False, True):
        assert mf.sparse_attention(q, k, v, [], compiled=compiled).shape == (1, 0, 8, 16)
    assert mf.token_mask(q, k, []).shape == (1, 0, 8, 16)


@pytest.mark.parametrize("B,Nq,Nk", [(0, 8, 16), (1, 0, 16), (0, 0, 0)])
@pytest.mark.parametrize("layout", [dict(), dict(strips=True, fold_columns=False, full_width=False),
                                    dict(fold_columns=False, full_width=False)])
def test_empty_plan_runs_empty(B, Nq, Nk, layout):
    """plan_attention returns an empty plan for empty inputs; run_plan gives the empty output."""
    q, k, v = qkv(B=B, Hq=4, Hkv=2, Nq=Nq, Nk=Nk)
    plan = mf.plan_attention(q, k, MIXED, **layout)
    assert plan.selection.nq == Nq and plan.selection.nk == Nk
    assert plan.flex_tiles().shape == (B, 4) and not plan.visited_tiles().any()
    for compiled in (False, True):
        assert mf.run_plan(plan, q, k, v, compiled=compiled).shape == (B, 4, Nq, 16)
    # still a plan for these shapes only
    q2, k2, v2 = qkv(B=1, Hq=4, Hkv=2, Nq=8, Nk=16)
    with pytest.raises(ValueError):
        mf.run_plan(plan, q2, k2, v2, compiled=False)


@pytest.mark.parametrize("B,Nq", [(1, 8), (0, 8), (1, 0)])
def test_zero_head_dim(B, Nq):
    q, k, v = qkv(B=B, Nq=Nq, D=0)
    call_all(q, k, v, [DENSE, DENSE], ValueError, "head dim")


def test_no_keys_with_queries():
    q, k, v = qkv(Nq=1, Nk=0)
    call_all(q, k, v, [DENSE, DENSE], ValueError, "query length")


# ---- Budgets past any length (>= 2**31, >= 2**63) clamp to the prompt length ----

HUGE_ENTRIES = [
    ["stream_llm", 2**31, 0], ["stream_llm", 3, 2**31], ["stream_llm", 10**30, 10**30], ["stream_llm", 1e30, 8],
    ["vertical_and_slash", 2**40, 2**63], ["vertical_and_slash", 10**30, 150], ["vertical_and_slash", 40, 2**64],
    ["vertical_and_slash", 2**63 - 1, 2**32], ["block_sparse", 2**63, 0], ["block_sparse", 2**31, 10**30],
    ["dense", 10**30, 2**63],
]


@pytest.mark.parametrize("entry", HUGE_ENTRIES, ids=str)
def test_huge_budgets_clamp_to_length(entry):
    Nq, Nk = 100, 200
    torch.manual_seed(0)
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Nq=Nq, Nk=Nk)
    patterns = [entry, ["vertical_and_slash", 30, 100], entry, ["stream_llm", 4, 16]]
    clamped = [[p[0], min(int(p[1]), Nk), min(int(p[2]), Nk)] for p in patterns]
    expected_mask = mf.token_mask(q, k, clamped)
    assert torch.equal(mf.token_mask(q, k, patterns), expected_mask)
    expected = mf.sparse_attention(q, k, v, clamped, compiled=False)
    torch.testing.assert_close(mf.sparse_attention(q, k, v, patterns, compiled=False), expected, rtol=0, atol=0)
    # the other layouts: the compiled CPU kernel's (folded columns, full width) and the strip kernel's
    for layout in (dict(fold_columns=True, full_width=True), dict(strips=True, fold_columns=False)):
        plan = mf.plan_attention(q, k, patterns, **layout)
        torch.testing.assert_close(mf.run_plan(plan, q, k, v, compiled=False), expected, rtol=1e-5, atol=1e-5)


def test_huge_budget_pattern_objects():
    assert mf.Pattern("stream_llm", 10**30, 2**63).a == 10**30
    assert mf.Pattern("vertical_and_slash", 1e30, 2**64).to_list()[1:3] == [int(1e30), 2**64]


# ---- run_plan with inputs the plan was not made for ----

def plan_case(**kw):
    shape = dict(B=2, Hq=4, Hkv=2, Nq=8, Nk=16, D=16)
    shape.update(kw)
    return qkv(**shape)


@pytest.mark.parametrize("plan", [None, object(), "plan", {"selection": None}, 3])
def test_run_plan_not_a_plan(plan):
    q, k, v = plan_case()
    for compiled in (False, True):
        with pytest.raises(TypeError, match="AttentionPlan"):
            mf.run_plan(plan, q, k, v, compiled=compiled)


@pytest.mark.parametrize("change,match", [
    (dict(B=1), "batch"), (dict(B=3), "batch"), (dict(Hq=2, Hkv=1), "query heads"), (dict(Hq=8), "query heads"),
    (dict(Hkv=4), "key heads"), (dict(Hkv=1), "key heads"), (dict(Nq=4), "query length"),
    (dict(Nq=16), "query length"), (dict(Nk=24), "key length"), (dict(Nq=8, Nk=12), "key length"),
    (dict(D=32), "head dim"), (dict(D=8), "head dim"), (dict(B=1, Nk=32), "batch .* key length"),
])
@pytest.mark.parametrize("compiled", [False, True])
def test_run_plan_other_shape(change, match, compiled):
    q, k, _ = plan_case()
    patterns = [["vertical_and_slash", 30, 100], ["stream_llm", 4, 8], ["block_sparse", 1, 0], DENSE]
    plan = mf.plan_attention(q, k, patterns, fold_columns=not compiled, full_width=compiled)
    q2, k2, v2 = plan_case(**change)
    with pytest.raises(ValueError, match=match):
        mf.run_plan(plan, q2, k2, v2, compiled=compiled)


def test_run_plan_checks_tensors():
    q, k, v = plan_case()
    plan = mf.plan_attention(q, k, [DENSE] * 4)
    with pytest.raises(TypeError, match="value"):
        mf.run_plan(plan, q, k, None, compiled=False)
    with pytest.raises(ValueError, match="dtype"):
        mf.run_plan(plan, q, k.half(), v, compiled=False)
    with pytest.raises(ValueError, match="value shape"):
        mf.run_plan(plan, q, k, v[:, :, :8], compiled=False)
    torch.testing.assert_close(mf.run_plan(plan, q, k, v, compiled=False),
                               mf.sparse_attention(q, k, v, [DENSE] * 4, compiled=False))


@pytest.mark.gpu
def test_run_plan_other_device():
    q, k, v = plan_case()
    plan = mf.plan_attention(q, k, [DENSE] * 4)
    with pytest.raises(ValueError, match="device"):
        mf.run_plan(plan, q.cuda(), k.cuda(), v.cuda(), compiled=False)
    plan = mf.plan_attention(q.cuda(), k.cuda(), [DENSE] * 4)
    with pytest.raises(ValueError, match="device"):
        mf.run_plan(plan, q, k, v, compiled=False)


# ---- numpy numbers and 0-d tensors as scales and budgets ----

VS = [["vertical_and_slash", 30, 100], ["stream_llm", 4, 8]]


@pytest.mark.parametrize("scale", [np.float32(0.125), np.float64(0.125), np.float16(0.125), torch.tensor(0.125),
                                   torch.tensor(0.125, dtype=torch.float64), torch.tensor(0.125, dtype=torch.bfloat16),
                                   np.int64(2), torch.tensor(2)], ids=repr)
def test_numpy_and_tensor_scales(scale):
    q, k, v = qkv(Nq=70, Nk=100)
    value = float(scale)
    expected = mf.sparse_attention(q, k, v, VS, scale=value, compiled=False)
    assert torch.equal(mf.sparse_attention(q, k, v, VS, scale=scale, compiled=False), expected)
    assert torch.equal(mf.token_mask(q, k, VS, scale=scale), mf.token_mask(q, k, VS, scale=value))
    plan = mf.plan_attention(q, k, VS, scale=scale)
    assert type(plan.scale) is float and plan.scale == value


@pytest.mark.gpu
def test_cuda_tensor_scale():
    """Accepted (read back to the host: one synchronisation per call, documented)."""
    q, k, v = (t.cuda() for t in qkv(Nq=70, Nk=100))
    out = mf.sparse_attention(q, k, v, VS, scale=torch.tensor(0.125, device="cuda"), compiled=False)
    assert torch.equal(out, mf.sparse_attention(q, k, v, VS, scale=0.125, compiled=False))
    with pytest.raises(ValueError, match="scale"):
        mf.sparse_attention(q, k, v, VS, scale=torch.tensor(math.nan, device="cuda"), compiled=False)


@pytest.mark.parametrize("cast", [np.int64, np.int32, np.int16, np.uint64, np.float32, np.float64, torch.tensor,
                                  float], ids=lambda c: getattr(c, "__name__", str(c)))
def test_numpy_budgets(cast):
    p = mf.Pattern("vertical_and_slash", cast(100), cast(800))
    ref = mf.Pattern("vertical_and_slash", 100, 800)
    assert p == ref and hash(p) == hash(ref) and type(p.a) is int and type(p.b) is int
    assert {ref: 1}[p] == 1
    q, k, v = qkv(Nq=70, Nk=100)
    entries = [["vertical_and_slash", cast(40), cast(120)], ["stream_llm", cast(4), cast(8)]]
    expected = mf.sparse_attention(q, k, v, [["vertical_and_slash", 40, 120], ["stream_llm", 4, 8]], compiled=False)
    assert torch.equal(mf.sparse_attention(q, k, v, entries, compiled=False), expected)


@pytest.mark.parametrize("value", [True, np.bool_(True), np.bool_(False), torch.tensor(True), np.float32(1.5),
                                   np.float64(math.nan), math.inf, torch.tensor(2.5), "4"], ids=repr)
def test_bad_budget_types(value):
    with pytest.raises(TypeError, match="budget"):
        mf.Pattern("stream_llm", value, 4)
    with pytest.raises(TypeError, match="budget"):
        mf.Pattern("vertical_and_slash", 100, value)
    q, k, v = qkv()
    call_all(q, k, v, [DENSE, ["stream_llm", value, 4]], TypeError, "budget")
