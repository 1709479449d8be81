"""Strips: the kept diagonals, sinks and vertical columns of every head, laid out for the strip kernel.

A *strip* is STRIP query rows by STRIP consecutive keys whose key range may start at any position.
For the query block whose first row sits at position i0, the strip with top offset ``sigma`` holds
the keys i0 - sigma .. i0 - sigma + STRIP - 1: row r sees offsets sigma + r - (STRIP-1) .. sigma + r,
so offset ``sigma`` itself is covered for every row, and two strips ``sigma`` and ``sigma - STRIP``
together cover every offset between them for every row. A head's kept offsets are covered by chains
of strips, one chain per cluster of kept offsets whose gaps are under STRIP: an isolated diagonal
costs one strip per query block (tile-aligned, it would cross two tiles), a run of r neighbouring
offsets about r / STRIP + 1 strips. The strip list is the same for every query block (a kept offset
is a diagonal), so the metadata grows with the kept offsets, not with the prompt length squared.

The kernel computes, per diagonal strip, exactly the cells whose offset is kept (within the strip's
cluster) and whose key is no sink (a bit test on the strip's ``words``), and in the sink strips
(keys 0 .. sink-1) every causal cell. The vertical columns come in blocks of STRIP gathered keys
after them: a column's cell counts if it is causal and its offset is not kept (the diagonal strips
compute those), a bit test on the head's ``allowed`` offsets. Each cell of the diagonals, sinks and
columns is computed once. Block-sparse blocks are not here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .build import column_flags, compact
from .estimate import Selection
from .pattern import TILE
from .strip_build_kernel import strip_layout_op, strip_layout_triton
from .triton_support import HAS_TRITON

#: Rows and keys of one strip (the kernel's tile).
STRIP = TILE
#: Strip tops of padding entries: past every query block, so never counted.
NO_STRIP = 2**30
#: Keys of a segment (``strip_segments``): the Hopper kernel copies 2 * STRIP // SEGMENT of them per step (32:
#: fewer keys than the strips, 0.90 of their area at 1M, for 4 copies of keys and 4 of values a step).
SEGMENT = 32
#: Zero bits in front of offset 0 in ``Strips.allowed``: a column's window of STRIP offsets starts
#: at i0 - column, which the kernel clamps to -ALLOWED_FRONT (a window wholly before offset 0).
ALLOWED_FRONT = 128


@dataclass(frozen=True)
class Strips:
    """The strip layout of one call.

    sigma:  [B, Hq, S] int32, each head's strip tops ascending, padded with NO_STRIP.
    counts: [B, Hq, n_q_blocks] int32, strips valid for query block t (rows t*STRIP ..), the
            prefix of ``sigma`` with sigma <= i0 + STRIP - 1 (a strip wholly before key 0 is dropped).
    words:  [B, Hq, S, 4] int32, the cells each strip counts: bit t (of word t // 32) set iff offset
            sigma - (STRIP - 1) + t is kept and in the strip's cluster (t < 2 * STRIP - 1). Row r and
            key c of a strip hold offset sigma + r - c, that is t = r - c + STRIP - 1 for every strip:
            the kernel's per-cell test is a shift of a word it loads once per strip.
    sink:   [Hq] int32 sink tokens (A-shape heads; 0 elsewhere).
    columns: [B, Hq, V] int64 vertical columns ascending, entries >= nk are padding (V >= 1).
    col_counts: [B, Hq, n_q_blocks] int32, columns at or before the last position of query block t.
    allowed: [B, Hq, W] int32, bit ALLOWED_FRONT + o set iff 0 <= o < nk and offset o is not kept:
            the offsets a column's cell may have (``allowed_offsets``; W = 1 when no head has columns).
    q_start: position of query row 0 (Nk - Nq); nq, nk: query and key lengths.
    has_sinks, has_columns: whether some head may have sink tokens / vertical columns (Python bounds,
            known without looking at the tensors: a kernel that needs neither can skip their pass).
    """

    sigma: Tensor
    counts: Tensor
    words: Tensor
    sink: Tensor
    columns: Tensor
    col_counts: Tensor
    allowed: Tensor
    q_start: int
    nq: int
    nk: int
    has_sinks: bool = True
    has_columns: bool = True

    def visited(self) -> Tensor:
        """[B, Hq] int64: 64x64 blocks the kernel computes per head (diagonal strips, sink strips,
        blocks of STRIP gathered columns)."""
        i0 = self.q_start + STRIP * torch.arange(self.counts.shape[-1], device=self.counts.device)
        sink_strips = (torch.minimum(self.sink.long()[:, None], i0 + STRIP) + STRIP - 1) // STRIP  # [Hq, nqb]
        column_blocks = (self.col_counts.long() + STRIP - 1) // STRIP
        return (self.counts.sum(-1, dtype=torch.int64) + sink_strips.sum(-1)
                + column_blocks.sum(-1))


@dataclass(frozen=True)
class Segments:
    """The diagonal strips cut into segments of ``width`` consecutive keys, empty segments dropped (the
    layout of the Hopper kernel, ``minference_flex.kernels.hopper_strips``).

    A narrow cluster of kept offsets a .. b needs STRIP + b - a keys per query block, but its chain
    of strips holds up to twice that (two strips once a < b); in segments it costs STRIP + b - a
    keys rounded up to ``width``. An isolated diagonal costs STRIP keys either way.

    tops:   [B, Hq, S'] int32 ascending, padded with NO_STRIP: the segment with top tau holds keys
            i0 - tau .. i0 - tau + width - 1 for the query block at i0 (the strip with top sigma is the
            segments sigma, sigma - width, ...).
    words:  [B, Hq, S', 4] int32: row r and key c of a segment count iff bit r - c + width - 1 of its
            words is set (offset tau + r - c kept and in the strip's cluster; bits past
            STRIP + width - 2 are 0), and the key is at least the head's sink and 0 (the kernel's test).
    full:   [B, Hq, S'] int8, 1 where all STRIP + width - 1 bits are set.
    counts: [B, Hq, n_q_blocks] int32, segments query block t visits: those with tau <= i0 + width - 1
            (a segment wholly before key 0 is dropped).
    """

    tops: Tensor
    words: Tensor
    full: Tensor
    counts: Tensor
    width: int


#: Segment widths ``strip_segments`` makes.
SEGMENT_WIDTHS = (16, 32)


def strip_segments(strips: Strips, width: int = SEGMENT) -> Segments:
    """The diagonal strips of ``strips`` as segments of ``width`` keys (``Segments``; no host sync).
    Sink strips and columns are not segments."""
    if width not in SEGMENT_WIDTHS:
        raise ValueError(f"segment width must be one of {SEGMENT_WIDTHS} keys, got {width}")
    # A plain int even where dynamo traces this as a frame of its own and makes ``width`` symbolic: the
    # bit arithmetic below needs constant shifts.
    width = SEGMENT_WIDTHS[SEGMENT_WIDTHS.index(width)]
    sigma = strips.sigma
    B, H, S = sigma.shape
    device = sigma.device
    R = STRIP // width
    w = strips.words.long() & 0xFFFFFFFF
    lo, hi = (w[..., 0] | (w[..., 1] << 32))[..., None], (w[..., 2] | (w[..., 3] << 32))[..., None]
    # Segment j of a strip holds its keys width * j ..: its bit u is the strip's bit u + shift.
    shift = STRIP - width * (torch.arange(R, device=device) + 1)                  # [R], 0 .. STRIP - width
    s1 = shift.clamp(min=1)
    low_half = torch.where(shift == 0, lo, ((lo >> s1) & ((1 << (64 - s1)) - 1)) | (hi << (64 - s1)))
    high_half = torch.where(shift == 0, hi, (hi >> s1) & ((1 << (64 - s1)) - 1))
    n_bits = STRIP + width - 1                                                   # < 64 + 32
    high_half = high_half & ((1 << (n_bits - 64)) - 1)
    full = (low_half == -1) & (high_half == (1 << (n_bits - 64)) - 1)
    words = torch.stack([low_half, low_half >> 32, high_half, high_half >> 32], -1) & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)      # [B, H, S, R, 4]
    tops = sigma[..., None] - width * torch.arange(R, device=device, dtype=torch.int32)
    real = (sigma[..., None] != NO_STRIP) & ((low_half != 0) | (high_half != 0))
    tops, order = torch.where(real, tops, NO_STRIP).flatten(2).sort(stable=True)
    words = words.flatten(2, 3).gather(2, order[..., None].expand(B, H, order.shape[-1], 4)).contiguous()
    full = full.flatten(2).gather(2, order).to(torch.int8)
    n_q_blocks = strips.counts.shape[-1]
    last = strips.q_start + STRIP * torch.arange(n_q_blocks, device=device) + width - 1
    counts = torch.searchsorted(tops, last.to(torch.int32).expand(B, H, n_q_blocks).contiguous(), right=True)
    return Segments(tops=tops.contiguous(), words=words, full=full, counts=counts.to(torch.int32), width=width)


def pack_bits(flags: Tensor) -> Tensor:
    """flags [..., 32 * W] bool -> [..., W] int32, flag 32 * w + i in bit i of word w."""
    weights = torch.pow(2, torch.arange(32, device=flags.device, dtype=torch.int64))
    value = (flags.unflatten(-1, (-1, 32)).to(torch.int64) * weights).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)  # same 32 bits, signed


def allowed_offsets(offsets: Tensor) -> Tensor:
    """[B, H, (Nk + ALLOWED_FRONT) // 32 + 4] int32: bit ALLOWED_FRONT + o set iff 0 <= o < Nk and
    ``offsets`` [B, H, Nk] bool does not keep offset o (``Strips.allowed``). Three words past the
    last offset let the kernel read a 96-bit window at any offset below Nk."""
    B, H, Nk = offsets.shape
    width = 32 * ((Nk + ALLOWED_FRONT) // 32 + 4)
    flags = torch.cat([offsets.new_zeros(B, H, ALLOWED_FRONT), ~offsets,
                       offsets.new_zeros(B, H, width - ALLOWED_FRONT - Nk)], -1)
    return pack_bits(flags)


def strip_words(offsets: Tensor, sigma: Tensor, owned: Tensor) -> Tensor:
    """[B, H, S, 4] int32: the offsets each strip counts (see ``Strips.words``), cut out of the
    kept offsets packed 32 to a word (two word reads and a shift per strip word, not a read per bit)."""
    B, H, Nk = offsets.shape
    front = 4 * 32  # zero bits before offset 0: a strip's lowest offset, sigma - (STRIP - 1), is > -front
    padded = torch.cat([offsets.new_zeros(B, H, front), offsets, offsets.new_zeros(B, H, 5 * 32 - Nk % 32)], -1)
    packed = pack_bits(padded).long() & 0xFFFFFFFF                                 # [B, H, W], unsigned
    j = torch.arange(4, device=offsets.device)
    low = sigma.long() - (STRIP - 1)                                               # offset of bit 0
    first = (low + front)[..., None] + 32 * j                                      # [B, H, S, 4], bit in padded
    idx = (first >> 5).clamp(0, packed.shape[-1] - 2)                              # padding strips clamp
    pair = packed.gather(-1, idx.flatten(-2)) | (packed.gather(-1, (idx + 1).flatten(-2)) << 32)
    value = (pair.view_as(idx) >> (first & 31)) & 0xFFFFFFFF
    # Only the strip's own cluster (owned) and bits t < 2 * STRIP - 1 count.
    t_lo = (owned[..., 0].long().clamp(min=0) - low).clamp(0, 2 * STRIP - 1)[..., None] - 32 * j
    t_hi = (owned[..., 1].long() - low + 1).clamp(0, 2 * STRIP - 1)[..., None] - 32 * j
    one = torch.ones((), dtype=torch.long, device=offsets.device)
    value = value & ((one << t_hi.clamp(0, 32)) - 1) & ~((one << t_lo.clamp(0, 32)) - 1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)  # same 32 bits, signed


def strip_tops(offsets: Tensor, max_kept: int) -> tuple[Tensor, Tensor]:
    """The strips covering every kept offset: (tops [B, H, S] int32 ascending, padded with NO_STRIP;
    owned [B, H, S, 2] int32, the first and last kept offset of each strip's cluster).

    offsets: [B, H, Nk] bool; ``max_kept`` >= the most offsets any head keeps (a Python bound).
    A cluster of kept offsets a .. b (consecutive gaps under STRIP) gets the chain b, b - STRIP, ...,
    (b - a + STRIP - 1) // STRIP + 1 strips, never more than the cluster's offsets, so S <= max_kept.
    The strips of one chain hold disjoint keys; those of two neighbouring chains may share keys, so
    a strip counts only the offsets of its own cluster (``owned``): every cell is computed once.
    The lowest top of a chain can be negative (down to -(STRIP - 1)): its keys reach past the
    diagonal, and it covers the smallest offsets for the last rows of a block.
    """
    B, H, Nk = offsets.shape
    device = offsets.device
    K = max(1, min(Nk, max_kept))
    count, kept = compact(torch.arange(Nk, device=device).expand(B, H, Nk), offsets, K)
    kept = kept.long()
    idx = torch.arange(K, device=device)
    valid = idx < count[..., None]
    gap = torch.nn.functional.pad(kept[..., 1:] - kept[..., :-1], (1, 0), value=STRIP)
    starts = valid & (gap >= STRIP)
    ends = valid & torch.nn.functional.pad(starts[..., 1:] | ~valid[..., 1:], (0, 1), value=True)
    first = torch.where(starts, idx, 0).cummax(-1).values                        # cluster start index
    last = torch.where(ends, idx, K).flip(-1).cummin(-1).values.flip(-1)          # cluster end index
    a, b = kept.gather(-1, first), kept.gather(-1, last.clamp(max=K - 1))
    t = idx - first                                                                # rank in cluster
    n_strips = (b - a + STRIP - 1) // STRIP + 1
    top, order = torch.where(valid & (t < n_strips), b - STRIP * t, NO_STRIP).sort(-1)
    owned = torch.stack([a.gather(-1, order), b.gather(-1, order)], -1)
    return top.to(torch.int32), owned.to(torch.int32).contiguous()


def strip_layout(selection: Selection) -> Strips:
    """The strip layout of a Selection's kept offsets, sinks and vertical columns (no host sync). On
    CUDA one Triton program per head builds it (``strip_build_kernel``); ``strip_tops``,
    ``strip_words``, ``allowed_offsets`` and the searches below are its definition and the CPU path."""
    offsets = selection.offsets
    B, H, Nk = offsets.shape
    columns = selection.columns
    if columns is None:  # no head has columns: one padding column each, never counted
        columns = torch.full((B, H, 1), Nk, dtype=torch.int64, device=offsets.device)
    if offsets.is_cuda and HAS_TRITON:
        build = strip_layout_op if torch.compiler.is_compiling() else strip_layout_triton
        sigma, _, words, allowed, counts, col_counts = build(
            offsets, columns, selection.q_offset, selection.nq, selection.max_offsets, STRIP, NO_STRIP, ALLOWED_FRONT)
    else:
        sigma, owned = strip_tops(offsets, selection.max_offsets)
        words = strip_words(offsets, sigma, owned)
        allowed = allowed_offsets(offsets)
        # Query block t counts the strips with top at or before its last row (a strip past it only
        # reaches keys after the row) and the columns at or before it.
        n_q_blocks = -(-selection.nq // STRIP)
        last = selection.q_offset + STRIP * torch.arange(n_q_blocks, device=offsets.device) + STRIP - 1
        counts = torch.searchsorted(sigma, last.to(torch.int32).expand(B, H, n_q_blocks).contiguous(), right=True)
        col_counts = torch.searchsorted(columns, last.clamp(max=Nk - 1).expand(B, H, n_q_blocks).contiguous(),
                                        right=True)
        counts, col_counts = counts.to(torch.int32), col_counts.to(torch.int32)
    if selection.columns is None:
        allowed = allowed[..., :1].contiguous()
    return Strips(sigma=sigma, counts=counts, words=words, sink=selection.sink, columns=columns,
                  col_counts=col_counts, allowed=allowed, q_start=selection.q_offset, nq=selection.nq, nk=selection.nk,
                  has_sinks=selection.max_sink > 0, has_columns=selection.columns is not None)


def strip_cells(strips: Strips) -> Tensor:
    """How often the strip kernel computes each cell: [B, Hq, Nq, Nk] int32 (dense: tests and
    emulation only). Every kept diagonal, sink or column cell must come out exactly 1, every other 0.

    Built from the strips themselves (their tops, words, column counts and allowed bits), not from
    the Selection, so a gap or an overlap in the cover shows up. Row r of a block counts, through the
    strip with top sigma, the offsets sigma - (STRIP - 1) + t for t in r .. r + STRIP - 1 whose bit t
    is set; a strip a block does not run only reaches keys before 0. A row counts the first
    ``col_counts`` columns of its block where the allowed bit of its offset is set.
    """
    sigma, words = strips.sigma, strips.words
    B, H, S = sigma.shape
    device = sigma.device
    nq, nk = strips.nq, strips.nk
    T = 2 * STRIP
    t = torch.arange(4 * 32, device=device)
    bit = ((words[..., t // 32] >> (t % 32)) & 1)[..., :T].to(torch.int32)         # [B, H, S, T]
    # per_offset[o + T, t]: strips whose bit t counts offset o (o = sigma - (STRIP - 1) + t).
    o_idx = (sigma.long()[..., None] - (STRIP - 1) + t[:T] + T).clamp(0, nk + T)  # padding lands at nk + T
    per_offset = torch.zeros(B, H, nk + T + 1, T, dtype=torch.int32, device=device)
    per_offset.index_put_((torch.arange(B, device=device)[:, None, None, None], torch.arange(H, device=device)[None, :, None, None],
                           o_idx, t[:T].expand_as(o_idx)), bit, accumulate=True)
    prefix = torch.nn.functional.pad(per_offset.cumsum(-1), (1, 0))             # over t
    r = torch.arange(STRIP, device=device)
    by_row = prefix[..., r + STRIP] - prefix[..., r]                              # [B, H, nk + T + 1, STRIP]
    pos = strips.q_start + torch.arange(nq, device=device)
    j = torch.arange(nk, device=device)
    o = pos[:, None] - j                                                          # [Nq, Nk]
    row = (torch.arange(nq, device=device) % STRIP)[:, None].expand(nq, nk)
    reached = by_row[:, :, (o + T).clamp(0, nk + T), row]
    sink = j < strips.sink[:, None, None].long()                                  # [H, 1, Nk]
    diagonals = torch.where(sink | (o < 0), 0, reached) + (sink & (o >= 0)).to(torch.int32)
    return diagonals + _column_cells(strips, o)


def segment_cells(segments: Segments, strips: Strips) -> Tensor:
    """How often the Hopper kernel computes each cell through ``segments`` (those of ``strips``):
    [B, Hq, Nq, Nk] int32 (dense: tests only). Every kept diagonal cell whose key is no sink must
    come out exactly 1, every other 0. Row r of query block t counts key c of each of the block's
    first ``counts[t]`` segments where bit r - c + width - 1 of its words is set and the key is at
    least the head's sink and 0, as the kernel does."""
    tops, words, width = segments.tops, segments.words, segments.width
    B, H, S = tops.shape
    device = tops.device
    nq, nk = strips.nq, strips.nk
    cells = torch.zeros(B, H, nq, nk + 1, dtype=torch.int32, device=device)     # key nk: out of range
    c = torch.arange(width, device=device)
    low = strips.sink.long().clamp(min=0)[None, :, None, None, None]
    for t in range(segments.counts.shape[-1]):
        rows = torch.arange(min(STRIP, nq - STRIP * t), device=device)
        u = rows[:, None] - c + width - 1                                                     # [R, width]
        on = (((words[..., u // 32] >> (u % 32)) & 1) != 0).transpose(2, 3)                  # [B, H, R, S, width]
        keys = STRIP * t + strips.q_start - tops.long()[..., None] + c                        # [B, H, S, width]
        visited = torch.arange(S, device=device) < segments.counts[..., t, None]            # [B, H, S]
        on = on & visited[:, :, None, :, None] & (keys[:, :, None] >= low)
        idx = torch.where(on, keys[:, :, None].clamp(0, nk), nk).flatten(-2)                  # [B, H, R, S * width]
        cells[:, :, STRIP * t + rows] += torch.zeros_like(cells[:, :, :len(rows)]).scatter_add_(
            -1, idx, on.flatten(-2).to(torch.int32))
    return cells[..., :nk]


def _column_cells(strips: Strips, o: Tensor) -> Tensor:
    """[B, Hq, Nq, Nk] int32: the column cells of ``strip_cells`` (o: [Nq, Nk] offsets)."""
    columns, counts = strips.columns, strips.col_counts
    rank = torch.arange(columns.shape[-1], device=columns.device)
    counted = torch.where(rank < counts[..., None], columns[..., None, :], strips.nk)   # [B, H, nqb, V]
    flags = column_flags(counted.flatten(1, 2), strips.nk).view(*counts.shape, strips.nk)
    per_row = flags[:, :, torch.arange(strips.nq, device=o.device) // STRIP]             # [B, H, Nq, Nk]
    bit = (o + ALLOWED_FRONT).clamp(min=0)
    word = strips.allowed[..., (bit >> 5).clamp(max=strips.allowed.shape[-1] - 1)]
    allowed = ((word >> (bit & 31)) & 1) != 0
    return (per_row & allowed).to(torch.int32)
