"""``strips.strip_tops``, ``strips.strip_words`` and ``strips.allowed_offsets`` in one Triton
program per head, on CUDA.

The PyTorch definition takes about 130 small kernel launches, so on the GPU building the strips is
bound by launches (about 2 ms at any length). Here one program walks its head's kept offsets in
chunks, three times, with running values carried from chunk to chunk:

1. compact the kept offsets into a sorted list (scratch), and pack the offsets it does not keep 32
   to a word (the allowed offsets of the vertical columns);
2. find the clusters (neighbours under STRIP apart); at each cluster's last offset, record the
   cluster's end, strip count and the number of strips of all earlier clusters, keyed by the index
   of the cluster's first offset (scratch);
3. the offset of rank t in its cluster writes the cluster's strip t (top = end - STRIP * t), at its
   place in the ascending list, with its owned range and its four words cut from the kept offsets;
4. for every query block, binary searches count the strips and the vertical columns at or before
   its last row (``Strips.counts`` and ``Strips.col_counts``).

The output is the same as the definition's for every real strip (padding strips: top NO_STRIP,
owned and words 0).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .triton_support import HAS_TRITON, tl, triton

#: Offsets per chunk when compacting (step 1: a flag each) and when walking the kept list (steps 2-3).
COMPACT = 2048
CHUNK = 256

if triton is not None:

    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _clusters(xs, i, n_kept, a_carry, s_carry, STRIP: tl.constexpr):
        """Kept offsets x of list entries i, whether each starts / ends a cluster, and each one's
        cluster start value a and start index s (running maxima carried over from earlier chunks)."""
        live = i < n_kept
        x = tl.load(xs + i, mask=live, other=0)
        before = tl.load(xs + i - 1, mask=live & (i > 0), other=0)
        after = tl.load(xs + i + 1, mask=i + 1 < n_kept, other=0)
        start = live & ((i == 0) | (x - before >= STRIP))
        end = live & ((i + 1 >= n_kept) | (after - x >= STRIP))
        a = tl.maximum(tl.associative_scan(tl.where(start, x, -1), 0, _max), a_carry)
        s = tl.maximum(tl.associative_scan(tl.where(start, i, -1), 0, _max), s_carry)
        return x, live, end, a, s

    @triton.jit
    def count_at_most(row, n, x, steps):
        """Entries <= x of the ascending row[0 .. n - 1], for each x (binary search; steps >= the
        bit length of n)."""
        lo = tl.zeros_like(x)
        hi = tl.zeros_like(x) + n
        for _ in range(steps):
            mid = (lo + hi) // 2
            active = lo < hi
            right = tl.load(row + mid, mask=active, other=0) <= x
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        return lo

    @triton.jit(do_not_specialize=["Nk", "K", "n_words", "V", "q_offset", "n_qb", "steps_k", "steps_v"])
    def _build(Off, Xs, RecB, RecN, RecBase, Sigma, Owned, Words, Allowed, Columns, Counts, ColCounts,
               Nk, K, n_words, V, q_offset, n_qb, steps_k, steps_v,
               STRIP: tl.constexpr, COMPACT: tl.constexpr, CHUNK: tl.constexpr, FRONT: tl.constexpr):
        tl.static_assert(COMPACT % 32 == 0 and FRONT % 32 == 0, "offsets are packed 32 to a word")
        bh = tl.program_id(0).to(tl.int64)
        off_row = Off + bh * Nk
        xs = Xs + bh * K
        lane = tl.arange(0, CHUNK)
        bit = tl.arange(0, 32)

        # 1. The kept offsets, ascending; the others' bits (FRONT + o) in Allowed.
        n_kept = tl.zeros((), tl.int32)
        for o0 in range(0, Nk, COMPACT):
            o = o0 + tl.arange(0, COMPACT)
            f = tl.load(off_row + o, mask=o < Nk, other=0).to(tl.int32)
            pos = n_kept + tl.cumsum(f, 0) - 1
            tl.store(xs + pos, o, mask=(f != 0) & (pos < K))
            n_kept += tl.sum(f, 0)
            free = ((f == 0) & (o < Nk)).to(tl.uint32).reshape(COMPACT // 32, 32)
            packed = tl.sum(free << bit[None, :].to(tl.uint32), 1)
            w = (FRONT + o0) // 32 + tl.arange(0, COMPACT // 32)
            tl.store(Allowed + bh * n_words + w, packed.to(tl.int32, bitcast=True), mask=w < n_words)
        n_kept = tl.minimum(n_kept, K)
        tl.debug_barrier()

        # 2. One record per cluster, at the index of its first offset.
        a_carry = tl.full((), -1, tl.int32)
        s_carry = tl.full((), -1, tl.int32)
        before = tl.zeros((), tl.int32)
        for i0 in range(0, n_kept, CHUNK):
            i = i0 + lane
            x, live, end, a, s = _clusters(xs, i, n_kept, a_carry, s_carry, STRIP)
            n = tl.where(end, (x - a + STRIP - 1) // STRIP + 1, 0)
            upto = before + tl.cumsum(n, 0)
            tl.store(RecB + bh * K + s, x, mask=end)
            tl.store(RecN + bh * K + s, n, mask=end)
            tl.store(RecBase + bh * K + s, upto - n, mask=end)
            a_carry = tl.max(a, 0)
            s_carry = tl.max(s, 0)
            before += tl.sum(n, 0)
        tl.debug_barrier()

        # 3. Strip t of each cluster, written by the cluster's offset of rank t.
        a_carry = tl.full((), -1, tl.int32)
        s_carry = tl.full((), -1, tl.int32)
        for i0 in range(0, n_kept, CHUNK):
            i = i0 + lane
            x, live, end, a, s = _clusters(xs, i, n_kept, a_carry, s_carry, STRIP)
            b = tl.load(RecB + bh * K + s, mask=live, other=0)
            n = tl.load(RecN + bh * K + s, mask=live, other=0)
            first = tl.load(RecBase + bh * K + s, mask=live, other=0)
            t = i - s
            emit = live & (t < n)
            top = b - STRIP * t
            p = bh * K + first + n - 1 - t
            tl.store(Sigma + p, top, mask=emit)
            tl.store(Owned + 2 * p, a, mask=emit)
            tl.store(Owned + 2 * p + 1, b, mask=emit)
            for w in tl.static_range(4):
                # Bit j of word w: offset top - (STRIP - 1) + 32 * w + j, if kept and in [a, b].
                j = 32 * w + bit[None, :]
                o = top[:, None] - (STRIP - 1) + j
                ok = emit[:, None] & (j < 2 * STRIP - 1) & (o >= a[:, None]) & (o <= b[:, None]) & (o < Nk)
                f = tl.load(off_row + o, mask=ok, other=0).to(tl.uint32)
                word = tl.sum(f << bit[None, :].to(tl.uint32), 1)
                tl.store(Words + 4 * p + w, word.to(tl.int32, bitcast=True), mask=emit)
            a_carry = tl.max(a, 0)
            s_carry = tl.max(s, 0)
        tl.debug_barrier()

        # 4. Per query block: strips with top at or before its last row, columns at or before it.
        for t0 in range(0, n_qb, CHUNK):
            t = t0 + lane
            last = q_offset + STRIP * t + STRIP - 1
            n_strips = count_at_most(Sigma + bh * K, K, last, steps_k)
            n_cols = count_at_most(Columns + bh * V, V, tl.minimum(last, Nk - 1).to(tl.int64), steps_v)
            tl.store(Counts + bh * n_qb + t, n_strips, mask=t < n_qb)
            tl.store(ColCounts + bh * n_qb + t, n_cols.to(tl.int32), mask=t < n_qb)


def strip_layout_triton(offsets: Tensor, columns: Tensor, q_offset: int, nq: int, max_kept: int, strip: int,
                        no_strip: int, front: int, chunk: int = CHUNK) -> tuple[Tensor, ...]:
    """(tops [B, H, S], owned [B, H, S, 2], words [B, H, S, 4], allowed [B, H, W], counts
    [B, H, n_q_blocks], col_counts [B, H, n_q_blocks]), all int32, of the kept ``offsets`` [B, H, Nk]
    bool and the sorted ``columns`` [B, H, V] int64 (padding Nk) for ``nq`` queries from position
    ``q_offset``, as ``strips.strip_layout`` defines them (``front`` zero bits before offset 0 in
    ``allowed``), with S = max(1, min(Nk, max_kept)). ``chunk`` (a power of two) only changes the speed."""
    if triton is None:
        raise ValueError("the strip builder needs Triton")
    B, H, Nk = offsets.shape
    V = columns.shape[-1]
    K = max(1, min(Nk, max_kept))
    n_qb = -(-nq // strip)
    n_words = (Nk + front) // 32 + 4
    device = offsets.device
    offsets, columns = offsets.contiguous(), columns.contiguous()
    scratch = torch.empty(4, B * H, K, dtype=torch.int32, device=device)
    tops = torch.full((B, H, K), no_strip, dtype=torch.int32, device=device)
    # One fill for the outputs the program writes only in part, each a contiguous piece of it.
    zeros = torch.zeros(B * H * (6 * K + n_words), dtype=torch.int32, device=device)
    owned, words, allowed = zeros.split([B * H * 2 * K, B * H * 4 * K, B * H * n_words])
    owned, words, allowed = owned.view(B, H, K, 2), words.view(B, H, K, 4), allowed.view(B, H, n_words)
    counts = torch.empty(2, B, H, n_qb, dtype=torch.int32, device=device)
    _build[(B * H,)](offsets, scratch[0], scratch[1], scratch[2], scratch[3], tops, owned, words, allowed, columns,
                     counts[0], counts[1], Nk, K, n_words, V, q_offset, n_qb, K.bit_length(), V.bit_length(),
                     STRIP=strip, COMPACT=COMPACT, CHUNK=chunk, FRONT=front, num_warps=4)
    return tops, owned, words, allowed, counts[0], counts[1]


@torch.library.custom_op("minference_flex::strip_layout", mutates_args=())
def strip_layout_op(offsets: Tensor, columns: Tensor, q_offset: int, nq: int, max_kept: int, strip: int,
                    no_strip: int, front: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``strip_layout_triton`` as one opaque operator, for calls inside a caller's ``torch.compile``:
    inductor then neither traces the launch nor re-plans its outputs, views of shared buffers that the
    program writes in part (traced into larger graphs they came out wrong, and failed to build with
    dynamic shapes). The outputs are copied apart (an operator's outputs may not alias)."""
    return tuple(t.clone() for t in strip_layout_triton(offsets, columns, q_offset, nq, max_kept, strip, no_strip, front))


@strip_layout_op.register_fake
def _(offsets, columns, q_offset, nq, max_kept, strip, no_strip, front):
    B, H, Nk = offsets.shape
    K = max(1, min(Nk, max_kept))
    n_qb = (nq + strip - 1) // strip
    n_words = (Nk + front) // 32 + 4
    new = functools.partial(offsets.new_empty, dtype=torch.int32)
    return (new((B, H, K)), new((B, H, K, 2)), new((B, H, K, 4)), new((B, H, n_words)), new((B, H, n_qb)),
            new((B, H, n_qb)))
