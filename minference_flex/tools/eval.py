"""``minference-flex eval``: dense SDPA against minference_flex on a real model (SmolLM2-135M-Instruct).

Same weights, same prompts; the model is loaded once (per RoPE setting) and switched with
``model.set_attn_implementation``. Measures

* needle in a haystack, RULER style: real prose from the standard library (``pydoc_data.topics``)
  with "The special magic number is NNNNNNN." planted at several depths, the question at the end in
  the chat template, greedy decoding; a prompt passes when the number appears in the answer. Reported
  per length for dense and sparse, with the number of answers that are identical on both sides.
* perplexity of both on real prose (``--ppl-length`` tokens, 8192 by default).
* the fraction of causal 64x64 KV tiles minference_flex skips, from ``mf.plan_attention`` on the
  query/key states every layer passes to attention on the sparse side (first prompt per length):
  key tiles never read (folded layout), and the tiles the split GPU layout computes (main mask +
  gathered vertical part) relative to the causal count.

Lengths above 8192 load the model with YaRN (factor length/8192 rounded up, original 8192).

    minference-flex eval                                   # 4K, 3 depths, 1 sample (CPU: minutes)
    minference-flex eval --lengths 4096 8192 16384 --depths 0 25 50 75 100 --samples 4 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from minference_flex.tools.checks import parse_entry  # noqa: F401  (re-exported: eval.parse_entry)
from minference_flex.tools.checks import (check_at_least, check_device, check_output, check_patterns, non_negative_int, percent,
                         positive_int, read_patterns)
from minference_flex.hf import _CONFIG_ATTR, text_config
from minference_flex.tools.models import SMOLLM2_DESCRIPTION, SMOLLM2_ORIGINAL_CONTEXT, SMOLLM2_PATTERNS, smollm2

NEEDLE = "The special magic number is {number}."
QUESTION_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n")
QUESTION_TAIL = "\nWhat is the special magic number mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number mentioned in the provided text is"
SENTINEL = "<<<CONTEXT>>>"
#: Shortest needle prompt (tokens): the chat template, question and needle take ~95 SmolLM2 tokens and
#: ``needle_prompt`` wants at least 16 tokens of haystack.
NEEDLE_MIN_LENGTH = 128


# --------------------------------------------------------------------------- data

def haystack_text() -> str:
    """~113K tokens of English prose shipped with Python (the pydoc topic help texts)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics))


@dataclass
class Haystack:
    """The tokenised haystack and the chat template split around the context, as token ids."""

    ids: list[int]
    prefix: list[int]
    suffix: list[int]
    boundaries: list[int]  # indices i where ids[i-1] ends a sentence or line

    @classmethod
    def build(cls, tokenizer) -> "Haystack":
        ids = tokenizer(haystack_text(), add_special_tokens=False)["input_ids"]
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION_HEAD + SENTINEL + QUESTION_TAIL}],
            tokenize=False, add_generation_prompt=True)
        head, tail = chat.split(SENTINEL)
        prefix = tokenizer(head, add_special_tokens=False)["input_ids"]
        suffix = tokenizer(tail + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        pieces = tokenizer.convert_ids_to_tokens(ids)
        ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "Ċ")) or "Ċ" in p]
        return cls(ids=ids, prefix=prefix, suffix=suffix, boundaries=ends)

    def text_ids(self, start: int, count: int) -> list[int]:
        """``count`` haystack tokens from ``start``, wrapping around."""
        n = len(self.ids)
        start %= n
        out = self.ids[start:start + count]
        while len(out) < count:
            out += self.ids[: count - len(out)]
        return out


def needle_prompt(hay: Haystack, tokenizer, length: int, depth: float, number: str, start: int):
    """(input_ids [1, length], needle token position): the chat prompt with exactly ``length`` tokens,
    the needle inserted at the sentence boundary nearest ``depth`` (0..1) of the haystack."""
    needle = tokenizer(" " + NEEDLE.format(number=number) + " ", add_special_tokens=False)["input_ids"]
    budget = length - len(hay.prefix) - len(hay.suffix) - len(needle)
    if budget < 16:
        raise ValueError(f"length {length} leaves no room for a haystack")
    start = hay.boundaries[start % len(hay.boundaries)]  # begin on a sentence
    context = hay.text_ids(start, budget)
    target = int(round(depth * budget))
    # nearest sentence boundary inside this slice (positions relative to the slice)
    import bisect

    bounds = [b - start for b in hay.boundaries if start < b <= start + budget]
    if bounds and 0 < depth < 1:
        i = bisect.bisect_left(bounds, target)
        near = [bounds[j] for j in (i - 1, i) if 0 <= j < len(bounds)]
        target = min(near, key=lambda b: abs(b - target))
    ids = hay.prefix + context[:target] + needle + context[target:] + hay.suffix
    assert len(ids) == length, (len(ids), length)
    return torch.tensor([ids]), len(hay.prefix) + target


