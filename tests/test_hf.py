"""The transformers backend (attn_implementation="minference_flex") on tiny random-weight models.

The sparse path runs the eager emulation (``make`` configures ``compiled=False``): the compiled CPU
kernel compiles once per prompt length.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import minference_flex as mf
import minference_flex.hf as mf_hf
from minference_flex.cost import H100, CostModel, choose, plan_tiles, tile_bounds

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(head_dim=16, **TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **TINY),
    "mistral": lambda: transformers.MistralConfig(head_dim=16, **TINY),
    "phi3": lambda: transformers.Phi3Config(**TINY),
}
PATTERN_TYPES = {
    "vertical_and_slash": ["vertical_and_slash", 8, 16],
    "stream_llm": ["stream_llm", 4, 16],
    "block_sparse": ["block_sparse", 1, 0],
    "block_mass": ["block_mass", 500, 4],
    "antidiagonal_mass": ["antidiagonal_mass", 500, 8],
    "vertical_slash_mass": ["vertical_slash_mass", 900, 64],
    "dense": ["dense", 0, 0],
}


def make(arch: str = "llama", attn: str = "minference_flex", seed: int = 0):
    """A tiny model in eval mode (a config of its own: from_config does not copy it), set to run the
    kernel's eager emulation."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=attn, dtype=torch.float32).eval()
    if attn == "minference_flex":
        mf.configure(model, compiled=False)
    return model


def reference(model):
    """The same weights under attn_implementation="sdpa"."""
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa",
                                           dtype=torch.float32).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


# --------------------------------------------------------------------------- registration / loading

def test_registered():
    assert "minference_flex" in transformers.AttentionInterface._global_mapping
    assert "minference_flex" in AttentionMaskInterface._global_mapping


@torch.no_grad()
def test_from_pretrained_and_set_attn_implementation(tmp_path):
    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16)
    x = ids(80)
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="minference_flex").eval()
    assert loaded.config._attn_implementation == "minference_flex"
    assert mf.get_patterns(loaded) == mf.get_patterns(model)  # the configuration travels in config.json
    torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=0)

    switched = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    dense = switched(x).logits
    switched.set_attn_implementation("minference_flex")
    assert switched.config._attn_implementation == "minference_flex"
    torch.testing.assert_close(switched(x).logits, expected, atol=1e-5, rtol=0)
    assert (dense - expected).abs().max() > 1e-3


