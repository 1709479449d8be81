"""The compiled CUDA kernel computes exactly the kept cells (float64 reference), with one compile
across lengths and budgets. Run on a GPU: pytest -m gpu."""
import math

import pytest
import torch

import minference_flex as mf
import minference_flex.kernels.flex
from block_masks import strip_cells, strip_segments
from minference_flex.kernels import hopper_strips
from minference_flex.kernels.dispatch import strip_attention

pytestmark = pytest.mark.gpu

MIXES = [
    [["vertical_and_slash", 100, 300]] * 8,
    [["stream_llm", 64, 256], ["vertical_and_slash", 40, 120], ["block_sparse", 3, 0], ["dense", 0, 0]] * 2,
    [mf.Pattern("block_sparse", 2, block_size=128), ["a_shape", 0, 1], ["vertical_slash", 1000, 6096], ["dense", 0, 0]] * 2,
    [["block_mass", 300, 8], ["vertical_and_slash", 100, 300], ["block_mass", 600, 64], ["stream_llm", 64, 256]] * 2,
    [["antidiagonal_mass", 300, 8], ["antidiagonal_mass", 950, 16], ["block_mass", 900, 8], ["dense", 0, 0]] * 2,
    [["vertical_slash_mass", 900, 2048], ["vertical_and_slash", 100, 300], ["vertical_slash_mass", 500, 0],
     ["vertical_slash_mass", 990, 10**6]] * 2,
]


