"""``minference-flex ttft``: time to first token of SmolLM2-135M (or ``--model qwen2.5-coder-1.5b``),
dense SDPA against minference_flex.

    minference-flex ttft --device cuda                          # 32768 and 131072 tokens, bf16, median of 3
    minference-flex ttft --device cuda --lengths 16384 65536 --patterns vertical_and_slash,1000,6096
    minference-flex ttft --lengths 2048 --min-sparse-len 1024 --eager --reps 1     # CPU smoke test

For each length the model (``models.smollm2``, real weights; YaRN over the original 8192 positions
when the length needs it, ``models.ModelSpec.context_for``; Qwen: YaRN factor 4 beyond 32768; one load
per RoPE setting) gets a prompt of that many tokens of real prose (the pydoc topic texts, as
``minference-flex capture`` uses) and, per side
(``attn_implementation="sdpa"``, then ``"minference_flex"`` with ``--patterns`` on every head,
``--min-sparse-len`` and the backend's SDPA fallback on, as users get it: on CUDA a layer call whose
sparse kernel the cost model predicts slower runs SDPA; ``dispatch`` in the JSON counts the layer
calls per way they went, warm-up and layer timing included), runs one untimed warm-up (on the sparse
side it compiles the kernel), then ``--reps`` rounds of one timed run per side in turn (interleaved)
of what the first token costs: the prefill forward
over the prompt (KV cache built, as ``generate`` does, and only the last position's logits,
``logits_to_keep=1``) and the argmax of those logits. Timing: CUDA events around the call on CUDA (after a synchronize), wall clock on
the CPU; reported is the median, with every run. On CUDA also the peak allocated memory of the timed
runs (weights included). The first tokens of both sides are reported and compared. ``--layer-times``
(CUDA) also times every layer's attention call on both sides, with sdpa timed once more as an A/A
control that shows how much of the per-layer ratio is noise (``run_ttft``).

The table goes to stdout, everything to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time

import torch

from minference_flex import hf
from minference_flex.tools.checks import check_device, check_model, check_output, check_patterns, positive_int
from minference_flex.tools.haystack import Haystack
from minference_flex.tools.layer_timing import LayerTimes
from minference_flex.tools.models import MODELS
from minference_flex.tools.sides import add_model_option, add_patterns_option, each_context, finish, use_side
from minference_flex.tools.timing import timed_runs

log = logging.getLogger(__name__)

SIDES = ("sdpa", "minference_flex")
DEFAULT_LENGTHS = [32768, 131072]
#: With --layer-times, sdpa timed once more (A/A control): how far the per-layer ratios move by noise.
CONTROL = "sdpa (again)"
#: --layer-times rounds by default: enough for about LAYER_SECONDS of forwards, within these bounds.
LAYER_ROUNDS = (20, 100)
LAYER_SECONDS = 10.0


def _side(name: str) -> str:
    """The attention implementation a timed side runs (the control runs sdpa)."""
    return "sdpa" if name == CONTROL else name


def auto_layer_reps(round_ms: float) -> int:
    """Rounds of per-layer timing for one length whose round (three forwards) takes ``round_ms``:
    short prompts are cheap and their host-bound calls noisy, so they get more (4K: 100, 128K: 20)."""
    low, high = LAYER_ROUNDS
    return max(low, min(high, math.ceil(LAYER_SECONDS * 1e3 / max(round_ms, 1e-3))))


@torch.inference_mode()
def first_token(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The greedy first token (a 0-d tensor on the model's device) after a prefill of ``input_ids``."""
    logits = model(input_ids=input_ids, use_cache=True, logits_to_keep=1).logits
    return logits[0, -1].argmax()


