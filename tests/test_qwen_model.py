"""The real Qwen2.5-Coder-1.5B-Instruct, where its file is in the cache (``minference-flex fetch
qwen2.5-coder-1.5b``); skipped elsewhere, as on a fresh clone. One load (about 70 s and 8 GB on a CPU)
serves every test of the module."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from minference_flex.tools import models, ruler
from minference_flex.tools.sides import greedy, use_side


def _qwen_file() -> bool:
    try:
        models.qwen2_5_coder_gguf()
    except (FileNotFoundError, ImportError):
        return False
    return True


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _qwen_file() or importlib.util.find_spec("gguf") is None,
                                 reason="needs the Qwen2.5-Coder GGUF file (minference-flex fetch qwen2.5-coder-1.5b)")]


@pytest.fixture(scope="module")
def qwen():
    import minference_flex  # noqa: F401  (registers attn_implementation="minference_flex")

    return models.qwen2_5_coder()


def test_the_file_is_the_model_the_tools_describe(qwen):
    """Layer, head and context numbers the tools check pattern files against before loading."""
    model, tokenizer = qwen
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        models.QWEN_LAYERS, models.QWEN_HEADS, models.QWEN_KV_HEADS)
    assert config.hidden_size // config.num_attention_heads == models.QWEN_HEAD_DIM
    assert config.max_position_embeddings == models.QWEN_ORIGINAL_CONTEXT
    assert config.rope_parameters["rope_theta"] == models.QWEN_ROPE_THETA
    assert tokenizer.chat_template and model.load_seconds > 0


def test_a_short_needle_is_answered_and_the_sparse_backend_agrees(qwen):
    """A 1024-token RULER needle prompt: dense finds the number; minference_flex forced sparse with
    every cell kept (the kernel's eager emulation, Qwen's head dim 128 and 6:1 GQA) answers the same."""
    model, tokenizer = qwen
    sample = ruler.generate("niah_single_number", tokenizer, 1024, seed=0)
    ids = torch.tensor([sample.input_ids])
    answers = {}
    for side, patterns in (("dense", None), ("sparse", ["dense", 0, 0])):
        use_side(model, side, patterns, 256, compiled=False)
        answers[side] = greedy(model, tokenizer, ids, 16)
    model.set_attn_implementation("sdpa")
    assert ruler.score(answers["dense"], sample.answers).passed, answers
    assert answers["sparse"] == answers["dense"]
