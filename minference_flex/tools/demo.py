"""``minference-flex demo``: needle in a haystack on a real model, dense SDPA against minference_flex.

    minference-flex demo                                  # SmolLM2-135M, 4096 tokens, depths 50/100, CPU
    minference-flex demo --length 8192 --depths 0 50 100 --patterns stream_llm,64,1024 --device cuda
    minference-flex demo --synthetic [--length N ...]     # one synthetic attention layer instead (layer_demo.py)

SmolLM2-135M-Instruct (``models.smollm2``, float32) is loaded once. For each depth a needle prompt of
``--length`` tokens is built (``eval.needle_prompt``: pydoc prose, "The special magic number is
NNNNNNN." at that depth, the question in the chat template) and answered greedily, first with
``attn_implementation="sdpa"`` (dense), then with ``"minference_flex"`` (sparse, ``--patterns`` on
every head, prefills of ``--min-sparse-len`` tokens or more). Printed per prompt: depth, planted
number, both answers and whether each contains the number, the prefill time of each side (the
model's forward over the prompt inside ``generate``, timed on its own, without the decoding steps)
and the fraction of causal 64x64 KV tiles the sparse side skips (``eval.tile_counter``; its
counting time is not in the prefill time). The first sparse call compiles the kernel for the prompt
length (CPU: seconds to minutes), so one untimed warm-up call on one layer's shapes runs first.
The last line sums up: pass rates, identical answers, mean prefill times and tiles skipped.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from minference_flex.hf import text_config
from minference_flex.tools.checks import check_device, check_model, check_patterns, percent, positive_int
from minference_flex.tools.haystack import NEEDLE_MIN_LENGTH, Haystack, needle_prompt, passes
from minference_flex.tools.models import MODELS
from minference_flex.tools.sides import add_model_option, add_patterns_option, greedy, layer_patterns, load_patterns, tile_counter, use_side


class PrefillTimer:
    """Times the first forward call of ``model`` (the prefill inside ``generate``) while active."""

    def __init__(self, model):
        self.model, self.seconds, self._t0, self._handles = model, None, None, []

    def _sync(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _pre(self, module, args, kwargs):
        if self.seconds is None and self._t0 is None:
            self._sync()
            self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        if self.seconds is None and self._t0 is not None:
            self._sync()
            self.seconds = time.perf_counter() - self._t0

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def warm_up(model, length: int, patterns) -> None:
    """Compile the sparse kernel for ``length`` tokens: one ``sparse_attention`` call with the query/key
    layout and dtype the model's attention layers pass (random values; the kernel is compiled per
    shape on CPU, shared by all layers and budgets), instead of a whole untimed sparse prefill."""
    from minference_flex.attention import sparse_attention

    tc = text_config(model)
    hq, hkv = tc.num_attention_heads, tc.num_key_value_heads
    d = getattr(tc, "head_dim", None) or tc.hidden_size // hq
    dtype, device = model.dtype, model.device
    g = torch.Generator().manual_seed(0)
    # [B, N, H, D] transposed to [B, H, N, D], as the attention modules hand them over
    q = torch.randn(1, length, hq, d, generator=g).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(1, length, hkv, d, generator=g).to(device, dtype).transpose(1, 2) for _ in range(2))
    with torch.inference_mode():
        sparse_attention(q, k, v, patterns, scale=d ** -0.5)


def clip(text: str, width: int = 40) -> str:
    """``repr`` of a stripped answer, cut to ``width`` characters with an ellipsis."""
    r = repr(text.strip())
    return r if len(r) <= width else r[: width - 4] + "...'"


def summary_line(records: list[dict]) -> str:
    """One line over the per-prompt records (keys dense_pass, sparse_pass, identical, dense_prefill,
    sparse_prefill, skipped: a fraction or None)."""
    n = len(records)
    count = lambda key: sum(bool(r[key]) for r in records)  # noqa: E731
    mean = lambda key: sum(r[key] for r in records) / n if n else 0.0  # noqa: E731
    skipped = [r["skipped"] for r in records if r.get("skipped") is not None]
    tiles = f"{sum(skipped) / len(skipped):.1%}" if skipped else "n/a"
    return (f"summary: dense {count('dense_pass')}/{n} passed, sparse {count('sparse_pass')}/{n} passed, "
            f"identical answers {count('identical')}/{n}, mean prefill dense {mean('dense_prefill'):.2f} s / "
            f"sparse {mean('sparse_prefill'):.2f} s, tiles skipped {tiles}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true",
                   help="run the synthetic one-layer demo instead (same as `minference-flex layer`; "
                        "see `minference-flex layer --help` for its options)")
    p.add_argument("--length", type=positive_int, default=4096,
                   help=f"prompt length in tokens (default 4096, {NEEDLE_MIN_LENGTH} to the model's context: 8192 "
                        "for SmolLM2, 32768 for Qwen)")
    p.add_argument("--depths", type=percent, nargs="+", default=[50, 100],
                   help="needle depths in percent of the haystack, 0..100 (default 50 100)")
    add_model_option(p)
    add_patterns_option(p)
    p.add_argument("--min-sparse-len", type=positive_int, default=1024,
                   help="prefills shorter than this run dense on the sparse side (default 1024)")
    p.add_argument("--max-new-tokens", type=positive_int, default=10, help="greedy tokens per answer (default 10)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="haystack start and planted numbers (default 0)")
    p.add_argument("--eager", action="store_true", help="sparse side on the eager kernel emulation (no compile)")
    args = p.parse_args(argv)
    # Every check before the model loads.
    context = MODELS[args.model].original_context
    if not NEEDLE_MIN_LENGTH <= args.length <= context:
        p.error(f"--length must be between {NEEDLE_MIN_LENGTH} and {context} (the question and the needle take "
                f"~95 tokens; {context} is {args.model}'s context, `minference-flex eval` handles longer prompts "
                f"with YaRN), got {args.length}")
    check_device(p, args.device)
    model = check_model(p, args.model)
    args.patterns = args.patterns or model.default_patterns
    args.patterns_value = check_patterns(p, args.patterns, num_layers=model.layers, num_heads=model.heads)
    return args


def run(args, out=print) -> list[dict]:
    patterns = getattr(args, "patterns_value", None) or load_patterns(args.patterns)
    t_start = time.perf_counter()
    spec = MODELS[args.model]
    model, tokenizer = spec.load(dtype=torch.float32, device=args.device)
    out(f"model: {spec.description}, float32 on {args.device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; loaded in {model.load_seconds:.1f} s")
    described = (f"{patterns[0]} {','.join(map(str, patterns[1:]))} on every head" if isinstance(patterns[0], str)
                 else f"per-head patterns from {args.patterns}")
    out(f"prompts: {args.length} tokens, needle at depths {', '.join(f'{d:g}%' for d in args.depths)}; "
        f"dense = sdpa, sparse = minference_flex, {described}, min_sparse_len {args.min_sparse_len}")
    hay = Haystack.build(tokenizer)
    tc = text_config(model)
    per_layer = layer_patterns(patterns, tc.num_hidden_layers, tc.num_attention_heads)
    rng = random.Random(args.seed)
    start = rng.randrange(len(hay.boundaries))
    prompts = []
    for depth in args.depths:
        number = str(rng.randrange(10 ** 5, 10 ** 7))
        ids, pos = needle_prompt(hay, tokenizer, args.length, depth / 100, number, start)
        prompts.append((depth, number, ids, pos))

    if not args.eager and args.length >= args.min_sparse_len:
        t0 = time.perf_counter()
        warm_up(model, args.length, per_layer[0])
        out(f"warm-up: compiled the sparse kernel for {args.length} tokens on one layer's shapes, untimed: "
            f"{time.perf_counter() - t0:.1f} s")

    records = []
    for i, (depth, number, ids, pos) in enumerate(prompts):
        rec = {"depth": depth, "number": number}
        out(f"[{i + 1}/{len(prompts)}] depth {depth:g}% (needle at token {pos}), number {number}")
        for side in ("dense", "sparse"):
            impl = use_side(model, side, patterns, args.min_sparse_len, compiled=not args.eager)
            stats: dict = {}
            counting = tile_counter(model, per_layer, args.min_sparse_len, stats) if side == "sparse" else None
            with PrefillTimer(model) as timer:
                if counting is not None:
                    with counting:
                        answer = greedy(model, tokenizer, ids, args.max_new_tokens)
                else:
                    answer = greedy(model, tokenizer, ids, args.max_new_tokens)
            prefill = (timer.seconds or 0.0) - stats.get("count_seconds", 0.0)
            ok = passes(number, answer)
            rec.update({f"{side}_answer": answer, f"{side}_pass": ok, f"{side}_prefill": prefill})
            line = f"    {side:<6} {impl:<15} prefill {prefill:6.2f} s  {'PASS' if ok else 'fail'}  {clip(answer)}"
            if side == "sparse":
                rec["skipped"] = 1 - stats["touched"] / stats["causal"] if stats.get("causal") else None
                line += (f"  tiles skipped {rec['skipped']:.1%}" if rec["skipped"] is not None
                         else "  (below --min-sparse-len: dense)")
            out(line)
        rec["identical"] = rec["dense_answer"].strip() == rec["sparse_answer"].strip()
        records.append(rec)
    out("prefill: the forward over the prompt inside generate(), decoding excluded; tiles skipped: causal "
        "64x64 KV tiles no kept cell reads, all layers and heads")
    out(summary_line(records) + f", total {time.perf_counter() - t_start:.0f} s")
    return records


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--synthetic" in argv:  # the command line (tools/cli.py) runs `layer` for it
        print("--synthetic is the one-layer demo: run `minference-flex demo --synthetic ...` or `minference-flex "
              "layer ...`", file=sys.stderr)
        return 2
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
