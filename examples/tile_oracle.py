"""How good can a 64x64-tile sparse attention be on SmolLM2, and how good is each way to choose tiles?

Runs eval's perplexity text (pydoc prose) through SmolLM2-135M-Instruct with every attention layer
restricted to chosen 64x64 (query block, key block) tiles, and prints the perplexity against dense
SDPA, the fraction of causal tiles kept and the mean exact attention mass they hold. Rules:

- ``oracle-global F``: a dense pass records every tile's exact mass; the top fraction F of all
  causal tiles over all layers and heads is kept (the best selection at that tile count, for mass);
- ``oracle P``: per query block, the ranked prefix of key blocks reaching P of the exact mass
  (``block_mass`` with 64 sampled rows, i.e. exact);
- ``sampled-B P``: the same estimated from B sampled rows per block (``block_mass, 1000 P, B``);
- ``pooled P`` / ``pooled-count F``: MInference's block-sparse score (mean query . mean key, here
  scaled and through a softmax over causal blocks), until P of it, or a fixed fraction F of each row's blocks.

The diagonal block and key block 0 are kept by every per-row rule. Attention is computed in float32
in chunks of query rows (never the whole [N, N] at once). usage:

    python examples/tile_oracle.py --device cuda --out oracle.json
    python examples/tile_oracle.py --length 1024 --rules oracle:0.95 pooled:0.99   # a quick CPU run
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from block_masks import TILE, block_means
from block_masks.estimate import block_mass_estimate, kept_mass_blocks
from minference_flex.tools.haystack import Haystack
from minference_flex.tools.sides import perplexity
from minference_flex.hooks import wrap_attention
from minference_flex.tools.models import smollm2

DEFAULT_RULES = ["oracle-global:0.4", "oracle:0.95", "oracle:0.98", "pooled-count:0.4", "pooled:0.99",
                 "sampled-8:0.98", "sampled-16:0.98"]


def top_count(mass: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row t (query block t has t + 1 causal blocks), the ceil(fraction * (t + 1)) best blocks."""
    nq = mass.shape[-2]
    counts = torch.ceil(fraction * torch.arange(1, nq + 1, device=mass.device))
    rank = mass.argsort(-1, descending=True).argsort(-1)
    return rank < counts[:, None]


def pooled_mass(q: torch.Tensor, k: torch.Tensor, scale: float, causal: torch.Tensor) -> torch.Tensor:
    scores = block_means(q[None], 0, TILE)[0] @ block_means(k[None], 0, TILE)[0].transpose(-1, -2) * scale
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=8192, help="tokens of text, a multiple of 64 (default 8192)")
    p.add_argument("--rules", nargs="+", default=DEFAULT_RULES, help="rule:value, see above")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.length % TILE:
        p.error(f"--length must be a multiple of {TILE}")
    model, tokenizer = smollm2(dtype=torch.float32, device=args.device,
                               context=args.length if args.length > 8192 else None)
    hay = Haystack.build(tokenizer)
    ids = torch.tensor([hay.text_ids(hay.boundaries[0], args.length)])
    n, nt = args.length, args.length // TILE
    causal = torch.ones(nt, nt, dtype=torch.bool, device=args.device).tril()
    forced = torch.eye(nt, dtype=torch.bool, device=args.device)
    forced[:, 0] = True
    chunk = 2048 if args.device != "cpu" else 512
    exact: dict[int, torch.Tensor] = {}   # layer -> [H, nt, nt] exact tile mass (row-normalised)
    state: dict = {}

    def keep_for(layer, q, k, scale):
        rule, value = state["rule"]
        if rule == "oracle-global":
            return state["global"][layer]
        if rule == "pooled-count":
            return top_count(pooled_mass(q, k, scale, causal), value) | forced
        if rule == "pooled":
            mass = pooled_mass(q, k, scale, causal)
        else:
            rows = 64 if rule == "oracle" else int(rule.split("-")[1])
            mass = block_mass_estimate(q[None], k[None], scale, rows)[0]
        return kept_mass_blocks(mass, value)

    def attend(inner, module, query, key, value, attention_mask, **kwargs):
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        group = query.shape[1] // key.shape[1]
        q, k = query[0].float(), key[0].float().repeat_interleave(group, 0)
        v = value[0].float().repeat_interleave(group, 0)
        layer = module.layer_idx
        keep = keep_for(layer, q, k, scale) & causal if "rule" in state else None
        if keep is not None:
            state["kept"] += keep.sum().item()
            state["causal"] += causal.sum().item() * keep.shape[0]
            state["mass"] += (exact[layer] * keep).sum().item() / (keep.shape[0] * nt)
        out = torch.empty_like(q)
        record = keep is None and layer not in exact
        mass = torch.zeros(q.shape[0], nt, nt, device=q.device) if record else None
        positions = torch.arange(n, device=q.device)
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            allowed = positions[r0:r1, None] >= positions[None, :]
            if keep is not None:
                allowed = allowed & keep[:, r0 // TILE:r1 // TILE].repeat_interleave(TILE, 1).repeat_interleave(TILE, 2)
            probs = (q[:, r0:r1] @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
            if record:
                mass[:, r0 // TILE:r1 // TILE] = probs.view(q.shape[0], -1, TILE, nt, TILE).sum((2, 4)) / TILE
            out[:, r0:r1] = probs @ v
        if record:
            exact[layer] = mass
        return out.transpose(0, 1)[None].to(query.dtype), None

    results = {"length": n, "device": args.device, "torch": torch.__version__, "sdpa": perplexity(model, ids)}
    with wrap_attention(model, attend):
        results["dense_in_chunks"] = perplexity(model, ids)   # also records the exact tile masses
    print(f"dense: SDPA {results['sdpa']:.4f}, in chunks {results['dense_in_chunks']:.4f}", flush=True)
    for spec in args.rules:
        rule, value = spec.split(":")
        value = float(value)
        if rule == "oracle-global":
            everything = torch.stack([exact[i] for i in range(len(exact))]).masked_fill(~causal, -1.0)
            top = everything.flatten().topk(int(value * causal.sum().item() * everything.shape[1] * len(exact))).indices
            chosen = torch.zeros(everything.numel(), dtype=torch.bool, device=args.device)
            state["global"] = chosen.scatter_(0, top, True).view_as(everything)
        state.update(rule=(rule, value), kept=0, causal=0, mass=0.0)
        t0 = time.perf_counter()
        with wrap_attention(model, attend):
            ppl = perplexity(model, ids)
        n_layers = len(exact)
        row = {"perplexity": round(ppl, 4), "vs_dense_pct": round(100 * (ppl / results["sdpa"] - 1), 2),
               "tiles_kept": round(state["kept"] / state["causal"], 4), "mass_kept": round(state["mass"] / n_layers, 4)}
        results[spec] = row
        print(f"{spec:20s} {row}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        del state["rule"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
