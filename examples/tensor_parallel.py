"""Tensor parallelism with ``attn_implementation="minference_flex"``: one process per rank (torchrun).

The model loads with transformers' TP plan (``DistributedConfig(tp_plan="auto")``, the same as the
deprecated ``tp_plan="auto"`` argument): q/k/v_proj are split column-wise, so rank ``r`` of ``W``
runs query heads ``r*Hq/W .. (r+1)*Hq/W - 1`` (and their KV heads, whole GQA groups) with those
heads' patterns. Started without torchrun, the same script runs the whole model in one process.

Without ``--model`` the model is a tiny random Llama (8 query heads, 2 KV heads, seeded, the same
in every process) with one pattern kind per head, which runs on CPU (gloo). ``--out`` saves the
logits (rank 0), ``--check`` compares them with a file saved by another run:

    python examples/tensor_parallel.py --out single.pt
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --check single.pt
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import minference_flex as mf

KINDS = [["dense", 0, 0], ["stream_llm", 4, 16], ["vertical_and_slash", 8, 16], ["block_sparse", 1, 0],
         ["block_mass", 500, 4], ["vertical_slash_mass", 900, 64]]


def tiny_model_dir(folder: str) -> str:
    """Save the tiny random Llama (seed 0) in ``folder`` and return it."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder or hub name (default: the tiny random Llama)")
    p.add_argument("--patterns", help="MInference per-head JSON file (default: one kind per head, in turn)")
    p.add_argument("--min-sparse-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256, help="prompt length (random token ids)")
    p.add_argument("--out", help="save the logits here (rank 0)")
    p.add_argument("--check", help="compare the logits with this file (saved with --out)")
    args = p.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")} if distributed else {}
    with tempfile.TemporaryDirectory() as folder:
        path = args.model or tiny_model_dir(folder)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="minference_flex",
                                                     dtype=torch.float32, **kwargs).eval()
    config = model.config.get_text_config()
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    patterns = args.patterns or [{str(h): KINDS[(3 * layer + h) % len(KINDS)] for h in range(heads)}
                                 for layer in range(layers)]
    mf.set_patterns(model, patterns, min_sparse_len=args.min_sparse_len, sdpa_fallback=False,
                    compiled=model.device.type == "cuda")
    rank = torch.distributed.get_rank() if distributed else 0
    ids = torch.randint(3, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits.float().cpu()
    if rank == 0:
        world = torch.distributed.get_world_size() if distributed else 1
        print(f"{world} process(es), {heads // world} of {heads} query heads each; "
              f"layer calls {dict(mf.dispatch_counts(model))}; logits |max| {logits.abs().max():.6f}")
        if args.out:
            torch.save(logits, args.out)
        if args.check:
            print(f"max |difference| from {args.check}: {(logits - torch.load(args.check)).abs().max():.3g}")
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
