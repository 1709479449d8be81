"""BlockMasks from a Selection: kept tiles listed explicitly, fully kept tiles in the full lists.

Two masks per call:
- the *main* mask over the real keys: A-shape sinks, kept diagonals (slashes, local windows, dense)
  and block-sparse blocks. A kept diagonal offset o touches, in query tile A, the key tiles A - d for
  d in {floor(o/T), ceil(o/T)}, so the kept tiles of a head are the same block-diagonals in every
  query tile: metadata grows with the kept tiles, never with Nk^2.
- the *vertical* mask over the gathered vertical columns (contiguous K/V, so a kept column costs one
  column of a tile, not a whole tile). Cells already covered by a kept diagonal are masked out there,
  so the two partial attentions are disjoint and merge exactly through their log-sum-exp.
Query tiles are aligned to positions: the caller pads ``pad`` rows in front of the queries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .estimate import Selection, alignment
from .pattern import TILE


@dataclass(frozen=True)
class TileGeometry:
    """Query tile t covers positions base + t*T .. base + t*T + T - 1 (the first ``pad`` rows are
    padding); key tile k covers positions k*T .. k*T + T - 1."""

    pad: int
    base: int
    n_q_tiles: int
    n_k_tiles: int

    @classmethod
    def of(cls, selection: Selection) -> "TileGeometry":
        pad = alignment(selection, TILE)
        return cls(
            pad=pad,
            base=selection.q_offset - pad,
            n_q_tiles=-(-(selection.nq + pad) // TILE),
            n_k_tiles=-(-selection.nk // TILE),
        )


def compact(values: Tensor, valid: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Move the valid entries of each row to its front, in order.

    values, valid: [..., W]. Returns (count [...] int32, packed [..., width] int32); entries past the
    count are 0. ``width`` must be at least the largest count.
    """
    pos = valid.cumsum(-1, dtype=torch.int32) - 1
    dest = torch.where(valid, pos, width).long()  # invalid entries land in a spare column
    packed = torch.zeros(*values.shape[:-1], width + 1, dtype=torch.int32, device=values.device)
    packed.scatter_(-1, dest, values.to(torch.int32))
    count = valid.sum(-1, dtype=torch.int32)
    return count, packed[..., :width].contiguous()


