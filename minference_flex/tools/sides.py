"""What the real-model tools (eval, demo, ttft) share: the sparse configurations they are given
(``--patterns``), the model (``--model``: SmolLM2 or Qwen2.5-Coder) loaded once per RoPE context, the switch of a loaded model between dense
SDPA and minference_flex, the measurements on each side (greedy answers, perplexity, tiles) and the
report at the end."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import time

import torch

from minference_flex.hf import _CONFIG_ATTR, text_config
from minference_flex.tools.checks import read_patterns
from minference_flex.tools.models import MODELS, QWEN_NAME, SMOLLM2_NAME, ModelSpec


# --------------------------------------------------------------------------- configurations

def pattern_label(spec: str) -> str:
    """How reports name a ``--patterns`` value: a file by its name, an entry as given."""
    return os.path.basename(spec) if os.path.exists(spec) else spec


def pattern_configs(specs: list[str]) -> dict:
    """``--patterns`` values -> {label: patterns}; a file's label is its name."""
    return {pattern_label(spec): load_patterns(spec) for spec in specs}


#: How ``--patterns`` help texts name each model's default configuration.
DEFAULT_PATTERNS_HELP = (f"default: the model's own, for SmolLM2 the searched configuration (docs/search.md), "
                         f"for Qwen {MODELS[QWEN_NAME].default_patterns} on every head")


def add_patterns_option(parser: argparse.ArgumentParser) -> None:
    """``--patterns``: one sparse configuration (a MInference JSON file or one entry for every head);
    None when not given (``ModelSpec.default_patterns`` then)."""
    parser.add_argument("--patterns", default=None,
                        help="MInference JSON file or one entry for every head, e.g. vertical_and_slash,100,800 "
                             f"({DEFAULT_PATTERNS_HELP})")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model``: one of ``models.MODELS`` (SmolLM2 by default); check it with ``checks.check_model``."""
    parser.add_argument("--model", choices=list(MODELS), default=SMOLLM2_NAME,
                        help=f"{SMOLLM2_NAME} (SmolLM2-135M-Instruct, bundled, default) or {QWEN_NAME} "
                             f"(Qwen2.5-Coder-1.5B-Instruct, 32K context; download it first with "
                             f"minference-flex fetch {QWEN_NAME})")


def load_patterns(spec):
    """A JSON file path (MInference per-layer list) or one entry ``type,a,b`` for every head
    (``cli_checks.read_patterns``; ValueError when the file is missing or malformed)."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    return read_patterns(spec)


def layer_patterns(patterns, num_layers: int, num_heads: int) -> list[list]:
    """One list of per-head entries per layer, from a single entry or a MInference list."""
    from minference_flex.head_patterns import DEFAULT_PATTERN

    if patterns and isinstance(patterns[0], str):
        return [[list(patterns)] * num_heads for _ in range(num_layers)]
    if len(patterns) != num_layers:
        raise ValueError(f"patterns have {len(patterns)} layers, the model {num_layers}")
    return [[layer.get(str(h), DEFAULT_PATTERN.to_list()) for h in range(num_heads)] for layer in patterns]


# --------------------------------------------------------------------------- models and sides

def each_context(lengths, run, *, model: ModelSpec = MODELS[SMOLLM2_NAME], extra=(),
                 dtype: torch.dtype = torch.float32, device: str = "cpu", **load) -> None:
    """Load ``model`` (SmolLM2 by default) once per RoPE context that ``lengths`` need
    (``model.context_for``; ``extra``: lengths that need a model loaded without lengths of their own)
    and call ``run(context, label, lengths, model, tokenizer)`` for each, in order of context (native
    first), ``label`` "native" or "yarnN". Each model is freed (CUDA cache included) before the next
    loads. ``load``: more keywords of the loader (``ModelSpec.load``)."""
    groups: dict = {}
    for n in lengths:
        groups.setdefault(model.context_for(n), []).append(n)
    for n in extra:
        groups.setdefault(model.context_for(n), [])
    for context, group in sorted(groups.items(), key=lambda kv: kv[0] or 0):
        loaded = model.load(dtype=dtype, device=device, context=context, **load)
        run(context, "native" if context is None else f"yarn{context}", group, *loaded)
        del loaded
        gc.collect()
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.empty_cache()


#: Where ``use_side`` notes what it stored and the stored object (in the model's ``__dict__``).
_SIDE = "_minference_flex_side"


def use_side(model, side: str, patterns, min_sparse_len: int, *, sdpa_fallback: bool = False,
             compiled: bool = True) -> str:
    """Switch the loaded model to dense SDPA or minference_flex; returns the implementation in use.

    ``sdpa_fallback`` (off by default: eval and demo measure the patterns, so every prefill from
    ``min_sparse_len`` on runs the sparse kernel) lets the backend run SDPA where its cost model
    predicts the sparse kernel to be slower, as users get it (ttft turns it on). ``compiled`` False
    runs the kernel's eager emulation (``--eager``)."""
    if side == "dense":
        model.set_attn_implementation("sdpa")
        return "sdpa"
    import minference_flex as mf

    model.set_attn_implementation("minference_flex")
    # Stored again only when it changes: a new configuration object makes every attention module
    # parse its layer's configuration again on its next call, and ttft times the calls that follow
    # a switch (users configure once).
    wanted = (patterns, min_sparse_len, sdpa_fallback, compiled)
    config = text_config(model)
    noted = model.__dict__.get(_SIDE)
    stored = getattr(config, _CONFIG_ATTR, None)
    if noted is None or noted[0] != wanted or noted[1] is not stored:
        mf.set_patterns(model, patterns, min_sparse_len=min_sparse_len, sdpa_fallback=sdpa_fallback,
                        compiled=compiled)
        model.__dict__[_SIDE] = (wanted, getattr(config, _CONFIG_ATTR))
    return "minference_flex"


