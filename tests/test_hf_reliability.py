"""The transformers backend on inputs that used to break it: static caches, block sizes other than 64
in pattern files, configuration objects shared by two models, attention masks with holes, autograd,
malformed pattern files.

Tiny random Llamas as in test_hf.py; the sparse path runs the eager emulation.
"""
from __future__ import annotations

import gc
import json
import logging
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import minference_flex as mf
import minference_flex.hf as mf_hf
from tests.test_hf import ids, make, reference


@pytest.fixture
def fresh_log(monkeypatch):
    """Forget which reasons were logged already, so that a test sees its own first warning."""
    monkeypatch.setattr(mf_hf, "_LOGGED", set())


GREEDY = dict(do_sample=False, pad_token_id=0)


# --------------------------------------------------------------------------- static caches

@torch.no_grad()
def test_static_cache_generate_matches_sdpa(monkeypatch):
    """Budgets that cover the prompt: the sparse prefill equals dense attention, so greedy tokens
    through a static cache must be sdpa's (the prefill's queries at their real positions, the unused
    cache slots ignored, decoding steps over the written slots only)."""
    model = make()
    mf.set_patterns(model, ["vertical_and_slash", 1000, 6096], min_sparse_len=16)
    x = ids(80)
    mf.clear_dispatch_counts(model)
    kw = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True, **GREEDY)
    ours = model.generate(x, cache_implementation="static", **kw)
    assert mf.dispatch_counts(model)["sparse"] == 2  # the prefill ran sparse in both layers
    theirs = reference(model).generate(x, cache_implementation="static", **kw)
    dynamic = reference(model).generate(x, **kw)
    assert ours.sequences.tolist() == theirs.sequences.tolist() == dynamic.sequences.tolist()
    for a, b in zip(ours.logits, theirs.logits):  # every step's logits, not only the argmax
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_static_cache_prefill_equals_dynamic_cache_prefill():
    """Small budgets (the sparse result differs from dense): a StaticCache prefill, with and without
    an attention mask, gives the logits of a DynamicCache prefill, and so do the decoding steps."""
    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16)
    x = ids(90)
    dynamic = DynamicCache(config=model.config)
    expected = model(x, past_key_values=dynamic, use_cache=True).logits
    assert (expected - reference(model)(x).logits).abs().max() > 1e-2  # sparse indeed
    for mask in (None, torch.ones_like(x)):
        static = StaticCache(config=model.config, max_cache_len=128)
        got = model(x, attention_mask=mask, past_key_values=static, use_cache=True).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # two decoding steps on both caches
    dyn_mask = torch.ones(1, 90, dtype=torch.long)
    for step in range(2):
        token = ids(1, seed=10 + step)
        dyn_mask = torch.cat([dyn_mask, torch.ones(1, 1, dtype=torch.long)], 1)
        a = model(token, attention_mask=dyn_mask, past_key_values=dynamic, use_cache=True).logits
        b = model(token, attention_mask=dyn_mask, past_key_values=static, use_cache=True).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@torch.no_grad()
def test_static_cache_with_left_padding():
    """A left-padded batch through a static cache: each sequence as alone (dynamic cache)."""
    from tests.test_hf import _padded

    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=32)
    seqs = [ids(100, seed=4)[0], ids(60, seed=5)[0]]
    input_ids, mask, _ = _padded(seqs, "left")
    batched = model.generate(input_ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static",
                             **GREEDY)[:, input_ids.shape[1]:]
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=4, **GREEDY)
        assert batched[i].tolist() == alone[0, len(s):].tolist()


# --------------------------------------------------------------------------- block_size in pattern files

def test_block_size_survives_set_get_save(tmp_path):
    model = make()
    mf.set_patterns(model, mf.Pattern("block_sparse", 2, block_size=128), min_sparse_len=16)
    layers = mf.get_patterns(model)
    assert layers[0]["0"] == ["block_sparse", 2, 0, 0.0, 128]
    assert mf_hf._layer_config(model.model.layers[1].self_attn).patterns == (mf.Pattern("block_sparse", 2, block_size=128),) * 4
    path = tmp_path / "p.json"
    mf.save_patterns(model, path)
    other = make()
    mf.set_patterns(other, path)
    assert mf_hf._layer_config(other.model.layers[0].self_attn).patterns[3].block_size == 128
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="minference_flex")
    assert mf_hf._layer_config(loaded.model.layers[0].self_attn).patterns[2].block_size == 128
    # mixed with MInference's four-element entries; those are written back unchanged
    mf.set_patterns(model, [{"0": ["block_sparse", 3, 0, 0.5, 256], "1": ["block_sparse", 3, 0, 0.5]}, {}])
    got = mf.get_patterns(model)
    assert got[0]["0"] == ["block_sparse", 3, 0, 0.5, 256] and got[0]["1"] == ["block_sparse", 3, 0, 0.5]
    assert mf.Pattern.parse(got[0]["0"]) == mf.Pattern("block_sparse", 3, block_size=256)
    assert mf.Pattern("block_sparse", 3).to_list(0.5) == ["block_sparse", 3, 0, 0.5]


