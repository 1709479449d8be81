"""``minference-flex search``: the pattern search of ``minference_flex.search`` from the command line.

    minference-flex search --length 16384 --out patterns.json                # SmolLM2, CPU
    minference-flex search --model qwen2.5-coder-1.5b --length 32768 --device cuda --out qwen_patterns.json
    minference-flex search --model /path/to/hf-model --length 32768 --device cuda --dtype bfloat16 \\
        --cost-budget 0.2 --allocate model --texts book.txt --checkpoint search.ckpt --plot search.png

Without ``--texts`` the calibration prompt is a needle-in-a-haystack prompt on the standard library's
prose (the same construction as ``minference-flex eval``, other haystack position and number).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from block_masks import Pattern

from minference_flex.tools.checks import (check_at_least, check_device, check_files, check_json, check_matplotlib,
                                         check_model, check_output, fraction, parse_entry, positive_int)
from minference_flex.tools.models import MODELS, QWEN_NAME, SMOLLM2_NAME
from minference_flex.search import ALLOCATIONS, DEFAULT_CANDIDATES, SearchResult, plot, search_patterns

CALIBRATION_SEED = 1234


def calibration_prompt(tokenizer, length: int) -> list[int]:
    """A needle prompt of ``length`` tokens (needle at 50% depth) on pydoc prose."""
    import random

    from minference_flex.tools.haystack import Haystack, needle_prompt

    rng = random.Random(CALIBRATION_SEED)
    hay = Haystack.build(tokenizer)
    ids, _ = needle_prompt(hay, tokenizer, length, 0.5, str(rng.randrange(10 ** 6, 10 ** 7)),
                           rng.randrange(len(hay.boundaries)))
    return ids[0].tolist()


def parse_candidates(spec: str) -> list[Pattern]:
    """``type,a,b;type,a,b;...`` -> patterns (ValueError naming the bad entry)."""
    return [Pattern.parse(parse_entry(item, "--candidates: each entry is"))
            for item in filter(None, (s.strip() for s in spec.split(";")))]


def load_model(name: str, length: int, device: str, dtype: torch.dtype):
    """(model, tokenizer): one of ``models.MODELS`` by name (YaRN as ``length`` needs), else a local
    transformers folder."""
    if name in MODELS:
        spec = MODELS[name]
        return spec.load(dtype=dtype, device=device, context=spec.context_for(length))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name, local_files_only=True)


def run_search(args) -> SearchResult:
    candidates = getattr(args, "candidate_patterns", None) or (
        parse_candidates(args.candidates) if args.candidates else list(DEFAULT_CANDIDATES))
    model, tokenizer = load_model(args.model, args.length, args.device, getattr(torch, args.dtype))
    if args.texts:
        texts = []
        for path in args.texts:
            with open(path) as f:
                texts.append(f.read())
    else:
        texts = [calibration_prompt(tokenizer, args.length)]
    return search_patterns(model, tokenizer, texts, length=args.length, cost_budget=args.cost_budget,
                           candidates=candidates, allocate=args.allocate, chunk=args.chunk,
                           checkpoint=args.checkpoint, progress=not args.no_progress)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check before a model loads; sets ``args.rechosen`` (the --rechoose result) and
    ``args.candidate_patterns``."""
    from minference_flex.tools.haystack import NEEDLE_MIN_LENGTH

    for option, path in (("--out", args.out), ("--details", args.details), ("--plot", args.plot)):
        check_output(p, option, path)
    if args.plot:
        check_matplotlib(p)
    if args.rechoose:
        data = check_json(p, "--rechoose", args.rechoose)
        try:
            args.rechosen = SearchResult.from_dict(data).rechoose(args.cost_budget, args.allocate)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError):
            p.error(f"--rechoose: {args.rechoose} is not a --details file of minference-flex search")
        return
    try:
        args.candidate_patterns = parse_candidates(args.candidates) if args.candidates else list(DEFAULT_CANDIDATES)
    except (TypeError, ValueError) as exc:
        p.error(f"--candidates: {exc}" if not str(exc).startswith("--candidates") else str(exc))
    if not args.candidate_patterns:
        p.error("--candidates names no pattern")
    if args.model in MODELS:
        check_model(p, args.model)
    elif not os.path.isdir(args.model):
        p.error(f"--model: {args.model} not found (expected {' or '.join(map(repr, MODELS))} or a local "
                "transformers model folder)")
    check_files(p, "--texts", args.texts)
    if not args.texts:
        check_at_least(p, "--length", args.length, NEEDLE_MIN_LENGTH, "the calibration needle prompt's question "
                       "and needle take ~95 tokens")
    check_device(p, args.device)
    if args.checkpoint and os.path.exists(args.checkpoint):
        data = check_json(p, "--checkpoint", args.checkpoint)
        if not isinstance(data, dict) or "fingerprint" not in data or "layers" not in data:
            p.error(f"--checkpoint: {args.checkpoint} is not a checkpoint of minference-flex search")
    elif args.checkpoint:
        check_output(p, "--checkpoint", args.checkpoint)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_NAME,
                   help=f"'{SMOLLM2_NAME}' (the bundled SmolLM2-135M-Instruct, default), '{QWEN_NAME}' "
                        f"(Qwen2.5-Coder-1.5B-Instruct: minference-flex fetch {QWEN_NAME}) or a local transformers "
                        "model folder")
    p.add_argument("--length", type=positive_int, default=16384,
                   help="calibration prompt length in tokens (default 16384)")
    p.add_argument("--cost-budget", type=fraction, default=0.3,
                   help="fraction of the dense causal KV tiles, above 0 and at most 1 (default 0.3)")
    p.add_argument("--allocate", choices=ALLOCATIONS, default="model",
                   help="budget per head or mean over the model's heads (default model)")
    p.add_argument("--candidates", default=None, help="'type,a,b;type,a,b;...' (default: DEFAULT_CANDIDATES, 14 "
                   "patterns of the three types)")
    p.add_argument("--texts", nargs="*", default=None, help="calibration text files (default: a needle prompt on "
                   "pydoc prose)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk", type=positive_int, default=256, help="query rows per dense scoring step")
    p.add_argument("--checkpoint", default=None, help="JSON file of finished layers; resumes when it exists")
    p.add_argument("--out", default="patterns.json", help="MInference JSON output (default patterns.json)")
    p.add_argument("--details", default=None, help="JSON with every candidate's recall and cost per head")
    p.add_argument("--rechoose", default=None, metavar="DETAILS",
                   help="no measurement: choose again from a --details file of an earlier search with this "
                        "run's --cost-budget and --allocate")
    p.add_argument("--plot", default=None, help="PNG figure of the choice and the recall per head")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_args(p, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    result = args.rechosen if args.rechoose else run_search(args)
    result.save(args.out)
    written = [args.out]
    if args.details:
        with open(args.details, "w") as f:
            json.dump(result.to_dict(), f)
        written.append(args.details)
    if args.plot:
        plot(result, args.plot)
        written.append(args.plot)
    counts: dict = {}
    for row in result.choice.tolist():
        for c in row:
            counts[result.candidates[c]] = counts.get(result.candidates[c], 0) + 1
    print(f"{'candidate':<34} {'heads':>5} {'uniform recall':>15} {'uniform cost':>13}")
    for c in result.candidates:
        r, cost = result.uniform(c)
        print(f"{str(c.to_list()[:3]):<34} {counts.get(c, 0):>5} {r:>15.4f} {cost:>13.3f}")
    print(f"{result.allocate} allocation, cost budget {result.cost_budget}: mean recall {result.mean_recall:.4f}, mean cost {result.mean_cost:.3f} of the causal tiles, "
          f"{result.seconds} s")
    for path in written:
        print(f"wrote {path}")
    if args.checkpoint and not args.rechoose:
        print(f"checkpoint (finished layers, resumable): {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
