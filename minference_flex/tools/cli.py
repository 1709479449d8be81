"""The ``minference-flex`` command: ``demo`` (needle in a haystack on SmolLM2, dense against sparse),
``layer`` (= ``demo --synthetic``: one synthetic attention layer), ``eval`` (the real-model evaluation
of docs/real_model.md), ``search`` (the per-head pattern search of docs/search.md), ``bench`` (the
GPU benchmark of docs/performance.md),
``capture`` (a real SmolLM2 layer's query/key/value, bench's ``--inputs capture``) and ``ttft`` (time
to first token of SmolLM2, SDPA against minference_flex) and ``fetch`` (download Qwen2.5-Coder-1.5B-Instruct
or the haystacks into the cache). The real-model commands take ``--model qwen2.5-coder-1.5b``.

    minference-flex demo [--length 4096] [--depths 50 100] [--patterns FILE|type,a,b] [--device cpu]
    minference-flex demo --synthetic [--length N] [--budgets V,S] [--eager] ...
    minference-flex bench --lengths 32768 131072 --reps 7 [--inputs capture] [--plot bench.png]
    minference-flex capture --length 131072 --device cuda --out smollm2_capture.pt
    minference-flex ttft --lengths 32768 131072 --device cuda
    minference-flex eval --lengths 4096 --samples 2 --out results.json
    minference-flex eval --tasks all --lengths 4096 8192 --haystack essays --plot ruler.png
    minference-flex search --length 16384 --out patterns.json
    minference-flex fetch qwen2.5-coder-1.5b|haystacks [--cache DIR]
    python -m minference_flex demo --help
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "needle in a haystack on SmolLM2-135M: dense vs sparse answers, prefill time, tiles skipped "
            "(--synthetic: the one-layer demo)",
    "layer": "one attention layer on synthetic long-prompt inputs: dense SDPA vs sparse attention",
    "bench": "GPU benchmark: SDPA, FlexAttention dense and minference-flex per length and budget",
    "eval": "real model (SmolLM2-135M or Qwen2.5-Coder-1.5B): needle retrieval or the RULER suite (--tasks), "
            "perplexity, TTFT and tiles skipped, dense vs sparse",
    "search": "offline per-head pattern search: a MInference pattern file for a model",
    "capture": "save the query/key/value a SmolLM2-135M layer receives on real prose (bench --inputs capture)",
    "ttft": "time to first token of SmolLM2-135M: SDPA vs minference_flex per prompt length",
    "fetch": "download into the cache: qwen2.5-coder-1.5b (Qwen2.5-Coder-1.5B-Instruct GGUF, 1.1 GB) or haystacks "
             "(Paul Graham's essays and Moby-Dick, 2 MB)",
}

#: The module of each command; each has ``main(argv: list[str] | None = None) -> int`` and names itself
#: after ``sys.argv[0]``. ``demo --synthetic`` is ``layer``.
MODULES = {"demo": "demo", "layer": "layer_demo", "eval": "eval", "search": "search_cli", "capture": "capture",
           "ttft": "ttft", "bench": "bench", "fetch": "fetch"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="minference-flex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from minference_flex import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        # The subcommand's own parser handles its options (and its --help).
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    command, prog = args.command, f"minference-flex {args.command}"
    if command == "demo" and "--synthetic" in rest:
        command, prog = "layer", f"{prog} --synthetic"
        rest = [a for a in rest if a != "--synthetic"]
    module = importlib.import_module(f".{MODULES[command]}", __package__)
    program = sys.argv[0]
    sys.argv[0] = prog  # the command's parser names itself after argv[0]
    try:
        return module.main(rest)
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    sys.exit(main())
