"""Which estimate of the block mass keeps the attention, at how many 64x64 blocks, on captured layers?

Reads a capture of ``minference-flex capture`` (post-RoPE query/key of some layers of a real model on
real prose) and, for every head, every estimate and every mass target, keeps per query block the
ranked prefix of the estimated key-block masses that reaches the target (plus the diagonal block and
key block 0: ``block_mass``'s rule, ``kept_mass_blocks``), then sums the exact causal attention of **every row** (float32,
computed in chunks of query rows: no [N, N] tensor) over the kept blocks. Printed and written as
JSON: per estimate and target, the causal blocks kept, the mean recall and the share of rows whose
recall is below 0.9 (mean over heads), with the per-layer means. Estimates (``--estimates``):

- ``oracle``: the exact block masses (the mean over a block's rows of each row's softmax per key block);
- ``rows-B``: ``block_mass``'s own estimate, B sampled rows per query block (``block_mass_estimate``);
- ``anti-S``: ``antidiagonal_mass``'s estimate, XAttention's antidiagonal scoring: the scores of
  the S antidiagonal cells of every SxS square (one query row and one key each), their mean as the
  square's logit, a causal softmax over squares, summed per 64x64 block
  (``antidiagonal_mass_estimate``);
- ``pooled``: FlexPrefill's and MInference's block means of queries and keys, a causal softmax over
  key blocks;
- ``pooled-q``: the block mean of the queries against every key, softmax, summed per key block.

usage (a capture first; the table of docs/performance.md is layers 2 10 20 of Qwen at 8192 tokens):

    minference-flex capture --model qwen2.5-coder-1.5b --length 8192 --layers 2 10 20 --dtype float32 --out qwen.pt
    python examples/block_estimates.py qwen.pt --out estimates.json
"""
from __future__ import annotations

import argparse
import json

import torch

from block_masks import TILE
from block_masks.estimate import antidiagonal_mass_estimate, block_mass_estimate, kept_mass_blocks

DEFAULT_ESTIMATES = ["oracle", "rows-16", "rows-8", "rows-4", "rows-1", "anti-8", "anti-16", "pooled", "pooled-q"]
DEFAULT_TARGETS = [0.95, 0.98, 0.99]
#: Bytes of float32 scores held at once by the chunked exact attention.
CHUNK_BYTES = 2**28


def causal_rows(q: torch.Tensor, k: torch.Tensor, scale: float, first: int) -> torch.Tensor:
    """Softmax of rows first .. first + len(q) - 1 of causal attention, [R, N] float32."""
    s = (q @ k.T) * scale
    rows = torch.arange(first, first + q.shape[0], device=q.device)
    return s.masked_fill_(torch.arange(k.shape[0], device=q.device) > rows[:, None], float("-inf")).softmax(-1)


def exact_block_rows(q: torch.Tensor, k: torch.Tensor, scale: float):
    """Yields (first query block, [c, 64, nb] exact mass per row and key block) in chunks."""
    n = q.shape[0]
    nb = n // TILE
    step = max(1, CHUNK_BYTES // (4 * n * TILE))
    for c in range(0, nb, step):
        p = causal_rows(q[c * TILE:(c + step) * TILE], k, scale, c * TILE)
        yield c, p.view(-1, TILE, nb, TILE).sum(-1)


def estimate(name: str, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[nb, nb] estimated mass of (query block, key block) for one head, q and k [N, D] float32."""
    n, d = q.shape
    nb = n // TILE
    later = torch.arange(nb, device=q.device)[None, :] > torch.arange(nb, device=q.device)[:, None]
    if name == "oracle":
        return torch.cat([m.mean(1) for _, m in exact_block_rows(q, k, scale)])
    if name.startswith("rows-"):
        return block_mass_estimate(q[None, None], k[None, None], scale, int(name[5:]))[0, 0]
    if name.startswith("anti-"):
        return antidiagonal_mass_estimate(q[None, None], k[None, None], scale, int(name[5:]))[0, 0]
    if name == "pooled":
        pq, pk = q.view(nb, TILE, d).mean(1), k.view(nb, TILE, d).mean(1)
        return ((pq @ pk.T) * scale).masked_fill(later, float("-inf")).softmax(-1)
    if name == "pooled-q":
        pq = q.view(nb, TILE, d).mean(1)
        last = torch.arange(1, nb + 1, device=q.device) * TILE - 1      # each block's last row
        s = ((pq @ k.T) * scale).masked_fill(torch.arange(n, device=q.device) > last[:, None], float("-inf"))
        return s.softmax(-1).view(nb, nb, TILE).sum(-1)
    raise ValueError(f"unknown estimate {name!r}; allowed: oracle, rows-B, anti-S, pooled, pooled-q")


def study(query: torch.Tensor, key: torch.Tensor, layers: list, estimates: list[str], targets: list[float]) -> dict:
    """query [L, Hq, N, D], key [L, Hkv, N, D] (one row per captured layer; N a multiple of 64)."""
    L, Hq, N, D = query.shape
    if N % TILE:
        raise ValueError(f"the capture's length must be a multiple of {TILE}, got {N}")
    group, nb, scale = Hq // key.shape[1], N // TILE, D ** -0.5
    causal_blocks = nb * (nb + 1) / 2
    per_head: dict = {}
    for li in range(L):
        for h in range(Hq):
            q, k = query[li, h].float(), key[li, h // group].float()
            keeps = {(e, t): kept_mass_blocks(estimate(e, q, k, scale), t) for e in estimates for t in targets}
            recall = {key_: [] for key_ in keeps}
            for c, rows in exact_block_rows(q, k, scale):
                for key_, keep in keeps.items():
                    recall[key_].append((rows * keep[c:c + rows.shape[0], None, :]).sum(-1).flatten())
            for (e, t), parts in recall.items():
                r = torch.cat(parts)
                per_head.setdefault(f"{e}@{t}", []).append(
                    (layers[li], keeps[(e, t)].sum().item() / causal_blocks, r.mean().item(), (r < 0.9).float().mean().item()))
    def mean(xs, i):
        return round(sum(x[i] for x in xs) / len(xs), 4)
    return {name: {"blocks": mean(xs, 1), "recall": mean(xs, 2), "rows_below_0.9": mean(xs, 3),
                   "per_layer": {str(layer): {"blocks": mean([x for x in xs if x[0] == layer], 1),
                                              "recall": mean([x for x in xs if x[0] == layer], 2)} for layer in layers}}
            for name, xs in per_head.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("capture", help="a file written by minference-flex capture")
    p.add_argument("--estimates", nargs="+", default=DEFAULT_ESTIMATES)
    p.add_argument("--targets", type=float, nargs="+", default=DEFAULT_TARGETS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if not all(0 < t <= 1 for t in args.targets):
        p.error(f"targets are fractions in (0, 1], got {args.targets}")
    cap = torch.load(args.capture)
    layers = list(cap["layer"]) if isinstance(cap["layer"], (list, tuple)) else [cap["layer"]]
    query, key = cap["query"].to(args.device), cap["key"].to(args.device)
    if query.dim() == 3:
        query, key = query[None], key[None]
    result = {"capture": {k: cap[k] for k in ("model", "length", "text") if k in cap}, "layers": layers,
              "estimates": study(query, key, layers, args.estimates, args.targets)}
    for name, r in result["estimates"].items():
        print(f"{name:16s} blocks {100 * r['blocks']:5.1f}%  recall {r['recall']:.4f}  "
              f"rows under 0.9 {100 * r['rows_below_0.9']:.2f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
