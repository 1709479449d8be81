"""Strips: the kept diagonals and sinks of every head, laid out for the strip kernel.

A *strip* is STRIP query rows by STRIP consecutive keys whose key range may start at any position.
For the query block whose first row sits at position i0, the strip with top offset ``sigma`` holds
the keys i0 - sigma .. i0 - sigma + STRIP - 1: row r sees offsets sigma + r - (STRIP-1) .. sigma + r,
so offset ``sigma`` itself is covered for every row, and two strips ``sigma`` and ``sigma - STRIP``
together cover every offset between them for every row. A head's kept offsets are covered by chains
of strips, one chain per cluster of kept offsets whose gaps are under STRIP: an isolated diagonal
costs one strip per query block (tile-aligned, it would cross two tiles), a run of r neighbouring
offsets about r / STRIP + 1 strips. The strip list is the same for every query block (a kept offset
is a diagonal), so the metadata grows with the kept offsets, not with the prompt length squared.

The kernel computes, per diagonal strip, exactly the cells whose offset is kept and whose key is
not a sink (a bit test on ``bits``), and in the sink strips (keys 0 .. sink-1) every causal cell:
each cell of the diagonals and sinks is computed once. Vertical columns and block-sparse blocks are
not here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .build import compact
from .estimate import Selection
from .pattern import TILE

#: Rows and keys of one strip (the kernel's tile).
STRIP = TILE
#: Bit ``o + BIT_BIAS`` of a head's bitset holds offset o, so that the bit words a strip reads
#: (strip tops go down to -(STRIP - 1), so offsets down to -2 * (STRIP - 1)) never start before it.
BIT_BIAS = 2 * STRIP
#: Strip tops of padding entries: past every query block, so never counted.
NO_STRIP = 2**30


@dataclass(frozen=True)
class Strips:
    """The strip layout of one call.

    sigma:  [B, Hq, S] int32, each head's strip tops ascending, padded with NO_STRIP.
    owned:  [B, Hq, S, 2] int32, the range of offsets each strip counts (its cluster's first and
            last kept offset; see ``strip_tops``).
    counts: [B, Hq, n_q_blocks] int32, strips valid for query block t (rows t*STRIP ..), the
            prefix of ``sigma`` with sigma <= i0 + STRIP - 1 (a strip wholly before key 0 is dropped).
    bits:   [B, Hq, W] int32, bit (o + BIT_BIAS) % 32 of word (o + BIT_BIAS) // 32 set iff offset o
            is kept (W leaves room for every word a strip reads).
    sink:   [Hq] int32 sink tokens (A-shape heads; 0 elsewhere).
    q_start: position of query row 0 (Nk - Nq); nq, nk: query and key lengths.
    """

    sigma: Tensor
    owned: Tensor
    counts: Tensor
    bits: Tensor
    sink: Tensor
    q_start: int
    nq: int
    nk: int

    def visited(self) -> Tensor:
        """[B, Hq] int64: strips the kernel computes per head (diagonal and sink strips)."""
        i0 = self.q_start + STRIP * torch.arange(self.counts.shape[-1], device=self.counts.device)
        sink_strips = (torch.minimum(self.sink.long()[:, None], i0 + STRIP) + STRIP - 1) // STRIP  # [Hq, nqb]
        return self.counts.sum(-1, dtype=torch.int64) + sink_strips.sum(-1)


def offset_bits(offsets: Tensor) -> Tensor:
    """offsets [B, H, Nk] bool -> [B, H, W] int32 bitset (see ``Strips.bits``)."""
    B, H, Nk = offsets.shape
    words = (Nk + BIT_BIAS + STRIP) // 32 + 6
    padded = torch.nn.functional.pad(offsets, (BIT_BIAS, words * 32 - Nk - BIT_BIAS)).view(B, H, words, 32)
    weights = torch.pow(2, torch.arange(32, device=offsets.device, dtype=torch.int64))
    value = (padded.to(torch.int64) * weights).sum(-1)
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


def slash_strips(selection: Selection) -> Strips:
    """The strip layout of a Selection's kept offsets and sinks (no host sync)."""
    offsets = selection.offsets
    sigma, owned = strip_tops(offsets, selection.max_offsets)
    n_q_blocks = -(-selection.nq // STRIP)
    B, H, _ = offsets.shape
    last_pos = selection.q_offset + STRIP * torch.arange(n_q_blocks, device=offsets.device) + STRIP - 1
    counts = torch.searchsorted(sigma, last_pos.to(torch.int32).expand(B, H, n_q_blocks).contiguous(), right=True)
    return Strips(sigma=sigma, owned=owned, counts=counts.to(torch.int32), bits=offset_bits(offsets),
                  sink=selection.sink, q_start=selection.q_offset, nq=selection.nq, nk=selection.nk)


def strip_cells(strips: Strips) -> Tensor:
    """How often the strip kernel computes each cell: [B, Hq, Nq, Nk] int32 (dense: tests and
    emulation only). Every kept diagonal or sink cell must come out exactly 1, every other cell 0.

    Built from the strips themselves (which keys each query block's strips reach, which offsets each
    strip counts), not from the Selection, so a gap or an overlap in the cover shows up.
    """
    sigma, owned, bits = strips.sigma, strips.owned, strips.bits
    B, H, S = sigma.shape
    device = sigma.device
    nq, nk, span = strips.nq, strips.nk, strips.nk + 2 * STRIP   # tops -STRIP .. nk + STRIP
    rows = torch.arange(nq, device=device)
    pos = strips.q_start + rows                                                 # [Nq]
    i0 = strips.q_start + (rows // STRIP) * STRIP                                # first row of the block
    j = torch.arange(nk, device=device)
    o = pos[:, None] - j                                                        # [Nq, Nk]
    # owns[x, o]: strips with top x - STRIP that count offset o (difference array over o).
    real = sigma != NO_STRIP
    top = torch.where(real, sigma.long() + STRIP, span)
    owns = torch.zeros(B, H, span + 1, nk + 1, dtype=torch.int32, device=device)
    ones = real.to(torch.int32)
    owns.index_put_((torch.arange(B, device=device)[:, None, None], torch.arange(H, device=device)[None, :, None],
                     top, owned[..., 0].long().clamp(0, nk)), ones, accumulate=True)
    owns.index_put_((torch.arange(B, device=device)[:, None, None], torch.arange(H, device=device)[None, :, None],
                     top, (owned[..., 1].long() + 1).clamp(0, nk)), -ones, accumulate=True)
    owns = owns.cumsum(-1)[:, :, :span, :nk]
    # Strip top sigma reaches key j from block i0 iff i0 - j <= sigma <= i0 - j + STRIP - 1; sum
    # owns over that window of tops with a prefix sum.
    before = torch.nn.functional.pad(owns.cumsum(-2), (0, 0, 1, 0))             # tops < x - STRIP
    lo = (i0[:, None] - j + STRIP).clamp(0, span)
    hi = (i0[:, None] - j + 2 * STRIP).clamp(0, span)
    oc = o.clamp(0, nk - 1)
    reached = before[:, :, hi, oc] - before[:, :, lo, oc]                         # [B, H, Nq, Nk]
    bit = o + BIT_BIAS
    word = bits[..., (bit // 32).clamp(0, bits.shape[-1] - 1)]
    kept = ((word >> (bit % 32)) & 1).bool() & (o >= 0)
    sink = j < strips.sink[:, None, None].long()                                 # [H, 1, Nk]
    return torch.where(kept & ~sink, reached, 0) + (sink & (o >= 0)).to(torch.int32)
