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
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from minference_flex.hf import text_config
from minference_flex.tools.checks import (check_at_least, check_device, check_output, check_patterns, non_negative_int,
                                         percent, positive_int)
from minference_flex.tools.haystack import NEEDLE_MIN_LENGTH, Haystack, context_for, needle_prompt, passes
from minference_flex.tools.models import SMOLLM2_DESCRIPTION, SMOLLM2_PATTERNS
from minference_flex.tools.sides import (each_context, finish, greedy, layer_patterns, pattern_configs, pattern_label,
                                         perplexity, tile_counter, use_side)


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


def run_eval(cfg: EvalConfig, *, progress: bool = True, log=print) -> dict:
    """Dense and every sparse configuration of ``cfg.patterns`` on the same prompts (see the module
    docstring). Results per length and side: ``niah[length][side]``, ``tiles[length][side]``,
    ``perplexity[ppl_length][side]``; ``identical[length][side]`` counts answers equal to dense."""
    from tqdm.auto import tqdm

    rng = random.Random(cfg.seed)
    lengths = sorted(set(cfg.lengths))
    extra = [cfg.ppl_length] if cfg.ppl_length else []
    sides = ["dense", *cfg.patterns]
    results = {"config": asdict(cfg), "model": SMOLLM2_DESCRIPTION,
               "sparse_backend": None, "sides": sides, "load_seconds": {}, "niah": {}, "identical": {},
               "perplexity": {}, "tiles": {}, "records": []}
    total = len(lengths) * len(cfg.depths) * cfg.samples * len(sides)
    total += len(sides) if cfg.ppl_length else 0
    bar = tqdm(total=total, desc="eval", disable=not progress, file=sys.stderr)
    hays = []

    def run(context, label, group, model, tokenizer):
        results["load_seconds"][label] = round(model.load_seconds, 1)
        log(f"loaded SmolLM2 ({label}) in {model.load_seconds:.1f} s")
        if not hays:
            hays.append(Haystack.build(tokenizer))
        hay = hays[0]
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

    each_context(lengths, run, extra=extra, dtype=getattr(torch, cfg.dtype), device=cfg.device)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
