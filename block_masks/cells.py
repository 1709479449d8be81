"""Dense, token-level views for tests and inspection at small sizes (they build [B, H, Nq, Nk])."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .estimate import Selection


def token_cells(selection: Selection, rows: Tensor | None = None) -> Tensor:
    """The kept cells [B, Hq, R, Nk] bool described by a Selection (causal, diagonal included), for
    the query rows ``rows`` (int64 [R], indices into the call's queries; default all Nq)."""
    offsets = selection.offsets
    B, H, Nk = offsets.shape
    device = offsets.device
    if rows is None:
        rows = torch.arange(selection.nq, device=device)
    p = selection.q_offset + rows[:, None]                                          # [R, 1]
    j = torch.arange(Nk, device=device)                                           # [Nk]
    o = p - j
    kept = offsets[:, :, o.clamp(min=0)] | (j < selection.sink[:, None, None])
    if selection.columns is not None:
        is_col = torch.zeros(B, H, Nk + 1, dtype=torch.bool, device=device)
        is_col.scatter_(-1, selection.columns, True)
        kept = kept | is_col[:, :, None, :Nk]
    for g in selection.blocks:
        blocks = torch.zeros(*g.kept.shape[:3], -(-Nk // g.block_size), dtype=torch.bool, device=device)
        blocks.scatter_(-1, g.kept, g.valid)
        kept = kept | blocks[:, :, p[:, 0] // g.block_size - g.first_block][..., j // g.block_size]
    return kept & (o >= 0)


def tile_states(block_mask: BlockMask) -> Tensor:
    """[B, H, n_q_tiles, n_k_tiles] int8: 0 skipped, 1 partial (mask_mod decides), 2 full.

    Raises AssertionError if a tile is listed twice (in one list, or as both partial and full)."""
    n_k_tiles = -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])
    lists = [(block_mask.kv_num_blocks, block_mask.kv_indices)]
    if block_mask.full_kv_num_blocks is not None:
        lists.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    counts = []
    for num, idx in lists:
        listed = torch.arange(idx.shape[-1], device=num.device) < num[..., None]
        dest = torch.where(listed, idx.long(), n_k_tiles)
        count = torch.zeros(*idx.shape[:-1], n_k_tiles + 1, dtype=torch.int32, device=num.device)
        counts.append(count.scatter_add_(-1, dest, torch.ones_like(dest, dtype=torch.int32))[..., :n_k_tiles])
    total = sum(counts)
    if (total > 1).any():
        raise AssertionError("a tile is listed twice (partial and full, or twice in one list)")
    state = counts[0] + (2 * counts[1] if len(counts) > 1 else 0)
    return state.to(torch.int8)


def visited_cells(block_mask: BlockMask) -> Tensor:
    """The cells [B, H, Nq, Nk] bool that FlexAttention's kernel computes for this BlockMask:
    every in-range cell of a full tile, the mask_mod cells of a partial tile, nothing elsewhere."""
    nq, nk = block_mask.seq_lengths
    tq, tk = block_mask.BLOCK_SIZE
    state = tile_states(block_mask)
    state = state.repeat_interleave(tq, -2)[..., :nq, :].repeat_interleave(tk, -1)[..., :nk]
    B, H = state.shape[:2]
    dev = state.device
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    q = torch.arange(nq, device=dev)[None, None, :, None]
    kv = torch.arange(nk, device=dev)[None, None, None, :]
    partial = block_mask.mask_mod(b, h, q, kv)
    return (state == 2) | ((state == 1) & partial)