def passes(number: str, answer: str) -> bool:
    """A needle answer passes when the planted number appears in it (thousands separators ignored)."""
    return number in answer.replace(",", "")


# --------------------------------------------------------------------------- attention sides

def sparse_available() -> bool:
    import minference_flex as mf
    from transformers import AttentionInterface

    return hasattr(mf, "set_patterns") and "minference_flex" in AttentionInterface._global_mapping


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


#: Where ``use_side`` notes what it stored and the stored object (in the model's ``__dict__``).
_SIDE = "_minference_flex_side"


def use_side(model, side: str, patterns, min_sparse_len: int, *, sdpa_fallback: bool = False,
             compiled: bool = True) -> str:
    """Switch the loaded model to dense SDPA or minference_flex; returns the implementation in use.

    ``sdpa_fallback`` (off by default: eval and demo measure the patterns, so every prefill from
    ``min_sparse_len`` on runs the sparse kernel) lets the backend run SDPA where its cost model
    predicts the sparse kernel to be slower, as users get it (ttft turns it on). ``compiled`` False
    runs the kernel's eager emulation (``--eager``)."""
    if side == "dense" or not sparse_available():
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
    of ``mf.plan_attention`` for its query/key to ``stats``: ``touched`` (key tiles of the folded layout,
    vertical columns inside the main mask: the causal tiles that are read at all), ``computed`` (tiles
    of the split GPU layout: main mask + gathered vertical part, which can exceed the causal count at
    short lengths), ``causal`` (the dense causal 64x64 tile count), per-layer skipped fractions and
    ``count_seconds`` (time spent counting, to subtract from a timed forward)."""
    from minference_flex.attention import plan_attention
    from minference_flex.hooks import wrap_attention

    def counting(inner, module, query, key, value, attention_mask, **kwargs):
        nq, nk = query.shape[2], key.shape[2]
        if nq > 1 and nq == nk and nk >= min_sparse_len:
            t0 = time.perf_counter()
            layer = getattr(module, "layer_idx", 0)
            q, k = query.float(), key.float()
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


# --------------------------------------------------------------------------- measurements

@torch.inference_mode()
def greedy(model, tokenizer, input_ids, max_new_tokens: int) -> str:
    input_ids = input_ids.to(model.device)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


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


@dataclass
class EvalConfig:
    lengths: list[int] = field(default_factory=lambda: [4096])
    depths: list[float] = field(default_factory=lambda: [0, 50, 100])  # percent
    samples: int = 1
    #: sparse configurations, each evaluated against the same dense side: label -> patterns
    patterns: dict = field(default_factory=lambda: pattern_configs([SMOLLM2_PATTERNS]))
    min_sparse_len: int = 1024
    ppl_length: int = 8192
    max_new_tokens: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    eager: bool = False


def context_for(length: int) -> int | None:
    """None (native 8K RoPE) or the YaRN context, a multiple of 8192, that covers ``length``."""
    if length <= SMOLLM2_ORIGINAL_CONTEXT:
        return None
    return -(-length // SMOLLM2_ORIGINAL_CONTEXT) * SMOLLM2_ORIGINAL_CONTEXT


def run_eval(cfg: EvalConfig, *, progress: bool = True, log=print) -> dict:
    """Dense and every sparse configuration of ``cfg.patterns`` on the same prompts (see the module
    docstring). Results per length and side: ``niah[length][side]``, ``tiles[length][side]``,
    ``perplexity[ppl_length][side]``; ``identical[length][side]`` counts answers equal to dense."""
    from tqdm.auto import tqdm

    dtype = getattr(torch, cfg.dtype)
    rng = random.Random(cfg.seed)
    lengths = sorted(set(cfg.lengths))
    groups: dict = {}
    for n in lengths:
        groups.setdefault(context_for(n), []).append(n)
    if cfg.ppl_length:
        groups.setdefault(context_for(cfg.ppl_length), [])
    sides = ["dense", *cfg.patterns]
    results = {"config": asdict(cfg), "model": SMOLLM2_DESCRIPTION,
               "sparse_backend": None, "sides": sides, "load_seconds": {}, "niah": {}, "identical": {},
               "perplexity": {}, "tiles": {}, "records": []}
    total = sum(len(v) for v in groups.values()) * len(cfg.depths) * cfg.samples * len(sides)
    total += len(sides) if cfg.ppl_length else 0
    bar = tqdm(total=total, desc="eval", disable=not progress, file=sys.stderr)
    hay = None
    for context, group in sorted(groups.items(), key=lambda kv: kv[0] or 0):
        model, tokenizer = smollm2(dtype=dtype, device=cfg.device, context=context)
        label = "native" if context is None else f"yarn{context}"
        results["load_seconds"][label] = round(model.load_seconds, 1)
        log(f"loaded SmolLM2 ({label}) in {model.load_seconds:.1f} s")
        if hay is None:
            hay = Haystack.build(tokenizer)
        tc = text_config(model)
        per_layer = {side: layer_patterns(p, tc.num_hidden_layers, tc.num_attention_heads)
                     for side, p in cfg.patterns.items()}
        for n in group:
            rows = {side: {"passed": 0, "total": 0, "seconds": 0.0} for side in sides}
            identical = {side: 0 for side in cfg.patterns}
            stats: dict = {side: {} for side in cfg.patterns}
            for s in range(cfg.samples):
                start = rng.randrange(len(hay.boundaries))
                for depth in cfg.depths:
                    number = str(rng.randrange(10 ** 5, 10 ** 7))  # 6 or 7 digits
                    ids, pos = needle_prompt(hay, tokenizer, n, depth / 100, number, start)
                    answers = {}
                    for side in sides:
                        impl = use_side(model, side, cfg.patterns.get(side), cfg.min_sparse_len,
                                        compiled=not cfg.eager)
                        if side != "dense":
                            results["sparse_backend"] = results["sparse_backend"] or impl
                        count = side != "dense" and s == 0 and depth == cfg.depths[0]
                        t0 = time.perf_counter()
                        with (tile_counter(model, per_layer[side], cfg.min_sparse_len, stats[side]) if count
                              else contextlib.nullcontext()):
                            answer = greedy(model, tokenizer, ids, cfg.max_new_tokens)
                        dt = time.perf_counter() - t0
                        ok = passes(number, answer)
                        answers[side] = answer
                        rows[side]["passed"] += ok
                        rows[side]["total"] += 1
                        rows[side]["seconds"] += dt
                        results["records"].append({"length": n, "depth": depth, "sample": s, "side": side,
                                                   "backend": impl, "number": number, "needle_pos": pos,
                                                   "answer": answer, "pass": ok, "seconds": round(dt, 2)})
                        bar.update(1)
                    for side in cfg.patterns:
                        identical[side] += answers["dense"].strip() == answers[side].strip()
            for side in sides:
                rows[side]["seconds"] = round(rows[side]["seconds"], 1)
            results["niah"][str(n)] = rows
            results["identical"][str(n)] = identical
            results["tiles"][str(n)] = {side: _tile_summary(stats[side]) for side in cfg.patterns}
        if cfg.ppl_length and context_for(cfg.ppl_length) == context:
            ids = torch.tensor([hay.text_ids(hay.boundaries[0], cfg.ppl_length)])
            ppl = {}
            for side in sides:
                use_side(model, side, cfg.patterns.get(side), cfg.min_sparse_len, compiled=not cfg.eager)
                t0 = time.perf_counter()
                ppl[side] = round(perplexity(model, ids), 3)
                ppl[f"{side}_seconds"] = round(time.perf_counter() - t0, 1)
                bar.update(1)
            results["perplexity"][str(cfg.ppl_length)] = ppl
        del model
        gc.collect()
    bar.close()
    return results


def _tile_summary(stats: dict) -> dict:
    if not stats.get("causal"):
        return {"skipped_fraction": 0.0, "note": "below min_sparse_len: dense"}
    return {"skipped_fraction": round(1 - stats["touched"] / stats["causal"], 4),
            "split_computed_ratio": round(stats["computed"] / stats["causal"], 4),
            "touched": stats["touched"], "computed": stats["computed"], "causal": stats["causal"],
            "per_layer_skipped": stats["per_layer"]}


def format_table(results: dict) -> str:
    sb = results.get("sparse_backend") or "sdpa"
    lines = [f"sparse side: {sb}" + ("" if sb == "minference_flex" else
                                     "  (minference_flex backend not available: both sides dense)"),
             f"{'length':>7} {'side':<28} {'needle pass':>11} {'same as dense':>13} {'tiles skipped':>14} "
             f"{'GPU work':>9} {'seconds':>8}"]
    for n, rows in results["niah"].items():
        for side, row in rows.items():
            same = results["identical"][n].get(side)
            tiles = results["tiles"][n].get(side, {})
            skipped = tiles.get("skipped_fraction", 0.0)
            work = tiles.get("split_computed_ratio", 1.0)
            same_text = "" if same is None else f"{same}/{row['total']}"
            lines.append(f"{n:>7} {side[:28]:<28} {row['passed']:>5}/{row['total']:<5} {same_text:>13} "
                         f"{skipped:>13.1%} {work:>9.1%} {row['seconds']:>8.1f}")
    lines.append("tiles skipped: causal 64x64 KV tiles never read; GPU work: tiles of the split layout "
                 "(main + gathered columns) / causal tiles")
    for n, ppl in results["perplexity"].items():
        dense = ppl["dense"]
        for side in results["sides"]:
            change = "" if side == "dense" else f" ({ppl[side] / dense - 1:+.2%} vs dense)"
            lines.append(f"perplexity at {n}, {side}: {ppl[side]:.3f}{change} ({ppl[side + '_seconds']} s)")
    for label, sec in results["load_seconds"].items():
        lines.append(f"load ({label}): {sec} s")
    return "\n".join(lines)


def pattern_label(spec: str) -> str:
    """How reports name a ``--patterns`` value: a file by its name, an entry as given."""
    return os.path.basename(spec) if os.path.exists(spec) else spec


def pattern_configs(specs: list[str]) -> dict:
    """``--patterns`` values -> {label: patterns}; a file's label is its name."""
    return {pattern_label(spec): load_patterns(spec) for spec in specs}


