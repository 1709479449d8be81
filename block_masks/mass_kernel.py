"""The ``block_mass`` estimate of ``estimate.block_mass_estimate`` as one Triton kernel on CUDA.

The PyTorch definition scores the sampled rows against every key in float32, masks, takes a softmax
and sums blocks: several full passes over [rows, Nk] scores per chunk. Here one program per (group of
consecutive query blocks, batch x head) holds the sampled rows of ``64 / rows`` query blocks, 64 rows
in all (one full tile for the dot, and one read of each key tile for all of them), and walks the
causal key tiles of its last block twice: first the running max and sum of exp2 of each row (online
softmax, log2 domain), then the tiles again, writing each query block's probability mass per key
block averaged over its rows. No scores leave the registers; the work is about ``2 rows / 64`` of a
causal q.k^T plus, per program, the tiles past its earlier blocks' diagonals (masked). Scores are
float32 dot products as in the definition (exact for bfloat16/float16 inputs), so only the summation
order differs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .pattern import TILE, query_blocks
from .score_kernel import kernel_operands
from .triton_support import HAS_TRITON, tl, triton

#: Sampled rows one program computes: those of ``PACKED_ROWS // rows`` consecutive query blocks.
PACKED_ROWS = 64

if HAS_TRITON:
    from .score_kernel import online_step, tile_scores

    # Lengths and the strides that follow them are not specialised on: one build per sampled-row
    # count and head dim, not per prompt length.
    @triton.jit(do_not_specialize=["Nq", "Nk", "q_offset", "first_block", "n_qb",
                                   "sqb", "sqh", "skb", "skh", "smb", "smh", "smq"])
    def _block_mass(Q, K, Heads, Mass, sqb, sqh, sqm, skb, skh, skn, smb, smh, smq,
                    n_sel, group, Nq, Nk, q_offset, first_block, n_qb, qk_scale,
                    ROWS: tl.constexpr, PACKED: tl.constexpr, DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
                    KEYS: tl.constexpr, PRECISION: tl.constexpr):
        BLOCKS: tl.constexpr = PACKED // ROWS
        t0 = (tl.cdiv(n_qb, BLOCKS) - 1 - tl.program_id(0)) * BLOCKS   # the longest rows first
        bg = tl.program_id(1)
        b = (bg // n_sel).to(tl.int64)
        g = (bg % n_sel).to(tl.int64)
        h = tl.load(Heads + g).to(tl.int64)
        # Row r samples query block t0 + r // ROWS at in-block row step * (r % ROWS + 1) - 1, clamped
        # to the rows the call has; rows of blocks past the last are padding.
        r = tl.arange(0, PACKED)
        t = t0 + r // ROWS
        row_ok = t < n_qb
        pos = (first_block + t) * KEYS + (KEYS // ROWS) * (r % ROWS + 1) - 1
        pos = tl.minimum(tl.maximum(pos, q_offset), Nk - 1)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + (pos - q_offset)[:, None].to(tl.int64) * sqm + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < DIM), other=0.0)
        kvbase = b * skb + (h // group) * skh
        end = tl.minimum(first_block + tl.minimum(t0 + BLOCKS, n_qb), tl.cdiv(Nk, KEYS)) * KEYS
        mx = tl.full([PACKED], float("-inf"), tl.float32)
        se = tl.zeros([PACKED], tl.float32)
        for j0 in range(0, end, KEYS):
            s, _ = tile_scores(q, K, kvbase, skn, j0, Nk, pos, row_ok, d, DIM, KEYS, qk_scale, PRECISION)
            mx, se = online_step(mx, se, s)
        lse = tl.where(row_ok, mx + tl.math.log2(tl.where(row_ok, se, 1.0)), 0.0)
        blocks = t0 + tl.arange(0, BLOCKS)
        out = Mass + b * smb + g * smh + blocks.to(tl.int64) * smq
        for j0 in range(0, end, KEYS):
            s, _ = tile_scores(q, K, kvbase, skn, j0, Nk, pos, row_ok, d, DIM, KEYS, qk_scale, PRECISION)
            p = tl.where(row_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            per_block = tl.sum(tl.reshape(tl.sum(p, 1), (BLOCKS, ROWS)), 1)
            tl.store(out + j0 // KEYS, per_block / ROWS, mask=blocks < n_qb)


def block_mass_estimate_triton(query: Tensor, key: Tensor, scale: float, rows: int, heads: Tensor) -> Tensor:
    """``estimate.block_mass_estimate`` for the query heads ``heads`` ([G] int64) of query [B, Hq, Nq, D],
    each reading key head h // (Hq / Hkv) of key [B, Hkv, Nk, D]: the definition's result for
    ``query[:, heads]`` and ``key[:, heads // group]``, [B, G, n_query_blocks, n_key_blocks] float32.
    ``rows`` divides 64 (``pattern.SAMPLED_ROWS``). On CUDA, or on CPU under ``TRITON_INTERPRET=1``."""
    if not 1 <= rows <= PACKED_ROWS or PACKED_ROWS % rows:
        raise ValueError(f"the block_mass kernel samples a divisor of {PACKED_ROWS} rows per query block, got {rows}")
    query, key = kernel_operands(query, key, "block_mass kernel")
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    first, n_qb = query_blocks(Nq, Nk)
    n_kb = -(-Nk // TILE)
    G = heads.shape[0]
    mass = torch.zeros(B, G, n_qb, n_kb, dtype=torch.float32, device=query.device)
    _block_mass[(triton.cdiv(n_qb, PACKED_ROWS // rows), B * G)](
        query, key, heads, mass, query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2), mass.stride(0), mass.stride(1), mass.stride(2),
        G, Hq // Hkv, Nq, Nk, Nk - Nq, first, n_qb, scale * math.log2(math.e),
        ROWS=rows, PACKED=PACKED_ROWS, DIM=D, HEAD_DIM=max(16, triton.next_power_of_2(D)), KEYS=TILE,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return mass


@torch.library.custom_op("minference_flex::block_mass_estimate", mutates_args=())
def block_mass_estimate_op(query: Tensor, key: Tensor, scale: float, rows: int, heads: Tensor) -> Tensor:
    """``block_mass_estimate_triton`` as one opaque operator, for calls inside a caller's
    ``torch.compile`` (see ``score_kernel.vertical_slash_scores_op``)."""
    return block_mass_estimate_triton(query, key, scale, rows, heads)


@block_mass_estimate_op.register_fake
def _(query: Tensor, key: Tensor, scale: float, rows: int, heads: Tensor) -> Tensor:
    _, n_qb = query_blocks(query.shape[2], key.shape[2])
    n_kb = (key.shape[2] + TILE - 1) // TILE
    return query.new_empty((query.shape[0], heads.shape[0], n_qb, n_kb), dtype=torch.float32)
