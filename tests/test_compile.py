"""mf.sparse_attention inside an outer torch.compile: one graph per model, whatever the layers' patterns.

- a transformers model (attn_implementation="minference_flex") with different per-head budgets in
  every layer traces its unpadded prefill into one graph, without a graph break, with one
  FlexAttention call per layer;
- the number of graphs does not grow with the number of layers (no recompile per layer), only with
  the prompt length (``dynamic=False``);
- the example's own decoder (examples/custom_model_compile.py), compiled with inductor and
  ``fullgraph=True``, matches a float64 softmax over ``mf.token_mask``'s cells.

Graph counting uses a backend that counts the graphs dynamo hands it and runs them eagerly (eager
flex_attention ignores the tile lists, so those runs are for counting only, not for numbers).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, DynamicCache

import minference_flex as mf

CAPABLE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model_compile.py"

# Dynamo traces through the lru_cache of the per-head tables (block_masks.estimate.head_tables) and
# says so; tracing it is what we want: the tables become constants of the graph.
pytestmark = [pytest.mark.filterwarnings("ignore:.*functools.lru_cache.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")]

KINDS = [["vertical_and_slash", 30, 100], ["stream_llm", 4, 16], ["block_sparse", 1, 0], ["dense", 0, 0]]


class GraphCounter:
    """A torch.compile backend: keeps the FX graphs dynamo produces and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def flex_calls(self, i: int = -1) -> int:
        return sum(n.op == "call_function" and "flex_attention" in str(n.target) for n in self.graphs[i].graph.nodes)


def tiny_llama(layers: int):
    """A random tiny Llama whose every layer has patterns of its own (kinds rotated over the heads,
    budgets growing with the layer)."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="minference_flex", dtype=torch.float32).eval()
    per_layer = []
    for layer in range(layers):
        heads = {}
        for h in range(4):
            kind, a, b = KINDS[(h + layer) % 4]
            heads[str(h)] = [kind, a + 8 * layer, b + 16 * layer]
        per_layer.append(heads)
    mf.set_patterns(model, per_layer, min_sparse_len=64)
    assert len({str(sorted(p.items())) for p in mf.get_patterns(model)}) == layers  # all layers differ
    return model


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@torch.no_grad()
def test_transformers_prefill_is_one_graph_without_break(cache):
    """fullgraph=True raises on any graph break; the graph holds one FlexAttention call per layer.

    With a cache, it is made outside the compiled call: a DynamicCache created inside makes dynamo
    (torch 2.13) give up on the model's frame and compile each decoder layer on its own (see
    docs/transformers.md)."""
    model = tiny_llama(3)
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    kwargs = {"past_key_values": DynamicCache(config=model.config)} if cache else {}
    out = compiled(ids(128), use_cache=cache, **kwargs)
    assert out.logits.shape == (1, 128, 128)
    assert len(backend.graphs) == 1
    assert backend.flex_calls() == 3      # every layer ran the sparse path (folded plan: one kernel each)
    assert not counters["graph_break"]
    if cache:
        assert kwargs["past_key_values"].get_seq_length() == 128


@torch.no_grad()
def test_graph_count_does_not_grow_with_layers():
    """One graph per prompt length, for one layer as for four layers with four different pattern
    sets; calling again with the same length reuses it (no recompile)."""
    for layers in (1, 4):
        torch._dynamo.reset()
        backend = GraphCounter()
        model = tiny_llama(layers)
        compiled = torch.compile(model, backend=backend, dynamic=False)
        compiled(ids(128), use_cache=False)
        compiled(ids(128, seed=2), use_cache=False)
        assert len(backend.graphs) == 1, (layers, len(backend.graphs))
        assert backend.flex_calls() == layers
        compiled(ids(192), use_cache=False)          # a new length: one more graph, not one per layer
        assert len(backend.graphs) == 2, (layers, len(backend.graphs))
        assert not counters["graph_break"]
        mf.set_patterns(model, ["stream_llm", 8, 32], min_sparse_len=64)
        compiled(ids(128), use_cache=False)          # new patterns are seen (guarded), not stale
        assert len(backend.graphs) == 3, (layers, len(backend.graphs))


@pytest.mark.parametrize("decision", ["check", "sdpa"])
@torch.no_grad()
def test_sdpa_fallback_under_compile(decision):
    """With the cost model applied (on CPU here, for the test), its decisions are Python constants of
    the graph: a "check" runs sparse without the host sync (no graph break), an "sdpa" decision puts
    no FlexAttention call in the graph; nothing is counted while tracing."""
    from minference_flex.cost import CostModel

    plan_ms = 1.0 if decision == "check" else 1e6   # planning over 5% of SDPA's time: "sdpa"
    cost = CostModel(sdpa_fixed_ms=1000.0, sdpa_cell_ms=0.0, plan_fixed_ms=plan_ms, plan_token_ms=0.0,
                     strip_tile_ms=1e9, flex_tile_ms=0.0, mass_cell_ms=0.0)
    model = tiny_llama(3)
    mf.configure(model, cost_model=cost, fallback_devices=["cuda", "cpu"])
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    compiled(ids(128), use_cache=False)
    assert len(backend.graphs) == 1 and not counters["graph_break"]
    assert backend.flex_calls() == (3 if decision == "check" else 0)
    assert not mf.dispatch_counts(model)


def _example():
    """examples/custom_model_compile.py as a module (examples/ is no package)."""
    name = "custom_model_compile"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclass looks its module up while being defined
        spec.loader.exec_module(module)
    return sys.modules[name]


# Per-layer patterns whose selection has no near-ties (no float rounding between the compiled and
# the eager estimation can change it): vertical_and_slash at its forced minimum (columns 0..29,
# offsets 0..99), block_sparse keeping only the diagonal block or every causal block, A-shape, dense.
TIE_FREE = [
    [["vertical_and_slash", 30, 100], ["stream_llm", 16, 64], ["block_sparse", 1, 0], ["dense", 0, 0],
     ["stream_llm", 0, 1], ["vertical_and_slash", 0, 0], mf.Pattern("block_sparse", 1, block_size=128),
     ["stream_llm", 100, 30]],
    [["block_sparse", 99, 0], ["stream_llm", 4, 200], ["vertical_and_slash", 30, 100], ["dense", 0, 0],
     mf.Pattern("block_sparse", 99, block_size=128), ["stream_llm", 64, 64], ["block_sparse", 1, 0],
     ["vertical_and_slash", 30, 100]],
]


def _check_example(device: str, dtype: torch.dtype, length: int, tol: float):
    ex = _example()
    torch.manual_seed(0)
    cfg = ex.Config(vocab_size=256, dim=256, head_dim=32, hidden=512)
    model = ex.Decoder(cfg, TIE_FREE).to(device, dtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, length), device=device)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    # No inductor cache: the lowering itself (and minference_flex's fix of the CPU one) must run.
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(tokens)
        ref = model(tokens, attend=ex.reference)
        emu = model(tokens, attend=ex.emulated)
    scale = ref.double().abs().max().item()
    for other in (ref, emu):
        err = (out.double() - other.double()).abs().max().item()
        assert err <= tol * scale, (err, scale)


@pytest.mark.skipif(not CAPABLE, reason="the compiled CPU FlexAttention kernel needs AVX2")
def test_example_model_compiled_on_cpu_matches_reference():
    """One inductor compile (~40 s on 2 cores) of a two-layer decoder with a fused qkv projection
    and RoPE: the value is a view at a storage offset into the projection and the masks' per-head
    tables are computed in the graph, the two cases torch 2.13's CPU lowering got wrong."""
    _check_example("cpu", torch.float32, 320, 1e-5)


