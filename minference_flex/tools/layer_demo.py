"""Synthetic demo: one attention layer, dense causal SDPA against minference-flex's sparse attention.

    minference-flex demo --synthetic           # N=8192, 8 query / 2 KV heads, head dim 64
    minference-flex layer --length 4096 --budgets 1000,6096 --eager    # the same command

(``minference-flex demo`` without ``--synthetic`` is the real-model demo, ``demo.py``.)

Inputs are synthetic but structured like a long prompt after RoPE (``bench_inputs.structured_qkv``:
attention sinks, heavy-hitter key columns, decay with distance). Every head uses
``["vertical_and_slash", vertical, slash]``. The report gives the median time of both after a
warm-up, the fraction of causal cells the sparse pattern keeps, the attention recall of those
cells and the error of the sparse output against a float64 reference restricted to them. Above
4096 tokens the cell statistics come from sampled query rows (no N x N tensor is ever built).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time

import torch
import torch.nn.functional as F

from block_masks import token_cells

from minference_flex.attention import plan_attention, sparse_attention, token_mask
from minference_flex.tools.bench_inputs import structured_qkv
from minference_flex.tools.checks import budgets, check_device, positive_int
from minference_flex.head_patterns import parse_patterns
from minference_flex.tools.timing import median_ms, row_stats, sample_rows

log = logging.getLogger("minference_flex.tools.layer_demo")

#: Largest length at which the kept-cell fraction is computed from the full token mask.
FULL_MASK_MAX = 4096
#: Relative error (bfloat16 output) above which the demo reports a mismatch and exits with 1.
TOLERANCE = 2e-2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=positive_int, default=8192, help="prompt length N (default 8192)")
    p.add_argument("--heads", type=positive_int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (default 2)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="head dimension (default 64)")
    p.add_argument("--budgets", type=budgets, default=(100, 800), metavar="VERTICAL,SLASH",
                   help="vertical_and_slash budgets of every head (default 100,800)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--reps", type=positive_int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument("--rows", type=positive_int, default=256, help="sampled query rows for the checks (default 256)")
    p.add_argument("--eager", action="store_true",
                   help="use the eager emulation (compiled=False) instead of the compiled kernel: "
                        "materialises every score, small lengths only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress log, only the report")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads must be a multiple of --kv-heads, got {args.heads} and {args.kv_heads}")
    check_device(p, args.device)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    N, Hq, Hkv, D = args.length, args.heads, args.kv_heads, args.head_dim
    a, b = args.budgets
    patterns = parse_patterns([["vertical_and_slash", a, b]] * Hq, Hq)
    compiled = not args.eager
    scale = 1.0 / math.sqrt(D)
    if args.eager and N > FULL_MASK_MAX:
        log.warning("--eager materialises %d x %d scores per head: slow and memory-hungry at this length", N, N)

    log.info("inputs: structured_qkv(%d, %d, %d, %d) on %s", Hq, Hkv, N, D, device)
    q, k, v = structured_qkv(Hq, Hkv, N, D, device=device, seed=0)
    if device.type == "cuda":
        def dense():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # the CPU flash kernel wants K/V repeated to the query heads; repeat once, outside the timing
        k_rep, v_rep = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)

        def dense():
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)

    def sparse():
        return sparse_attention(q, k, v, patterns, compiled=compiled)

    with torch.no_grad():
        log.info("dense SDPA: warm-up and %d timed runs", args.reps)
        dense()
        dense_ms = median_ms(dense, device, args.reps)
        if compiled:
            log.info("sparse: compiling the FlexAttention kernels (up to 1-2 minutes on a small CPU, cached afterwards)")
        else:
            log.info("sparse: eager emulation (compiled=False)")
        start = time.perf_counter()
        try:
            out = sparse()
        except Exception:
            if compiled:
                log.error("the compiled kernel failed; --eager runs the eager emulation (small lengths only)")
            raise
        log.info("sparse: first call took %.1f s; %d timed runs", time.perf_counter() - start, args.reps)
        sparse_ms = median_ms(sparse, device, args.reps)

        log.info("checking the kept cells against a float64 reference")
        rows = sample_rows(N, args.rows, device)
        selection = plan_attention(q, k, patterns).selection
        kept = token_cells(selection, rows)                                     # [1, Hq, R, N]
        if N <= FULL_MASK_MAX:
            cells = token_mask(q, k, patterns).sum().item() / (Hq * N * (N + 1) / 2)
        else:
            cells = kept.sum().item() / (Hq * (rows + 1).sum().item())  # query i sees i + 1 keys
        recall, err = row_stats(q, k, v, out, kept, rows, scale)

    return dict(device=device, N=N, Hq=Hq, Hkv=Hkv, D=D, dtype=q.dtype, budgets=(a, b), compiled=compiled,
                reps=args.reps, dense_ms=dense_ms, sparse_ms=sparse_ms, cells=cells,
                cells_sampled=N > FULL_MASK_MAX, rows=rows.numel(), recall=recall, err=err)


def report(r: dict) -> str:
    dev = r["device"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    dtype = str(r["dtype"]).removeprefix("torch.")
    kind = "compiled kernel" if r["compiled"] else "eager emulation"
    where = f"sampled, {r['rows']} rows" if r["cells_sampled"] else "all rows"
    ok = r["err"] <= TOLERANCE
    lines = [
        ("device", f"{name}, torch {torch.__version__}"),
        ("layer", f"{r['N']} tokens, {r['Hq']} q heads / {r['Hkv']} kv heads, head dim {r['D']}, {dtype}"),
        ("patterns", f"vertical_and_slash {r['budgets'][0]},{r['budgets'][1]} on every head"),
        ("dense SDPA", f"{r['dense_ms']:10.1f} ms  (causal, median of {r['reps']})"),
        ("sparse", f"{r['sparse_ms']:10.1f} ms  (mf.sparse_attention, {kind}, median of {r['reps']})"),
        ("dense/sparse", f"{r['dense_ms'] / r['sparse_ms']:10.2f} x"),
        ("cells kept", f"{100 * r['cells']:10.2f} %  of causal cells ({where})"),
        ("recall", f"{r['recall']:10.3f}    attention mass of dense causal softmax on kept cells ({r['rows']} rows)"),
        ("max rel err", f"{r['err']:10.1e}    vs float64 over the kept cells ({r['rows']} rows): "
                        f"{'ok' if ok else 'MISMATCH'} (tolerance {TOLERANCE:.0e})"),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = run(args)
    print(report(result))
    return 0 if result["err"] <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