def add_patterns_option(parser: argparse.ArgumentParser) -> None:
    """``--patterns``: one sparse configuration (a MInference JSON file or one entry for every head)."""
    parser.add_argument("--patterns", default=SMOLLM2_PATTERNS,
                        help="MInference JSON file or one entry for every head, e.g. vertical_and_slash,100,800 "
                             "(default: the searched SmolLM2 configuration, docs/search.md)")


def finish(results: dict, table: str, out: str | None, started: float) -> None:
    """Print the table and the total time, write ``results`` (with ``total_seconds``) as JSON to ``out``."""
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    print(table)
    print(f"total {results['total_seconds']} s")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {out}")


def main(argv=None, prog: str = "minference-flex eval") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[4096],
                   help=f"prompt lengths in tokens, at least {NEEDLE_MIN_LENGTH} (default 4096)")
    p.add_argument("--depths", type=percent, nargs="+", default=[0, 50, 100],
                   help="needle depths in percent, 0..100 (default 0 50 100)")
    p.add_argument("--samples", type=positive_int, default=1, help="haystacks per length and depth (default 1)")
    p.add_argument("--patterns", nargs="+", default=[SMOLLM2_PATTERNS],
                   help="one or more sparse configurations, each a MInference JSON file or one entry for every "
                        "head, e.g. vertical_and_slash,100,800; all are compared with the same dense side "
                        "(default: the searched SmolLM2 configuration, docs/search.md)")
    p.add_argument("--min-sparse-len", type=positive_int, default=1024,
                   help="prefills shorter than this run dense on the sparse side (default 1024)")
    p.add_argument("--ppl-length", type=non_negative_int, default=8192,
                   help="perplexity length in tokens; 0 skips it")
    p.add_argument("--max-new-tokens", type=positive_int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="sparse side on the eager kernel emulation (no compile)")
    p.add_argument("--out", default="results.json", help="JSON results file (default results.json); '' writes none")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # Every check before the model loads (a bad value used to surface after the load, or never).
    check_at_least(p, "--lengths", args.lengths, NEEDLE_MIN_LENGTH, "the question and the needle take ~95 tokens")
    if args.ppl_length == 1:
        p.error("--ppl-length must be 0 (no perplexity) or at least 2 tokens, got 1")
    check_device(p, args.device)
    check_output(p, "--out", args.out)
    patterns = {pattern_label(spec): check_patterns(p, spec) for spec in args.patterns}
    cfg = EvalConfig(lengths=args.lengths, depths=args.depths, samples=args.samples,
                     patterns=patterns, min_sparse_len=args.min_sparse_len,
                     ppl_length=args.ppl_length, max_new_tokens=args.max_new_tokens, device=args.device,
                     dtype=args.dtype, seed=args.seed, eager=args.eager)
    t0 = time.perf_counter()
    results = run_eval(cfg, progress=not args.no_progress)
    finish(results, format_table(results), args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
