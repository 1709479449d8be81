"""The ``antidiagonal_mass`` estimate of ``estimate.antidiagonal_mass_estimate`` as one Triton kernel.

The PyTorch definition pads and reshapes the queries and keys into squares and scores them in float32
chunks. Here one program per (64 consecutive query squares, batch x selected head) holds the squares
of ``side`` query blocks (``64 / side`` each), starting at a block boundary. A square's score against
a key square is the sum of ``side`` dot products (its antidiagonal), so one tile of 64 x 64 squares is
``side`` products of 64 rows by the head dim, which read query rows ``g side + i`` and key rows
``h side + side - 1 - i`` straight from the inputs (a position the call lacks loads as zeros): no
reshaped copy. As in ``mass_kernel``, the program walks its causal key tiles twice, first for each
square row's running max and sum of exp2 (online softmax, log2 domain), then for the probabilities,
which it sums per (query block, key block) of the tile and divides by the number of the query
block's squares that hold a query. The work is about ``2 / side`` of a causal q.k^T. Scores are
float32 dot products as in the definition (exact products for bfloat16/float16 inputs), so only
the summation order differs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .pattern import SAMPLED_ROWS, TILE, query_blocks
from .score_kernel import kernel_operands
from .triton_support import HAS_TRITON, tl, triton

#: Query squares one program holds, and key squares per tile.
SQUARES = 64

if HAS_TRITON:
    from .score_kernel import online_step

    @triton.jit
    def _square_scores(Q, K, qbase, kvbase, sqm, skn, g, h, q_offset, Nk, present, d,
                       DIM: tl.constexpr, SIDE: tl.constexpr, SQUARES: tl.constexpr, qk_scale,
                       PRECISION: tl.constexpr):
        """[SQUARES, SQUARES] antidiagonal scores (log2 domain, float32) of query squares ``g``
        against key squares ``h``: -inf where h > g or the query square holds no query."""
        acc = tl.zeros([SQUARES, SQUARES], dtype=tl.float32)
        dim_ok = d[None, :] < DIM
        for i in range(SIDE):
            qpos = g * SIDE + i
            kpos = h * SIDE + (SIDE - 1 - i)
            q = tl.load(Q + qbase + (qpos - q_offset)[:, None].to(tl.int64) * sqm + d[None, :],
                        mask=((qpos >= q_offset) & (qpos < Nk))[:, None] & dim_ok, other=0.0)
            k = tl.load(K + kvbase + kpos[:, None].to(tl.int64) * skn + d[None, :],
                        mask=(kpos < Nk)[:, None] & dim_ok, other=0.0)
            acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # qk_scale may arrive as float64 (torch.compile passes Python floats so): keep scores float32.
        s = (acc * qk_scale).to(tl.float32)
        return tl.where(present[:, None] & (h[None, :] <= g[:, None]), s, float("-inf"))

    # Lengths and the strides that follow them are not specialised on: one build per square side
    # and head dim, not per prompt length.
    @triton.jit(do_not_specialize=["Nq", "Nk", "q_offset", "first_block", "n_qb", "n_kb",
                                   "sqb", "sqh", "skb", "skh", "smb", "smh", "smq"])
    def _antidiagonal_mass(Q, K, Heads, Mass, sqb, sqh, sqm, skb, skh, skn, smb, smh, smq,
                           n_sel, group, Nq, Nk, q_offset, first_block, n_qb, n_kb, qk_scale,
                           SIDE: tl.constexpr, SQUARES: tl.constexpr, DIM: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        PER: tl.constexpr = BLOCK // SIDE          # squares per block of 64 positions
        BLOCKS: tl.constexpr = SQUARES // PER      # query blocks of a program, key blocks of a tile
        t0 = (tl.cdiv(n_qb, BLOCKS) - 1 - tl.program_id(0)) * BLOCKS   # the longest rows first
        bg = tl.program_id(1)
        b = (bg // n_sel).to(tl.int64)
        sel = (bg % n_sel).to(tl.int64)
        h = tl.load(Heads + sel).to(tl.int64)
        qbase = b * sqb + h * sqh
        kvbase = b * skb + (h // group) * skh
        d = tl.arange(0, HEAD_DIM)
        g = (first_block + t0) * PER + tl.arange(0, SQUARES)          # absolute query squares
        present = (g * SIDE + SIDE - 1 >= q_offset) & (g * SIDE < Nk)
        end = tl.minimum(first_block + tl.minimum(t0 + BLOCKS, n_qb), n_kb) * PER
        mx = tl.full([SQUARES], float("-inf"), tl.float32)
        se = tl.zeros([SQUARES], tl.float32)
        for h0 in range(0, end, SQUARES):
            hs = h0 + tl.arange(0, SQUARES)
            s = _square_scores(Q, K, qbase, kvbase, sqm, skn, g, hs, q_offset, Nk, present, d,
                               DIM, SIDE, SQUARES, qk_scale, PRECISION)
            mx, se = online_step(mx, se, s)
        lse = tl.where(present, mx + tl.math.log2(tl.where(present, se, 1.0)), 0.0)
        counts = tl.sum(tl.reshape(present.to(tl.float32), (BLOCKS, PER)), 1)
        blocks = t0 + tl.arange(0, BLOCKS)
        out = Mass + b * smb + sel * smh + blocks.to(tl.int64)[:, None] * smq
        for h0 in range(0, end, SQUARES):
            hs = h0 + tl.arange(0, SQUARES)
            s = _square_scores(Q, K, qbase, kvbase, sqm, skn, g, hs, q_offset, Nk, present, d,
                               DIM, SIDE, SQUARES, qk_scale, PRECISION)
            p = tl.where(present[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            sums = tl.sum(tl.sum(tl.reshape(p, (BLOCKS, PER, BLOCKS, PER)), 3), 1)
            kb = h0 // PER + tl.arange(0, BLOCKS)
            tl.store(out + kb[None, :], sums / tl.maximum(counts, 1.0)[:, None],
                     mask=(blocks[:, None] < n_qb) & (kb[None, :] < n_kb))


def antidiagonal_mass_estimate_triton(query: Tensor, key: Tensor, scale: float, side: int, heads: Tensor) -> Tensor:
    """``estimate.antidiagonal_mass_estimate`` for the query heads ``heads`` ([G] int64) of query
    [B, Hq, Nq, D], each reading key head h // (Hq / Hkv) of key [B, Hkv, Nk, D]: the definition's
    result for ``query[:, heads]`` and ``key[:, heads // group]``, [B, G, n_query_blocks,
    n_key_blocks] float32. ``side`` divides 64 (``pattern.SAMPLED_ROWS``). On CUDA, or on CPU under
    ``TRITON_INTERPRET=1``."""
    if side not in SAMPLED_ROWS:
        raise ValueError(f"the antidiagonal kernel scores squares of a side in {SAMPLED_ROWS}, got {side}")
    query, key = kernel_operands(query, key, "antidiagonal kernel")
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    first, n_qb = query_blocks(Nq, Nk)
    n_kb = -(-Nk // TILE)
    G = heads.shape[0]
    mass = torch.zeros(B, G, n_qb, n_kb, dtype=torch.float32, device=query.device)
    blocks = SQUARES * side // TILE
    _antidiagonal_mass[(triton.cdiv(n_qb, blocks), B * G)](
        query, key, heads, mass, query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2), mass.stride(0), mass.stride(1), mass.stride(2),
        G, Hq // Hkv, Nq, Nk, Nk - Nq, first, n_qb, n_kb, scale / side * math.log2(math.e),
        SIDE=side, SQUARES=SQUARES, DIM=D, HEAD_DIM=max(16, triton.next_power_of_2(D)), BLOCK=TILE,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return mass


@torch.library.custom_op("minference_flex::antidiagonal_mass_estimate", mutates_args=())
def antidiagonal_mass_estimate_op(query: Tensor, key: Tensor, scale: float, side: int, heads: Tensor) -> Tensor:
    """``antidiagonal_mass_estimate_triton`` as one opaque operator, for calls inside a caller's
    ``torch.compile`` (see ``score_kernel.vertical_slash_scores_op``)."""
    return antidiagonal_mass_estimate_triton(query, key, scale, side, heads)


@antidiagonal_mass_estimate_op.register_fake
def _(query: Tensor, key: Tensor, scale: float, side: int, heads: Tensor) -> Tensor:
    _, n_qb = query_blocks(query.shape[2], key.shape[2])
    n_kb = (key.shape[2] + TILE - 1) // TILE
    return query.new_empty((query.shape[0], heads.shape[0], n_qb, n_kb), dtype=torch.float32)