def run_ttft(model, tokenizer, lengths, *, patterns, min_sparse_len: int, reps: int, hay: Haystack | None = None,
             context: int | None = None, layer_times: bool = False, layer_reps: int | None = None,
             compiled: bool = True) -> list[dict]:
    """Both sides at every length of ``lengths`` on an already loaded model; one record per length.

    Per side one untimed warm-up (it compiles the sparse kernel and fills caches), then ``reps``
    rounds, each timing one first token per side in turn (interleaved, so that drift of the machine
    hits both sides alike, and each side first in every other round; at 4K tokens this model's
    forward is bound by the host). ``layer_times`` (CUDA): ``layer_reps`` more rounds (None:
    ``auto_layer_reps``) time every layer's attention call (``LayerTimes``) in three forwards, sdpa,
    minference_flex and sdpa again (``CONTROL``), in an order that rotates round by round; the record
    gets each layer's minference_flex / sdpa ratio of the medians (``layer_ratio``) and the control's
    (``control_ratio``: what noise alone gives; at 4K, where the calls are host-bound, 5 rounds leave
    7-11% of it in the worst layer's ratio, 30 up to 8%, 100 at most 4.6% in three runs)."""
    hay = hay or Haystack.build(tokenizer)
    cuda = model.device.type == "cuda"
    records = []
    for n in lengths:
        ids = torch.tensor([hay.text_ids(hay.boundaries[0], n)], device=model.device)
        impls = {}

        def switch(side: str) -> str:
            impls[side] = use_side(model, "dense" if side == "sdpa" else "sparse", patterns, min_sparse_len,
                                   sdpa_fallback=True, compiled=compiled)
            return impls[side]

        sides = {side: {"runs_ms": [], "peak_bytes": None, "dispatch": {}} for side in SIDES}
        tokens = {}
        hf.clear_dispatch_counts(model)
        for side in SIDES:
            log.info("length %d, %s: warm-up", n, switch(side))
            tokens[side] = int(first_token(model, ids))
        log.info("length %d: %d rounds of one timed run per side", n, reps)
        for r in range(reps):
            for side in SIDES[r % 2:] + SIDES[:r % 2]:  # each side first in every other round
                switch(side)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                out = []
                sides[side]["runs_ms"] += timed_runs(lambda: out.append(first_token(model, ids)), 1,
                                                     "cuda" if cuda else "cpu")
                if int(out[0]) != tokens[side]:
                    log.warning("%s: first token changed between runs: %d then %d", side, tokens[side], int(out[0]))
                if cuda:
                    peak = torch.cuda.max_memory_allocated()
                    sides[side]["peak_bytes"] = max(sides[side]["peak_bytes"] or 0, peak)
        if layer_times:
            # CONTROL times sdpa a second time: its ratio to sdpa is the noise of the per-layer ratios.
            timed = (*SIDES, CONTROL)
            timers = {name: LayerTimes(switch(_side(name))) for name in timed}
            rounds = layer_reps or auto_layer_reps(2 * statistics.median(sides["sdpa"]["runs_ms"])
                                                   + statistics.median(sides["minference_flex"]["runs_ms"]))
            for r in range(rounds):
                for name in timed[r % 3:] + timed[:r % 3]:  # the order rotates round by round
                    switch(_side(name))
                    with timers[name]:
                        first_token(model, ids)
            for side in SIDES:
                sides[side]["layer_ms"] = timers[side].medians()
            control_ms = timers[CONTROL].medians()
        rec = {"length": n, "context": context, "sides": {}, "layer_reps": rounds if layer_times else None}
        for side in SIDES:
            res = sides[side]
            res["ms"] = statistics.median(res["runs_ms"])
            res["runs_ms"] = [round(t, 3) for t in res["runs_ms"]]
            res["token"] = tokens[side]
            res["token_text"] = tokenizer.decode([tokens[side]])
            res["backend"] = impls[side]
            rec["sides"][side] = res
        # Every backend decision of the sparse side (warm-up and timed runs; the dense side runs none).
        rec["sides"]["minference_flex"]["dispatch"] = dict(hf.dispatch_counts(model))
        dense, sparse = rec["sides"]["sdpa"], rec["sides"]["minference_flex"]
        rec["speedup"] = dense["ms"] / sparse["ms"]
        rec["same_first_token"] = dense["token"] == sparse["token"]
        if layer_times:
            rec["layer_ratio"] = {layer: sparse["layer_ms"][layer] / ms for layer, ms in dense["layer_ms"].items()}
            rec["control_ratio"] = {layer: control_ms[layer] / ms for layer, ms in dense["layer_ms"].items()}
        records.append(rec)
        if cuda:
            torch.cuda.empty_cache()
    model.set_attn_implementation("sdpa")
    return records