@torch.no_grad()
def test_block_size_reaches_the_kernel():
    """A 128-token block_sparse pattern set through set_patterns runs as one built directly."""
    model = make()
    x = ids(400)
    mf.set_patterns(model, mf.Pattern("block_sparse", 1, block_size=128), min_sparse_len=16)
    wide = model(x).logits
    mf.set_patterns(model, mf.Pattern("block_sparse", 2, block_size=64), min_sparse_len=16)
    narrow = model(x).logits
    assert (wide - narrow).abs().max() > 1e-3
    mf.set_patterns(model, [{str(h): ["block_sparse", 1, 0, 0.0, 128] for h in range(4)}] * 2, min_sparse_len=16)
    torch.testing.assert_close(model(x).logits, wide, atol=0, rtol=0)


# --------------------------------------------------------------------------- shared configuration objects

@torch.no_grad()
def test_models_sharing_a_config_keep_their_own_patterns(tmp_path):
    a = make()
    b = AutoModelForCausalLM.from_config(a.config, attn_implementation="minference_flex").eval()
    b.load_state_dict(a.state_dict())
    assert b.config is a.config  # transformers shares it
    x = ids(200)
    before = a(x).logits
    mf.set_patterns(b, ["stream_llm", 4, 16], min_sparse_len=16)
    torch.testing.assert_close(a(x).logits, before, atol=0, rtol=0)
    assert a.config.minference_flex["min_sparse_len"] == mf.DEFAULT_MIN_SPARSE_LEN  # a keeps make's configuration
    assert (b(x).logits - before).abs().max() > 1e-2
    assert all(m.config is b.config for m in b.modules() if "config" in m.__dict__)
    # the other way round, and a model configured before the sharing
    mf.set_patterns(a, ["stream_llm", 8, 32], min_sparse_len=16)
    a_logits = a(x).logits
    c = AutoModelForCausalLM.from_config(a.config, attn_implementation="minference_flex").eval()
    mf.set_patterns(c, ["dense"], min_sparse_len=16)
    torch.testing.assert_close(a(x).logits, a_logits, atol=0, rtol=0)
    assert a.config.minference_flex["patterns"][0]["0"] == ["stream_llm", 8, 32, 0.0]
    # the configuration still travels with save_pretrained
    b.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="minference_flex")
    assert mf.get_patterns(loaded) == mf.get_patterns(b)


def test_unshared_config_stays_in_place():
    """A model whose config no other live model uses keeps its config object (a model that is gone
    but not collected yet does not count)."""
    model = make()
    config = model.config
    gc.disable()
    try:
        other = AutoModelForCausalLM.from_config(config, attn_implementation="minference_flex")
        other.cycle = [other]
        del other
        mf.set_patterns(model, ["dense"])
    finally:
        gc.enable()
    assert model.config is config and model.model.layers[0].self_attn.config is config
    assert model.config.minference_flex["patterns"][0]["0"] == ["dense", 0, 0, 0.0]


# --------------------------------------------------------------------------- masks with holes

def _holed_prompt(n: int, holes=(20, 21, 50)):
    x = ids(n)
    x[0, list(holes)] = 0  # the pad token inside the prompt: generate infers a mask with holes
    return x


@pytest.mark.parametrize("min_sparse_len", [16, mf.DEFAULT_MIN_SPARSE_LEN])
@torch.no_grad()
def test_generate_with_pad_tokens_inside_the_prompt(min_sparse_len, fresh_log, caplog):
    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=min_sparse_len)
    x = _holed_prompt(90)
    with caplog.at_level(logging.WARNING, logger="minference_flex"):
        ours = model.generate(x, max_new_tokens=6, **GREEDY)
        model.generate(x, max_new_tokens=2, **GREEDY)
    theirs = reference(model).generate(x, max_new_tokens=6, **GREEDY)
    assert ours.tolist() == theirs.tolist()
    records = [r for r in caplog.records if r.name == "minference_flex"]
    assert len(records) == 1 and "contiguous" in records[0].getMessage()


