"""Predicted times of one attention layer call on a CUDA device: SDPA, planning and the sparse kernel.

The transformers backend uses them to decide, per prefill layer call, whether the sparse kernel could
be slower than SDPA and then to run SDPA instead (``choose``, docs/transformers.md). All times are in
milliseconds. *Cells* are query-key pairs; *tiles* are 64x64 (64 query rows by 64 keys): a strip of
the strip kernel, or the 64x64-equivalent area of a FlexAttention tile.

The model is linear in a few counts and calibrated on one device only (``H100``). The bounds of the
kernel time are derived for the layout ``sparse_attention`` runs on CUDA (``plan_attention`` with
``strips=True``): kept diagonals, sinks and gathered vertical columns in the strip kernel's 64x64
blocks, block-sparse blocks in 64x64 FlexAttention tiles.

Every function here takes Python integers or, under ``torch.compile`` with dynamic shapes, SymInts:
the arithmetic uses ``torch.sym_min`` / ``torch.sym_max`` and integer division, so only the final
comparisons of ``choose`` guard (a compiled caller recompiles where a decision flips, not per length).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from block_masks import STRIP, TILE, Pattern
from block_masks.pattern import (
    A_SHAPE,
    BLOCK_MASS,
    BLOCK_SPARSE,
    DENSE,
    FORCED_OFFSETS,
    MASS_KINDS,
    SCORED_KINDS,
    VERTICAL_SLASH,
    query_blocks,
    scored_budgets,
)

if TYPE_CHECKING:
    from minference_flex.attention import AttentionPlan

#: Cells of one 64x64 tile or strip.
TILE_CELLS = TILE * STRIP
#: Head dim the kernel coefficients are given for.
REFERENCE_HEAD_DIM = 128
#: ``sdpa_dims(64)``, measured on the H100 (SmolLM2 geometry: 2.64 ms at 32K and 42.49 ms at 128K
#: for 9 heads of dim 64; Llama-3-8B: 13.30 ms at 32K for 32 heads of dim 128).
SDPA_DIMS_AT_64 = 90.0
#: The most a layer may lose against SDPA by planning and then falling back (a fraction of SDPA's time).
MAX_LOSS = 0.05

Choice = Literal["sdpa", "sparse", "check"]


class TileBounds(NamedTuple):
    """Bounds of the 64x64 tiles one call visits, summed over batch and heads: ``low`` <= strips +
    FlexAttention tiles, ``strips`` >= strips, ``flex`` >= FlexAttention tiles (64x64 equivalents);
    ``cells`` <= the kept cells (what ``low`` is derived from)."""

    low: int
    strips: int
    flex: int
    cells: int


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the time model of one attention layer call (milliseconds).

    - SDPA (causal flash attention): ``sdpa_fixed_ms + sdpa_cell_ms * batch * heads * causal cells
      * sdpa_dims(head_dim)`` (``sdpa_cell_ms`` per cell and dim at head dim 128);
    - planning (estimation and mask building): ``plan_fixed_ms + plan_token_ms * batch * query heads
      * keys``, plus ``mass_cell_ms`` per score of the sampled rows of ``block_mass`` heads (each
      row times all keys); an ``antidiagonal_mass`` head of side ``b`` is priced as a ``block_mass``
      head of ``64 / b`` rows (as many dot products and ``b`` times fewer scores: an upper bound
      until its kernel is timed);
    - the sparse kernel: ``strip_tile_ms`` per 64x64 strip and ``flex_tile_ms`` per 64x64 area of
      FlexAttention tiles at head dim 128, scaled by ``head_dim / 128`` but never below
      ``min_dim_factor`` (small head dims use the tiles less efficiently).
    """

    sdpa_fixed_ms: float
    sdpa_cell_ms: float
    plan_fixed_ms: float
    plan_token_ms: float
    strip_tile_ms: float
    flex_tile_ms: float
    mass_cell_ms: float
    min_dim_factor: float = 0.85  # measured 0.82 for head dim 64 (SmolLM2) against 128 (Llama-3-8B)

    def sdpa_ms(self, batch: int, q_heads: int, n_queries: int, n_keys: int, head_dim: int) -> float:
        """Causal SDPA with the queries at the last ``n_queries`` of ``n_keys`` positions."""
        q0 = n_keys - n_queries
        causal_cells = (n_keys * (n_keys + 1) - q0 * (q0 + 1)) // 2
        return self.sdpa_fixed_ms + self.sdpa_cell_ms * (batch * q_heads * causal_cells) * sdpa_dims(head_dim)

    def plan_ms(self, batch: int, q_heads: int, n_keys: int, head_dim: int) -> float:
        """``plan_attention``: estimation and mask building. ``head_dim`` is not used: the estimation
        multiplies 64 queries by the keys and the rest does not depend on it (measured at 128 only)."""
        return self.plan_fixed_ms + self.plan_token_ms * (batch * q_heads * n_keys)

    def mass_ms(self, batch: int, n_queries: int, n_keys: int, patterns: Sequence[Pattern]) -> float:
        """The estimate of the ``block_mass`` and ``antidiagonal_mass`` heads (0 without such heads)."""
        n_blocks = query_blocks(n_queries, n_keys)[1]
        rows = sum(p.b if p.kind == BLOCK_MASS else TILE // p.b for p in patterns if p.kind in MASS_KINDS)
        return self.mass_cell_ms * batch * rows * n_blocks * n_keys

    def dim_factor(self, head_dim: int) -> float:
        """Kernel time per tile at ``head_dim`` relative to head dim 128."""
        return torch.sym_max(head_dim / REFERENCE_HEAD_DIM, self.min_dim_factor)

    def kernel_ms(self, strip_tiles: Tensor | int, flex_tiles: Tensor | float, head_dim: int) -> Tensor | float:
        """``run_plan`` visiting ``strip_tiles`` strips and ``flex_tiles`` 64x64-equivalent
        FlexAttention tiles (counts summed over batch and heads; tensors or numbers)."""
        return (strip_tiles * self.strip_tile_ms + flex_tiles * self.flex_tile_ms) * self.dim_factor(head_dim)

    def kernel_ms_bounds(self, batch: int, n_queries: int, n_keys: int, patterns: Sequence[Pattern],
                         head_dim: int) -> tuple[float, float]:
        """(low, high): bounds of ``kernel_ms`` for any prompt, from the shapes and the per-head
        budgets only (``tile_bounds``; no tensor is read). ``patterns``: one per query head."""
        tiles = tile_bounds(batch, n_queries, n_keys, patterns)
        low = torch.sym_min(self.kernel_ms(tiles.low, 0, head_dim), self.kernel_ms(0, tiles.low, head_dim))
        return low, self.kernel_ms(tiles.strips, tiles.flex, head_dim)


#: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, bfloat16, Llama-3-8B geometry (32 query
#: heads, 8 KV heads, head dim 128, batch 1), numbers of docs/performance.md. Re-calibrate here.
H100 = CostModel(
    sdpa_fixed_ms=0.02,
    sdpa_cell_ms=6.0e-12,        # SDPA causal 13.30 ms at N = 32768 (7.0e-12 at 131072: SDPA is underestimated)
    plan_fixed_ms=1.0,           # estimation + mask building, host-bound at small sizes (~65 launches): measured
    plan_token_ms=4.5e-7,        # 0.9-1.2 ms at 32768, 1.9-2.4 at 131072, 13.5-15.5 at 1M; predicted 1.5 / 2.9 / 16.1
    strip_tile_ms=6.0e-6,        # strip kernel per 64x64 block (strips and column blocks): 5.1-5.4 ns at 32K-128K, 5.6-5.8 at 1M
    flex_tile_ms=6.0e-6,         # FlexAttention 64x64 tiles (block-sparse heads), dense 5.3 ns, partial tiles more
    mass_cell_ms=2.5e-9,         # block_mass estimate kernel, per sampled score: 2.3-2.7e-9 from 32K on an H200 (4.4e-9 at 8K)
)

#: Cost models by name: what a model's ``cost_model`` setting (``hf.configure``) may name.
COST_MODELS: dict[str, CostModel] = {"H100": H100}


def sdpa_dims(head_dim: int) -> float:
    """The head dim as SDPA's time sees it, in dims of head dim 128's cost per dim: the head dim
    itself from 128 on; 90 at 64 (on the H100 SDPA spends 8.5e-12 ms per cell and dim at head dim
    64 against 6.0e-12 at 128: 64 * 8.5 / 6.0 = 90.7, rounded down); linear between; below 64
    (not measured) proportional to the head dim, which rates SDPA no slower than at 64."""
    if head_dim >= REFERENCE_HEAD_DIM:
        return head_dim
    if head_dim >= 64:
        return SDPA_DIMS_AT_64 + (head_dim - 64) * (REFERENCE_HEAD_DIM - SDPA_DIMS_AT_64) / 64
    return SDPA_DIMS_AT_64 * head_dim / 64


# --------------------------------------------------------------------------- tile bounds

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _sum_min(n: int, k: int) -> int:
    """sum_{i=1}^{n} min(i, k), for n, k >= 0."""
    m = torch.sym_min(n, k)
    return m * (m + 1) // 2 + (n - m) * k


def _row_cells(q0: int, n_keys: int, k: int) -> int:
    """sum over the query rows p = q0 .. n_keys - 1 of min(p + 1, k): k kept keys per row, at most
    the row's causal length."""
    return _sum_min(n_keys, k) - _sum_min(q0, k)


def _sum_capped(n: int, step: int, first: int, cap: int) -> int:
    """sum_{t=0}^{n-1} min(cap, first + step * t), for step >= 1 (closed form, no loop)."""
    below = torch.sym_min(torch.sym_max(_ceil_div(cap - first, step), 0), n)  # terms under the cap
    return step * below * (below - 1) // 2 + first * below + (n - below) * cap


def _one_cluster_strips(kept: int) -> int:
    """Strips of a head whose kept offsets are 0 .. kept - 1 (one cluster): ceil((kept - 1) / 64) + 1."""
    return _ceil_div(kept - 1, STRIP) + 1


def tile_bounds(batch: int, n_queries: int, n_keys: int, patterns: Sequence[Pattern]) -> TileBounds:
    """Bounds of the tiles ``run_plan`` visits (strip layout, 64x64 tiles) for any prompt of this shape.

    ``patterns``: one Pattern per query head. Query block t (strips: rows 64t .., first row at
    position i0 = Nk - Nq + 64t) and query tile t (FlexAttention: aligned, ``pad`` padding rows in
    front, absolute tile index A) are bounded per head kind:

    - strips of kept offsets: a head has at most S strips (at most one per kept offset; the forced
      offsets 0..99 of ``vertical_and_slash`` are one cluster of 3 strips, so S <= kept - 97), and a
      block runs those with top <= i0 + 63 (tops >= -63): at most (i0 + 126) // 64 + 1 when the
      kept offsets are one run 0 .. w-1 (dense, A-shape window), at most (i0 + 126) // 32 + 1 in
      general (clusters are >= 64 offsets apart, so at most 2 strips per 64 offsets);
    - sink strips (A-shape): exactly ceil(min(sink, i0 + 64) / 64);
    - blocks of gathered vertical columns (strip kernel): at most min(ceil(columns / 64),
      (i0 + 127) // 64) per query block (only columns at or before its last row count);
    - block-sparse tiles: at most min(blocks * block_size / 64, A + 1) per query tile; ``block_mass``
      tiles: at most A + 1 (every causal tile).

    The low bound counts kept cells: every 64x64 tile holds at most 4096 cells and every kept cell
    is computed once, and a row keeps at least min(row length, k) keys (k: the larger of window and
    sink for A-shape, the 100 forced offsets for vertical-slash plus the other kept offsets where they
    cover the fewest rows, the kept blocks before the diagonal one plus one key for block-sparse);
    every query block visits at least one tile (the diagonal).
    """
    nq, nk = n_queries, n_keys
    q0 = nk - nq
    n_blocks = _ceil_div(nq, STRIP)
    align = math.lcm(TILE, *(p.block_size for p in patterns if p.kind == BLOCK_SPARSE))
    pad = q0 % align
    n_tiles = _ceil_div(nq + pad, TILE)
    first_tile = (q0 - pad) // TILE                         # absolute index of query tile 0

    def one_cluster(kept):   # strips over all query blocks, offsets 0 .. kept - 1
        return _sum_capped(n_blocks, 1, (q0 + 2 * STRIP - 2) // STRIP + 1, _one_cluster_strips(kept))

    def per_tile(cap):       # FlexAttention tiles over all query tiles, at most cap per tile
        return _sum_capped(n_tiles, 1, first_tile + 1, cap)

    groups: dict[tuple, int] = {}
    for p in patterns:
        key = (p.kind, p.a, p.b, p.block_size)
        groups[key] = groups.get(key, 0) + 1

    low = strips = flex = kept_cells = 0
    for (kind, a, b, block_size), heads in groups.items():
        h_strips = h_flex = 0
        if kind == DENSE:
            cells = _row_cells(q0, nk, nk)
            h_strips = one_cluster(nk)
        elif kind == A_SHAPE:
            window, sink = torch.sym_min(max(b, 1), nk), torch.sym_min(a, nk)
            cells = _row_cells(q0, nk, max(a, b, 1))
            h_strips = one_cluster(window) + _sum_capped(n_blocks, 1, 1 + _ceil_div(q0, STRIP), _ceil_div(sink, STRIP))
        elif kind in SCORED_KINDS:  # a vertical_slash_mass head: its caps bound what it keeps
            columns, kept = (torch.sym_min(budget, nk) for budget in scored_budgets(kind, a, b))
            # forced offsets in every row, the others placed where they cover the fewest rows (a mass
            # head may keep no others)
            cells = _row_cells(q0, nk, FORCED_OFFSETS)
            if kind == VERTICAL_SLASH:
                cells = cells + _sum_min(torch.sym_max(kept - FORCED_OFFSETS, 0), nq)
            most = torch.sym_max(kept - (FORCED_OFFSETS - 3), 3)
            h_strips = (_sum_capped(n_blocks, 2, (q0 + 2 * STRIP - 2) // (STRIP // 2) + 1, most)
                        + _sum_capped(n_blocks, 1, (q0 + 2 * STRIP - 1) // STRIP, _ceil_div(columns, STRIP)))
        elif kind in MASS_KINDS:  # at least the diagonal cell of a row, at most every causal tile
            cells = _row_cells(q0, nk, 1)
            h_flex = per_tile(_ceil_div(nk, TILE))
        else:  # BLOCK_SPARSE
            kept_blocks = max(a, 1)
            cells = _row_cells(q0, nk, block_size * (kept_blocks - 1) + 1)
            h_flex = per_tile(kept_blocks * block_size // TILE)
        low += heads * torch.sym_max(_ceil_div(cells, TILE_CELLS), n_blocks)
        strips += heads * h_strips
        flex += heads * h_flex
        kept_cells += heads * cells
    return TileBounds(batch * low, batch * strips, batch * flex, batch * kept_cells)


# --------------------------------------------------------------------------- decisions

def choose(cost: CostModel, batch: int, n_queries: int, n_keys: int, head_dim: int,
           patterns: Sequence[Pattern]) -> Choice:
    """How to run one layer call, from shapes and budgets only (no tensor is read):

    - ``"sparse"``: planning plus the kernel's upper bound is within SDPA's time;
    - ``"sdpa"``: planning plus the kernel's lower bound exceeds SDPA's time, or planning alone
      exceeds ``MAX_LOSS`` of it (planning and then falling back would lose more than that);
    - ``"check"``: plan, then compare the kernel time predicted from the plan's tiles with SDPA
      (``kernel_beats_sdpa``) and run the faster one: at most planning (< MAX_LOSS) is lost.
    """
    q_heads = len(patterns)
    sdpa = cost.sdpa_ms(batch, q_heads, n_queries, n_keys, head_dim)
    plan = cost.plan_ms(batch, q_heads, n_keys, head_dim) + cost.mass_ms(batch, n_queries, n_keys, patterns)
    low, high = cost.kernel_ms_bounds(batch, n_queries, n_keys, patterns, head_dim)
    if plan + high <= sdpa:
        return "sparse"
    if plan + low > sdpa or plan > MAX_LOSS * sdpa:
        return "sdpa"
    return "check"


def plan_tiles(plan: AttentionPlan) -> tuple[Tensor | int, Tensor | float]:
    """(strips, FlexAttention tiles as 64x64 equivalents) the kernel visits for a plan, summed over
    batch and heads: 0-d device tensors, read without a host sync."""
    strips = plan.strips.visited().sum() if plan.strips is not None else 0
    return strips, plan.flex_tiles().sum() * (plan.tiles.q * plan.tiles.kv / TILE_CELLS)


def kernel_beats_sdpa(cost: CostModel, plan: AttentionPlan, head_dim: int) -> Tensor | bool:
    """Whether the kernel time predicted from the plan's tiles is within SDPA's time for the same call
    (0-d bool tensor on the plan's device; ``bool()`` of it is the one host sync of a "check")."""
    selection = plan.selection
    batch, q_heads = selection.offsets.shape[:2]
    sdpa = cost.sdpa_ms(batch, q_heads, selection.nq, selection.nk, head_dim)
    return cost.kernel_ms(*plan_tiles(plan), head_dim) <= sdpa
