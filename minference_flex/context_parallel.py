"""Context parallelism: one causal sparse attention call whose sequence is sharded over the ranks.

Sharding (load-balanced, as PyTorch's context parallel shards causal attention): a sequence of ``N``
positions over ``W`` ranks is cut into ``2W`` equal chunks of ``c = N / (2W)`` positions; rank ``r``
holds chunk ``r`` (positions ``r·c .. (r+1)·c - 1``) followed by chunk ``2W-1-r`` (positions
``(2W-1-r)·c .. (2W-r)·c - 1``), so every rank has the same share of the causal work. ``shard`` and
``unshard`` convert ``[B, H, N, D]`` tensors (dim 2 the sequence) to and from that layout.

``context_parallel_attention`` takes each rank's shards of query ``[B, Hq, 2c, D]`` and key/value
``[B, Hkv, 2c, D]`` (self-attention over the whole prompt: the queries are all ``N`` positions) and
returns the rank's shard of the output, equal (up to float rounding) to the matching rows of
``mf.sparse_attention(query, key, value, patterns)`` on the whole tensors in one process. The
selection is the single-process op's:

- vertical-slash scores (``vertical_and_slash``, ``vertical_slash_mass`` heads) come from the last 64
  queries of the sequence, which are the end of chunk ``2W-1``, on rank 0: rank 0 estimates the kept
  columns and diagonal offsets once (``block_masks.estimate.scored_selection``) and broadcasts them
  (``[B, Hq, V]`` int64 and ``[B, Hq, N]`` bytes); every rank restricts them to the keys of each of
  its chunks (a chunk's keys are the prefix that ends with it);
- block kinds (``block_sparse``, ``block_mass``) choose per query block from that block's queries and
  the keys up to it, so each rank estimates its own query blocks; chunks start on block boundaries
  (``c`` a multiple of every block size), so every block is whole on one rank;
- dense and A-shape heads need no estimate.

Each chunk then runs as one call of the single-process plan and kernels (``kernel_plan`` with the
broadcast ``scored``, ``run_plan``) with its queries as the last of the key prefix.

Exchanged (collectives of ``torch.distributed``, any backend with ``all_gather`` and ``broadcast``;
tested with gloo): one ``all_gather`` of the key shards and one of the value shards, one
``broadcast`` of the columns and one of the offsets. **Present limit: K/V are all-gathered**, so each
rank holds the whole ``[B, Hkv, N, D]`` key and value (the memory of one GPU's attention inputs);
fetching only the key/value tiles a rank's kept cells need (its local windows and diagonals, the
gathered columns and kept blocks from the other ranks) is not done. Rank 0 computes the
vertical-slash scores alone (``64·N`` per head) while the others wait for the broadcast.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from block_masks.estimate import scored_column_count, scored_selection
from block_masks.pattern import BLOCK_KINDS, LAST_Q, SCORED_KINDS, TILE
from minference_flex.attention import _check, kernel_plan, run_plan


def shard(x: Tensor, rank: int, world: int, dim: int = 2) -> Tensor:
    """Rank ``rank``'s shard of ``x`` (sequence along ``dim``, length ``N`` divisible by ``2 * world``):
    chunk ``rank`` then chunk ``2 * world - 1 - rank`` of the ``2 * world`` equal chunks."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank} and world {world}")
    n = x.shape[dim]
    if n % (2 * world):
        raise ValueError(f"sequence length {n} is not divisible by 2 * world = {2 * world}")
    chunks = x.chunk(2 * world, dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


def unshard(shards: Sequence[Tensor], dim: int = 2) -> Tensor:
    """The whole tensor from every rank's ``shard`` (``shards[r]`` of rank ``r``), in sequence order."""
    world = len(shards)
    if world == 0:
        raise ValueError("unshard needs at least one shard")
    halves = [s.chunk(2, dim) for s in shards]
    if any(s.shape[dim] % 2 for s in shards):
        raise ValueError("each shard holds two equal chunks: its length must be even")
    return torch.cat([halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))], dim)


