"""The strip kernel: a Triton forward attention over the strips and columns of ``block_masks.strips``.

Why not FlexAttention for the diagonals: FlexAttention's key tiles are aligned, so an isolated kept
diagonal crosses two tiles of every query tile, and the kept cells of such a partial tile are found
by ``mask_mod`` with a gather per cell, which made a partial tile cost 1.8x a full one on the H100
(docs/performance.md). Here a strip starts at any key, so an isolated diagonal costs one strip, its
cells are found from four words loaded once per strip (a 64-bit window per row, a shift per cell),
and a strip whose cells all count skips the mask. The vertical columns run in the same program, in
blocks of gathered keys (their cells found from one 64-bit window of allowed offsets per column), so
the kept cells of a vertical-slash head need no second kernel and no merge.

One program per (query block of STRIP rows, batch x query head), the last blocks first; query head h
reads key/value head h // group. Strips load their keys and values as TMA tiles (host-side tensor
descriptors of K and V; a key range that starts before 0 or ends past Nk reads zeros there): one copy
instruction per tile instead of a per-element address computation, which cut the kernel's
instructions per strip by a fifth and its time by 15% on the H100. The gathered columns use pointer
loads. Scores stay unscaled; the scale enters the exponent as one FMA. It returns the output over the
strip cells and their log-sum-exp, to be merged with the other parts of a plan. Rows with no strip
cell get output 0 and log-sum-exp -inf.

On Hopper GPUs (bf16/fp16, head dim 64 or 128) the diagonal strips and the columns run in the
faster Gluon kernel of ``hopper_strips`` (where the plan chose it: ``dispatch``); this kernel then only
adds the sink strips of heads that have them, resuming the online softmax from that kernel's output
and log-sum-exp (``triton_strips(..., resume=..., columns=False)``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from minference_flex.kernels.contract import ALLOWED_FRONT, STRIP, TensorDescriptor, Strips, count_at_most, tl, triton

#: Triton launch options, measured on the H100 (docs/performance.md).
NUM_WARPS = 4
NUM_STAGES = 2

if triton is not None:

    @triton.jit
    def _tile(KD, VD, b, kvh, start, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Keys and values start .. start + BLOCK - 1 of one head: one TMA copy each (tensor descriptors
        of [B, Hkv, Nk, D]); keys before 0 or past Nk and dims past D read as zeros."""
        k = KD.load([b, kvh, start, 0]).reshape(BLOCK, HEAD_DIM)
        v = VD.load([b, kvh, start, 0]).reshape(BLOCK, HEAD_DIM)
        return k, v

    @triton.jit
    def _gathered(k_base, v_base, cols, dims, skn, svn, Nk):
        """Keys and values at the gathered positions ``cols`` (``dims``: [1, HEAD_DIM] bool, the real
        head dims); positions outside 0 .. Nk - 1 read as zeros."""
        in_range = ((cols >= 0) & (cols < Nk))[:, None] & dims
        cols = cols.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * skn, mask=in_range, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn, mask=in_range, other=0.0)
        return k, v

    # Gluon twin: hopper_strips._online_softmax.
    @triton.jit
    def _softmax_step(qk, v, m_i, l_i, acc, s, PRECISION: tl.constexpr):
        """One tile of the online softmax. ``qk``: unscaled scores (float32), -inf where a cell does
        not count; the scale ``s`` (log2 domain) enters the exponent as one FMA per cell. The row
        maxima ``m_i`` are kept scaled: an unchanged maximum then gives alpha = 1 exactly (computed
        from a raw maximum, the rounding of its product drifted the sum by 1e-6 a tile)."""
        m_new = tl.maximum(m_i, tl.max(qk, 1) * s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _diagonal_strip(q, KD, VD, Sigma, Words, strip, b, kvh, i0, lane, key_shift, sink, s, m_i, l_i, acc,
                        EDGE: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        """One diagonal strip (keys i0 - sigma .. i0 - sigma + BLOCK - 1) into the online softmax.
        ``EDGE``: the strip may reach a sink or a negative key, which its cells must then skip."""
        sigma = tl.load(Sigma + strip)
        w0 = tl.load(Words + strip * 4)
        w1 = tl.load(Words + strip * 4 + 1)
        w2 = tl.load(Words + strip * 4 + 2)
        w3 = tl.load(Words + strip * 4 + 3)
        start = i0 - sigma
        # The loads stay outside the branch below so that the compiler pipelines them across strips
        # (inside it, they were not: 1.3x slower).
        k, v = _tile(KD, VD, b, kvh, start, BLOCK, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # A strip whose cells all count (bit 127 is no cell) needs no mask, unless it reaches a sink or
        # a negative key.
        masked = (w0 & w1 & w2 & (w3 | -2147483648)) != -1
        if EDGE:
            masked = masked | (start < sink)
        if masked:
            # Gluon twin of this bit window: hopper_strips._segment_window.
            # Row r tests bits r .. r + 63 of the 128 (cell (r, c) is bit r - c + 63): one 64-bit
            # window per row, then one 32-bit shift per cell (bits r + 32 .. r + 63 for keys 0..31,
            # bits r .. r + 31 for keys 32..63). 1.2x faster than picking one of the four words per cell.
            lo = ((w1.to(tl.int64) << 32) | (w0.to(tl.int64) & 0xFFFFFFFF)).to(tl.uint64, bitcast=True)
            hi = ((w3.to(tl.int64) << 32) | (w2.to(tl.int64) & 0xFFFFFFFF)).to(tl.uint64, bitcast=True)
            window = tl.where(lane == 0, lo, (lo >> lane.to(tl.uint64)) | (hi << (64 - lane).to(tl.uint64)))
            word = tl.where(lane[None, :] >= 32, (window & 0xFFFFFFFF).to(tl.uint32)[:, None],
                            (window >> 32).to(tl.uint32)[:, None])
            keep = ((word >> key_shift[None, :]) & 1) != 0
            if EDGE:
                keys = start + lane
                keep = keep & (keys[None, :] >= sink) & (keys[None, :] >= 0)
            qk = tl.where(keep, qk, float("-inf"))
        return _softmax_step(qk, v, m_i, l_i, acc, s, PRECISION)

    # Lengths and the strides that follow them or the budgets are not specialised on (divisibility by
    # 16, equality to 1): one build for every length and budget.
    @triton.jit(do_not_specialize=["Nq", "Nk", "q_start", "ssb", "ssh", "scb", "sch", "svcb", "svch",
                                   "sncb", "snch", "sab", "sah", "search_steps"])
    def _strip_forward(Q, KD, VD, K, V, Out, Lse, Sigma, Words, Counts, Sink, Columns, ColCounts, Allowed,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                       ssb, ssh, scb, sch, svcb, svch, sncb, snch, sab, sah,
                       n_heads, group, Nq, Nk, q_start, qk_scale, search_steps,
                       DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, FRONT: tl.constexpr,
                       PRECISION: tl.constexpr, RESUME: tl.constexpr, COLUMNS: tl.constexpr):
        tl.static_assert(BLOCK == 64, "the cell test below reads 64-bit windows of the strip words")
        # The last query blocks hold the most strips: launched first, they leave light blocks for the
        # tail of the grid (2% faster at 128K, H100).
        qb = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        # 64-bit element offsets: at 1M tokens one tensor holds more than 2**31 elements.
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        kvh = h // group
        b32, kvh32 = bh // n_heads, bh % n_heads // group  # TMA coordinates are 32-bit
        s = tl.cast(qk_scale, tl.float32)  # may arrive as float64 (torch.compile passes Python floats so)
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HEAD_DIM)  # HEAD_DIM: DIM rounded up to a power of two
        dims = d[None, :] < DIM
        lane = tl.arange(0, BLOCK)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqm + d[None, :],
                    mask=(rows[:, None] < Nq) & dims, other=0.0)
        i0 = q_start + qb * BLOCK
        pos = i0 + lane
        k_base = K + b * skb + kvh * skh + d[None, :]
        v_base = V + b * svb + kvh * svh + d[None, :]
        sink = tl.load(Sink + h)
        out_rows = Out + b * sob + h * soh + rows[:, None].to(tl.int64) * som + d[None, :]
        lse_rows = Lse + (b * n_heads + h) * Nq + rows
        if RESUME:
            # The diagonal strips are done (``hopper_strips``): continue their online softmax from their
            # output and log-sum-exp, as maximum lse (log2 units) and sum 1.
            lse0 = tl.load(lse_rows, mask=rows < Nq, other=float("-inf"))
            m_i = lse0 * 1.4426950408889634
            l_i = tl.where(lse0 > float("-inf"), 1.0, 0.0)
            acc = tl.load(out_rows, mask=(rows[:, None] < Nq) & dims, other=0.0).to(tl.float32)
        else:
            m_i = tl.full([BLOCK], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK], tl.float32)
            acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
            # Bit r - c + BLOCK - 1 of a strip's words tells whether its cell (row r, key c) counts.
            key_shift = (31 - lane % 32).to(tl.uint32)

            # Diagonal strips, tops ascending. Those with top <= i0 - sink (the first n_safe, found by a
            # binary search) reach no sink and no negative key: their cells need only the word test
            # (dropping the key tests from the masked strips made the kernel 10% faster, H100).
            n = tl.load(Counts + b * scb + h * sch + qb)
            head_strips = b * ssb + h * ssh
            n_safe = count_at_most(Sigma + head_strips, n, i0 - sink, search_steps)
            for t in range(0, n_safe):
                m_i, l_i, acc = _diagonal_strip(q, KD, VD, Sigma, Words, head_strips + t, b32, kvh32, i0, lane,
                                                key_shift, sink, s, m_i, l_i, acc, False, BLOCK, HEAD_DIM, PRECISION)
            for t in range(n_safe, n):
                m_i, l_i, acc = _diagonal_strip(q, KD, VD, Sigma, Words, head_strips + t, b32, kvh32, i0, lane,
                                                key_shift, sink, s, m_i, l_i, acc, True, BLOCK, HEAD_DIM, PRECISION)

        # Sink strips: keys 0 .. sink - 1, every causal cell.
        n_sink = (tl.minimum(sink, i0 + BLOCK) + BLOCK - 1) // BLOCK
        for t in range(0, n_sink):
            k, v = _tile(KD, VD, b32, kvh32, t * BLOCK, BLOCK, HEAD_DIM)
            keys = t * BLOCK + lane
            keep = (keys[None, :] < sink) & (pos[:, None] >= keys[None, :])
            qk = tl.where(keep, tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, s, PRECISION)

        # Vertical columns, in blocks of BLOCK gathered keys (sorted; the first n_cols are at or
        # before the block's last row). Column c's cell in row r has offset i0 + r - c and counts if
        # that offset is allowed (causal, not kept: the strips compute kept offsets): bit
        # FRONT + i0 - c + r of the head's allowed words, from one 64-bit window per column.
        n_cols = 0
        if COLUMNS:  # else the Hopper kernel has computed them
            n_cols = tl.load(ColCounts + b * sncb + h * snch + qb)
        col_row = Columns + b * svcb + h * svch
        allowed_row = Allowed + b * sab + h * sah
        row_shift = (lane % 32).to(tl.uint32)
        for c0 in range(0, n_cols, BLOCK):
            # Gluon twin of this column window: hopper_strips._column_words.
            j = c0 + lane
            cols = tl.load(col_row + j, mask=j < n_cols, other=Nk).to(tl.int64)
            k, v = _gathered(k_base, v_base, cols, dims, skn, svn, Nk)
            first = tl.maximum(i0 - cols, -FRONT) + FRONT   # a window wholly before offset 0 reads zeros
            word = allowed_row + (first >> 5)
            a0 = tl.load(word).to(tl.uint32, bitcast=True).to(tl.uint64)
            a1 = tl.load(word + 1).to(tl.uint32, bitcast=True).to(tl.uint64)
            a2 = tl.load(word + 2).to(tl.uint32, bitcast=True).to(tl.uint64)
            shift = (first & 31).to(tl.uint64)
            low = (a0 | (a1 << 32)) >> shift
            window = tl.where(shift == 0, low, low | (a2 << (64 - shift)))
            half = tl.where(lane[:, None] >= 32, (window >> 32).to(tl.uint32)[None, :],
                            (window & 0xFFFFFFFF).to(tl.uint32)[None, :])
            keep = ((half >> row_shift[:, None]) & 1) != 0
            qk = tl.where(keep, tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, s, PRECISION)

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(out_rows, out.to(Out.dtype.element_ty), mask=(rows[:, None] < Nq) & dims)
        tl.store(lse_rows, lse, mask=rows < Nq)