@contextlib.contextmanager
def tile_counter(model, per_layer: list[list], min_sparse_len: int, stats: dict):
    """While active, every prefill attention call (of ``min_sparse_len`` keys or more) adds the tiles
    of ``mf.plan_attention`` for its query/key (the first prompt of a batch) to ``stats``:
    ``touched`` (key tiles of the folded layout, vertical columns inside the main mask: the causal
    tiles that are read at all), ``computed`` (tiles of the split GPU layout: main mask + gathered
    vertical part, which can exceed the causal count at short lengths), ``causal`` (the dense causal
    64x64 tile count), per-layer skipped fractions and ``count_seconds`` (time spent counting, to
    subtract from a timed forward)."""
    from minference_flex.attention import plan_attention
    from minference_flex.hooks import wrap_attention

    def counting(inner, module, query, key, value, attention_mask, **kwargs):
        nq, nk = query.shape[2], key.shape[2]
        if nq > 1 and nq == nk and nk >= min_sparse_len:
            t0 = time.perf_counter()
            layer = getattr(module, "layer_idx", 0)
            q, k = query[:1].float(), key[:1].float()  # a batch's first prompt stands for it (eval --batch)
            folded = plan_attention(q, k, per_layer[layer], full_width=False, fold_columns=True)
            split = plan_attention(q, k, per_layer[layer], full_width=False, fold_columns=False)
            touched, computed = folded.tile_counts(), split.tile_counts()
            causal, touched, computed = touched["causal"], touched["visited"], computed["visited"]
            stats["touched"] = stats.get("touched", 0) + touched
            stats["computed"] = stats.get("computed", 0) + computed
            stats["causal"] = stats.get("causal", 0) + causal
            stats.setdefault("per_layer", {})[layer] = round(1 - touched / causal, 4)
            stats["count_seconds"] = stats.get("count_seconds", 0.0) + time.perf_counter() - t0
        return inner(module, query, key, value, attention_mask, **kwargs)

    with wrap_attention(model, counting):
        yield stats


# --------------------------------------------------------------------------- measurements and report

def greedy(model, tokenizer, input_ids, max_new_tokens: int) -> str:
    """The greedy answer to ``input_ids`` ([1, n]): at most ``max_new_tokens`` tokens, decoded."""
    return timed_greedy(model, tokenizer, input_ids, max_new_tokens)[0][0]


@torch.inference_mode()
def timed_greedy(model, tokenizer, input_ids, max_new_tokens: int) -> tuple[list[str], float]:
    """(greedy answers, time to first token in seconds) for ``input_ids`` [B, n]: prompts of equal
    length (no padding), one answer of at most ``max_new_tokens`` tokens per row; the time runs from
    the call until the prefill's logits are there, i.e. until generation chooses the first new
    tokens (CUDA synchronised): for B > 1 the batch's prefill."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        seconds = None

        def __call__(self, ids, scores):
            if self.seconds is None:
                if scores.is_cuda:
                    torch.cuda.synchronize(scores.device)
                self.seconds = time.perf_counter() - start
            return scores

    first = FirstToken()
    start = time.perf_counter()
    input_ids = input_ids.to(model.device)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         logits_processor=LogitsProcessorList([first]))
    answers = [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, input_ids.shape[1]:]]
    return answers, first.seconds


@torch.inference_mode()
def perplexity(model, input_ids, chunk: int = 1024) -> float:
    """exp(mean next-token NLL), the vocabulary projection done in chunks to bound memory."""
    input_ids = input_ids.to(model.device)
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    head = model.get_output_embeddings()
    nll, count = 0.0, 0
    for i in range(0, input_ids.shape[1] - 1, chunk):
        j = min(i + chunk, input_ids.shape[1] - 1)
        logits = head(hidden[:, i:j]).float()
        nll += torch.nn.functional.cross_entropy(logits[0], input_ids[0, i + 1:j + 1], reduction="sum").item()
        count += j - i
    return math.exp(nll / count)


def finish(results: dict, table: str, out: str | None, started: float) -> None:
    """Print the table and the total time, write ``results`` (with ``total_seconds``) as JSON to ``out``."""
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    print(table)
    print(f"total {results['total_seconds']} s")
    if out:
        write_json(results, out)
        print(f"wrote {out}")


def write_json(results: dict, path: str) -> None:
    """``results`` as JSON in ``path``, replaced in one step (a run killed while writing leaves the
    previous file whole)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
