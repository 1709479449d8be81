"""Benchmark one attention layer: SDPA, FlexAttention dense causal and minference_flex, side by side.

    python -m minference_flex.tools.bench --lengths 32768 131072 --budgets 1000,6096 100,800 --out results
    python -m minference_flex.tools.bench --inputs capture --capture smollm2_capture.pt --plot results/bench.png

Every number comes from one run on one card: CUDA events around each call, warm-up first, the
median of repeated runs. Before timing, the sparse output is checked on sampled query rows against a
float64 reference restricted to the same kept cells.

Inputs (``--inputs``): ``structured`` (default) is ``bench_inputs.structured_qkv`` in the chosen
geometry; ``capture`` is the query/key/value one layer of a real model (SmolLM2-135M or
Qwen2.5-Coder-1.5B) received on real prose, read from a file written by ``minference-flex capture``
(the geometry is the capture's: smollm2-135m or qwen2.5-coder-1.5b; a length N takes the first N
positions of the capture, which must hold at least N). ``--plot PATH.png`` draws the times of SDPA,
FlexAttention dense and minference_flex (one line per budget) against the prompt length.

``--compile-counts`` counts compilations instead of timing (CUDA): dynamo graphs and builds of
our Triton kernels across 10 prompt lengths and 10 budget sets (``compile_counts``).

``--device cpu --eager`` runs the whole benchmark on the CPU with the eager kernel emulation: a
smoke test of the script at small lengths (timings there mean nothing).
"""
from __future__ import annotations

import argparse
import sys
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from block_masks import Tiles, select, token_cells
from block_masks.pattern import VERTICAL_SLASH, VERTICAL_SLASH_MASS

from minference_flex.attention import plan_attention, plan_selection, run_plan, sparse_attention
from minference_flex.tools.bench_inputs import structured_qkv
from minference_flex.tools.checks import (budgets as budgets_arg, check_device, check_matplotlib, check_output, check_output_folder,
                         non_negative_int, positive_int)
from minference_flex.head_patterns import parse_patterns
from minference_flex.tools.timing import row_stats, sample_rows, time_ms
from minference_flex.kernels.flex import compiled_flex
from minference_flex.kernels.dispatch import KERNELS

log = logging.getLogger(__name__)

GEOMETRIES = {
    "llama3-8b": dict(Hq=32, Hkv=8, D=128),
    "smollm2-135m": dict(Hq=9, Hkv=3, D=64),
    "qwen2.5-coder-1.5b": dict(Hq=12, Hkv=2, D=128),
}
#: Geometries a capture file can have (the models ``minference-flex capture`` runs).
CAPTURE_GEOMETRIES = ("smollm2-135m", "qwen2.5-coder-1.5b")

INPUTS = ("structured", "capture")


# --------------------------------------------------------------------------- captured inputs

def load_capture(path) -> dict:
    """The dict ``minference-flex capture`` saved (query/key/value [L, H, N, D] for the layers in
    ``layer``, ``length``, ``model``, ...), on the CPU, with ``geometry``: the name in ``GEOMETRIES``
    of its head layout. ValueError when the file is missing or is no capture of a model in
    ``CAPTURE_GEOMETRIES``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--inputs capture needs a capture file, and {str(path)!r} does not exist: make one with "
                         f"`minference-flex capture --length N --out {path}` (N at least the longest --lengths)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a capture file of `minference-flex capture` (no dict in it)")
    missing = [key for key in ("query", "key", "value", "layer", "length") if key not in data]
    if missing:
        raise ValueError(f"{path} is not a capture file of `minference-flex capture` (no {', '.join(missing)})")
    L, N = len(data["layer"]), data["length"]
    layouts = []
    for name in CAPTURE_GEOMETRIES:
        g = GEOMETRIES[name]
        want = {"query": (L, g["Hq"], N, g["D"]), "key": (L, g["Hkv"], N, g["D"]), "value": (L, g["Hkv"], N, g["D"])}
        if all(tuple(data[key].shape) == shape for key, shape in want.items()):
            return dict(data, geometry=name)
        layouts.append(f"{name}: query {want['query']}, key and value {want['key']}")
    shapes = ", ".join(f"{key} {tuple(data[key].shape)}" for key in ("query", "key", "value"))
    raise ValueError(f"{path}: {shapes} fit no captured model's geometry (layers {data['layer']}, {N} tokens; "
                     f"expected {'; or '.join(layouts)})")


def capture_index(capture: dict, n: int, layer: int | None = None) -> int:
    """Index (along dim 0 of query/key/value) of ``layer`` (default the first captured) in a capture
    dict, after checking that it holds ``n`` positions of that layer; ValueError otherwise."""
    if n < 1:
        raise ValueError(f"length must be positive, got {n}")
    if n > capture["length"]:
        raise ValueError(f"length {n} asked but the capture holds {capture['length']} tokens: capture a longer "
                         f"prompt (`minference-flex capture --length {n}`)")
    layers = list(capture["layer"])
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in the capture (layers {layers})")
    return layers.index(layer)


def capture_qkv(capture, n: int, device="cuda", layer: int | None = None,
                dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, Hq, n, D], k/v [1, Hkv, n, D] (the capture's geometry: SmolLM2 9/3/64, Qwen 12/2/128)
    in ``dtype`` on ``device``: the first ``n`` positions (a prefix of the captured prompt) of layer
    ``layer`` (default the first captured) of a capture (``capture``: a file path or the dict of
    ``load_capture``). ValueError when the file is
    missing, ``n`` exceeds the captured length or the layer was not captured."""
    data = capture if isinstance(capture, dict) else load_capture(capture)
    i = capture_index(data, n, layer)
    return tuple(data[key][i:i + 1, :, :n].to(device=device, dtype=dtype).contiguous()
                 for key in ("query", "key", "value"))


