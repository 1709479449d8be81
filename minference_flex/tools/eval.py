"""``minference-flex eval``: dense SDPA against minference_flex on a real model (SmolLM2-135M-Instruct,
or Qwen2.5-Coder-1.5B-Instruct with ``--model qwen2.5-coder-1.5b``).

Same weights, same prompts; the model is loaded once (per RoPE setting) and switched with
``model.set_attn_implementation``. Two suites:

**Needle** (the default, without ``--tasks``):

* needle in a haystack, RULER style: real prose (``--haystack``: the standard library's
  ``pydoc_data.topics`` by default) with "The special magic number is NNNNNNN." planted at several depths, the question at the end in
  the chat template, greedy decoding; a prompt passes when the number appears in the answer. Reported
  per length for dense and sparse, with the number of answers that are identical on both sides.
* perplexity of both on real prose (``--ppl-length`` tokens, 8192 by default).
* the fraction of causal 64x64 KV tiles minference_flex skips, from ``mf.plan_attention`` on the
  query/key states every layer passes to attention on the sparse side (first prompt per length):
  key tiles never read (folded layout), and the tiles the split GPU layout computes (main mask +
  gathered vertical part) relative to the causal count.

**RULER** (``--tasks``, a subset of ``ruler.TASKS`` or ``all``): ``--samples`` prompts per task and
length (``ruler.generate``, seeds ``--seed`` on, the needles hidden in ``--haystack`` prose), the
same prompts on every side. Per length and side: each task's score (mean RULER ``string_match_all``
x100), the prompts passed (every expected value in the answer), how many prompts pass or fail as on
the dense side, perplexity on as many tokens of Moby-Dick (pydoc prose until ``minference-flex
fetch haystacks`` has run), the median time to first token (after one untimed prefill per side and
length, which compiles the kernel) and its speedup over dense, and the
fraction of causal KV tiles skipped (first prompt per length). ``--plot FILE.png`` draws score and
speedup against length per side. ``--batch B`` answers B prompts of a task in one generate (every
prompt is exactly the length asked, so no padding): much faster on a GPU, where decoding is bound by
launches; the time to first token is then the batch's divided by B. ``--out`` is rewritten after
every batch; ``--resume`` continues such a file (same settings, more ``--lengths`` allowed) without
asking its answered prompts again: long runs on machines that stop them go in several pieces.

Lengths above the model's context load it with YaRN (SmolLM2: factor length/8192 rounded up,
original 8192; Qwen: factor 4 or more over 32768).

    minference-flex eval                                   # 4K, 3 depths, 1 sample (CPU: minutes)
    minference-flex eval --lengths 4096 8192 16384 --depths 0 25 50 75 100 --samples 4 --device cuda
    minference-flex eval --tasks niah_single_number vt --lengths 1024 --haystack essays --plot ruler.png
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from minference_flex.hf import text_config
from minference_flex.tools import ruler
from minference_flex.tools.checks import (check_at_least, check_device, check_matplotlib, check_model, check_output,
                                         check_patterns, non_negative_int, percent, positive_int)
from minference_flex.tools.haystack import (HAYSTACKS, NEEDLE_MIN_LENGTH, Haystack, needle_prompt, passes,
                                            perplexity_text)
from minference_flex.tools.models import MODELS, SMOLLM2_NAME
from minference_flex.tools.sides import (DEFAULT_PATTERNS_HELP, add_model_option, each_context, finish, greedy,
                                         layer_patterns, pattern_configs, pattern_label, perplexity, tile_counter,
                                         timed_greedy, use_side, write_json)

#: Greedy tokens per answer when ``--max-new-tokens`` is not given: the needle suite's, and RULER's
#: ``tokens_to_generate`` per task.
NEEDLE_NEW_TOKENS = 10
RULER_NEW_TOKENS = {"niah_single_number": 128, "niah_single_word": 128, "niah_single_uuid": 128,
                    "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                    "vt": 30, "cwe": 120, "fwe": 50}
#: Shortest RULER prompt (tokens): every task leaves room for some context at this length.
RULER_MIN_LENGTH = 256


@dataclass
class EvalConfig:
    lengths: list[int] = field(default_factory=lambda: [4096])
    depths: list[float] = field(default_factory=lambda: [0, 50, 100])  # percent
    samples: int = 1
    #: sparse configurations, each evaluated against the same dense side: label -> patterns
    patterns: dict = field(default_factory=lambda: pattern_configs([MODELS[SMOLLM2_NAME].default_patterns]))
    min_sparse_len: int = 1024
    ppl_length: int = 8192
    #: None: NEEDLE_NEW_TOKENS, or RULER_NEW_TOKENS[task]
    max_new_tokens: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    eager: bool = False
    model: str = SMOLLM2_NAME
    #: RULER tasks (``ruler.TASKS`` names); empty: the needle suite
    tasks: list[str] = field(default_factory=list)
    haystack: str = "pydoc"  # a ``haystack.HAYSTACKS`` name: the prose the needles hide in
    #: RULER: prompts of one task generated together (one [batch, n] prefill and decode)
    batch: int = 1


def run_eval(cfg: EvalConfig, *, progress: bool = True, log=print) -> dict:
    """The needle suite: dense and every sparse configuration of ``cfg.patterns`` on the same prompts
    (see the module docstring; ``run_ruler`` runs ``cfg.tasks``). Results per length and side:
    ``niah[length][side]``, ``tiles[length][side]``, ``perplexity[ppl_length][side]``;
    ``identical[length][side]`` counts answers equal to dense."""
    from tqdm.auto import tqdm

    spec = MODELS[cfg.model]
    new_tokens = cfg.max_new_tokens or NEEDLE_NEW_TOKENS
    rng = random.Random(cfg.seed)
    lengths = sorted(set(cfg.lengths))
    extra = [cfg.ppl_length] if cfg.ppl_length else []
    sides = ["dense", *cfg.patterns]
    results = {"config": asdict(cfg), "model": spec.description,
               "sparse_backend": None, "sides": sides, "load_seconds": {}, "niah": {}, "identical": {},
               "perplexity": {}, "tiles": {}, "records": []}
    total = len(lengths) * len(cfg.depths) * cfg.samples * len(sides)
    total += len(sides) if cfg.ppl_length else 0
    bar = tqdm(total=total, desc="eval", disable=not progress, file=sys.stderr)
    hays = []

    def run(context, label, group, model, tokenizer):
        results["load_seconds"][label] = round(model.load_seconds, 1)
        log(f"loaded {spec.name} ({label}) in {model.load_seconds:.1f} s")
        if not hays:
            hays.append(Haystack.build(tokenizer, HAYSTACKS[cfg.haystack]()))
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
                            answer = greedy(model, tokenizer, ids, new_tokens)
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
        if cfg.ppl_length and spec.context_for(cfg.ppl_length) == context:
            ids = torch.tensor([hay.text_ids(hay.boundaries[0], cfg.ppl_length)])
            ppl = {}
            for side in sides:
                use_side(model, side, cfg.patterns.get(side), cfg.min_sparse_len, compiled=not cfg.eager)
                t0 = time.perf_counter()
                ppl[side] = round(perplexity(model, ids), 3)
                ppl[f"{side}_seconds"] = round(time.perf_counter() - t0, 1)
                bar.update(1)
            results["perplexity"][str(cfg.ppl_length)] = ppl

    each_context(lengths, run, model=spec, extra=extra, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    bar.close()
    return results


#: Settings a ``--resume`` run must share with the results it continues (all but the lengths).
RESUME_KEYS = tuple(k for k in EvalConfig.__dataclass_fields__ if k != "lengths")


def resumable(previous: dict, cfg: EvalConfig) -> list[str]:
    """The settings of ``cfg`` that differ from those ``previous`` (RULER results) was made with:
    empty when a run with ``cfg`` can continue it."""
    old, new = previous.get("config", {}), json.loads(json.dumps(asdict(cfg)))
    if previous.get("suite") != "ruler":
        return ["suite"]
    return [key for key in RESUME_KEYS if old.get(key) != new[key]]


def ruler_rows(records: list[dict], sides: list[str], tasks: list[str]) -> dict:
    """Per side, from the prompt records of one length: each task's score x100 and their mean, the
    prompts passed, ``same_as_dense`` (sparse sides), the median time to first token and its speedup
    over dense."""
    by = {(r["side"], r["task"], r["sample"]): r for r in records}
    samples = sorted({(r["task"], r["sample"]) for r in records}, key=lambda ts: (tasks.index(ts[0]), ts[1]))
    rows = {}
    for side in sides:
        mine = [by[(side, *ts)] for ts in samples]
        task_scores = {task: round(100 * statistics.fmean(r["score"] for r in mine if r["task"] == task), 1)
                       for task in tasks}
        rows[side] = {"tasks": task_scores, "score": round(statistics.fmean(task_scores.values()), 1),
                      "passed": sum(r["pass"] for r in mine), "total": len(mine),
                      "ttft_median": round(statistics.median(r["ttft_seconds"] for r in mine), 4)}
        if side != "dense":
            rows[side]["same_as_dense"] = sum(r["pass"] == by[("dense", *ts)]["pass"] for r, ts in zip(mine, samples))
    for side in sides:
        rows[side]["ttft_speedup"] = round(rows["dense"]["ttft_median"] / rows[side]["ttft_median"], 3)
    return rows


def run_ruler(cfg: EvalConfig, *, progress: bool = True, log=print, save=None, previous: dict | None = None) -> dict:
    """The RULER suite (module docstring) of ``cfg.tasks`` on dense and every configuration of
    ``cfg.patterns``. Results per length and side: ``ruler[length][side]`` = {``tasks``: task ->
    score x100, ``score``: their mean, ``passed``/``total`` prompts, ``same_as_dense`` (sparse sides:
    prompts that pass or fail as on dense), ``ttft_median`` s, ``ttft_speedup`` (dense median / this
    side's), ``perplexity``}; ``tiles[length][side]``; one record per prompt and side in ``records``.

    ``save(results)`` is called after every batch and every length (``results["complete"]`` False
    until the end), so an interrupted run keeps what it measured. ``previous``: such results of a
    run with the same settings (``resumable``; the lengths may differ): its finished lengths are kept
    and its answered prompts are not asked again, so the run continues where that one stopped."""
    from tqdm.auto import tqdm

    spec = MODELS[cfg.model]
    lengths = sorted(set(cfg.lengths))
    sides = ["dense", *cfg.patterns]
    haystack = HAYSTACKS[cfg.haystack]()
    ppl_name, ppl_text = perplexity_text()
    differ = resumable(previous, cfg) if previous is not None else []
    if differ:
        raise ValueError(f"cannot resume: these settings differ from the earlier run's: {', '.join(differ)}")
    results = previous or {"config": asdict(cfg), "model": spec.description, "suite": "ruler", "haystack": cfg.haystack,
                           "perplexity_text": ppl_name, "sparse_backend": None, "sides": sides,
                           "tasks": list(cfg.tasks), "load_seconds": {}, "ruler": {}, "tiles": {}, "records": []}
    results["config"]["lengths"] = sorted(set(results["config"]["lengths"]) | set(lengths))
    results["complete"] = False
    done = {(r["length"], r["task"], r["sample"], r["side"]) for r in results["records"]}
    todo = [n for n in lengths if str(n) not in results["ruler"]]
    bar = tqdm(total=len(todo) * (len(cfg.tasks) * cfg.samples * len(sides) + len(sides)),
               desc="eval", disable=not progress, file=sys.stderr)
    bar.update(sum(1 for key in done if key[0] in todo))

    def checkpoint():
        if save is not None:
            save(results)

    def run(context, label, group, model, tokenizer):
        results["load_seconds"][label] = round(model.load_seconds, 1)
        log(f"loaded {spec.name} ({label}) in {model.load_seconds:.1f} s")
        tc = text_config(model)
        per_layer = {side: layer_patterns(p, tc.num_hidden_layers, tc.num_attention_heads)
                     for side, p in cfg.patterns.items()}
        ppl_ids = tokenizer(ppl_text, add_special_tokens=False)["input_ids"]
        for n in group:
            counting = str(n) not in results["tiles"]
            stats: dict = {side: {} for side in cfg.patterns}
            prompts = [(task, i, ruler.generate(task, tokenizer, n, seed=cfg.seed + i, haystack=haystack))
                       for task in cfg.tasks for i in range(cfg.samples)]
            # Batches of at most cfg.batch prompts of one task: every prompt is exactly n tokens long.
            batches = [prompts[j:j + cfg.batch] for t in range(len(cfg.tasks))
                       for j in range(t * cfg.samples, (t + 1) * cfg.samples, cfg.batch)]
            for side in sides:  # untimed: the kernel compile (and any first-call cost) is no prefill time
                if all((n, task, i, side) in done for task, i, _ in prompts):
                    continue  # a resumed run: nothing of this side left to time
                use_side(model, side, cfg.patterns.get(side), cfg.min_sparse_len, compiled=not cfg.eager)
                _prefill(model, torch.tensor([sample.input_ids for _, _, sample in batches[0]]))
            for batch in batches:
                task = batch[0][0]
                ids = torch.tensor([sample.input_ids for _, _, sample in batch])
                for side in sides:
                    if all((n, task, i, side) in done for _, i, _ in batch):
                        continue
                    impl = use_side(model, side, cfg.patterns.get(side), cfg.min_sparse_len, compiled=not cfg.eager)
                    if side != "dense":
                        results["sparse_backend"] = results["sparse_backend"] or impl
                    count = side != "dense" and counting and not stats[side]
                    t0 = time.perf_counter()
                    with (tile_counter(model, per_layer[side], cfg.min_sparse_len, stats[side]) if count
                          else contextlib.nullcontext()):
                        answers, first = timed_greedy(model, tokenizer, ids,
                                                      cfg.max_new_tokens or RULER_NEW_TOKENS[task])
                    dt = time.perf_counter() - t0
                    counted = stats[side].get("count_seconds", 0.0) if count else 0.0
                    first = (first - counted) / len(batch)  # the tile counting runs inside the prefill
                    for (_, i, sample), answer in zip(batch, answers):
                        result = ruler.score(answer, sample.answers)
                        results["records"].append({
                            "length": n, "task": task, "sample": i, "side": side, "backend": impl,
                            "expected": sample.answers, "answer": answer, "score": round(result.fraction, 4),
                            "pass": result.passed, "ttft_seconds": round(first, 4),
                            "seconds": round((dt - counted) / len(batch), 3)})
                        done.add((n, task, i, side))
                        bar.update(1)
                if counting and all(stats.values()):  # every sparse side counted: keep it for a resumed run
                    results["tiles"][str(n)] = {side: _tile_summary(stats[side]) for side in cfg.patterns}
                    counting = False
                checkpoint()
            ids = torch.tensor([(ppl_ids * (n // len(ppl_ids) + 1))[:n]])
            rows = ruler_rows([r for r in results["records"] if r["length"] == n], sides, list(cfg.tasks))
            for side in sides:
                use_side(model, side, cfg.patterns.get(side), cfg.min_sparse_len, compiled=not cfg.eager)
                rows[side]["perplexity"] = round(perplexity(model, ids), 3)
                bar.update(1)
            results["ruler"][str(n)] = rows
            results["tiles"].setdefault(str(n), {side: _tile_summary(stats[side]) for side in cfg.patterns})
            checkpoint()

    each_context(todo, run, model=spec, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    bar.close()
    results["complete"] = True
    return results


@torch.inference_mode()
def _prefill(model, input_ids) -> None:
    """One untimed forward of the decoder over ``input_ids`` (no vocabulary projection)."""
    model.get_decoder()(input_ids=input_ids.to(model.device))


def _tile_summary(stats: dict) -> dict:
    if not stats.get("causal"):
        return {"skipped_fraction": 0.0, "note": "below min_sparse_len: dense"}
    return {"skipped_fraction": round(1 - stats["touched"] / stats["causal"], 4),
            "split_computed_ratio": round(stats["computed"] / stats["causal"], 4),
            "touched": stats["touched"], "computed": stats["computed"], "causal": stats["causal"],
            "per_layer_skipped": stats["per_layer"]}


def _backend_line(results: dict) -> str:
    sb = results.get("sparse_backend") or "sdpa"
    return f"sparse side: {sb}" + ("" if sb == "minference_flex" else
                                   "  (minference_flex backend not available: both sides dense)")


def format_table(results: dict) -> str:
    """The text report of ``run_eval``'s or ``run_ruler``'s results."""
    if results.get("suite") == "ruler":
        return format_ruler_table(results)
    lines = [_backend_line(results),
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


def format_ruler_table(results: dict) -> str:
    """One row per length and side: each task's score, the mean, prompts passed, the pass/fail
    agreement with dense, perplexity, median TTFT and speedup over dense, tiles skipped."""
    tasks = results["tasks"]
    width = max(6, *(len(t) for t in tasks))
    side_width = max(4, *(len(side) for side in results["sides"]))
    lines = [_backend_line(results) + f"; haystack {results['haystack']}, perplexity on {results['perplexity_text']}",
             f"{'length':>7} {'side':<{side_width}} " + " ".join(f"{t:>{width}}" for t in tasks)
             + f" {'score':>6} {'passed':>7} {'as dense':>8} {'ppl':>8} {'TTFT s':>8} {'speedup':>7} {'skipped':>7}"]
    for n, rows in results["ruler"].items():
        for side, row in rows.items():
            same = f"{row['same_as_dense']}/{row['total']}" if "same_as_dense" in row else ""
            skipped = results["tiles"][n].get(side, {}).get("skipped_fraction", 0.0)
            lines.append(f"{n:>7} {side:<{side_width}} " + " ".join(f"{row['tasks'][t]:>{width}.1f}" for t in tasks)
                         + f" {row['score']:>6.1f} {str(row['passed']) + '/' + str(row['total']):>7} {same:>8}"
                         f" {row['perplexity']:>8.3f} {row['ttft_median']:>8.3f} {row['ttft_speedup']:>6.2f}x"
                         f" {skipped:>7.1%}")
    lines.append("scores: mean RULER string_match_all x100; passed: every expected value in the answer; as dense: "
                 "prompts that pass or fail as on dense; TTFT: median time to first token; skipped: causal 64x64 "
                 "KV tiles never read")
    for label, sec in results["load_seconds"].items():
        lines.append(f"load ({label}): {sec} s")
    return "\n".join(lines)


def plot_ruler(results: dict, path: str) -> None:
    """``path`` (PNG): the mean RULER score and the TTFT speedup over dense against length, per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(n) for n in results["ruler"]]
    fig, (score_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for side in results["sides"]:
        rows = [results["ruler"][str(n)][side] for n in lengths]
        score_ax.plot(lengths, [r["score"] for r in rows], marker="o", label=side)
        speed_ax.plot(lengths, [r["ttft_speedup"] for r in rows], marker="o", label=side)
    score_ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="RULER score (x100)", ylim=(0, 105))
    score_ax.set_title(f"mean of {len(results['tasks'])} tasks", fontsize=10)
    speed_ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="TTFT speedup over dense")
    speed_ax.set_title(results["model"], fontsize=10)
    for ax in (score_ax, speed_ax):
        ax.minorticks_off()  # the log axis's own minor labels would collide with the lengths
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.grid(alpha=0.3)
    speed_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[4096],
                   help=f"prompt lengths in tokens, at least {NEEDLE_MIN_LENGTH} (RULER: {RULER_MIN_LENGTH}) "
                        "(default 4096)")
    p.add_argument("--tasks", nargs="+", choices=[*ruler.TASKS, "all"], default=None, metavar="TASK",
                   help=f"run the RULER suite on these tasks ('all' or some of: {', '.join(ruler.TASKS)}) "
                        "instead of the needle suite")
    p.add_argument("--haystack", choices=list(HAYSTACKS), default="pydoc",
                   help="prose the needles hide in: pydoc (bundled with Python, default), essays (Paul "
                        "Graham's) or moby-dick; the last two need `minference-flex fetch haystacks`")
    p.add_argument("--depths", type=percent, nargs="+", default=[0, 50, 100],
                   help="needle suite: needle depths in percent, 0..100 (default 0 50 100)")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="needle suite: haystacks per length and depth; RULER: prompts per task and length "
                        "(default 1)")
    add_model_option(p)
    p.add_argument("--patterns", nargs="+", default=None,
                   help="one or more sparse configurations, each a MInference JSON file or one entry for every "
                        "head, e.g. vertical_and_slash,100,800; all are compared with the same dense side "
                        f"({DEFAULT_PATTERNS_HELP})")
    p.add_argument("--min-sparse-len", type=positive_int, default=1024,
                   help="prefills shorter than this run dense on the sparse side (default 1024)")
    p.add_argument("--ppl-length", type=non_negative_int, default=8192,
                   help="needle suite: perplexity length in tokens; 0 skips it (RULER: at every length)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"greedy tokens per answer (default: {NEEDLE_NEW_TOKENS} for needles, RULER's per task)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=positive_int, default=1,
                   help="RULER suite: prompts of one task answered together, in one [batch, length] "
                        "generate (default 1); the time to first token is then the batch's over its size")
    p.add_argument("--eager", action="store_true", help="sparse side on the eager kernel emulation (no compile)")
    p.add_argument("--out", default="results.json", help="JSON results file (default results.json); '' writes none")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="RULER suite: a figure of score and TTFT speedup over dense against length per side")
    p.add_argument("--resume", action="store_true",
                   help="RULER suite: continue the --out file of an earlier run with the same settings (its "
                        "answered prompts are not asked again; other --lengths may be added). The file is "
                        "rewritten after every batch, so an interrupted run keeps what it measured")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # Every check before the model loads (a bad value used to surface after the load, or never).
    tasks = list(ruler.TASKS) if args.tasks and "all" in args.tasks else list(dict.fromkeys(args.tasks or []))
    if tasks:
        check_at_least(p, "--lengths", args.lengths, RULER_MIN_LENGTH, "room for each task's context")
    else:
        check_at_least(p, "--lengths", args.lengths, NEEDLE_MIN_LENGTH, "the question and the needle take ~95 tokens")
        if args.plot:
            p.error("--plot draws the RULER suite: give --tasks")
        if args.resume:
            p.error("--resume continues the RULER suite: give --tasks")
    if args.resume and not args.out:
        p.error("--resume continues the --out file: give one")
    if args.ppl_length == 1:
        p.error("--ppl-length must be 0 (no perplexity) or at least 2 tokens, got 1")
    check_device(p, args.device)
    check_output(p, "--out", args.out)
    if args.plot:
        check_matplotlib(p)
        check_output(p, "--plot", args.plot)
    try:
        HAYSTACKS[args.haystack]()  # fetched? (a missing text names the fetch command)
    except FileNotFoundError as exc:
        p.error(f"--haystack {args.haystack}: {exc}")
    model = check_model(p, args.model)
    patterns = {pattern_label(value): check_patterns(p, value, num_layers=model.layers, num_heads=model.heads)
                for value in args.patterns or [model.default_patterns]}
    cfg = EvalConfig(lengths=args.lengths, depths=args.depths, samples=args.samples,
                     patterns=patterns, min_sparse_len=args.min_sparse_len,
                     ppl_length=args.ppl_length, max_new_tokens=args.max_new_tokens, device=args.device,
                     dtype=args.dtype, seed=args.seed, eager=args.eager, model=args.model, tasks=tasks,
                     haystack=args.haystack, batch=args.batch)
    previous = None
    if args.resume and os.path.exists(args.out):
        try:
            with open(args.out) as f:
                previous = json.load(f)
            differ = resumable(previous, cfg)
        except (OSError, ValueError, AttributeError) as exc:
            p.error(f"--resume: {args.out} is not a results file of minference-flex eval --tasks ({exc})")
        if differ:
            p.error(f"--resume: {args.out} was made with other settings ({', '.join(differ)} differ); "
                    "give the same options or another --out")
    t0 = time.perf_counter()
    if tasks:
        results = run_ruler(cfg, progress=not args.no_progress, previous=previous,
                            save=(lambda r: write_json(r, args.out)) if args.out else None)
    else:
        results = run_eval(cfg, progress=not args.no_progress)
    finish(results, format_table(results), args.out, t0)
    if args.plot:
        plot_ruler(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
