"""The vertical-slash scores of ``estimate.vertical_slash_scores`` in two Triton passes on CUDA.

The PyTorch definition materialises the float32 scores of the last 64 queries against every key,
their softmax and a padded copy for the diagonal sums: about 100 kernel launches and, at 1M tokens
in Llama-3-8B geometry, several GB. Here:

- pass 1, one program per (chunk of keys, batch x query head): the running max and sum of
  exp2 of each query row's scores over its chunk (online softmax, log2 domain);
- pass 2, one program per (tile of 64 keys, batch x query head): combines the chunk statistics into
  each row's log-sum-exp, recomputes the tile's scores, and writes the tile's column sums of the
  probabilities (``vertical``) and adds its diagonal sums into ``slash``. A tile's rows and keys
  span 127 offsets; the skew that lines each offset up in one column is a register gather, and the
  127 sums go out with atomic adds onto zeros. Every offset gets at most two adds (two neighbouring
  tiles), so the result does not depend on their order.

Scores are exact float32 dot products for bfloat16/float16 inputs (products of 8-bit mantissas fit
in float32) and IEEE float32 ones for float32 inputs, as in the definition; only the summation
order differs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .triton_support import HAS_TRITON, tl, triton

#: Query rows scored (the last LAST_Q queries), keys per tile, and the most key chunks of pass 1.
ROWS = 64
KEYS = 64
MAX_CHUNKS = 32

if triton is not None:

    @triton.jit
    def tile_scores(q, K, kvbase, skn, j0, Nk, pos, row_ok, d, DIM: tl.constexpr, KEYS: tl.constexpr,
                     qk_scale, PRECISION: tl.constexpr):
        """Scores (log2 domain, float32) of the query rows against keys j0 .. j0 + KEYS - 1, -inf
        where the key is past the row's position, past the keys or the row is padding."""
        cols = j0 + tl.arange(0, KEYS)
        k = tl.load(K + kvbase + cols[:, None].to(tl.int64) * skn + d[None, :],
                    mask=(cols[:, None] < Nk) & (d[None, :] < DIM), other=0.0)
        # qk_scale may arrive as float64 (torch.compile passes Python floats so): keep scores float32.
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale).to(tl.float32)
        ok = row_ok[:, None] & (cols[None, :] <= pos[:, None]) & (cols[None, :] < Nk)
        return tl.where(ok, s, float("-inf")), cols

    @triton.jit
    def online_step(mx, se, s):
        """One key tile of a running row max and sum of exp2 (log2 domain) of scores ``s``."""
        new = tl.maximum(mx, tl.max(s, 1))
        safe = tl.where(new == float("-inf"), 0.0, new)
        return new, se * tl.math.exp2(mx - safe) + tl.sum(tl.math.exp2(s - safe[:, None]), 1)

    @triton.jit
    def _program_rows(Q, bh, n_heads, group, sqb, sqh, sqm, skb, skh, Nq, Nk, m,
                      DIM: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        """The program's query rows (the last m of head bh % n_heads), which are real (row_ok), their
        positions, the head dims and the offset of the head's keys."""
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        r = tl.arange(0, ROWS)
        row_ok = r < m
        q = tl.load(Q + b * sqb + h * sqh + (Nq - m + r)[:, None].to(tl.int64) * sqm + d[None, :],
                    mask=row_ok[:, None] & (d[None, :] < DIM), other=0.0)
        return q, r, row_ok, Nk - m + r, d, b * skb + (h // group) * skh

    @triton.jit(do_not_specialize=["Nq", "Nk", "chunk"])
    def _row_stats(Q, K, Mx, Se, sqb, sqh, sqm, skb, skh, skn, n_heads, group, Nq, Nk, m, chunk, qk_scale,
                   DIM: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr,
                   MAX_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
        c = tl.program_id(0)
        bh = tl.program_id(1)
        q, r, row_ok, pos, d, kvbase = _program_rows(Q, bh, n_heads, group, sqb, sqh, sqm, skb, skh, Nq, Nk, m,
                                                     DIM, HEAD_DIM, ROWS)
        mx = tl.full([ROWS], float("-inf"), tl.float32)
        se = tl.zeros([ROWS], tl.float32)
        for j0 in range(c * chunk, tl.minimum((c + 1) * chunk, Nk), KEYS):
            s, _ = tile_scores(q, K, kvbase, skn, j0, Nk, pos, row_ok, d, DIM, KEYS, qk_scale, PRECISION)
            mx, se = online_step(mx, se, s)
        out = (bh * MAX_CHUNKS + c) * ROWS + r
        tl.store(Mx + out, mx)
        tl.store(Se + out, se)

    @triton.jit(do_not_specialize=["Nq", "Nk", "n_chunks"])
    def _vertical_slash(Q, K, Mx, Se, Vert, Slash, sqb, sqh, sqm, skb, skh, skn, n_heads, group, Nq, Nk, m,
                        n_chunks, qk_scale, DIM: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                        KEYS: tl.constexpr, MAX_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
        t = tl.program_id(0)
        bh = tl.program_id(1)
        q, r, row_ok, pos, d, kvbase = _program_rows(Q, bh, n_heads, group, sqb, sqh, sqm, skb, skh, Nq, Nk, m,
                                                     DIM, HEAD_DIM, ROWS)
        # Each row's log-sum-exp (log2 domain) from the chunk statistics of pass 1.
        ch = tl.arange(0, MAX_CHUNKS)
        stats = (bh * MAX_CHUNKS + ch[:, None]) * ROWS + r[None, :]
        mx = tl.load(Mx + stats, mask=ch[:, None] < n_chunks, other=float("-inf"))
        se = tl.load(Se + stats, mask=ch[:, None] < n_chunks, other=0.0)
        top = tl.max(mx, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        lse = top + tl.math.log2(tl.sum(se * tl.math.exp2(mx - top[None, :]), 0))
        j0 = t * KEYS
        s, cols = tile_scores(q, K, kvbase, skn, j0, Nk, pos, row_ok, d, DIM, KEYS, qk_scale, PRECISION)
        # 0 where the cell is masked; padding rows (lse -inf) would give nan.
        p = tl.where(row_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        out = bh.to(tl.int64) * Nk
        tl.store(Vert + out + cols, tl.sum(p, 0), mask=cols < Nk)
        # Cell (r, c) has offset pos_r - (j0 + c) = base + u with u = r - c + KEYS - 1.
        u = tl.arange(0, 2 * KEYS)
        c = r[:, None] + KEYS - 1 - u[None, :]
        inside = (c >= 0) & (c < KEYS)
        diag = tl.sum(tl.where(inside, tl.gather(p, tl.where(inside, c, 0), 1), 0.0), 0)
        o = Nk - m - j0 - (KEYS - 1) + u
        tl.atomic_add(Slash + out + o, diag, mask=(u < 2 * KEYS - 1) & (o >= 0) & (o < Nk), sem="relaxed")


def kernel_operands(query: Tensor, key: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """query and key with unit last strides, after checking that Triton and the head dim allow
    ``what`` (a kernel's name, for the error)."""
    if triton is None:
        raise ValueError(f"the {what} needs Triton")
    if not 1 <= query.shape[-1] <= 256:
        raise ValueError(f"the {what} supports head dims up to 256, got {query.shape[-1]}")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (query, key))


def vertical_slash_scores_triton(query: Tensor, key: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``estimate.vertical_slash_scores`` on CUDA (or under ``TRITON_INTERPRET=1``): same arguments,
    same (vertical, slash) [B, Hq, Nk] float32."""
    query, key = kernel_operands(query, key, "score kernel")
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    m = min(ROWS, Nq)
    chunk = KEYS * triton.cdiv(triton.cdiv(Nk, MAX_CHUNKS), KEYS)
    n_chunks = triton.cdiv(Nk, chunk)
    device = query.device
    mx = torch.empty(B * Hq * MAX_CHUNKS * ROWS, dtype=torch.float32, device=device)
    se = torch.empty_like(mx)
    vertical = torch.empty(B, Hq, Nk, dtype=torch.float32, device=device)
    slash = torch.zeros(B, Hq, Nk, dtype=torch.float32, device=device)
    common = dict(DIM=D, HEAD_DIM=max(16, triton.next_power_of_2(D)), ROWS=ROWS, KEYS=KEYS,
                  MAX_CHUNKS=MAX_CHUNKS, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                  num_warps=4)
    strides = (query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2))
    qk_scale = scale * math.log2(math.e)
    _row_stats[(n_chunks, B * Hq)](query, key, mx, se, *strides, Hq, Hq // Hkv, Nq, Nk, m, chunk, qk_scale,
                                   **common)
    _vertical_slash[(triton.cdiv(Nk, KEYS), B * Hq)](query, key, mx, se, vertical, slash, *strides, Hq, Hq // Hkv,
                                                     Nq, Nk, m, n_chunks, qk_scale, **common)
    return vertical, slash


@torch.library.custom_op("minference_flex::vertical_slash_scores", mutates_args=())
def vertical_slash_scores_op(query: Tensor, key: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``vertical_slash_scores_triton`` as one opaque operator, for calls inside a caller's
    ``torch.compile``: inductor then neither traces nor re-plans the Triton launches (traced into
    larger graphs they gave wrong results and failed to build with dynamic shapes)."""
    return vertical_slash_scores_triton(query, key, scale)


@vertical_slash_scores_op.register_fake
def _(query: Tensor, key: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    shape = (query.shape[0], query.shape[1], key.shape[2])
    return query.new_empty(shape, dtype=torch.float32), query.new_empty(shape, dtype=torch.float32)
