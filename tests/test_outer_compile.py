"""Uniform configurations of every pattern kind inside an outer ``torch.compile`` (inductor), against
float64 under ``mf.token_mask``: the masks are then built in the same graph as the kernel, which is
where the CPU lowering once lost the kept diagonals of ``vertical_and_slash`` heads.

One graph computes every configuration (one compile); the inductor caches are off for it, so that
a kernel compiled by older code can never stand in for the one under test.
"""
from __future__ import annotations

import pytest
import torch

import minference_flex as mf
from minference_flex.tools.bench_inputs import structured_qkv
from tests.naive import reference_attention

CAPABLE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

pytestmark = [pytest.mark.filterwarnings("ignore:.*functools.lru_cache.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")]

#: One entry for every head of a call, every kind; the second vertical_and_slash row has two budgets.
UNIFORM = {
    "vertical_and_slash": [["vertical_and_slash", 30, 100]] * 4,
    "vertical_and_slash, two budgets": [["vertical_and_slash", 30, 100]] * 3 + [["vertical_and_slash", 40, 100]],
    "stream_llm": [["stream_llm", 16, 64]] * 4,
    "block_sparse": [["block_sparse", 2, 0]] * 4,
    "block_mass": [["block_mass", 900, 8]] * 4,
    "antidiagonal_mass": [["antidiagonal_mass", 900, 8]] * 4,
    "dense": [["dense", 0, 0]] * 4,
}


def _outer_compile_errors(device: str, n: int = 256) -> dict[str, float]:
    q, k, v = structured_qkv(4, 2, n, 64, device=device)
    configs = list(UNIFORM.values())

    def every_config(q, k, v):
        return [mf.sparse_attention(q, k, v, p) for p in configs]

    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        outs = torch.compile(every_config, dynamic=False)(q, k, v)
    errors = {}
    for name, p, out in zip(UNIFORM, configs, outs):
        ref = reference_attention(q, k, v, mf.token_mask(q, k, p))
        errors[name] = (out.double() - ref.to(out.device)).abs().max().item()
    return errors


@pytest.mark.slow
@pytest.mark.skipif(not CAPABLE, reason="the compiled CPU kernel needs AVX2")
def test_uniform_configurations_under_outer_compile_on_cpu():
    errors = _outer_compile_errors("cpu")
    assert all(e < 3e-2 for e in errors.values()), errors


@pytest.mark.gpu
def test_uniform_configurations_under_outer_compile_on_cuda():
    errors = _outer_compile_errors("cuda")
    assert all(e < 3e-2 for e in errors.values()), errors


@pytest.mark.slow
@pytest.mark.skipif(not CAPABLE, reason="the compiled CPU kernel needs AVX2")
def test_compiled_transformers_model_with_one_vertical_and_slash_entry():
    """``torch.compile(model)`` as docs/transformers.md shows it, every head ``vertical_and_slash``:
    the logits of the compiled prefill equal those of the kernel's eager emulation."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="minference_flex").eval()
    mf.set_patterns(model, ["vertical_and_slash", 30, 100], min_sparse_len=128)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        with torch._inductor.config.patch(force_disable_caches=True):
            compiled = torch.compile(model, dynamic=False)(ids, use_cache=False).logits
        mf.configure(model, compiled=False)
        eager = model(ids, use_cache=False).logits
    assert (compiled - eager).abs().max().item() < 1e-3
