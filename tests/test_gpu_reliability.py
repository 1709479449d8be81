"""The reliability cases on CUDA, with the compiled kernels (strip kernels, FlexAttention, merge):
calls with autograd on mixed with compiled and failing calls, non-finite inputs, static caches,
attention masks with holes, gradients through the transformers backend. Run on a GPU: pytest -m gpu.
(The uniform configurations under an outer torch.compile: tests/test_outer_compile.py.)"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from tests.naive import reference_attention
from tests.strategies import examples, patterns
from tests.test_hf import ids, make, reference
from tests.test_hf_reliability import GREEDY, _holed_prompt
from tests.test_nonfinite import _forced, _poison, _reference

pytestmark = pytest.mark.gpu

MIX = [["vertical_and_slash", 40, 120], ["stream_llm", 4, 64], ["block_sparse", 2, 0], ["block_mass", 900, 8]]


def _qkv(n, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, h, n, 64, device="cuda", generator=g).to(dtype) for h in (4, 2, 2))


def _error(out, q, k, v, pats):
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), mf.token_mask(q, k, pats).cpu())
    return (out.double().cpu() - ref).abs().max().item()


def test_calls_mixed_with_grad_and_failures_on_cuda():
    for step in range(3):
        for n, pats in ((1000, MIX), (777, [["block_sparse", 2, 0]] * 4), (1500, [["vertical_and_slash", 30, 100]] * 4)):
            q, k, v = _qkv(n, seed=step)
            with torch.no_grad():
                assert _error(mf.sparse_attention(q, k, v, pats), q, k, v, pats) < 3e-2
            with pytest.raises(ValueError, match="inference only"):
                mf.sparse_attention(q.clone().requires_grad_(), k, v, pats)
            with pytest.raises(ValueError):
                mf.run_plan(mf.plan_attention(q[:, :, :64], k[:, :, :64], pats), q, k, v)
            with torch.no_grad():
                assert _error(mf.sparse_attention(q, k, v, pats, compiled=False), q, k, v, pats) < 3e-2
            assert _error(mf.sparse_attention(q, k, v, pats), q, k, v, pats) < 3e-2  # grad mode, no grad needed


@st.composite
def _cuda_cases(draw):
    """One geometry (4 query heads, 2 key heads, head dim 64), so that few kernels compile."""
    from tests.strategies import Case

    nk = draw(st.sampled_from([64, 100, 257, 700]))
    nq = draw(st.sampled_from([1, 64, nk]))
    return Case(draw(st.integers(1, 2)), 4, 2, nq, nk, 64, [draw(patterns(nk)) for _ in range(4)], None,
                draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=examples(30))
@given(case=_cuda_cases(), data=st.data())
def test_nonfinite_inputs_on_cuda(case, data):
    q, k, v = case.tensors(torch.float32)
    _poison(case, data, q, k)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    mask = mf.token_mask(q, k, case.patterns).cpu()
    assert mask[:, _forced(case)].all(), "a forced cell was dropped"
    with torch.no_grad():
        out = mf.sparse_attention(q, k, v, case.patterns).double().cpu()
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), mask, case)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "non-finite in other rows than dense under the mask"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, equal_nan=True)


def _cuda_model(entry, min_sparse_len):
    model = make().cuda()
    mf.set_patterns(model, entry, min_sparse_len=min_sparse_len, compiled=True)  # make() runs eager
    return model, reference(model).cuda()


@torch.no_grad()
def test_static_cache_generate_on_cuda():
    model, ref = _cuda_model(["vertical_and_slash", 1000, 6096], 16)
    x = ids(300).cuda()
    kw = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True, **GREEDY)
    mf.clear_dispatch_counts(model)
    ours = model.generate(x, cache_implementation="static", **kw)
    assert sum(mf.dispatch_counts(model).values()) == 2  # the prefill went through the sparse dispatch
    theirs = ref.generate(x, cache_implementation="static", **kw)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_holed_mask_generate_on_cuda(caplog):
    model, ref = _cuda_model(["stream_llm", 4, 16], 16)
    x = _holed_prompt(300).cuda()
    with caplog.at_level(logging.WARNING, logger="minference_flex"):
        ours = model.generate(x, max_new_tokens=6, **GREEDY)
    assert ours.tolist() == ref.generate(x, max_new_tokens=6, **GREEDY).tolist()


def test_gradients_through_the_backend_on_cuda():
    model, ref = _cuda_model(["stream_llm", 4, 16], 16)
    x = ids(300).cuda()
    with torch.no_grad():
        sparse = model(x).logits
    grads = []
    for m in (model, ref):
        embeds = m.get_input_embeddings()(x).detach().requires_grad_(True)
        m.zero_grad()
        m(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
        grads.append([embeds.grad] + [p.grad for p in m.parameters()])
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, sparse, atol=0, rtol=0)
