"""BlockMasks from a Selection: kept tiles listed explicitly, fully kept tiles in the full lists.

Two masks per call:
- the *main* mask over the real keys: A-shape sinks, kept diagonals (slashes, local windows, dense)
  and block-sparse blocks. A kept diagonal offset o touches the same few tile diagonals in every query
  tile, so the kept tiles of a head are one list of tile diagonals shared by all query tiles: metadata grows with the kept tiles, never with Nk^2.
- the *vertical* mask over the gathered vertical columns (contiguous K/V, so a kept column costs one
  column of a tile, not a whole tile). Cells already covered by a kept diagonal are masked out there,
  so the two partial attentions are disjoint and merge exactly through their log-sum-exp.
Query tiles are aligned to positions: the caller pads ``pad`` rows in front of the queries.
Tiles are Tq query rows by Tk keys, Tq a multiple of Tk (``Tiles``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .estimate import Selection, alignment
from .pattern import TILE


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the BlockMasks: ``q`` query rows by ``kv`` keys (``q`` a multiple of ``kv``)."""

    q: int = TILE
    kv: int = TILE

    def __post_init__(self) -> None:
        if self.kv <= 0 or self.q <= 0 or self.q % self.kv:
            raise ValueError(f"query tile {self.q} must be a positive multiple of the key tile {self.kv}")