def chunk_size_multiple(patterns: Sequence) -> int:
    """What the chunk length ``N / (2W)`` must be a multiple of: 64 (the last 64 queries on one rank,
    ``block_mass``'s blocks) and every ``block_sparse`` block size (whole query blocks per rank)."""
    return math.lcm(TILE, *(p.block_size for p in patterns if p.kind in BLOCK_KINDS))


def _restrict(scored: tuple[Tensor, Tensor], end: int) -> tuple[Tensor, Tensor]:
    """The scored columns and offsets of the whole sequence for a call over keys ``0 .. end - 1``:
    columns at or past ``end`` become the padding ``end`` (the list stays sorted), offsets past the
    call's keys are dropped. Cells (p, j) with j <= p < end are kept exactly as before."""
    columns, slashes = scored
    return torch.where(columns < end, columns, end), slashes[..., :end].contiguous()


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, patterns: Sequence, *,
                               group: dist.ProcessGroup | None = None, scale: float | None = None,
                               compiled: bool = True) -> Tensor:
    """This rank's shard ``[B, Hq, 2c, D]`` of ``mf.sparse_attention`` over a sequence sharded by ``shard``.

    query ``[B, Hq, 2c, D]``, key and value ``[B, Hkv, 2c, D]``: this rank's ``shard`` of the whole
    ``[B, H, N, D]`` tensors, ``N = 2c·W`` over the ``W`` ranks of ``group`` (default: the default
    group, which must be initialised), every rank with the same shapes, patterns and scale.
    ``c`` must be a multiple of ``chunk_size_multiple(patterns)`` (64 and every ``block_sparse``
    block size). ``patterns``, ``scale`` and ``compiled`` as for ``mf.sparse_attention``.
    Collective: every rank of the group must call it. See the module docstring for what is
    exchanged (K/V are all-gathered: the present limit).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel_attention needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group)")
    patterns, scale = _check(query, key, value, patterns, scale)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, Hq, n_local, D = query.shape
    if key.shape[2] != n_local:
        raise ValueError(f"query and key/value shards must have the same length (self-attention over the "
                         f"whole sequence), got {n_local} and {key.shape[2]}")
    if B == 0 or Hq == 0:  # same shapes on every rank: all return at once, with no collective
        return query.new_zeros(query.shape)
    multiple = chunk_size_multiple(patterns)
    if n_local == 0 or n_local % (2 * multiple):
        raise ValueError(f"each rank's shard holds 2 chunks of N / (2W) positions, a multiple of {multiple} "
                         f"(64 and the block_sparse block sizes): the shard length must be a positive "
                         f"multiple of {2 * multiple}, got {n_local}")
    c, n = n_local // 2, n_local * world

    # K/V: all-gathered (the present limit), then put back in sequence order.
    def gather(x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return unshard(parts)
    key_all, value_all = gather(key), gather(value)

    # The scored heads' columns and offsets: estimated once on rank 0 (which holds the last queries)
    # and broadcast.
    scored = None
    if any(p.kind in SCORED_KINDS for p in patterns):
        src = dist.get_global_rank(group, 0) if group is not None else 0
        if rank == 0:
            columns, slashes = scored_selection(query[:, :, n_local - LAST_Q:], key_all, patterns, scale)
            slashes = slashes.to(torch.uint8)
        else:
            columns = torch.empty(B, Hq, scored_column_count(patterns, n), dtype=torch.int64, device=query.device)
            slashes = torch.empty(B, Hq, n, dtype=torch.uint8, device=query.device)
        dist.broadcast(columns, src, group=group)
        dist.broadcast(slashes, src, group=group)
        scored = (columns, slashes.bool())

    outputs = []
    for half, chunk in ((0, rank), (1, 2 * world - 1 - rank)):
        end = (chunk + 1) * c
        q = query[:, :, half * c:(half + 1) * c]
        k, v = key_all[:, :, :end], value_all[:, :, :end]
        plan = kernel_plan(q, k, patterns, scale=scale, compiled=compiled,
                           scored=None if scored is None else _restrict(scored, end))
        outputs.append(run_plan(plan, q, k, v, compiled=compiled))
    return torch.cat(outputs, dim=2)
