"""The transformers backend on inputs that used to break it: static caches, block sizes other than 64
in pattern files, configuration objects shared by two models, attention masks with holes, autograd,
malformed pattern files.

Tiny random Llamas as in test_hf.py; the sparse path runs the eager emulation.
"""
from __future__ import annotations

import copy
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


@pytest.fixture(autouse=True)
def _eager_kernel(monkeypatch):
    monkeypatch.setattr(mf_hf, "COMPILED", False)


@pytest.fixture
def fresh_log(monkeypatch):
    """Forget which reasons were logged already, so that a test sees its own first warning."""
    monkeypatch.setattr(mf_hf, "_LOGGED", set(), raising=False)


def counting(monkeypatch):
    from collections import Counter

    counts = Counter()
    monkeypatch.setattr(mf_hf, "DISPATCH_COUNTS", counts)
    return counts


GREEDY = dict(do_sample=False, pad_token_id=0)


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