# --------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_matches_sdpa_when_budgets_cover_the_prompt(arch):
    model = make(arch)
    n = 300
    heads = [["vertical_and_slash", 1000, 6096], ["stream_llm", n, n], ["block_sparse", 5, 0], ["dense", 0, 0]]
    mf.set_patterns(model, [{str(h): p for h, p in enumerate(heads)}] * 2, min_sparse_len=16)
    x = ids(n)
    torch.testing.assert_close(model(x).logits, reference(model)(x).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_small_budgets_change_the_logits():
    model = make()
    x = ids(300)
    dense = reference(model)(x).logits
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16)
    assert (model(x).logits - dense).abs().max() > 1e-2
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=301)  # shorter prompts run dense
    torch.testing.assert_close(model(x).logits, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("nq", [1, 64])
@torch.no_grad()
def test_short_calls_are_transformers_sdpa_bit_for_bit(nq):
    """A prefill below min_sparse_len (the backend's fast path) and a decoding step return exactly
    what transformers' sdpa function returns for the same call (same kernel, same output layout)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = make()
    mf.set_patterns(model, ["vertical_and_slash", 8, 16], min_sparse_len=65)
    module = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(0)
    # as the model hands them over: [B, S, H, D] projections viewed as [B, H, S, D]
    q = torch.randn(2, nq, 4, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 64, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    ours, _ = mf_hf.minference_flex_attention(module, q, k, v, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert ours.shape == (2, nq, 4, 16) and ours.is_contiguous()
    assert torch.equal(ours, theirs)


def _padded(seqs, side):
    n = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        input_ids[i, sl] = s
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", sorted(PATTERN_TYPES))
@torch.no_grad()
def test_padding_invariance(kind, side):
    model = make()
    # 150 <= min_sparse_len: the short sequence runs dense alone and in the batch alike
    mf.set_patterns(model, PATTERN_TYPES[kind], min_sparse_len=160)
    seqs = [ids(230, seed=2)[0], ids(150, seed=3)[0]]
    input_ids, mask, position_ids = _padded(seqs, side)
    logits = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
    n = input_ids.shape[1]
    for i, s in enumerate(seqs):
        alone = model(s[None]).logits[0, -1]
        last = n - 1 if side == "left" else len(s) - 1
        torch.testing.assert_close(logits[i, last], alone, atol=1e-4, rtol=0)
    if kind != "dense":  # the long sequence did run sparse
        assert (model(seqs[0][None]).logits[0, -1] - reference(model)(seqs[0][None]).logits[0, -1]).abs().max() > 1e-4


@torch.no_grad()
def test_generate_with_left_padding():
    model = make("qwen2")
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=32)
    seqs = [ids(120, seed=4)[0], ids(70, seed=5)[0]]
    input_ids, mask, _ = _padded(seqs, "left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids, attention_mask=mask, **kw)[:, input_ids.shape[1]:]
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
        assert batched[i].tolist() == alone[0, len(s):].tolist()


@pytest.mark.parametrize("pattern", [["stream_llm", 4, 16], ["dense", 0, 0]])
@torch.no_grad()
def test_chunked_prefill_on_a_cache(pattern):
    model = make("mistral")
    mf.set_patterns(model, pattern, min_sparse_len=16)
    x = ids(260)
    one_shot = model(x).logits[:, -1]
    cache = DynamicCache(config=model.config)
    # past_key_values: the name every transformers 5.x takes (5.24 renames it cache and keeps the
    # alias; 5.17 silently ignored cache=, and the second chunk ran with no history).
    model(x[:, :170], past_key_values=cache, use_cache=True)
    chunked = model(x[:, 170:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert cache.get_seq_length() == 260
    torch.testing.assert_close(chunked, one_shot, atol=1e-4, rtol=0)


def test_training_dropout_is_rejected():
    model = make()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="inference only"):
        model(ids(20))


# --------------------------------------------------------------------------- configuration

def test_default_configuration():
    model = make(attn="sdpa")  # not configured
    layers = mf.get_patterns(model)
    assert layers == [{str(h): mf.DEFAULT_PATTERN.to_list() for h in range(4)}] * 2
    layer = mf_hf._layer_config(model.model.layers[0].self_attn)
    assert layer[:6] == (None, mf.DEFAULT_MIN_SPARSE_LEN, True, True, H100, ("cuda",))


def test_set_patterns_sources(tmp_path):
    model = make()
    attn = model.model.layers[1].self_attn
    mf.set_patterns(model, ["a_shape", 4, 16, 0.5], min_sparse_len=99)
    assert mf.get_patterns(model) == [{str(h): ["stream_llm", 4, 16, 0.5] for h in range(4)}] * 2
    assert mf_hf._layer_config(attn)[:3] == ((mf.Pattern("stream_llm", 4, 16),) * 4, 99, True)
    mf.set_patterns(model, mf.Pattern("dense"), sdpa_fallback=False)
    assert mf_hf._layer_config(attn)[:3] == ((mf.Pattern("dense"),) * 4, mf.DEFAULT_MIN_SPARSE_LEN, False)

    layers = [{"0": ["stream_llm", 4, 16, 0.9]}, {"3": ["block_sparse", 2, 0, 0.25], 1: ["dense", 0, 0]}]
    mf.set_patterns(model, layers)
    got = mf.get_patterns(model)
    assert got[0]["0"] == ["stream_llm", 4, 16, 0.9]
    assert got[0]["1"] == got[0]["2"] == got[0]["3"] == mf.DEFAULT_PATTERN.to_list()
    assert got[1] == {"0": mf.DEFAULT_PATTERN.to_list(), "1": ["dense", 0, 0, 0.0], "2": mf.DEFAULT_PATTERN.to_list(),
                      "3": ["block_sparse", 2, 0, 0.25]}
    assert mf_hf._layer_config(attn)[0][3] == mf.Pattern("block_sparse", 2, 0)

    path = tmp_path / "patterns.json"
    path.write_text(json.dumps(layers))
    mf.set_patterns(model, path)
    assert mf.get_patterns(model) == got
    mf.set_patterns(model, str(path))
    assert mf.get_patterns(model) == got


def test_save_round_trip(tmp_path):
    model = make()
    layers = [{str(h): ["vertical_and_slash", 100 + h, 200, 0.125 * h] for h in range(4)},
              {"2": ["stream_llm", 64, 512, 0.75]}]
    mf.set_patterns(model, layers)
    first = tmp_path / "a.json"
    mf.save_patterns(model, first)
    mf.set_patterns(model, first)
    second = tmp_path / "b.json"
    mf.save_patterns(model, second)
    assert first.read_text() == second.read_text()
    assert json.loads(first.read_text())[1]["2"] == ["stream_llm", 64, 512, 0.75]


def test_set_patterns_errors():
    model = make()
    with pytest.raises(ValueError, match=r"3 layers.*2 layers"):
        mf.set_patterns(model, [{}] * 3)
    with pytest.raises(ValueError, match=r"head 4.*4 attention heads"):
        mf.set_patterns(model, [{"4": ["dense", 0, 0]}, {}])
    with pytest.raises(ValueError, match="unknown pattern type"):
        mf.set_patterns(model, [{"0": ["nope", 0, 0]}, {}])
    with pytest.raises(ValueError, match="min_sparse_len"):
        mf.set_patterns(model, ["dense", 0, 0], min_sparse_len=0)
    with pytest.raises(ValueError, match="sdpa_fallback"):
        mf.set_patterns(model, ["dense", 0, 0], sdpa_fallback=1)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the compiled CPU FlexAttention kernel needs AVX2")
@torch.no_grad()
def test_compiled_kernel_matches_eager(monkeypatch):
    model = make()
    heads = [["stream_llm", 4, 16], ["vertical_and_slash", 8, 16], ["block_sparse", 1, 0], ["dense", 0, 0]]
    mf.set_patterns(model, [{str(h): p for h, p in enumerate(heads)}] * 2, min_sparse_len=16)
    x = ids(100)  # one prompt length: one compile
    eager = model(x).logits
    mf.configure(model, compiled=True)
    torch.testing.assert_close(model(x).logits, eager, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- SDPA fallback

# Cost models that decide one way for any call (times in ms): SDPA costs 1000.
SDPA_ALWAYS_FASTER = CostModel(sdpa_fixed_ms=1000.0, sdpa_cell_ms=0.0, plan_fixed_ms=1e6, plan_token_ms=0.0,
                               strip_tile_ms=0.0, flex_tile_ms=0.0, mass_cell_ms=0.0)
SPARSE_ALWAYS_FASTER = CostModel(sdpa_fixed_ms=1000.0, sdpa_cell_ms=0.0, plan_fixed_ms=0.0, plan_token_ms=0.0,
                                 strip_tile_ms=0.0, flex_tile_ms=0.0, mass_cell_ms=0.0)


def checking(flex_tile_ms: float) -> CostModel:
    """A model whose every decision is a check (strips could cost anything, planning is cheap), and
    whose check compares ``flex_tile_ms`` times the plan's tiles (all FlexAttention tiles on CPU)
    with SDPA's 1000."""
    return CostModel(sdpa_fixed_ms=1000.0, sdpa_cell_ms=0.0, plan_fixed_ms=1.0, plan_token_ms=0.0,
                     strip_tile_ms=1e9, flex_tile_ms=flex_tile_ms, mass_cell_ms=0.0)


def fallback_on_cpu(model, cost):
    """Apply ``cost`` on CPU too (the cost model is calibrated for CUDA only) and count from zero."""
    mf.configure(model, cost_model=cost, fallback_devices=["cuda", "cpu"])
    mf.clear_dispatch_counts(model)
    return model


FALLBACK_PATTERNS = [["stream_llm", 4, 16], ["vertical_and_slash", 8, 16], ["block_sparse", 1, 0], ["dense", 0, 0]]


def layer_call(model, n: int = 200, seed: int = 0):
    """One attention call of layer 1 on random q/k/v: (backend output [1, Hq, n, D], sdpa, sparse)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, 16, generator=g)
    k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    out, _ = mf_hf.minference_flex_attention(model.model.layers[1].self_attn, q, k, v, None, scaling=0.3)
    patterns = [mf.Pattern.parse(p) for p in FALLBACK_PATTERNS]
    sparse = mf.sparse_attention(q, k, v, patterns, scale=0.3, compiled=False)
    return out.transpose(1, 2), mf_hf._sdpa(q, k, v, None, 0.3), sparse


def fallback_model(sdpa_fallback: bool = True):
    model = make()
    mf.set_patterns(model, [{str(h): p for h, p in enumerate(FALLBACK_PATTERNS)}] * 2, min_sparse_len=16,
                    sdpa_fallback=sdpa_fallback)
    return model


@torch.no_grad()
def test_fallback_runs_sdpa_when_the_model_says_so():
    model = fallback_on_cpu(fallback_model(), SDPA_ALWAYS_FASTER)
    out, sdpa, sparse = layer_call(model)
    assert torch.equal(out, sdpa)
    assert not torch.allclose(sdpa, sparse, atol=1e-3)  # the two sides differ: the test can tell
    assert mf.dispatch_counts(model) == {"sdpa": 1}


@torch.no_grad()
def test_fallback_runs_sparse_when_the_model_says_so():
    model = fallback_on_cpu(fallback_model(), SPARSE_ALWAYS_FASTER)
    out, _, sparse = layer_call(model)
    assert torch.equal(out, sparse)
    assert mf.dispatch_counts(model) == {"sparse": 1}


@torch.no_grad()
def test_check_plans_and_picks_by_the_tile_count():
    """The tiles of these patterns at 200 tokens do not depend on the data (the vertical-slash head
    keeps its forced columns and offsets only), so a model can put SDPA's time just above or below
    the plan's predicted kernel time."""
    model = fallback_model()
    patterns = [mf.Pattern.parse(p) for p in FALLBACK_PATTERNS]
    plan = mf_hf.kernel_plan(torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16), patterns, compiled=False)
    tiles = float(sum(plan_tiles(plan)))
    assert tile_bounds(1, 200, 200, patterns).low < 0.9 * tiles
    for factor, expected in [(0.9, "check-sparse"), (1.1, "check-sdpa")]:
        cost = checking(factor * 1000 / tiles / CostModel.min_dim_factor)  # head dim 16: the smallest factor
        assert choose(cost, 1, 200, 200, 16, patterns) == "check"
        fallback_on_cpu(model, cost)
        out, sdpa, sparse = layer_call(model)
        assert torch.equal(out, sparse if expected == "check-sparse" else sdpa), expected
        assert mf.dispatch_counts(model) == {expected: 1}