def kept_diagonals(offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Block-diagonals d (key tile = query tile - d) that any / every kept offset covers.

    offsets: [B, H, Nk] bool. Tile pairs at distance d hold offsets d*T - (T-1) .. d*T + (T-1).
    Returns (touched, full), both [B, H, n_k_tiles] bool; d = 0 is never full (it is causal).
    """
    B, H, Nk = offsets.shape
    n = -(-Nk // TILE)
    # Offsets >= Nk never occur in a real cell: padding counts as "not kept" for touched and
    # "kept" for full.
    any_pad = torch.nn.functional.pad(offsets, (0, n * TILE - Nk), value=False).view(B, H, n, TILE)
    all_pad = torch.nn.functional.pad(offsets, (0, n * TILE - Nk), value=True).view(B, H, n, TILE)
    no = torch.zeros(B, H, 1, dtype=torch.bool, device=offsets.device)
    touched = any_pad.any(-1) | torch.cat([no, any_pad[..., 1:].any(-1)[..., :-1]], -1)
    full = all_pad.all(-1) & torch.cat([no, all_pad[..., 1:].all(-1)[..., :-1]], -1)
    return touched, full


def _main_mask_mod(selection: Selection, base: Tensor):
    offsets, sink, block_sparse = selection.offsets, selection.sink, selection.block_sparse
    last = offsets.shape[-1] - 1

    def mask_mod(b, h, q_idx, kv_idx):
        o = q_idx + base - kv_idx
        kept = (kv_idx < sink[h]) | offsets[b, h, o.clamp(0, last)] | block_sparse[h]
        return (o >= 0) & kept

    return mask_mod


def main_block_mask(selection: Selection, *, full_width: bool = False) -> BlockMask:
    """The BlockMask of everything but the vertical columns, over queries padded by ``pad`` rows.

    Block-sparse heads list their kept blocks (the diagonal one partial, for causality); the other
    heads list their sink tiles and the tiles of their kept block-diagonals. ``full_width`` pads
    the index lists to every key tile (needed by the compiled CPU kernel).
    """
    geo = TileGeometry.of(selection)
    device = selection.offsets.device
    B, H, _ = selection.offsets.shape
    nkt = geo.n_k_tiles
    tile_row = geo.base // TILE + torch.arange(geo.n_q_tiles, device=device)  # absolute query tiles
    A = tile_row[:, None]                                                     # [nqt, 1]

    touched, full = kept_diagonals(selection.offsets)
    diag_width = max(1, min(nkt, 2 * selection.max_offsets + 1))
    n_diag, diag = compact(torch.arange(nkt, device=device).expand(B, H, nkt), touched, diag_width)
    diag_full = full.gather(-1, diag.long())

    # Sink tiles 0 .. S-1 (deduplicated against the diagonals: a diagonal tile below S is listed here).
    n_sink_tiles = -(-selection.max_sink // TILE)
    sink_tiles = -(-selection.sink.long() // TILE)                      # [H]
    kb = torch.arange(n_sink_tiles, device=device)
    sink_valid = (kb < sink_tiles[:, None, None]) & (kb <= A)          # [H, nqt, S]
    sink_full = ((kb + 1) * TILE <= selection.sink[:, None, None]) & (kb < A)
    sink_full = sink_full | full[:, :, (A - kb).clamp(0, nkt - 1)]     # [B, H, nqt, S]
    sink_full = sink_full & sink_valid

    diag_kb = A - diag[:, :, None, :]                                   # [B, H, nqt, Wd]
    in_count = torch.arange(diag_width, device=device) < n_diag[..., None, None]
    diag_valid = in_count & (diag_kb >= sink_tiles[None, :, None, None])  # also >= 0
    diag_full = diag_valid & diag_full[:, :, None, :]

    cand = [kb.expand(B, H, geo.n_q_tiles, n_sink_tiles), diag_kb]
    valid = [sink_valid.expand(B, H, -1, -1), diag_valid]
    is_full = [sink_full, diag_full]
    widths = n_sink_tiles + diag_width
    for g in selection.blocks:
        r = g.block_size // TILE
        row = (tile_row * TILE) // g.block_size - g.first_block
        kept = g.kept[:, :, row, :, None] * r + torch.arange(r, device=device)  # [B, H, nqt, K, r]
        g_valid = g.valid[:, :, row, :, None] & (kept <= A[..., None])
        cand.append(kept.flatten(-2))
        valid.append(g_valid.flatten(-2))
        is_full.append((g_valid & (kept < A[..., None])).flatten(-2))
        widths = max(widths, kept.shape[-2] * r)

    cand, valid, is_full = torch.cat(cand, -1), torch.cat(valid, -1), torch.cat(is_full, -1)
    width = nkt if full_width else min(nkt, widths)
    n_partial, partial_idx = compact(cand, valid & ~is_full, width)
    n_full, full_idx = compact(cand, is_full, width)
    base = torch.full((), geo.base, dtype=torch.int32, device=device)  # a fill, not a host copy
    return BlockMask.from_kv_blocks(
        kv_num_blocks=n_partial,
        kv_indices=partial_idx,
        full_kv_num_blocks=n_full,
        full_kv_indices=full_idx,
        BLOCK_SIZE=(TILE, TILE),
        mask_mod=_main_mask_mod(selection, base),
        seq_lengths=(selection.nq + geo.pad, selection.nk),
        compute_q_blocks=False,
    )


def vertical_block_mask(selection: Selection) -> BlockMask:
    """The BlockMask over the gathered vertical columns ([B, H, V] keys, V = columns.shape[-1]).

    Query tile t lists the column tiles holding columns at or before its last position (columns
    are sorted); a cell is kept if its column is causal and its offset is not already kept.
    """
    geo = TileGeometry.of(selection)
    columns, offsets = selection.columns, selection.offsets
    device = columns.device
    B, H, V = columns.shape
    last_pos = (geo.base + (torch.arange(geo.n_q_tiles, device=device) + 1) * TILE - 1).clamp(max=selection.nk - 1)
    n_causal = torch.searchsorted(columns, last_pos.expand(B, H, -1).contiguous(), right=True)
    n_tiles = -(-V // TILE)
    num = ((n_causal + TILE - 1) // TILE).to(torch.int32)
    idx = torch.arange(n_tiles, dtype=torch.int32, device=device).expand(B, H, geo.n_q_tiles, n_tiles).contiguous()
    base = torch.full((), geo.base, dtype=torch.int32, device=device)  # a fill, not a host copy
    last_col, last_off = V - 1, offsets.shape[-1] - 1

    def mask_mod(b, h, q_idx, c):
        col = columns[b, h, c.clamp(0, last_col)]
        o = q_idx + base - col
        return (o >= 0) & ~offsets[b, h, o.clamp(0, last_off)]

    return BlockMask.from_kv_blocks(
        kv_num_blocks=num,
        kv_indices=idx,
        BLOCK_SIZE=(TILE, TILE),
        mask_mod=mask_mod,
        seq_lengths=(selection.nq + geo.pad, V),
        compute_q_blocks=False,
    )


def gather_columns(x: Tensor, columns: Tensor) -> Tensor:
    """x [B, Hkv, Nk, D], columns [B, Hq, V] (padding >= Nk) -> [B, Hq, V, D] without repeating K/V:
    query head h reads key head h // (Hq // Hkv)."""
    B, Hkv, Nk, D = x.shape
    Hq, V = columns.shape[1], columns.shape[2]
    idx = columns.clamp(max=Nk - 1).reshape(B, Hkv, (Hq // Hkv) * V, 1).expand(-1, -1, -1, D)
    return x.gather(2, idx).view(B, Hq, V, D)