def format_table(report: dict) -> str:
    lines = [f"{report['device_name']}, torch {report['torch']}, {report['dtype']}; patterns {report['patterns']}, "
             f"min_sparse_len {report['min_sparse_len']}" + (", eager kernel emulation" if report["eager"] else ""),
             f"{'length':>7} {'side':<16} {'TTFT ms':>10} {'runs ms':<28} {'peak GiB':>8} {'first token':<14}"]
    for rec in report["results"]:
        for side in SIDES:
            r = rec["sides"][side]
            peak = f"{r['peak_bytes'] / 2 ** 30:8.2f}" if r["peak_bytes"] is not None else f"{'-':>8}"
            runs = " ".join(f"{t:.1f}" for t in r["runs_ms"])
            label = side if r["backend"] == side else f"{side} ({r['backend']})"
            lines.append(f"{rec['length']:>7} {label:<16} {r['ms']:10.1f} {runs:<28} {peak} {r['token_text']!r:<14}")
        dispatch = rec["sides"]["minference_flex"].get("dispatch")
        ways = ", ".join(f"{way} {count}" for way, count in sorted(dispatch.items())) if dispatch else ""
        lines.append(f"{'':>7} {'sdpa / minference_flex':<27} {rec['speedup']:.2f}x, "
                     f"first tokens {'identical' if rec['same_first_token'] else 'DIFFER'}"
                     + (f"; sparse-side layer calls: {ways}" if ways else ""))
        for key, label in (("layer_ratio", "minference_flex / sdpa"), ("control_ratio", "sdpa / sdpa (A/A control)")):
            if rec.get(key):
                layer, worst = max(rec[key].items(), key=lambda kv: kv[1])
                best = min(rec[key].values())
                median = statistics.median(rec[key].values())
                lines.append(f"{'':>7} per-layer attention {label} (median of {rec['layer_reps']} calls each): "
                             f"median {median:.3f}, worst {worst:.3f} (layer {layer}), best {best:.3f}")
    lines.append(f"TTFT: prefill forward (KV cache, last-position logits) + argmax, median of {report['reps']} "
                 f"interleaved rounds (one run per side each) after one warm-up per side and length")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=positive_int, nargs="+", default=DEFAULT_LENGTHS,
                   help="prompt lengths in tokens (default 32768 131072)")
    add_model_option(p)
    add_patterns_option(p)
    p.add_argument("--min-sparse-len", type=positive_int, default=8192,
                   help="prefills shorter than this run dense on the sparse side (default 8192, the backend's)")
    p.add_argument("--reps", type=positive_int, default=3, help="timed runs per side and length (default 3)")
    p.add_argument("--layer-times", action="store_true",
                   help="(CUDA) also time every layer's attention call on both sides and on sdpa once more (A/A "
                        "control), --layer-reps more prefills each")
    p.add_argument("--layer-reps", type=positive_int, default=None,
                   help="rounds of prefills timed per layer with --layer-times (default: about 10 s of forwards "
                        "per length, 20 to 100 rounds; fewer leave the worst layer's ratio to noise at short lengths)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--eager", action="store_true", help="sparse side on the eager kernel emulation (small lengths)")
    p.add_argument("--out", default="ttft.json", help="JSON results file (default ttft.json); '' writes none")
    args = p.parse_args(argv)
    # Every check before the model loads.
    check_device(p, args.device)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.layer_times and not args.device.startswith("cuda"):
        p.error("--layer-times times CUDA kernels: it needs --device cuda")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    check_output(p, "--out", args.out)
    model = check_model(p, args.model)
    args.patterns = args.patterns or model.default_patterns
    args.patterns_value = check_patterns(p, args.patterns, num_layers=model.layers, num_heads=model.heads)
    return args


def run(args) -> dict:
    cuda = args.device.startswith("cuda")
    import transformers

    model_spec = MODELS[args.model]
    report = {"model": model_spec.description, "device": args.device,
              "device_name": torch.cuda.get_device_name(args.device) if cuda
              else f"cpu ({torch.get_num_threads()} threads)",
              "torch": str(torch.__version__), "transformers": transformers.__version__, "dtype": args.dtype,
              "patterns": args.patterns, "min_sparse_len": args.min_sparse_len, "reps": args.reps,
              "layer_reps": (args.layer_reps or "auto") if args.layer_times else None,
              "eager": args.eager, "text": "pydoc_data.topics", "load_seconds": {}, "results": []}
    hays = []

    def run(context, label, lengths, model, tokenizer):
        report["load_seconds"][label] = round(model.load_seconds, 1)
        if not hays:
            hays.append(Haystack.build(tokenizer))
        report["results"] += run_ttft(model, tokenizer, lengths, patterns=args.patterns_value,
                                      min_sparse_len=args.min_sparse_len, reps=args.reps, hay=hays[0],
                                      context=context, layer_times=args.layer_times, layer_reps=args.layer_reps,
                                      compiled=not args.eager)

    each_context(args.lengths, run, model=model_spec, dtype=getattr(torch, args.dtype), device=args.device,
                 attn_implementation="sdpa")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    report = run(args)
    finish(report, format_table(report), args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