@pytest.mark.gpu
def test_example_model_compiled_on_cuda_matches_reference():
    _check_example("cuda", torch.float32, 1024, 1e-3)


def _compile_dynamic_over_lengths(patterns) -> int:
    """Runs ``mf.sparse_attention`` under ``torch.compile(dynamic=True)`` at three lengths, each
    checked against the uncompiled call; returns the graphs dynamo made."""
    counters.clear()
    attend = torch.compile(lambda q, k, v: mf.sparse_attention(q, k, v, patterns), dynamic=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (4096, 5000, 8192):
        q = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = torch.randn(2, 1, 2, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        torch.testing.assert_close(attend(q, k, v), mf.sparse_attention(q, k, v, patterns), atol=2e-2, rtol=2e-2)
    return counters["stats"]["unique_graphs"]


def test_plan_traced_with_dynamic_shapes_is_one_graph():
    """The plan of a ``sparse_attention`` call (its pattern check, the traced scale, the strip layout
    and the Hopper backend's segments) under ``torch.compile(dynamic=True)``: dynamo makes the closure's
    budgets and the head dim symbolic, and a check that reads them in Python (``getattr``,
    ``math.isfinite``, shifts by a traced width) breaks the graph. One graph for three lengths, the
    same layout as eager."""
    from block_masks import strip_segments
    from minference_flex.attention import _check

    patterns = [["vertical_and_slash", 100, 300]] * 4

    def plan(q, k, v):
        _, scale = _check(q, k, v, patterns, None)
        layout = mf.plan_attention(q, k, patterns, scale=scale, strips=True, fold_columns=False,
                                   full_width=False).strips
        segments = strip_segments(layout)
        return layout.sigma, layout.words, segments.tops, segments.words, segments.counts

    traced = torch.compile(plan, dynamic=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    for n in (640, 700, 1024):
        q = torch.randn(1, 4, n, 64, generator=g)
        k, v = torch.randn(2, 1, 2, n, 64, generator=g)
        for got, want in zip(traced(q, k, v), plan(q, k, v)):
            assert torch.equal(got, want)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
def test_user_compile_with_dynamic_shapes_on_cuda():
    """A user's ``torch.compile(dynamic=True)`` around ``mf.sparse_attention`` with vertical-slash
    heads (the strip kernel and the Triton estimation, no FlexAttention call): one graph for all
    lengths."""
    assert _compile_dynamic_over_lengths([["vertical_and_slash", 100, 300]] * 8) == 1


@pytest.mark.gpu
def test_user_compile_with_dynamic_shapes_and_block_sparse_heads_on_cuda():
    """Block-sparse heads add a FlexAttention call traced with a symbolic length: the results are
    right at every length (dynamo still breaks the graph there: 8 graphs for 3 lengths on torch 2.11,
    docs/performance.md)."""
    _compile_dynamic_over_lengths([["vertical_and_slash", 100, 300]] * 4 + [["block_sparse", 8, 0]] * 2
                                  + [["a_shape", 64, 256]] * 2)