@torch.no_grad()
def test_fallback_off_always_runs_sparse():
    model = fallback_on_cpu(fallback_model(sdpa_fallback=False), SDPA_ALWAYS_FASTER)
    out, _, sparse = layer_call(model)
    assert torch.equal(out, sparse)
    assert mf.dispatch_counts(model) == {"sparse": 1}


@torch.no_grad()
def test_fallback_in_a_whole_model():
    """Small budgets change the logits; with an SDPA decision in every layer the model gives the dense
    logits back, padded batch included (each sequence decides alone), and short prompts stay dense."""
    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16)
    x = ids(300)
    dense = reference(model)(x).logits
    fallback_on_cpu(model, SDPA_ALWAYS_FASTER)
    torch.testing.assert_close(model(x).logits, dense, atol=1e-5, rtol=0)
    assert mf.dispatch_counts(model) == {"sdpa": 2}
    input_ids, mask, position_ids = _padded([ids(230, seed=2)[0], ids(150, seed=3)[0]], "left")
    padded = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
    expected = reference(model)(input_ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(padded[:, -1], expected[:, -1], atol=1e-5, rtol=0)
    assert mf.dispatch_counts(model) == {"sdpa": 2 + 2 * 2}
    fallback_on_cpu(model, SPARSE_ALWAYS_FASTER)
    assert (model(x).logits - dense).abs().max() > 1e-2
    assert mf.dispatch_counts(model)["sparse"] == 2


@torch.no_grad()
def test_fallback_is_off_on_cpu_by_default():
    model = fallback_model()
    assert mf.settings(model) == {"compiled": False, "cost_model": "H100", "fallback_devices": ["cuda"]}
    assert mf_hf._layer_config(model.model.layers[1].self_attn).cost is H100
    out, _, sparse = layer_call(model)
    assert torch.equal(out, sparse)
    assert mf.dispatch_counts(model) == {"sparse": 1}


@torch.no_grad()
def test_settings_are_per_model_and_json(tmp_path):
    """One model's settings and counts leave another's alone; a CostModel is stored by its fields."""
    a, b = fallback_model(), fallback_model()
    fallback_on_cpu(a, SDPA_ALWAYS_FASTER)
    assert mf.settings(b)["fallback_devices"] == ["cuda"]
    layer_call(a), layer_call(b)
    assert mf.dispatch_counts(a) == {"sdpa": 1} and mf.dispatch_counts(b) == {"sparse": 1}
    stored = json.loads(json.dumps(a.config.minference_flex))
    assert stored["cost_model"]["sdpa_fixed_ms"] == 1000.0 and stored["fallback_devices"] == ["cuda", "cpu"]
    a.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="minference_flex").eval()
    assert mf.settings(loaded) == mf.settings(a)
    assert mf_hf._layer_config(loaded.model.layers[1].self_attn).cost == SDPA_ALWAYS_FASTER
    with pytest.raises(ValueError, match="unknown cost model"):
        mf.configure(a, cost_model="A100")