@torch.no_grad()
def test_mask_with_holes_runs_sdpa_with_the_exact_mask(fresh_log):
    """A batch in which one row has holes: the whole call runs SDPA with that mask (sdpa's logits on
    every real token), on a fresh cache and on a chunk on top of a cache."""
    from tests.test_hf import _padded

    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16)
    input_ids, mask, _ = _padded([ids(120, seed=2)[0], ids(70, seed=3)[0]], "left")
    mask[0, [5, 6, 60]] = 0
    ref = reference(model)
    got, expected = model(input_ids, attention_mask=mask).logits, ref(input_ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    cache, ref_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    model(input_ids[:, :80], attention_mask=mask[:, :80], past_key_values=cache, use_cache=True)
    ref(input_ids[:, :80], attention_mask=mask[:, :80], past_key_values=ref_cache, use_cache=True)
    got = model(input_ids[:, 80:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    expected = ref(input_ids[:, 80:], attention_mask=mask, past_key_values=ref_cache, use_cache=True).logits
    torch.testing.assert_close(got[real[:, 80:]], expected[real[:, 80:]], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- autograd

def _loss(model, embeds):
    return model(inputs_embeds=embeds).logits.float().pow(2).mean()


def test_gradients_run_dense_and_leave_the_sparse_path_intact(fresh_log, caplog, monkeypatch):
    model = make()
    mf.set_patterns(model, ["stream_llm", 4, 16], min_sparse_len=16)
    ref = reference(model)
    x = ids(100)
    with torch.no_grad():
        sparse = model(x).logits
        assert (sparse - ref(x).logits).abs().max() > 1e-2
    grads = []
    for m in (model, ref):
        embeds = m.get_input_embeddings()(x).detach().requires_grad_(True)
        m.zero_grad()
        with caplog.at_level(logging.INFO, logger="minference_flex"):
            _loss(m, embeds).backward()
        grads.append([embeds.grad] + [p.grad for p in m.parameters()])
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)
    assert [r.name for r in caplog.records if r.name == "minference_flex"] == ["minference_flex"]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, sparse, atol=0, rtol=0)
    # eval mode without no_grad: the parameters need gradients, so the call runs dense
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- malformed pattern files

@pytest.mark.parametrize("layer, message", [
    ({"1": ["dense", 0, 0], "01": ["dense", 0, 0]}, r"layer 1.*'01'.*head 1"),
    ({"1.7": ["dense", 0, 0]}, r"layer 1.*'1\.7'"),
    ({1.0: ["dense", 0, 0]}, r"layer 1.*1\.0"),
    ({True: ["dense", 0, 0]}, r"layer 1.*True"),
    ({"0": ["dense", 0, 0, float("nan")]}, r"layer 1.*'0'.*score"),
    ({"0": ["dense", 0, 0, float("inf")]}, r"layer 1.*'0'.*score"),
    ({"0": ["dense", 0, 0, "0.5"]}, r"layer 1.*'0'.*score"),
    ({"0": ["nope", 0, 0]}, r"layer 1.*'0'.*unknown pattern type"),
])
def test_malformed_layer_entries(layer, message):
    model = make()
    with pytest.raises(ValueError, match=message):
        mf.set_patterns(model, [{}, layer])


def test_json_file_with_nan_score_and_numpy_values(tmp_path):
    model = make()
    path = tmp_path / "p.json"
    path.write_text('[{"0": ["dense", 0, 0, NaN]}, {}]')
    with pytest.raises(ValueError, match=r"layer 0.*'0'.*score"):
        mf.set_patterns(model, path)
    with pytest.raises(ValueError, match="score"):
        mf.set_patterns(model, ["dense", 0, 0, float("nan")])
    # numpy numbers are numbers; what is stored is plain JSON
    mf.set_patterns(model, [{np.int64(2): ["stream_llm", np.int64(4), 16, np.float64(0.25)]}, {}],
                    min_sparse_len=np.int64(16))
    assert mf_hf._layer_config(model.model.layers[0].self_attn).min_sparse_len == 16
    assert type(model.config.minference_flex["min_sparse_len"]) is int
    mf.save_patterns(model, path)
    assert json.loads(path.read_text())[0]["2"] == ["stream_llm", 4, 16, 0.25]
    model.config.minference_flex["patterns"][0]["1"] = ["dense", 0, 0, math.nan]  # edited behind our back
    with pytest.raises(ValueError):
        mf.save_patterns(model, tmp_path / "q.json")
    assert not (tmp_path / "q.json").exists()


@pytest.mark.parametrize("value", [True, 1.5, "16", np.float64(16.0), 0, np.int64(-1)])
def test_min_sparse_len_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="min_sparse_len"):
        mf.set_patterns(make(), ["dense"], min_sparse_len=value)