# --------------------------------------------------------------------------- plot

def entry_label(run: dict) -> str:
    """How tables and plots name a run's pattern: ``(V, S)`` for vertical_and_slash budgets, ``mass
    99%<8192`` for a vertical_slash_mass target and cap."""
    a, b = run["budgets"]
    return f"mass {a / 10:g}%<{b}" if run.get("pattern") == VERTICAL_SLASH_MASS else f"({a}, {b})"


def plot_report(report: dict, path) -> dict[str, tuple[list[int], list[float]]]:
    """Write a PNG of the milliseconds against the prompt length (both axes logarithmic) for SDPA
    causal, FlexAttention dense causal and minference_flex total (one line per budget, configuration
    and strip kernel), from a report as ``bench.json`` holds it. Returns the plotted series
    {label: (lengths, ms)}; failed runs are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only --plot needs matplotlib
    from matplotlib.figure import Figure

    results = sorted(report["results"], key=lambda r: r["length"])
    series: dict[str, tuple[list[int], list[float]]] = {}

    def add(label, n, ms):
        xs, ys = series.setdefault(label, ([], []))
        xs.append(n)
        ys.append(ms)

    configs = {run["config"] for r in results for run in r["runs"] if "error" not in run}
    kernels = {run.get("strip_kernel", "auto") for r in results for run in r["runs"] if "error" not in run}
    for r in results:
        if r["sdpa_ms"] is not None:
            add("SDPA causal", r["length"], r["sdpa_ms"])
        if "flex_dense_ms" in r:
            add("FlexAttention dense causal", r["length"], r["flex_dense_ms"])
        for run in r["runs"]:
            if "error" in run:
                continue
            label = f"minference_flex {entry_label(run)}"
            if len(configs) > 1:
                label += f" {run['config']}"
            if len(kernels) > 1:
                label += f" ({run.get('strip_kernel', 'auto')} strips)"
            add(label, r["length"], run["total_ms"])

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"SDPA causal": dict(color="black", marker="o"),
              "FlexAttention dense causal": dict(color="gray", marker="s", linestyle="--")}
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, **styles.get(label, dict(marker="^")))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = [r["length"] for r in results]
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time per layer (ms, log scale)")
    inputs = report.get("inputs", "structured")
    ax.set_title(f"{report.get('card', '?')}, {report.get('geometry', '?')}, {inputs} inputs", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return series


def row_check(q, k, v, plan, out, rows):
    """On sampled query ``rows``: the largest relative error of ``out`` against a float64 reference
    over the plan's kept cells, the attention recall of those cells and their share of the causal cells."""
    kept = token_cells(plan.selection, rows)                                  # [B, H, R, Nk]
    recall, err = row_stats(q, k, v, out, kept, rows, plan.scale)
    causal = (k.shape[2] - q.shape[2] + rows + 1).sum() * kept.shape[0] * kept.shape[1]
    return err, recall, (kept.sum() / causal).item()


