"""Attention recall: the share of a head's exact softmax mass that a Selection keeps.

Used by the offline pattern search. The dense softmax is computed in query chunks (never [Nq, Nk]
at once); what a selection keeps is then summed from per-chunk aggregates, so every candidate costs
a gather over its own columns per chunk, not a pass over all cells:
kept mass = sum over kept offsets of the diagonal mass
          + the mass of the kept columns (sinks and verticals) outside the kept offsets
          + the mass of the kept blocks (block-sparse heads keep nothing else).
Positions as in ``select``: query i sits at Nk - Nq + i; P is causal.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .estimate import Selection, diagonal_sums
from .pattern import TILE


def _column_ids(selection: Selection) -> Tensor | None:
    """Every head's kept columns outside the offsets' reach, [B, Hq, V] int64 padded with Nk:
    the A-shape sinks followed by the vertical columns (None if no head has either)."""
    B, Hq, Nk = selection.offsets.shape
    parts = []
    if selection.max_sink:
        sink = torch.arange(selection.max_sink, device=selection.offsets.device)
        sink = torch.where(sink < selection.sink[:, None], sink, Nk)
        parts.append(sink.expand(B, Hq, -1))
    if selection.columns is not None:
        parts.append(selection.columns)
    return torch.cat(parts, dim=-1) if parts else None


def _block_mass(tile_mass: Tensor, selection: Selection) -> Tensor:
    """[B, Hq] mass of the kept blocks of the block-sparse heads, from the mass per (query tile,
    key tile) [B, Hq, nT, nT] (tiles of TILE positions counted from 0)."""
    B, Hq, nT, _ = tile_mass.shape
    total = tile_mass.new_zeros(B, Hq)
    for group in selection.blocks:
        f = group.block_size // TILE
        nb = -(-nT // f)
        padded = F.pad(tile_mass, (0, nb * f - nT, 0, nb * f - nT))
        blocks = padded.view(B, Hq, nb, f, nb, f).sum(dim=(3, 5))                 # [B, Hq, nb, nb]
        n_pq = group.kept.shape[2]
        rows = blocks[:, :, group.first_block:group.first_block + n_pq]            # [B, Hq, nPq, nb]
        kept = rows.gather(-1, group.kept)                                        # [B, Hq, nPq, K]
        total = total + (kept * group.valid).sum(dim=(-1, -2))
    return total


def attention_recall(query: Tensor, key: Tensor, selections: Sequence[Selection], scale: float, *,
                     chunk: int = 256) -> Tensor:
    """Exact attention recall of each selection: [S, B, Hq] float64.

    recall[s, b, h] = mean over the Nq query rows of the causal softmax mass (float32 softmax of
    q k^T * scale) that selection s keeps for head h, i.e. (P * token_cells(selections[s])).sum() / Nq.
    query [B, Hq, Nq, D], key [B, Hkv, Nk, D]; every selection made by ``select`` for these inputs.
    ``chunk`` query rows are scored at a time: memory is O(chunk * Nk) per head.
    """
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    for s in selections:
        if (s.nq, s.nk) != (Nq, Nk):
            raise ValueError(f"a selection made for {s.nq} queries and {s.nk} keys does not fit {Nq} and {Nk}")
    dev = query.device
    q_offset = Nk - Nq
    column_ids = [_column_ids(s) for s in selections]
    n_tiles = -(-Nk // TILE)
    with_blocks = any(s.blocks for s in selections)
    diag = torch.zeros(B, Hq, Nk, dtype=torch.float64, device=dev)
    tiles = torch.zeros(B, Hq, n_tiles, n_tiles, dtype=torch.float64, device=dev) if with_blocks else None
    column_mass = torch.zeros(len(selections), B, Hq, dtype=torch.float64, device=dev)
    k = key.float()
    for r0 in range(0, Nq, chunk):
        r1 = min(r0 + chunk, Nq)
        R, first, end = r1 - r0, q_offset + r0, q_offset + r1  # keys at end and beyond are in the future
        pos = first + torch.arange(R, device=dev)
        q = query[:, :, r0:r1].float().reshape(B, Hkv, (Hq // Hkv) * R, D)
        scores = (q @ k[:, :, :end].transpose(-1, -2)).view(B, Hq, R, end) * scale
        scores.masked_fill_(torch.arange(end, device=dev) > pos[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        diag[..., :end] += diagonal_sums(probs, first)
        if tiles is not None:
            n_end = -(-end // TILE)
            per_tile = F.pad(probs, (0, n_end * TILE - end)).view(B, Hq, R, n_end, TILE).sum(-1)
            tiles[..., :n_end].index_add_(2, pos // TILE, per_tile.double())
        probs = F.pad(probs, (0, 1))  # column `end` is 0: padding and future column ids read it
        for i, ids in enumerate(column_ids):
            if ids is None:
                continue
            V = ids.shape[-1]
            vals = probs.gather(-1, ids.clamp(max=end)[:, :, None, :].expand(B, Hq, R, V))
            offset = pos[:, None] - ids[:, :, None, :]                                  # [B, Hq, R, V]
            in_offsets = selections[i].offsets.gather(-1, offset.clamp(0, Nk - 1).flatten(2)).view_as(offset)
            column_mass[i] += vals.masked_fill(in_offsets & (offset >= 0), 0).sum(dim=(-1, -2))
    recall = []
    for i, s in enumerate(selections):
        mass = (diag * s.offsets).sum(-1) + column_mass[i]
        if s.blocks:
            mass = mass + _block_mass(tiles, s)
        recall.append(mass / Nq)
    return torch.stack(recall)