def test_sdpa_fallback_round_trips(tmp_path):
    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16, sdpa_fallback=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="minference_flex")
    assert loaded.config.minference_flex["sdpa_fallback"] is False
    assert mf_hf._layer_config(loaded.model.layers[0].self_attn).sdpa_fallback is False
    del loaded.config.minference_flex["sdpa_fallback"]  # stored before the switch existed: on
    assert mf_hf._layer_config(loaded.model.layers[0].self_attn).sdpa_fallback is True


def test_accuracy_tools_measure_the_sparse_kernel():
    """eval and demo switch sides with use_side: the fallback off (they measure the patterns); ttft
    asks for it on."""
    from minference_flex.tools.sides import use_side

    model = make()
    assert use_side(model, "sparse", ["stream_llm", 4, 16], 16) == "minference_flex"
    assert mf_hf._layer_config(model.model.layers[0].self_attn).sdpa_fallback is False
    use_side(model, "sparse", ["stream_llm", 4, 16], 16, sdpa_fallback=True)
    assert mf_hf._layer_config(model.model.layers[0].self_attn).sdpa_fallback is True
    # Switching back and forth keeps the stored configuration (and the modules' parsed copies) when
    # nothing changes; a change is stored.
    stored = model.config.minference_flex
    assert use_side(model, "dense", None, 16) == "sdpa"
    use_side(model, "sparse", ["stream_llm", 4, 16], 16, sdpa_fallback=True)
    assert model.config.minference_flex is stored
    use_side(model, "sparse", ["stream_llm", 4, 32], 16, sdpa_fallback=True)
    assert mf_hf._layer_config(model.model.layers[0].self_attn).patterns[0] == mf.Pattern("stream_llm", 4, 32)
    mf.set_patterns(model, ["dense", 0, 0])  # configured elsewhere in between: use_side stores its own again
    use_side(model, "sparse", ["stream_llm", 4, 32], 16, sdpa_fallback=True)
    assert mf_hf._layer_config(model.model.layers[0].self_attn).patterns[0] == mf.Pattern("stream_llm", 4, 32)


def test_layer_configuration_follows_the_stored_configuration():
    """A module keeps its parsed layer configuration between calls, and sees every change made
    through set_patterns or to the stored values."""
    model = make()
    module = model.model.layers[1].self_attn
    mf.set_patterns(model, ["a_shape", 64, 128], min_sparse_len=64)
    first = mf_hf._layer_config(module)
    assert first.patterns[0] == mf.Pattern("a_shape", 64, 128) and first.min_sparse_len == 64
    assert mf_hf._layer_config(module) is first
    model.config.minference_flex["min_sparse_len"] = 128
    model.config.minference_flex["sdpa_fallback"] = False
    changed = mf_hf._layer_config(module)
    assert (changed.min_sparse_len, changed.sdpa_fallback, changed.patterns) == (128, False, first.patterns)
    mf.set_patterns(model, ["vertical_and_slash", 10, 20], min_sparse_len=128)
    assert mf_hf._layer_config(module).patterns[0] == mf.Pattern("vertical_and_slash", 10, 20)