def parse_config(text: str) -> tuple[Tiles, dict, bool]:
    """"strips" (the strip kernel for the diagonals, 64x64 FlexAttention tiles for the rest), or
    FlexAttention alone: "128x64", "64x64:num_warps=4,num_stages=3" -> (Tiles, kernel options, strips)."""
    if text == "strips":
        return Tiles(), {}, True
    tiles, _, opts = text.partition(":")
    try:
        q_tile, kv_tile = (int(x) for x in tiles.split("x"))
        options = {k: int(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
    except ValueError:
        raise ValueError(f"configuration {text!r}: expected 'strips' or QxK[:option=value,...]") from None
    return Tiles(q_tile, kv_tile), options, False


def bench_length(n: int, geometry: dict, entries: list[tuple[str, int, int]], configs: list[str], reps: int,
                 inputs: str = "structured", capture=None, layer: int | None = None, device: str = "cuda",
                 eager: bool = False, warmup: int | None = None, skip: tuple[str, ...] = (),
                 strip_kernels: tuple[str, ...] = ("auto",)) -> dict:
    """One length: SDPA, FlexAttention dense and, per configuration (and per strip kernel of
    ``strip_kernels`` for the strip configuration), the minference_flex runs: one per ``entries``
    (kind, a, b), every head that pattern.
    ``inputs``: "structured" (``structured_qkv`` in ``geometry``) or "capture" (the first ``n``
    positions of layer ``layer`` of ``capture``, a dict of ``load_capture``). ``device="cpu"`` with ``eager`` is the
    smoke-test mode (wall-clock times, eager kernels). ``skip`` leaves out the "sdpa" baseline, the "flex"
    dense baseline and the "dense-pattern" run (each takes 20-35 s a call at 1M tokens)."""
    if inputs == "capture":
        q, k, v = capture_qkv(capture, n, device=device, layer=layer)
    else:
        q, k, v = structured_qkv(geometry["Hq"], geometry["Hkv"], n, geometry["D"], device=device)
    cuda = device == "cuda"
    timer = dict(reps=reps, device=device, warmup=(3 if cuda else 1) if warmup is None else warmup)
    rows = sample_rows(n, 64, q.device)
    res = {"length": n}
    if "sdpa" in skip:
        res["sdpa_ms"] = None
    elif cuda:
        res["sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                 **timer)
    else:  # the CPU flash kernel wants K/V repeated to the query heads; repeat once, outside the timing
        G = q.shape[1] // k.shape[1]
        k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        res["sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True), **timer)
        del k_rep, v_rep
    if "flex" not in skip:
        causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, n, n, device=device, _compile=not eager)
        if eager:
            def flex(q, k, v, block_mask, score_mod, enable_gqa):
                return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa)
        else:
            flex = compiled_flex() if cuda else compiled_flex((), ("cpu", "bench"))
        res["flex_dense_ms"] = time_ms(lambda: flex(q, k, v, causal, None, True), **timer)  # default tiles
    res["runs"] = []
    for config in configs:
        for strip_kernel in strip_kernels if parse_config(config)[2] else ("auto",):
            try:
                res["runs"].extend(bench_config(q, k, v, config, entries, rows, timer, res["sdpa_ms"],
                                                compiled=not eager, dense_pattern="dense-pattern" not in skip,
                                                strip_kernel=strip_kernel))
            except Exception as exc:  # one failing configuration must not hide the others' numbers
                log.exception("configuration %s (strip kernel %s) failed", config, strip_kernel)
                res["runs"].append(dict(config=config, strip_kernel=strip_kernel,
                                        error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            if cuda:
                torch.cuda.empty_cache()
    return res


def plan_bytes(plan) -> int:
    """Bytes of a plan's kernel metadata: the strips and the BlockMasks' tile lists."""
    tensors = []
    if plan.strips is not None:
        st = plan.strips
        tensors += [st.sigma, st.counts, st.words, st.col_counts, st.allowed]
        if plan.selection.columns is not None:  # else one padding column per head, made here
            tensors.append(st.columns)
    for mask in (plan.main, plan.vertical):
        if mask is not None:
            tensors += [t for t in (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
                                    mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)
                        if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_config(q, k, v, config: str, entries, rows, timer: dict, sdpa_ms: float, compiled: bool = True,
                 dense_pattern: bool = True, strip_kernel: str = "auto") -> list[dict]:
    H = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    runs = []
    tiles, options, strips = parse_config(config)
    plan_options = dict(tiles=tiles, kernel_options=options, strips=strips and q.is_cuda,
                        fold_columns=not q.is_cuda, full_width=not q.is_cuda)
    dense_ms = None
    if dense_pattern:
        dense_plan = plan_attention(q, k, [["dense", 0, 0]] * H, strip_kernel=strip_kernel, **plan_options)
        dense_ms = time_ms(lambda: run_plan(dense_plan, q, k, v, compiled=compiled), **timer)
        del dense_plan
    for kind, a, b in entries:
        patterns = parse_patterns([[kind, a, b]] * H, H)
        if q.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        plan = plan_attention(q, k, patterns, strip_kernel=strip_kernel, **plan_options)
        out = run_plan(plan, q, k, v, compiled=compiled)
        peak = torch.cuda.max_memory_allocated() if q.is_cuda else None
        err, recall, cells = row_check(q, k, v, plan, out, rows)
        sel = plan.selection
        run = dict(config=config, strip_kernel=strip_kernel, pattern=kind, budgets=[a, b], dense_pattern_ms=dense_ms,
                   rel_err=err, recall=recall,
                   cell_fraction=cells, tiles=plan.tile_counts(), metadata_bytes=plan_bytes(plan),
                   peak_memory_bytes=peak)
        run["estimate_ms"] = time_ms(lambda: select(q, k, patterns, scale), **timer)
        backend = plan.strip_backend or "triton"  # the build includes the Hopper backend's segments
        run["build_ms"] = time_ms(lambda: plan_selection(sel, scale=scale, strip_backend=backend, **plan_options), **timer)
        run["kernel_ms"] = time_ms(lambda: run_plan(plan, q, k, v, compiled=compiled), **timer)
        run["total_ms"] = time_ms(lambda: run_plan(plan_attention(q, k, patterns, strip_kernel=strip_kernel, **plan_options),
                                                   q, k, v, compiled=compiled), **timer)
        run["speedup_vs_sdpa"] = sdpa_ms / run["total_ms"] if sdpa_ms else None
        runs.append(run)
        del out  # at 1M tokens it is 8.6 GB: gone before the next budget runs
    return runs


#: Prompt lengths and budget sets of ``--compile-counts`` (the target: at most 2 compilations across 10
#: lengths, one across 10 budget sets).
COUNT_LENGTHS = (4096, 5000, 6144, 7777, 8192, 9001, 10240, 12345, 14000, 16384)
COUNT_BUDGETS = ((100, 800), (200, 1000), (300, 1500), (500, 2000), (1000, 6096), (50, 300), (64, 512), (128, 256),
                 (700, 900), (400, 4000))


def compile_counts(geometry: dict) -> dict:
    """Compilations ``mf.sparse_attention`` triggers on CUDA: dynamo graphs (the FlexAttention kernel)
    and builds of each of our Triton kernels, for a first call, then 10 prompt lengths (budgets
    (1000, 6096)), then 10 budget sets (8192 tokens), every head vertical_and_slash, structured inputs."""
    from torch._dynamo.utils import counters

    from block_masks import score_kernel, strip_build_kernel

    from minference_flex.kernels import hopper_strips, merge as merge_kernel, triton_strips

    kernels = {"strip kernel": triton_strips._strip_forward, "merge": merge_kernel._merge_pair,
               "scores pass 1": score_kernel._row_stats, "scores pass 2": score_kernel._vertical_slash,
               "strip builder": strip_build_kernel._build}
    if hopper_strips.gluon is not None:
        kernels["hopper strips"] = hopper_strips._segments_and_columns

    def builds() -> dict[str, int]:  # Triton keeps one compiled kernel per specialisation, per device
        return {name: sum(len(cache[0]) for cache in fn.device_caches.values()) for name, fn in kernels.items()}

    Hq = geometry["Hq"]
    q, k, v = structured_qkv(Hq, geometry["Hkv"], max(COUNT_LENGTHS), geometry["D"], device="cuda")

    def run(n: int, budgets: tuple[int, int]) -> None:
        sparse_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], [["vertical_and_slash", *budgets]] * Hq)

    counts = {}
    for name, calls in (("first call", [(3000, (1000, 6096))]),
                        ("10 lengths", [(n, (1000, 6096)) for n in COUNT_LENGTHS]),
                        ("10 budget sets", [(8192, b) for b in COUNT_BUDGETS])):
        graphs, before = counters["stats"]["unique_graphs"], builds()
        for n, budgets in calls:
            run(n, budgets)
        torch.cuda.synchronize()
        after = builds()
        counts[name] = dict(dynamo_graphs=counters["stats"]["unique_graphs"] - graphs,
                            triton_builds={kernel: after[kernel] - before[kernel] for kernel in kernels})
    return counts


def _ms(value: float | None) -> str:
    return f"{value:8.2f}" if value is not None else f"{'-':>8}"


def _speedup(value: float | None) -> str:
    return f"{value:6.2f}x" if value is not None else f"{'-':>7}"


#: The table's columns: (header, unit, width); the unit row under the header says what the numbers are in.
COLUMNS = (("N", "tokens", 8), ("config", "", 24), ("strips", "", 6), ("budget", "(V, S)", 14), ("SDPA", "ms", 8),
           ("flex", "ms", 8), ("dense", "ms", 8), ("est", "ms", 7), ("build", "ms", 7), ("kernel", "ms", 8),
           ("total", "ms", 8), ("speedup", "x SDPA", 7), ("tiles", "frac", 6), ("recall", "mass", 6),
           ("err", "rel", 8))
LEGEND = ("SDPA, flex: dense causal SDPA and FlexAttention; dense: minference_flex with every head dense; est, build, "
          "kernel: the parts of total\n(estimating the pattern, building the masks, the attention kernel); speedup: "
          "SDPA ms / total ms; tiles: fraction of the causal tiles visited;\nrecall: attention mass kept (sampled "
          "rows); err: largest relative error against float64 over the kept cells")


def format_table(report: dict) -> str:
    """The bench table of a report (``bench.json``): a header, a row of units, one row per run, a legend."""
    lines = [f"{report['card']}, torch {report['torch']}, {report['geometry']}, {report['inputs']} inputs, bfloat16"
             + (", eager kernels" if report.get("eager") else ""),
             " ".join(f"{name:>{width}}" for name, _, width in COLUMNS),
             " ".join(f"{unit:>{width}}" for _, unit, width in COLUMNS)]
    for r in report["results"]:
        for run in r["runs"]:
            if "error" in run:
                lines.append(f"{r['length']:>8} {run['config']:>24} {run['strip_kernel']:>6} failed: "
                             f"{run['error'][:120]}")
                continue
            lines.append(f"{r['length']:>8} {run['config']:>24} {run['strip_kernel']:>6} "
                         f"{entry_label(run):>14} {_ms(r['sdpa_ms'])} "
                         f"{_ms(r.get('flex_dense_ms'))} {_ms(run['dense_pattern_ms'])} "
                         f"{run['estimate_ms']:7.2f} {run['build_ms']:7.2f} {run['kernel_ms']:8.2f} "
                         f"{run['total_ms']:8.2f} {_speedup(run['speedup_vs_sdpa'])} {run['tiles']['fraction']:6.3f} "
                         f"{run['recall']:6.3f} {run['rel_err']:8.1e}")
    lines.append(LEGEND)
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict:
    """``main`` returning the report (bench.json's contents)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default=None,
                   help="head layout of the structured inputs (default llama3-8b; --inputs capture: the "
                        "capture's)")
    p.add_argument("--inputs", choices=INPUTS, default="structured",
                   help="structured: bench_inputs.structured_qkv (default); capture: query/key/value of a real "
                        "model layer (SmolLM2 or Qwen2.5-Coder) from the --capture file")
    p.add_argument("--capture", type=Path, default=Path("smollm2_capture.pt"),
                   help="capture file of `minference-flex capture` for --inputs capture (default smollm2_capture.pt)")
    p.add_argument("--layer", type=non_negative_int, default=None,
                   help="with --inputs capture: which captured layer (default the first in the file)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[32768, 131072])
    p.add_argument("--budgets", type=budgets_arg, nargs="+", default=[(1000, 6096), (100, 800)], metavar="V,S",
                   help="vertical,slash budgets of the vertical_and_slash heads (default 1000,6096 100,800)")
    p.add_argument("--mass", type=budgets_arg, nargs="+", default=[], metavar="A,CAP",
                   help="also vertical_slash_mass heads: mass to keep in thousandths (1..1000), cap on columns and "
                        "offsets (e.g. 990,8192)")
    p.add_argument("--configs", nargs="+", default=["strips"],
                   help="strips (default: the strip kernel for the diagonals), or FlexAttention alone with "
                        "BlockMask tiles QxK and optional kernel options: 64x64:num_warps=4,num_stages=3")
    p.add_argument("--strip-kernels", nargs="+", choices=KERNELS, default=["auto"],
                   help="kernels of the strip configuration, each timed in the same run: auto (default: the Hopper "
                        "kernel for the diagonal strips where it runs), triton (the Triton kernel alone), hopper")
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument("--compile-counts", action="store_true",
                   help="instead of timing: count the compilations across 10 prompt lengths and 10 budget sets")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="untimed runs before each timing (default 3 on CUDA)")
    p.add_argument("--skip", nargs="+", default=[], choices=["sdpa", "flex", "dense-pattern"],
                   help="leave out baselines: SDPA, FlexAttention dense, the dense-pattern run (each 20-35 s a "
                        "call at 1M tokens)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for bench.json (default results)")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH.png",
                   help="also write a PNG of time against prompt length (needs matplotlib: pip install '.[plot]')")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default); cpu only to smoke-test the script at small lengths, with --eager")
    p.add_argument("--eager", action="store_true",
                   help="eager kernel emulation instead of compiled kernels (small lengths only; timings meaningless)")
    args = p.parse_args(argv)
    # Every check before any input is loaded or timed.
    for a, cap in args.mass:
        if not 1 <= a <= 1000:
            p.error(f"--mass: the mass is in thousandths, 1..1000; got {a},{cap}")
    for config in args.configs:
        try:
            parse_config(config)
        except ValueError as exc:
            p.error(f"--configs: {exc}")
    check_output_folder(p, "--out", args.out)
    if args.plot is not None:
        check_output(p, "--plot", args.plot, make_folder=True)
        check_matplotlib(p)
    check_device(p, args.device)
    geometry = args.geometry or "llama3-8b"
    capture, inputs = None, {"kind": args.inputs}
    if args.inputs == "capture":
        try:
            capture = load_capture(args.capture)
            if args.geometry is not None and args.geometry != capture["geometry"]:
                raise ValueError(f"--geometry {args.geometry}: the capture {args.capture} has the "
                                 f"{capture['geometry']} geometry")
            for n in args.lengths:  # every length must fit before anything is timed
                capture_index(capture, n, args.layer)
        except ValueError as exc:
            p.error(str(exc))
        geometry = capture["geometry"]
        layer = capture["layer"][0] if args.layer is None else args.layer
        inputs.update(file=str(args.capture), layer=layer, captured_length=capture["length"],
                      **{key: capture[key] for key in ("model", "text", "start", "model_dtype", "rope")
                         if key in capture})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.compile_counts:
        report = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, geometry=geometry,
                      lengths=COUNT_LENGTHS, budgets=COUNT_BUDGETS, counts=compile_counts(GEOMETRIES[geometry]))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_counts.json").write_text(json.dumps(report, indent=1))
        for name, c in report["counts"].items():
            built = ", ".join(f"{kernel} {n}" for kernel, n in c["triton_builds"].items())
            print(f"{name:>15}: {c['dynamo_graphs']} dynamo graphs; Triton builds: {built}")
        print(f"wrote {args.out / 'compile_counts.json'}")
        return report
    entries = [(VERTICAL_SLASH, a, b) for a, b in args.budgets] + [(VERTICAL_SLASH_MASS, a, b) for a, b in args.mass]
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = dict(card=card, torch=torch.__version__, geometry=geometry, inputs=args.inputs, inputs_detail=inputs,
                  eager=args.eager, results=[])
    for n in args.lengths:
        log.info("length %d", n)
        report["results"].append(bench_length(n, GEOMETRIES[geometry], entries, args.configs, args.reps,
                                              inputs=args.inputs, capture=capture, layer=args.layer,
                                              device=args.device, eager=args.eager, warmup=args.warmup,
                                              skip=tuple(args.skip), strip_kernels=tuple(args.strip_kernels)))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, args.plot)
    print(format_table(report))
    print(f"wrote {args.out / 'bench.json'}")
    if args.plot is not None:
        print(f"wrote {args.plot}")
    return report


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
