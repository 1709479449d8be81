"""Benchmark one attention layer: SDPA, FlexAttention dense causal and minference_flex, side by side.

    python -m minference_flex.bench --lengths 32768 131072 --budgets 1000,6096 100,800 --out results

Every number comes from one run on one card: CUDA events around each call, warm-up first, the
median of repeated runs. Before timing, the sparse output is checked on sampled query rows against a
float64 reference restricted to the same kept cells.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from block_masks import Tiles, main_block_mask, select, token_cells, vertical_block_mask

from .attention import plan_attention, run_plan
from .bench_inputs import structured_qkv
from .config import parse_patterns
from .layer_demo import row_stats, sample_rows
from .kernel import compiled_flex

log = logging.getLogger(__name__)

GEOMETRIES = {
    "llama3-8b": dict(Hq=32, Hkv=8, D=128),
    "smollm2-135m": dict(Hq=9, Hkv=3, D=64),
}


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row_check(q, k, v, plan, out, rows):
    """On sampled query ``rows``: the largest relative error of ``out`` against a float64 reference
    over the plan's kept cells, the attention recall of those cells and their share of the causal cells."""
    kept = token_cells(plan.selection, rows)                                  # [B, H, R, Nk]
    recall, err = row_stats(q, k, v, out, kept, rows, plan.scale)
    causal = (k.shape[2] - q.shape[2] + rows + 1).sum() * kept.shape[0] * kept.shape[1]
    return err, recall, (kept.sum() / causal).item()


def parse_config(text: str) -> tuple[Tiles, dict]:
    """"128x64" or "64x64:num_warps=4,num_stages=3" -> (Tiles, kernel options)."""
    tiles, _, opts = text.partition(":")
    q_tile, kv_tile = (int(x) for x in tiles.split("x"))
    options = {k: int(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
    return Tiles(q_tile, kv_tile), options


def bench_length(n: int, geometry: dict, budgets: list[tuple[int, int]], configs: list[str], reps: int) -> dict:
    q, k, v = structured_qkv(geometry["Hq"], geometry["Hkv"], n, geometry["D"], device="cuda")
    rows = sample_rows(n, 64, q.device)
    res = {"length": n}
    res["sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps=reps)
    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, n, n, device="cuda", _compile=True)
    flex = compiled_flex()
    res["flex_dense_ms"] = time_ms(lambda: flex(q, k, v, causal, None, True), reps=reps)  # default tiles
    res["runs"] = []
    for config in configs:
        try:
            res["runs"].extend(bench_config(q, k, v, config, budgets, rows, reps, res["sdpa_ms"]))
        except Exception as exc:  # one failing configuration must not hide the others' numbers
            log.exception("configuration %s failed", config)
            res["runs"].append(dict(config=config, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        torch.cuda.empty_cache()
    return res


def bench_config(q, k, v, config: str, budgets, rows, reps: int, sdpa_ms: float) -> list[dict]:
    H = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    runs = []
    tiles, options = parse_config(config)
    dense_plan = plan_attention(q, k, [["dense", 0, 0]] * H, tiles=tiles, kernel_options=options)
    dense_ms = time_ms(lambda: run_plan(dense_plan, q, k, v), reps=reps)
    del dense_plan
    for a, b in budgets:
        patterns = parse_patterns([["vertical_and_slash", a, b]] * H, H)
        plan = plan_attention(q, k, patterns, tiles=tiles, kernel_options=options)
        out = run_plan(plan, q, k, v)
        err, recall, cells = row_check(q, k, v, plan, out, rows)
        sel = plan.selection
        run = dict(config=config, budgets=[a, b], dense_pattern_ms=dense_ms, rel_err=err, recall=recall,
                   cell_fraction=cells, tiles=plan.tile_counts())
        run["estimate_ms"] = time_ms(lambda: select(q, k, patterns, scale), reps=reps)
        run["build_ms"] = time_ms(lambda: (main_block_mask(sel, tiles), vertical_block_mask(sel, tiles)), reps=reps)
        run["kernel_ms"] = time_ms(lambda: run_plan(plan, q, k, v), reps=reps)
        run["total_ms"] = time_ms(lambda: run_plan(plan_attention(q, k, patterns, tiles=tiles, kernel_options=options), q, k, v), reps=reps)
        run["speedup_vs_sdpa"] = sdpa_ms / run["total_ms"]
        runs.append(run)
        del plan, sel, out
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama3-8b")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--budgets", nargs="+", default=["1000,6096", "100,800"],
                   help="vertical,slash budgets of the vertical_and_slash heads")
    p.add_argument("--configs", nargs="+", default=["64x64"],
                   help="BlockMask tiles QxK, optionally with kernel options: 64x64:num_warps=4,num_stages=3")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("minference-flex bench times CUDA kernels and needs a GPU")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    budgets = [tuple(int(x) for x in s.split(",")) for s in args.budgets]
    report = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, geometry=args.geometry, results=[])
    for n in args.lengths:
        log.info("length %d", n)
        report["results"].append(bench_length(n, GEOMETRIES[args.geometry], budgets, args.configs, args.reps))
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"{report['card']}, torch {report['torch']}, {args.geometry}, bfloat16")
    print(f"{'N':>8} {'config':>24} {'budget':>11} {'SDPA':>8} {'flex':>8} {'dense':>8} {'est':>7} {'build':>7} "
          f"{'kernel':>8} {'total':>8} {'speedup':>7} {'tiles':>6} {'recall':>6} {'err':>8}")
    for r in report["results"]:
        for run in r["runs"]:
            if "error" in run:
                print(f"{r['length']:>8} {run['config']:>24} failed: {run['error'][:120]}")
                continue
            print(f"{r['length']:>8} {run['config']:>24} {str(tuple(run['budgets'])):>11} {r['sdpa_ms']:8.2f} "
                  f"{r['flex_dense_ms']:8.2f} {run['dense_pattern_ms']:8.2f} "
                  f"{run['estimate_ms']:7.2f} {run['build_ms']:7.2f} {run['kernel_ms']:8.2f} {run['total_ms']:8.2f} "
                  f"{run['speedup_vs_sdpa']:6.2f}x {run['tiles']['fraction']:6.3f} {run['recall']:6.3f} {run['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
