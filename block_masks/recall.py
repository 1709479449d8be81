"""Attention recall: the share of a head's exact softmax mass that a Selection keeps.

Used by the offline pattern search. The dense softmax is computed in query chunks (never [Nq, Nk]
at once); what a selection keeps is then summed from per-chunk aggregates that one pass collects
for all selections together:
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

from .build import column_flags
from .estimate import Selection, padded_diagonal_sums
from .pattern import TILE


def _column_flags(selection: Selection) -> Tensor:
    """[B, Hq, Nk] bool: the kept columns of every head, A-shape sinks and vertical columns."""
    B, Hq, Nk = selection.offsets.shape
    flags = (torch.arange(Nk, device=selection.offsets.device) < selection.sink[:, None]).expand(B, Hq, Nk)
    return flags if selection.columns is None else flags | column_flags(selection.columns, selection.nk)


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


MAX_COLUMN_SETS = 62


def attention_recall(query: Tensor, key: Tensor, selections: Sequence[Selection], scale: float, *,
                     chunk: int = 256) -> Tensor:
    """Exact attention recall of each selection: [S, B, Hq] float64.

    recall[s, b, h] = mean over the Nq query rows of the causal softmax mass (float32 softmax of
    q k^T * scale) that selection s keeps for head h, i.e. (P * token_cells(selections[s])).sum() / Nq.
    query [B, Hq, Nq, D], key [B, Hkv, Nk, D]; every selection made by ``select`` for these inputs
    (at most 62 of them). ``chunk`` query rows are scored at a time: memory is O(chunk * Nk) per head.

    The kept columns' cells that a kept offset also covers are counted once: columns are grouped
    by which selections keep them, and per group the mass along each offset is accumulated, so one
    pass over the union of kept columns serves every selection.
    """
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    for s in selections:
        if (s.nq, s.nk) != (Nq, Nk):
            raise ValueError(f"a selection made for {s.nq} queries and {s.nk} keys does not fit {Nq} and {Nk}")
    if not 1 <= len(selections) <= MAX_COLUMN_SETS:
        raise ValueError(f"attention_recall scores 1 to {MAX_COLUMN_SETS} selections at once, got {len(selections)}")
    dev = query.device
    q_offset = Nk - Nq

    # Group the kept columns by the set of selections that keep them (a bit mask per column).
    flags = torch.stack([_column_flags(s) for s in selections], dim=-1)               # [B, Hq, Nk, S]
    code = (flags.long() << torch.arange(len(selections), device=dev)).sum(-1)         # [B, Hq, Nk]
    codes, group = torch.unique(code, return_inverse=True)
    member = ((codes[:, None] >> torch.arange(len(selections), device=dev)) & 1).bool()  # [M, S]
    n_groups = codes.numel()
    width = int((code != 0).sum(-1).max())                                            # union size
    union = torch.where(code != 0, torch.arange(Nk, device=dev), Nk).sort(-1).values[..., :width]
    union_group = group.gather(-1, union.clamp(max=Nk - 1))  # padding (Nk) reads a zero below

    n_tiles = -(-Nk // TILE)
    with_blocks = any(s.blocks for s in selections)
    f64 = dict(dtype=torch.float64, device=dev)
    diag = torch.zeros(B, Hq, Nk, **f64)            # mass along each offset
    columns = torch.zeros(B, Hq, Nk, **f64)         # mass of each column
    group_diag = torch.zeros(B, Hq, n_groups * Nk, **f64)  # mass along each offset, per column group
    tiles = torch.zeros(B, Hq, n_tiles, n_tiles, **f64) if with_blocks else None
    k = key.float()
    for r0 in range(0, Nq, chunk):
        r1 = min(r0 + chunk, Nq)
        R, first, end = r1 - r0, q_offset + r0, q_offset + r1  # keys at end and beyond are in the future
        pos = first + torch.arange(R, device=dev)
        q = query[:, :, r0:r1].float().reshape(B, Hkv, (Hq // Hkv) * R, D)
        scores = (q @ k[:, :, :end].transpose(-1, -2)).view(B, Hq, R, end) * scale
        scores.masked_fill_(torch.arange(end, device=dev) > pos[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        columns[..., :end] += probs.sum(dim=-2)
        if tiles is not None:
            n_end = -(-end // TILE)
            per_tile = F.pad(probs, (0, n_end * TILE - end)).view(B, Hq, R, n_end, TILE).sum(-1)
            tiles[..., :n_end].index_add_(2, pos // TILE, per_tile.double())
        probs = F.pad(probs, (R, 0))  # R zero columns in front: the diagonal skew, and a zero to gather
        diag[..., :end] += padded_diagonal_sums(probs, first)
        if width:
            ids = torch.where(union < end, union + R, 0)[:, :, None, :].expand(B, Hq, R, width)
            vals = probs.gather(-1, ids)                                            # [B, Hq, R, width]
            offset = pos[:, None] - union[:, :, None, :]
            dest = torch.where(offset >= 0, union_group[:, :, None, :] * Nk + offset, n_groups * Nk)
            part = torch.zeros(B, Hq, n_groups * Nk + 1, dtype=torch.float32, device=dev)
            group_diag += part.scatter_add_(-1, dest.flatten(2), vals.flatten(2))[..., :-1]
    group_diag = group_diag.view(B, Hq, n_groups, Nk)
    recall = []
    for i, s in enumerate(selections):
        kept_offsets = s.offsets.double()
        overlap = (group_diag * member[:, i, None]).sum(2)  # along offsets, within this selection's columns
        mass = (diag * kept_offsets).sum(-1) + (columns * flags[..., i]).sum(-1) - (overlap * kept_offsets).sum(-1)
        if s.blocks:
            mass = mass + _block_mass(tiles, s)
        recall.append(mass / Nq)
    return torch.stack(recall)