@dataclass(frozen=True)
class TileGeometry:
    """Query tile t covers positions base + t*Tq .. base + t*Tq + Tq - 1 (the first ``pad`` rows are
    padding); key tile k covers positions k*Tk .. k*Tk + Tk - 1."""

    tiles: Tiles
    pad: int
    base: int
    n_q_tiles: int
    n_k_tiles: int

    @classmethod
    def of(cls, selection: Selection, tiles: Tiles) -> "TileGeometry":
        pad = alignment(selection, tiles.q)
        return cls(
            tiles=tiles,
            pad=pad,
            base=selection.q_offset - pad,
            n_q_tiles=-(-(selection.nq + pad) // tiles.q),
            n_k_tiles=-(-selection.nk // tiles.kv),
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


def kept_diagonals(offsets: Tensor, tiles: Tiles) -> tuple[Tensor, Tensor]:
    """Tile diagonals that any / every kept offset covers.

    offsets: [B, H, Nk] bool. With r = Tq / Tk, query tile A and key tile r*A - d hold the offsets
    d*Tk - (Tk-1) .. d*Tk + Tq - 1, for d = -(r-1) .. n_k_tiles - 1. Returns (touched, full), both
    [B, H, n_k_tiles + r - 1] bool indexed by e = d + r - 1; a tile with a negative offset is never full.
    """
    B, H, Nk = offsets.shape
    T, r = tiles.kv, tiles.q // tiles.kv
    n = -(-Nk // T)

    def window(pad_value: bool) -> Tensor:
        # Offsets >= Nk never occur in a real cell: "not kept" for touched, "kept" for full.
        x = torch.nn.functional.pad(offsets, (0, n * T - Nk), value=pad_value).view(B, H, n, T)
        chunk = x.sum(-1, dtype=torch.int32)
        tail = chunk - x[..., 0].to(torch.int32)
        padded = torch.nn.functional.pad(chunk, (r - 1, r - 1), value=0)
        if pad_value:
            padded[..., n + r - 1:] = T
        sums = torch.nn.functional.pad(padded.cumsum(-1, dtype=torch.int32), (1, 0))
        chunks = sums[..., r:] - sums[..., :-r]                      # chunks d .. d+r-1
        return chunks + torch.nn.functional.pad(tail, (r, 0))[..., : n + r - 1]  # + tail of chunk d-1

    touched = window(False) > 0
    full = window(True) == tiles.q + T - 1
    return touched, full


def offset_lookup(offsets: Tensor):
    """A function (b, h, o) -> bool telling whether offset o (clamped into range) is kept.

    (A bit-packed variant of this lookup measured 1.8x slower in the kernel: docs/performance.md.)
    """
    last = offsets.shape[-1] - 1
    return lambda b, h, o: offsets[b, h, o.clamp(0, last)]


def column_flags(columns: Tensor, nk: int) -> Tensor:
    """[B, H, nk] bool: the kept vertical ``columns`` [B, H, V] (entries >= nk are padding) as flags."""
    B, H, _ = columns.shape
    flags = torch.zeros(B, H, nk + 1, dtype=torch.bool, device=columns.device)
    return flags.scatter_(-1, columns.clamp(max=nk), True)[..., :nk]


def _main_mask_mod(selection: Selection, base: Tensor, columns: Tensor | None, diagonals: bool):
    sink, block_sparse = selection.sink, selection.block_sparse
    kept_offset = offset_lookup(selection.offsets)
    last = selection.nk - 1

    def blocks_only(b, h, q_idx, kv_idx):  # no per-cell lookup: the partial tiles are diagonal blocks
        return (q_idx + base >= kv_idx) & block_sparse[h]

    if not diagonals:
        return blocks_only

    def mask_mod(b, h, q_idx, kv_idx):
        o = q_idx + base - kv_idx
        kept = (kv_idx < sink[h]) | kept_offset(b, h, o) | block_sparse[h]
        if columns is not None:
            kept = kept | columns[b, h, kv_idx.clamp(0, last)]
        return (o >= 0) & kept

    return mask_mod


def _sink_and_diagonal_tiles(selection: Selection, tiles: Tiles, geo: TileGeometry, first_kv: Tensor,
                             last_kv: Tensor):
    """The sink tiles and the tiles of the kept tile diagonals of every query tile, for
    ``main_block_mask``: (touched tile diagonals [B, H, n_e], candidate key tiles, valid, full, width),
    the middle three lists of [B, H, n_q_tiles, *] tensors."""
    device = selection.offsets.device
    B, H, _ = selection.offsets.shape
    T, r, nkt = tiles.kv, tiles.q // tiles.kv, geo.n_k_tiles
    touched, full = kept_diagonals(selection.offsets, tiles)
    n_e = nkt + r - 1
    diag_width = max(1, min(n_e, (r + 1) * selection.max_offsets))
    n_diag, diag = compact(torch.arange(n_e, device=device).expand(B, H, n_e), touched, diag_width)
    diag_full = full.gather(-1, diag.long())

    # Sink tiles 0 .. S-1 (deduplicated against the diagonals: a diagonal tile below S is listed here).
    n_sink_tiles = -(-selection.max_sink // T)
    sink_tiles = -(-selection.sink.long() // T)                          # [H]
    kb = torch.arange(n_sink_tiles, device=device)
    sink_valid = (kb < sink_tiles[:, None, None]) & (kb <= last_kv)     # [H, nqt, S]
    sink_full = ((kb + 1) * T <= selection.sink[:, None, None]) & (kb < first_kv)
    sink_full = sink_full | full[:, :, (first_kv + r - 1 - kb).clamp(0, n_e - 1)]  # [B, H, nqt, S]
    sink_full = sink_full & sink_valid

    diag_kb = first_kv + r - 1 - diag[:, :, None, :]                     # [B, H, nqt, Wd]
    in_count = torch.arange(diag_width, device=device) < n_diag[..., None, None]
    diag_valid = in_count & (diag_kb >= sink_tiles[None, :, None, None]) & (diag_kb < nkt)
    diag_full = diag_valid & diag_full[:, :, None, :]
    return (touched, [kb.expand(B, H, geo.n_q_tiles, n_sink_tiles), diag_kb],
            [sink_valid.expand(B, H, -1, -1), diag_valid], [sink_full, diag_full], n_sink_tiles + diag_width)


def main_block_mask(selection: Selection, tiles: Tiles = Tiles(), *, full_width: bool = False,
                    fold_columns: bool = False, diagonals: bool = True) -> BlockMask:
    """The BlockMask of everything but the vertical columns, over queries padded by ``pad`` rows.

    Block-sparse heads list their kept blocks (the diagonal ones partial, for causality); the other
    heads list their sink tiles and the tiles of their kept tile diagonals. ``full_width`` pads
    the index lists to every key tile (needed by the compiled CPU kernel). ``fold_columns`` also
    lists the key tiles holding vertical columns, so that this one mask covers every kept cell
    (for kernels that cannot return the log-sum-exp needed to merge a separate vertical part).
    ``diagonals=False`` lists the block-sparse blocks only (the strip kernel computes the kept
    diagonals and sinks); the cells of the other heads are then not in this mask.
    """
    if fold_columns and not diagonals:
        raise ValueError("fold_columns needs the diagonals in the main mask")
    geo = TileGeometry.of(selection, tiles)
    device = selection.offsets.device
    B, H, _ = selection.offsets.shape
    T, r, nkt = tiles.kv, tiles.q // tiles.kv, geo.n_k_tiles
    A = geo.base // tiles.q + torch.arange(geo.n_q_tiles, device=device)[:, None]  # absolute query tiles
    first_kv, last_kv = r * A, (r * A + r - 1).clamp(max=nkt - 1)                 # diagonal key tiles

    n_e = nkt + r - 1
    if diagonals:
        touched, cand, valid, is_full, widths = _sink_and_diagonal_tiles(selection, tiles, geo, first_kv, last_kv)
    elif not selection.blocks:
        raise ValueError("a main mask without diagonals needs block-sparse heads")
    else:
        cand, valid, is_full, widths = [], [], [], 0
    for g in selection.blocks:
        per = g.block_size // T
        # Query tiles made only of padding rows may lie before the group's first query block.
        row = (A[:, 0] * tiles.q) // g.block_size - g.first_block
        real = (row >= 0)[:, None, None]
        row = row.clamp(min=0)
        kept = g.kept[:, :, row, :, None] * per + torch.arange(per, device=device)  # [B, H, nqt, K, per]
        g_valid = g.valid[:, :, row, :, None] & (kept <= last_kv[..., None]) & real
        cand.append(kept.flatten(-2))
        valid.append(g_valid.flatten(-2))
        is_full.append((g_valid & (kept < first_kv[..., None])).flatten(-2))
        widths = max(widths, g.max_kept * per)  # a Python int: no symbolic max under dynamic shapes

    columns = None
    if fold_columns and selection.columns is not None:
        # Key tiles holding a vertical column, unless already listed as a sink or diagonal tile
        # (those become partial where needed: only full tiles skip mask_mod, and they keep all).
        columns = column_flags(selection.columns, selection.nk)
        has_col = torch.nn.functional.pad(columns, (0, nkt * T - selection.nk)).view(B, H, nkt, T).any(-1)
        n_col, col_tiles = compact(torch.arange(nkt, device=device).expand(B, H, nkt), has_col, nkt)
        col_kb = col_tiles[:, :, None, :].long()                              # [B, H, 1, nkt]
        e = (first_kv + r - 1 - col_kb).clamp(0, n_e - 1)                      # [B, H, nqt, nkt]
        listed = touched[:, :, None, :].expand(-1, -1, geo.n_q_tiles, -1).gather(-1, e)
        col_valid = (torch.arange(nkt, device=device) < n_col[..., None, None]) & (col_kb <= last_kv)
        sink_tiles = -(-selection.sink.long() // T)
        col_valid = col_valid & (col_kb >= sink_tiles[None, :, None, None]) & ~listed
        cand.append(col_kb.expand(-1, -1, geo.n_q_tiles, -1))
        valid.append(col_valid)
        is_full.append(torch.zeros_like(col_valid))
        widths = widths + nkt

    cand, valid, is_full = torch.cat(cand, -1), torch.cat(valid, -1), torch.cat(is_full, -1)
    width = nkt if full_width else max(2, min(nkt, widths))  # >= 2: see vertical_block_mask
    n_partial, partial_idx = compact(cand, valid & ~is_full, width)
    n_full, full_idx = compact(cand, is_full, width)
    base = torch.full((), geo.base, dtype=torch.int32, device=device)  # a fill, not a host copy
    return BlockMask.from_kv_blocks(
        kv_num_blocks=n_partial,
        kv_indices=partial_idx,
        full_kv_num_blocks=n_full,
        full_kv_indices=full_idx,
        BLOCK_SIZE=(tiles.q, T),
        mask_mod=_main_mask_mod(selection, base, columns, diagonals),
        seq_lengths=(selection.nq + geo.pad, selection.nk),
        compute_q_blocks=False,
    )


def vertical_block_mask(selection: Selection, tiles: Tiles = Tiles()) -> BlockMask:
    """The BlockMask over the gathered vertical columns ([B, H, V] keys, V = columns.shape[-1]).

    Query tile t lists the column tiles holding columns at or before its last position (columns
    are sorted); a cell is kept if its column is causal and its offset is not already kept.
    """
    geo = TileGeometry.of(selection, tiles)
    columns, offsets = selection.columns, selection.offsets
    device = columns.device
    B, H, V = columns.shape
    T = tiles.kv
    last_pos = (geo.base + (torch.arange(geo.n_q_tiles, device=device) + 1) * tiles.q - 1).clamp(max=selection.nk - 1)
    n_causal = torch.searchsorted(columns, last_pos.expand(B, H, -1).contiguous(), right=True)
    n_tiles = -(-V // T)
    num = ((n_causal + T - 1) // T).to(torch.int32)
    # At least two entries per row, so that a budget under one tile does not give the compiler a
    # size-1 dimension to specialise on (and recompile for).
    width = max(2, n_tiles)
    idx = torch.arange(width, dtype=torch.int32, device=device).clamp(max=n_tiles - 1)
    idx = idx.expand(B, H, geo.n_q_tiles, width).contiguous()
    base = torch.full((), geo.base, dtype=torch.int32, device=device)  # a fill, not a host copy
    last_col = V - 1
    kept_offset = offset_lookup(offsets)

    def mask_mod(b, h, q_idx, c):
        col = columns[b, h, c.clamp(0, last_col)]
        o = q_idx + base - col
        return (o >= 0) & ~kept_offset(b, h, o)

    return BlockMask.from_kv_blocks(
        kv_num_blocks=num,
        kv_indices=idx,
        BLOCK_SIZE=(tiles.q, T),
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