def reference(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double().repeat_interleave(G, 1)


# Every mix, dtype and kind of length (off the tile grid, a chunk on top of a cache, one query),
# chosen so that few kernels (one per dtype and head dim) need compiling.
CASES = [
    (0, 1000, 1000, torch.bfloat16), (0, 2049, 2049, torch.float16), (0, 700, 3001, torch.bfloat16),
    (0, 1, 777, torch.bfloat16), (1, 1000, 1000, torch.bfloat16), (1, 700, 3001, torch.bfloat16),
    (1, 64, 4096, torch.bfloat16), (1, 2049, 2049, torch.float32), (2, 1000, 1000, torch.bfloat16),
    (2, 700, 3001, torch.float16), (2, 1, 777, torch.bfloat16), (2, 64, 4096, torch.bfloat16),
    (3, 1000, 1000, torch.bfloat16), (3, 700, 3001, torch.bfloat16), (3, 1, 777, torch.float16),
    (3, 64, 4096, torch.bfloat16), (4, 1000, 1000, torch.bfloat16), (4, 700, 3001, torch.float16),
    (4, 1, 777, torch.bfloat16), (4, 64, 4096, torch.bfloat16),
]


@pytest.mark.parametrize("mix,nq,nk,dtype", CASES)
def test_compiled_cuda_matches_float64(mix, nq, nk, dtype):
    g = torch.Generator(device="cuda").manual_seed(nq * 7 + nk + mix)
    D = 64 if mix != 1 else 128
    q = torch.randn(2, 8, nq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, 4, nk, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(2, 4, nk, D, device="cuda", generator=g).to(dtype)
    out = mf.sparse_attention(q, k, v, MIXES[mix])
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference(q, k, v, mf.token_mask(q, k, MIXES[mix]), 1 / math.sqrt(D))
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    emulated = mf.sparse_attention(q, k, v, MIXES[mix], compiled=False) if nk <= 2049 else None
    if emulated is not None:
        assert ((emulated.double() - ref).norm() / ref.norm()).item() < 1e-2


# Both strip kernels on their own, over the strip cells: sinks and columns (mix 1), chunked prefill
# (nq < nk), one query, odd lengths, both head dims and half dtypes; the dense mix has neither sinks nor
# columns (the Hopper kernel's output is the result).
STRIP_CASES = [(1, 700, 3001, 128, torch.bfloat16), (1, 2049, 2049, 64, torch.float16), (0, 1, 777, 64, torch.bfloat16),
               (2, 1000, 1000, 128, torch.bfloat16), (3, 64, 4096, 64, torch.bfloat16),
               ("dense", 3100, 3100, 128, torch.float16)]


@pytest.mark.parametrize("kernel", ["triton", "hopper"])
@pytest.mark.parametrize("mix,nq,nk,D,dtype", STRIP_CASES)
def test_strip_kernels_match_float64_over_the_strip_cells(kernel, mix, nq, nk, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(nq + nk + D)
    q = torch.randn(1, 8, nq, D, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(1, 4, nk, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    if kernel == "hopper" and not hopper_strips.supported(q, k, v):
        pytest.skip("the Hopper strip kernel needs a compute-capability 9.x GPU and Triton with Gluon")
    patterns = [["dense", 0, 0]] * 8 if mix == "dense" else MIXES[mix]
    plan = mf.plan_attention(q, k, patterns, strip_kernel=kernel)
    assert plan.strip_backend == kernel and (plan.segments is not None) == (kernel == "hopper")
    out, lse = strip_attention(q, k, v, plan.strips, plan.scale, plan.strip_backend, plan.segments)
    cells = strip_cells(plan.strips) > 0
    live = cells.any(-1)
    ref = reference(q, k, v, cells, plan.scale)
    err = ((out.double() - ref.nan_to_num(0))[live].norm() / ref[live].norm()).item()
    assert err < 1e-2, err
    assert (out[~live] == 0).all() and torch.isinf(lse[~live]).all()
    scores = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * plan.scale
    ref_lse = scores.masked_fill(~cells, float("-inf")).logsumexp(-1)
    assert (lse.double() - ref_lse)[live].abs().max().item() < 1e-3


def test_hopper_kernel_refuses_what_it_cannot_run():
    for dtype, D in ((torch.float32, 64), (torch.bfloat16, 96)):
        q = torch.randn(1, 2, 300, D, device="cuda").to(dtype)
        with pytest.raises(ValueError, match="Hopper strip kernel"):
            mf.plan_attention(q, q, [["vertical_and_slash", 30, 100]] * 2, strip_kernel="hopper")
        plan = mf.plan_attention(q, q, [["vertical_and_slash", 30, 100]] * 2)
        assert plan.strip_backend == "triton"
        with pytest.raises(ValueError, match="Hopper strip kernel"):
            strip_attention(q, q, q, plan.strips, plan.scale, "hopper", strip_segments(plan.strips))


def test_one_compile_across_lengths_and_budgets():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    minference_flex.kernels.flex.compiled_flex.cache_clear()
    g = torch.Generator(device="cuda").manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    for i, n in enumerate([1100, 1500, 2100, 2500, 3000, 3500, 4100, 4500, 5000, 6000]):
        q = torch.randn(1, 8, n, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, 4, n, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        mf.sparse_attention(q, k, k, [["vertical_and_slash", 100 + 50 * i, 200 + 100 * i]] * 8)
    by_length = counters["stats"]["unique_graphs"] - before
    before = counters["stats"]["unique_graphs"]
    for i in range(10):
        mf.sparse_attention(q, k, k, [["vertical_and_slash", 30 + 97 * i, 100 + 301 * i]] * 8)
    by_budget = counters["stats"]["unique_graphs"] - before
    # main and vertical calls differ in head layout (GQA or not): at most 2 graphs each
    assert by_length <= 4, by_length
    assert by_budget == 0, by_budget


def test_device_mismatch_is_rejected():
    q = torch.randn(1, 2, 8, 16, device="cuda")
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="device|cuda|cpu"):
        mf.sparse_attention(q, k, k, [["dense", 0, 0]] * 2)


def test_head_dim_and_scale_changes_keep_results_exact():
    """A second head dim or scale in one process must not reuse a kernel built for the first."""
    g = torch.Generator(device="cuda").manual_seed(5)
    for D, scale in [(64, None), (128, None), (64, 0.05), (128, 0.3), (64, None)]:
        q = torch.randn(1, 4, 900, D, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, 2, 900, D, device="cuda", generator=g, dtype=torch.bfloat16)
        patterns = [["stream_llm", 64, 128], ["vertical_and_slash", 40, 120], ["block_sparse", 2, 0], ["dense", 0, 0]]
        out = mf.sparse_attention(q, k, k, patterns, scale=scale)
        ref = reference(q, k, k, mf.token_mask(q, k, patterns, scale=scale), scale or 1 / math.sqrt(D))
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2, (D, scale)


@pytest.mark.parametrize("kernel", ["triton", "hopper"])
def test_log_sum_exp_stays_exact_over_many_strips(kernel):
    """The strip kernel's log-sum-exp of the last rows of a 32K prompt (about 480 strips each)
    against float64: a per-strip rounding in the rescale of the running sum (the scale applied to an
    unscaled row maximum) once drifted it by 1e-3 with the output unchanged."""
    from block_masks.build import column_flags
    from minference_flex.tools.bench_inputs import structured_qkv

    N = 32768
    q, k, v = structured_qkv(4, 1, N, 128, device="cuda")
    if kernel == "hopper" and not hopper_strips.supported(q, k, v):
        pytest.skip("the Hopper strip kernel needs a compute-capability 9.x GPU and Triton with Gluon")
    plan = mf.plan_attention(q, k, [["vertical_and_slash", 1000, 6096]] * 4, strip_kernel=kernel)
    _, lse = strip_attention(q, k, v, plan.strips, plan.scale, plan.strip_backend, plan.segments)
    sel = plan.selection
    rows = torch.arange(N - 64, N, device="cuda")
    keys = torch.arange(N, device="cuda")
    offset = rows[:, None] - keys[None, :]
    flags = column_flags(sel.columns, N)[0]
    for h in range(4):
        kept = (offset >= 0) & (sel.offsets[0, h][offset.clamp(min=0)] | flags[h][None, :] | (keys < sel.sink[h]))
        logits = (q[0, h, rows].double() @ k[0, 0].double().T) * plan.scale
        ref = logits.masked_fill(~kept, float("-inf")).logsumexp(-1)
        assert (lse[0, h, rows].double() - ref).abs().max().item() < 1e-4