def triton_strips(query: Tensor, key: Tensor, value: Tensor, strips: Strips, scale: float,
                  resume: tuple[Tensor, Tensor] | None = None, columns: bool = True) -> tuple[Tensor, Tensor]:
    """The Triton kernel of ``dispatch.strip_attention`` (key and value TMA-addressable). With ``resume`` =
    (out [B, Hq, Nq, D], lse [B, Hq, Nq] float32) of the diagonal strips, it skips them and continues
    the online softmax over the sink strips and columns from there, in place; ``columns=False`` (with
    ``resume`` only: the part already holds them) skips the columns too."""
    if not columns and resume is None:
        raise ValueError("columns=False leaves cells out: it needs resume=(out, lse) of a part that holds them")
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    sigma, counts, words = strips.sigma, strips.counts, strips.words
    cols, col_counts, allowed = strips.columns, strips.col_counts, strips.allowed
    if resume is None:
        out = torch.empty_like(query)
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=query.device)
    else:
        out, lse = resume
        if out.shape != query.shape or lse.shape != (B, Hq, Nq) or not lse.is_contiguous() or out.stride(-1) != 1:
            raise ValueError(f"resume wants out {tuple(query.shape)} (unit stride in D) and a contiguous lse "
                             f"{(B, Hq, Nq)}, got {tuple(out.shape)} and {tuple(lse.shape)}")
    head_dim = max(16, triton.next_power_of_2(D))
    tiles = [TensorDescriptor.from_tensor(t, [1, 1, STRIP, head_dim]) for t in (key, value)]
    grid = (triton.cdiv(Nq, STRIP), B * Hq)
    _strip_forward[grid](
        query, *tiles, key, value, out, lse, sigma, words, counts, strips.sink, cols, col_counts, allowed,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(1), out.stride(2),
        sigma.stride(0), sigma.stride(1), counts.stride(0), counts.stride(1), cols.stride(0), cols.stride(1),
        col_counts.stride(0), col_counts.stride(1), allowed.stride(0), allowed.stride(1),
        Hq, Hq // Hkv, Nq, Nk, strips.q_start, scale * math.log2(math.e), sigma.shape[-1].bit_length(),
        DIM=D, HEAD_DIM=head_dim, BLOCK=STRIP, FRONT=ALLOWED_FRONT,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", RESUME=resume is not None, COLUMNS=columns,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out, lse
