"""The transformers backend (attn_implementation="minference_flex") on tiny random-weight models.

The sparse path runs the eager emulation (``minference_flex.hf.COMPILED = False``): the compiled CPU
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
    "dense": ["dense", 0, 0],
}


@pytest.fixture(autouse=True)
def _eager_kernel(monkeypatch):
    monkeypatch.setattr(mf_hf, "COMPILED", False)


def make(arch: str = "llama", attn: str = "minference_flex", seed: int = 0):
    """A tiny model in eval mode (a config of its own: from_config does not copy it)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=attn, dtype=torch.float32).eval()


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
    model(x[:, :170], cache=cache, use_cache=True)
    chunked = model(x[:, 170:], cache=cache, use_cache=True).logits[:, -1]
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
    model = make()
    layers = mf.get_patterns(model)
    assert layers == [{str(h): mf.DEFAULT_PATTERN.to_list() for h in range(4)}] * 2
    assert mf_hf._layer_config(model.model.layers[0].self_attn) == (None, mf.DEFAULT_MIN_SPARSE_LEN)


def test_set_patterns_sources(tmp_path):
    model = make()
    attn = model.model.layers[1].self_attn
    mf.set_patterns(model, ["a_shape", 4, 16, 0.5], min_sparse_len=99)
    assert mf.get_patterns(model) == [{str(h): ["stream_llm", 4, 16, 0.5] for h in range(4)}] * 2
    assert mf_hf._layer_config(attn) == ((mf.Pattern("stream_llm", 4, 16),) * 4, 99)
    mf.set_patterns(model, mf.Pattern("dense"))
    assert mf_hf._layer_config(attn) == ((mf.Pattern("dense"),) * 4, mf.DEFAULT_MIN_SPARSE_LEN)

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


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the compiled CPU FlexAttention kernel needs AVX2")
@torch.no_grad()
def test_compiled_kernel_matches_eager(monkeypatch):
    model = make()
    heads = [["stream_llm", 4, 16], ["vertical_and_slash", 8, 16], ["block_sparse", 1, 0], ["dense", 0, 0]]
    mf.set_patterns(model, [{str(h): p for h, p in enumerate(heads)}] * 2, min_sparse_len=16)
    x = ids(100)  # one prompt length: one compile
    eager = model(x).logits
    monkeypatch.setattr(mf_hf, "COMPILED", True)
    torch.testing.assert_close(model(x).logits, eager, atol=1e-5, rtol=0)
