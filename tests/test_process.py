"""The process as a whole: compiled and eager calls mixed, with calls that fail in between, must each
give what the float64 reference gives under ``mf.token_mask``, and one failed call must change no
later one.

- a call that needs gradients raises a clear ValueError before touching any compiled state (on CPU it
  once raised inside the compile, after which dynamo skipped the compiled function for good and every
  later call ran eager ``flex_attention``, which ignores the tile lists: wrong block-sparse results);
- a compile that raises anyway moves the kernel on to a fresh compiled function;
- a stateful property test runs random sequences of such calls in one process.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import minference_flex as mf
from minference_flex.kernels.flex import flex
from tests.naive import reference_attention
from tests.strategies import examples

CAPABLE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
BLOCKS = [["block_sparse", 2, 0]] * 4


def _qkv(n: int = 256, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, n, 64, generator=g).to(dtype) for h in (4, 2, 2))


def _error(out, q, k, v, patterns) -> float:
    ref = reference_attention(q, k, v, mf.token_mask(q, k, patterns))
    return (out.double() - ref).abs().max().item()


def test_call_with_grad_raises_value_error_before_any_kernel():
    q, k, v = _qkv()
    for compiled in (True, False):
        with torch.enable_grad(), pytest.raises(ValueError, match="inference only"):
            mf.sparse_attention(q.clone().requires_grad_(), k, v, BLOCKS, compiled=compiled)
        plan = mf.plan_attention(q, k, BLOCKS)
        with torch.enable_grad(), pytest.raises(ValueError, match="inference only"):
            mf.run_plan(plan, q, k, v.clone().requires_grad_(), compiled=compiled)
    with torch.no_grad():  # no gradient needed: runs
        mf.sparse_attention(q.clone().requires_grad_(), k, v, BLOCKS, compiled=False)


@pytest.mark.skipif(not CAPABLE, reason="the compiled CPU kernel needs AVX2")
def test_failed_compile_does_not_poison_later_calls():
    """The kernel itself, called with an input that requires grad (the op refuses earlier), raises
    inside the compile on CPU; the next compiled calls must still compute the planned cells."""
    q, k, v = _qkv()
    with torch.no_grad():
        before = mf.sparse_attention(q, k, v, BLOCKS)
    assert _error(before, q, k, v, BLOCKS) < 1e-5
    plan = mf.plan_attention(q, k, BLOCKS)
    with torch.enable_grad(), pytest.raises(Exception):  # noqa: B017 - whatever the compiler raises
        flex(q.clone().requires_grad_(), k, v, plan.main, plan.scale, compiled=True, lse=False)
    with torch.no_grad():
        after = mf.sparse_attention(q, k, v, BLOCKS)
    assert _error(after, q, k, v, BLOCKS) < 1e-5
    with torch.enable_grad():  # grad mode on, no input requires grad
        after_with_grad_mode = mf.sparse_attention(q, k, v, BLOCKS)
    assert _error(after_with_grad_mode, q, k, v, BLOCKS) < 1e-5


# --------------------------------------------------------------------------- stateful

#: A few shapes only, so that the compiled CPU kernel (one compile per length) is built a few times.
LENGTHS = (128, 200)
PATTERN_SETS = (
    BLOCKS,
    [["vertical_and_slash", 30, 100]] * 4,
    [["vertical_and_slash", 40, 120], ["stream_llm", 4, 16], ["block_sparse", 1, 0], ["dense", 0, 0]],
    [["block_mass", 900, 8], ["block_sparse", 2, 0, 0.0, 128], ["antidiagonal_mass", 800, 4], ["vertical_and_slash", 30, 100]],
    [["vertical_slash_mass", 900, 0], ["vertical_and_slash", 30, 100], ["vertical_slash_mass", 500, 200],
     ["stream_llm", 8, 32]],
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


class CallSequence(RuleBasedStateMachine):
    """Random sequences of compiled and eager calls, calls with autograd on, and calls that fail."""

    @initialize()
    def start(self):
        self.calls = 0

    def _inputs(self, data, dtype=None):
        n = data.draw(st.sampled_from(LENGTHS), label="length")
        dtype = dtype or data.draw(st.sampled_from(list(TOL)), label="dtype")
        return _qkv(n, dtype, seed=data.draw(st.integers(0, 3), label="seed"))

    def _check(self, out, q, k, v, patterns):
        self.calls += 1
        assert out.shape == q.shape and out.dtype == q.dtype
        assert _error(out, q, k, v, patterns) < TOL[q.dtype] * 4

    @rule(data=st.data(), patterns=st.sampled_from(PATTERN_SETS))
    def compiled_call(self, data, patterns):
        if not CAPABLE:
            return
        q, k, v = self._inputs(data, torch.float32)  # one dtype: one CPU compile per length
        with torch.no_grad():
            self._check(mf.sparse_attention(q, k, v, patterns), q, k, v, patterns)

    @rule(data=st.data(), patterns=st.sampled_from(PATTERN_SETS), inference=st.booleans())
    def eager_call(self, data, patterns, inference):
        q, k, v = self._inputs(data)
        with torch.inference_mode(inference):
            self._check(mf.sparse_attention(q, k, v, patterns, compiled=False), q, k, v, patterns)

    @rule(data=st.data(), patterns=st.sampled_from(PATTERN_SETS), compiled=st.booleans())
    def call_needing_grad(self, data, patterns, compiled):
        q, k, v = self._inputs(data, torch.float32)
        with torch.enable_grad(), pytest.raises(ValueError, match="inference only"):
            mf.sparse_attention(q.requires_grad_(), k, v, patterns, compiled=compiled)

    @rule(data=st.data(), compiled=st.booleans())
    def failing_call(self, data, compiled):
        q, k, v = self._inputs(data, torch.float32)
        bad = data.draw(st.sampled_from(["unknown kind", "head count", "plan for another length"]), label="failure")
        with torch.no_grad(), pytest.raises(ValueError):
            if bad == "unknown kind":
                mf.sparse_attention(q, k, v, [["vertical", 1, 2]] * 4, compiled=compiled)
            elif bad == "head count":
                mf.sparse_attention(q, k, v, BLOCKS[:3], compiled=compiled)
            else:
                plan = mf.plan_attention(q[:, :, :64], k[:, :, :64], BLOCKS)
                mf.run_plan(plan, q, k, v, compiled=compiled)


@pytest.mark.slow
def test_call_sequences():
    run = settings(max_examples=examples(6), stateful_step_count=8, deadline=None)(CallSequence)
    run.TestCase().runTest()
