"""Online estimation: which columns, diagonals and blocks each head keeps for this prompt.

Everything here is batched over batch and heads; the per-head budgets live in tensors, so the only
Python integers are shapes and upper bounds derived from the patterns.
Positions: the Nq queries are the last Nq of the Nk keys, query i sits at p_i = Nk - Nq + i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .pattern import (
    A_SHAPE,
    BLOCK_KINDS,
    BLOCK_MASS,
    BLOCK_SPARSE,
    DENSE,
    FORCED_COLUMNS,
    FORCED_OFFSETS,
    LAST_Q,
    MASS_KINDS,
    SCORED_KINDS,
    TILE,
    VERTICAL_SLASH_MASS,
    Pattern,
    query_blocks,
    scored_budgets,
)
from .antidiagonal_kernel import antidiagonal_mass_estimate_op, antidiagonal_mass_estimate_triton
from .mass_kernel import block_mass_estimate_op, block_mass_estimate_triton
from .score_kernel import vertical_slash_scores_op, vertical_slash_scores_triton
from .triton_support import HAS_TRITON


@dataclass(frozen=True)
class BlockSelection:
    """Kept key blocks of the block-sparse heads that share one ``block_size``.

    kept:  [B, Hq, n_query_blocks, K] int64 key-block numbers, best first.
    valid: [B, Hq, n_query_blocks, K] bool, False for padding and for heads outside the group.
    Query block r is the pattern block ``first_block + r`` (blocks counted from position 0).
    max_kept: a Python bound of K (the group's largest budget), for mask widths: K itself is
    symbolic under torch.compile with dynamic shapes.
    """

    block_size: int
    first_block: int
    kept: Tensor
    valid: Tensor
    max_kept: int


@dataclass(frozen=True)
class Selection:
    """Token-level description of the kept cells of every head (the input of mask building).

    A causal cell (p, j) of head h is kept iff j < sink[h], or offsets[b, h, p - j], or j is one of
    columns[b, h], or (block-sparse heads) its key block is kept for its query block.
    offsets: [B, Hq, Nk] bool; sink: [Hq] int32; block_sparse: [Hq] bool, the heads that keep whole
    key blocks (``block_sparse`` and ``block_mass``);
    columns: [B, Hq, V] int64 sorted ascending, entries equal to Nk are padding (None if no head has
    verticals).
    """

    nq: int
    nk: int
    offsets: Tensor
    sink: Tensor
    block_sparse: Tensor
    columns: Tensor | None
    blocks: tuple[BlockSelection, ...]
    max_sink: int        # largest sink over heads (Python bound for mask widths)
    max_offsets: int     # largest number of kept offsets over heads (Python bound)

    @property
    def q_offset(self) -> int:
        return self.nk - self.nq


@dataclass(frozen=True)
class HeadTables:
    """Per-head pattern parameters as device tensors [Hq] (built once per pattern list), with what
    ``select`` derives from them alone, so that a call spends no kernel launches on it."""

    a: Tensor
    block_size: Tensor
    block_sparse: Tensor     # bool: block_sparse heads
    whole_blocks: Tensor     # bool: heads that keep whole key blocks (block_sparse, block_mass)
    window: Tensor           # offsets 0 .. window - 1 kept by construction: all (DENSE_WINDOW) for dense
                             # heads, the local window for A-shape heads, none elsewhere
    sink: Tensor             # int32 sink tokens of A-shape heads (not yet capped at the length), 0 elsewhere
    columns: Tensor          # vertical columns kept (vertical_and_slash) or at most kept (vertical_slash_mass) per
                             # head, at least FORCED_COLUMNS; 0 elsewhere
    slashes: Tensor          # the same for diagonal offsets, at least FORCED_OFFSETS; 0 elsewhere
    mass_target: Tensor      # float32 share of the column and of the offset mass to keep (vertical_slash_mass
                             # heads: a / 1000), 0 elsewhere


#: ``HeadTables.window`` of dense heads: past any prompt length.
DENSE_WINDOW = 2**62


@lru_cache(maxsize=256)
def head_tables(patterns: tuple[Pattern, ...], device: torch.device) -> HeadTables:
    """Cached so that the host-to-device copy happens once per (patterns, device), not per call.

    Budgets past any prompt length (Python ints of any size) are capped to fit the tables' dtypes:
    ``DENSE_WINDOW`` for int64, 2**31 - 1 for the int32 sinks (index tensors are int32, so no prompt
    is longer); ``select`` clamps them to the length."""
    def t(values, dtype=torch.int64):
        cap = DENSE_WINDOW if dtype == torch.int64 else 2**31 - 1 if dtype == torch.int32 else None
        return torch.tensor([min(v, cap) for v in values] if cap else values, dtype=dtype, device=device)

    def of_kind(kind, value, dtype=torch.int64):  # value(p) for the heads of this kind, 0 elsewhere
        return t([value(p) if p.kind == kind else 0 for p in patterns], dtype)

    return HeadTables(
        a=t([p.a for p in patterns]),
        block_size=t([p.block_size for p in patterns]),
        block_sparse=t([p.kind == BLOCK_SPARSE for p in patterns], torch.bool),
        whole_blocks=t([p.kind in BLOCK_KINDS for p in patterns], torch.bool),
        window=t([DENSE_WINDOW if p.kind == DENSE else max(p.b, 1) if p.kind == A_SHAPE else 0 for p in patterns]),
        sink=of_kind(A_SHAPE, lambda p: p.a, torch.int32),
        columns=t([scored_budgets(p.kind, p.a, p.b)[0] if p.kind in SCORED_KINDS else 0 for p in patterns]),
        slashes=t([scored_budgets(p.kind, p.a, p.b)[1] if p.kind in SCORED_KINDS else 0 for p in patterns]),
        mass_target=t([p.a / 1000 if p.kind == VERTICAL_SLASH_MASS else 0.0 for p in patterns], torch.float32),
    )


def ranking_scores(scores: Tensor) -> Tensor:
    """``scores`` with every value that is not finite (NaN or an infinity, from non-finite inputs)
    set to -inf: it ranks last and ``_top`` never keeps it, so forced entries, set to +inf after
    this, always rank first and the kept set is defined whatever the inputs hold."""
    return torch.where(scores.isfinite(), scores, float("-inf"))


def _top(scores: Tensor, k: int, counts: Tensor, ranked: bool = True) -> tuple[Tensor, Tensor]:
    """Top-``k`` indices along the last dim and which of them a row keeps: its best ``counts``, of
    those with a score above -inf (``ranking_scores``).

    ``ranked=False`` when every count is 0 or at least ``k`` (one budget for all heads): then the
    order does not matter and the indices come unsorted, which saves a sort of the k (a segmented
    radix sort of ~16 launches for k = 6096 on CUDA)."""
    top = scores.topk(k, dim=-1, sorted=ranked)
    scored = top.values > float("-inf")
    if not ranked:
        return top.indices, (counts > 0).unsqueeze(-1) & scored
    rank = torch.arange(k, device=scores.device)
    return top.indices, (rank < counts.unsqueeze(-1)) & scored


def _top_scored(scores: Tensor, forced: int, k: int, counts: Tensor, target: Tensor | None,
                ranked: bool) -> tuple[Tensor, Tensor]:
    """The kept columns (or offsets) of the scored heads, from their scores [B, Hq, N] (``ranking_scores``,
    overwritten: the forced entries become +inf): the top-``k`` indices, entries 0 .. forced - 1 ranked
    first, and which of them a head keeps.

    A head keeps its best ``counts`` [Hq]; a head with a ``target`` [Hq] above 0 (``vertical_slash_mass``)
    only those of them ranked so that the entries ranked above hold less than ``target`` of the row's
    total score, and the forced ones: the shortest such prefix that reaches the target (scores of 0 or
    not finite are never kept, forced ones always). ``target`` None: no mass heads."""
    mass = scores.clamp(min=0) if target is not None else None   # -inf (not finite) holds no mass
    scores[..., :forced] = float("inf")                 # in place: ``ranking_scores`` made a fresh tensor
    idx, keep = _top(scores, k, counts, ranked)
    if mass is not None:
        ranked_mass = mass.gather(-1, idx)
        before = ranked_mass.cumsum(-1) - ranked_mass
        reach = target[:, None] * mass.sum(-1, keepdim=True)          # [B, Hq, 1]
        in_prefix = (torch.arange(k, device=scores.device) < forced) | ((before < reach) & (ranked_mass > 0))
        keep = keep & (in_prefix | (target[:, None] == 0))
    return idx, keep


def diagonal_sums(probs: Tensor, first: int) -> Tensor:
    """Sums of ``probs`` [..., R, N] along query-key offsets, rows at positions first .. first+R-1
    (first + R <= N): out[..., o] = sum_r probs[..., r, first + r - o], 0 where that key is < 0."""
    return padded_diagonal_sums(F.pad(probs, (probs.shape[-2], 0)), first)


def padded_diagonal_sums(padded: Tensor, first: int) -> Tensor:
    """``diagonal_sums`` of probs given as ``padded`` = probs with R zero columns in front, a fresh
    contiguous tensor (storage offset 0, as ``F.pad`` returns).

    Skew without an index tensor: reading the padded rows with a row stride one longer than their
    width shifts row r right by r, which lines up each diagonal in one column."""
    *lead, R, W = padded.shape
    N = W - R
    if first + R > N:
        raise ValueError(f"rows at positions {first}..{first + R - 1} need at least {first + R} keys, got {N}")
    flat = padded.reshape(-1, R, W)
    # view[r, c] = padded[r, r + c] = probs[r, r + c - R]: offset first + R - c, the same for every r.
    # Storage offset 0: both callers pass the fresh output of F.pad (and storage_offset() would
    # break the graph inside torch.compile).
    view = flat.as_strided((flat.shape[0], R, first + R + 1), (R * W, W + 1, 1), 0)
    out = view.sum(dim=-2).flip(-1)[:, : first + R]
    return F.pad(out, (0, N - first - R)).view(*lead, N)


def vertical_slash_scores(query: Tensor, key: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention mass of the last ``min(64, Nq)`` queries per key column and per diagonal offset.

    query [B, Hq, Nq, D], key [B, Hkv, Nk, D]. Returns (vertical, slash), both [B, Hq, Nk] float32:
    vertical[j] = sum_r P[r, j], slash[o] = sum_r P[r, p_r - o], with P the causal softmax of the last
    queries computed in float32. On CUDA two Triton passes compute the same (``score_kernel``); this
    PyTorch code is their definition and the CPU path.
    """
    if query.is_cuda and HAS_TRITON:
        scores = vertical_slash_scores_op if torch.compiler.is_compiling() else vertical_slash_scores_triton
        return scores(query, key, scale)
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    m = min(LAST_Q, Nq)
    # The scale goes on the few queries, not on the [B, Hq, m, Nk] scores (8.6 GB at 1M tokens).
    q_last = (query[:, :, Nq - m:].float() * scale).reshape(B, Hkv, (Hq // Hkv) * m, D)
    scores = (q_last @ key.float().transpose(-1, -2)).view(B, Hq, m, Nk)
    # Row r sits at position Nk - m + r: only the last m columns can be in its future.
    future = torch.ones(m, m, dtype=torch.bool, device=query.device).triu(1)
    scores[..., Nk - m:].masked_fill_(future, float("-inf"))
    probs = scores.softmax(dim=-1)
    del scores
    vertical = probs.sum(dim=-2)
    slash = diagonal_sums(probs, Nk - m)
    return vertical, slash


def block_means(x: Tensor, start: int, block: int) -> Tensor:
    """Mean of x [B, H, N, D] over blocks of positions (x[:, :, i] sits at start + i), blocks counted
    from position 0. Returns [B, H, n_blocks, D] float32 covering blocks start // block onwards."""
    B, H, N, D = x.shape
    front = start % block
    n_blocks = -(-(front + N) // block)
    padded = torch.nn.functional.pad(x, (0, 0, front, n_blocks * block - front - N))
    sums = padded.view(B, H, n_blocks, block, D).sum(dim=-2, dtype=torch.float32)
    lo = (torch.arange(n_blocks, device=x.device) * block - front).clamp(min=0)
    hi = ((torch.arange(n_blocks, device=x.device) + 1) * block - front).clamp(max=N)
    return sums / (hi - lo).unsqueeze(-1)


def block_sparse_selection(
    query: Tensor, key: Tensor, tables: HeadTables, block_size: int, in_group: Tensor, max_a: int
) -> BlockSelection:
    """Top key blocks per query block for the heads in ``in_group`` ([Hq] bool) by pooled scores."""
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    q_offset = Nk - Nq
    first = q_offset // block_size
    pooled_q = block_means(query, q_offset, block_size)          # [B, Hq, nPq, D]
    pooled_k = block_means(key, 0, block_size)                   # [B, Hkv, nPk, D]
    n_pq, n_pk = pooled_q.shape[2], pooled_k.shape[2]
    scores = (pooled_q.reshape(B, Hkv, -1, D) @ pooled_k.transpose(-1, -2)).view(B, Hq, n_pq, n_pk)
    q_block = first + torch.arange(n_pq, device=query.device)
    k_block = torch.arange(n_pk, device=query.device)
    scores = ranking_scores(scores).masked_fill(k_block > q_block[:, None], float("-inf"))
    scores = scores.masked_fill(k_block == q_block[:, None], float("inf"))  # the diagonal block always
    k = min(n_pk, max(max_a, 1))
    counts = torch.minimum(tables.a.clamp(min=1)[:, None], q_block + 1)  # [Hq, nPq]
    counts = torch.where(in_group[:, None], counts, 0)
    kept, valid = _top(scores, k, counts)
    return BlockSelection(block_size, first, kept, valid, max(max_a, 1))


#: The most bytes of sampled-row scores a ``block_mass`` estimate holds at once (it works through the
#: query blocks in chunks of this size, so a long prompt never needs [rows, Nk] scores in one piece).
MASS_CHUNK_BYTES = 2**28


def sampled_rows(q_offset: int, nq: int, rows: int, block: int = TILE, device=None) -> Tensor:
    """[n_blocks, rows] int64 query indices (into the call's Nq queries, which sit at positions
    q_offset ..) sampled from each query block: in-block rows step - 1, 2 step - 1, .., block - 1
    (step = block // rows), each clamped to the rows of its block that the call has. Blocks are
    counted from position 0; the first is the block of position q_offset."""
    first, n_blocks = query_blocks(nq, q_offset + nq, block)
    start = (first + torch.arange(n_blocks, device=device))[:, None] * block
    step = block // rows
    pos = start + torch.arange(step - 1, block, step, device=device)
    return pos.clamp(min=q_offset, max=q_offset + nq - 1) - q_offset


def block_mass_estimate(query: Tensor, key: Tensor, scale: float, rows: int) -> Tensor:
    """Estimated causal softmax mass of every (query block, key block) of 64 positions.

    query [B, H, Nq, D], key [B, H, Nk, D] (one key head per query head). Returns [B, H, n_q_blocks,
    n_k_blocks] float32: for query block t, the mean over its ``sampled_rows`` r of the exact causal
    softmax of row r (float32) summed over the keys of each key block (so a row of the result sums
    to 1; key blocks after the diagonal one hold 0). Works through the query blocks in chunks of at
    most ``MASS_CHUNK_BYTES`` of scores. On CUDA ``block_mass_selection`` runs the same in one Triton
    kernel (``mass_kernel``); this is its definition and the CPU path.
    """
    B, H, Nq, D = query.shape
    Nk = key.shape[2]
    q_offset = Nk - Nq
    idx = sampled_rows(q_offset, Nq, rows, device=query.device)
    n_qb, n_kb = idx.shape[0], -(-Nk // TILE)
    keys = key.float().transpose(-1, -2)
    out = torch.empty(B, H, n_qb, n_kb, dtype=torch.float32, device=query.device)
    chunk = max(1, MASS_CHUNK_BYTES // (4 * B * H * rows * Nk))
    for c0 in range(0, n_qb, chunk):
        r = idx[c0:c0 + chunk].flatten()
        scores = (query[:, :, r].float() * scale) @ keys                       # [B, H, c * rows, Nk]
        future = torch.arange(Nk, device=query.device) > (q_offset + r)[:, None]
        probs = scores.masked_fill_(future, float("-inf")).softmax(dim=-1)
        probs = F.pad(probs, (0, n_kb * TILE - Nk)).view(B, H, -1, rows, n_kb, TILE)
        out[:, :, c0:c0 + chunk] = probs.sum(dim=(3, 5)) / rows
    return out


def antidiagonal_squares(q_offset: int, nq: int, side: int, device=None) -> Tensor:
    """[n_query_blocks, 64 / side] bool: which squares of ``side`` query positions hold at least one
    of the call's queries (positions q_offset .. q_offset + nq - 1), for the query blocks of 64
    positions that hold the queries, counted from position 0."""
    first, n_qb = query_blocks(nq, q_offset + nq)
    pos = first * TILE + torch.arange(n_qb * TILE, device=device)
    return ((pos >= q_offset) & (pos < q_offset + nq)).view(n_qb, TILE // side, side).any(-1)


def antidiagonal_mass_estimate(query: Tensor, key: Tensor, scale: float, side: int) -> Tensor:
    """XAttention's estimate of the causal softmax mass of every (query block, key block) of 64.

    query [B, H, Nq, D], key [B, H, Nk, D] (one key head per query head); ``side`` divides 64.
    Positions are cut into squares of ``side``: query square g holds positions g side .. g side +
    side - 1, key square h the same keys, with a zero vector for a position the call has no query
    (or key) for. Square (g, h) scores ``sum_i q[g side + i] . k[h side + side - 1 - i]`` (its
    antidiagonal) times ``scale / side``, in float32; each query square that holds a query of the
    call takes the softmax of its scores over the key squares ``h <= g``. Returns [B, H,
    n_query_blocks, n_key_blocks] float32: per query block, the mean over its squares that hold a
    query of that softmax summed over each key block's squares (a row sums to 1; key blocks after
    the diagonal one hold 0). The diagonal square's antidiagonal includes cells above the diagonal:
    the estimate only ranks blocks, and the diagonal block is always kept. On CUDA
    ``block_mass_selection`` runs the same in one Triton kernel (``antidiagonal_kernel``); this is
    its definition and the CPU path.
    """
    B, H, Nq, D = query.shape
    Nk = key.shape[2]
    q_offset = Nk - Nq
    first, n_qb = query_blocks(Nq, Nk)
    n_kb = -(-Nk // TILE)
    per = TILE // side
    q = F.pad(query.float(), (0, 0, q_offset - first * TILE, (first + n_qb) * TILE - Nk))
    q = q.reshape(B, H, n_qb * per, side * D)
    k = F.pad(key.float(), (0, 0, 0, n_kb * TILE - Nk)).view(B, H, n_kb * per, side, D)
    k = k.flip(3).reshape(B, H, n_kb * per, side * D).transpose(-1, -2)
    present = antidiagonal_squares(q_offset, Nq, side, query.device)            # [n_qb, per]
    counts = present.sum(-1, dtype=torch.float32)
    square = first * per + torch.arange(n_qb * per, device=query.device)
    later = torch.arange(n_kb * per, device=query.device) > square[:, None]
    out = torch.empty(B, H, n_qb, n_kb, dtype=torch.float32, device=query.device)
    chunk = max(1, MASS_CHUNK_BYTES // (4 * B * H * per * n_kb * per))
    for c0 in range(0, n_qb, chunk):
        rows = slice(c0 * per, (c0 + chunk) * per)
        probs = ((q[:, :, rows] @ k) * (scale / side)).masked_fill_(later[rows], float("-inf")).softmax(-1)
        probs = probs * present[c0:c0 + chunk].flatten()[:, None]
        sums = probs.view(B, H, -1, per, n_kb, per).sum(dim=(3, 5))
        out[:, :, c0:c0 + chunk] = sums / counts[c0:c0 + chunk, None]
    return out


def ranked_prefix(mass: Tensor, target: Tensor | float) -> Tensor:
    """[..., n] bool: per row of ``mass`` [..., n], the entries ranked (largest first) such that the
    entries ranked above hold less than ``target`` (a fraction, broadcast over rows) of the row's
    total, and with a mass above 0: the shortest ranked prefix that reaches the target."""
    ranked, order = mass.sort(dim=-1, descending=True)
    take = (ranked > 0) & (ranked.cumsum(-1) - ranked < target * ranked.sum(-1, keepdim=True))
    return torch.zeros_like(take).scatter_(-1, order, take)


def kept_mass_blocks(mass: Tensor, target: Tensor | float, first_block: int = 0) -> Tensor:
    """``block_mass``'s rule on estimated masses [..., n_qb, n_kb] (query block r is block
    ``first_block + r``): [..., n_qb, n_kb] bool, the ``ranked_prefix`` reaching ``target``, the
    diagonal block and key block 0, each restricted to the causal key blocks."""
    n_qb, n_kb = mass.shape[-2:]
    q_block = first_block + torch.arange(n_qb, device=mass.device)[:, None]
    k_block = torch.arange(n_kb, device=mass.device)
    forced = (k_block == q_block) | (k_block == 0)
    return (ranked_prefix(mass, target) | forced) & (k_block <= q_block)


@lru_cache(maxsize=256)
def _mass_groups(patterns: tuple[Pattern, ...], device: torch.device
                 ) -> tuple[tuple[str, int, Tensor, Tensor], ...]:
    """(kind, b, head indices [G], mass targets [G, 1, 1]) of the ``MASS_KINDS`` heads, one group per
    kind and ``b`` (sampled rows or square side); cached like ``head_tables`` (no host-to-device copy
    per call)."""
    groups = []
    for kind, b in sorted({(p.kind, p.b) for p in patterns if p.kind in MASS_KINDS}):
        heads = [h for h, p in enumerate(patterns) if (p.kind, p.b) == (kind, b)]
        targets = [patterns[h].a / 1000 for h in heads]
        groups.append((kind, b, torch.tensor(heads, device=device),
                       torch.tensor(targets, device=device)[:, None, None]))
    return tuple(groups)


def block_mass_selection(query: Tensor, key: Tensor, patterns: tuple[Pattern, ...], scale: float) -> BlockSelection:
    """The kept key blocks of the ``block_mass`` and ``antidiagonal_mass`` heads (see ``Pattern``), as
    one BlockSelection of blocks of 64 listing every key block (``valid`` says which are kept; False
    for other heads).

    Per query block, key blocks are ranked by estimated mass (``block_mass_estimate`` or
    ``antidiagonal_mass_estimate``); a block is kept if its mass is > 0 and the blocks ranked above
    it hold less than a / 1000 of the row's estimated mass (so the kept set is the shortest prefix
    that reaches it), and the diagonal block and key block 0 are always kept (``kept_mass_blocks``).
    """
    B, Hq, Nq, _ = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    group = Hq // Hkv
    first, n_qb = query_blocks(Nq, Nk)
    n_kb = -(-Nk // TILE)
    valid = torch.zeros(B, Hq, n_qb, n_kb, dtype=torch.bool, device=query.device)
    compiling = torch.compiler.is_compiling()
    for kind, b, index, target in _mass_groups(patterns, query.device):
        if query.is_cuda and HAS_TRITON:
            if kind == BLOCK_MASS:
                estimate = block_mass_estimate_op if compiling else block_mass_estimate_triton
            else:
                estimate = antidiagonal_mass_estimate_op if compiling else antidiagonal_mass_estimate_triton
            mass = estimate(query, key, scale, b, index)
        else:
            estimate = block_mass_estimate if kind == BLOCK_MASS else antidiagonal_mass_estimate
            mass = estimate(query[:, index], key[:, index // group], scale, b)
        valid[:, index] = kept_mass_blocks(mass, target, first)
    kept = torch.arange(n_kb, device=query.device).expand(B, Hq, n_qb, n_kb)
    return BlockSelection(TILE, first, kept, valid, n_kb)


def scored_selection(query: Tensor, key: Tensor, patterns: tuple[Pattern, ...], scale: float
                     ) -> tuple[Tensor, Tensor]:
    """The kept columns and offsets of the scored heads (``vertical_and_slash``, ``vertical_slash_mass``),
    estimated from the last ``min(64, Nq)`` queries (``vertical_slash_scores``): (columns [B, Hq, V]
    int64 sorted ascending, Nk = padding, V = ``scored_column_count``; slashes [B, Hq, Nk] bool).
    Heads of other kinds keep nothing here. Only the last 64 queries are read, so passing just them
    (with all the keys) gives the same result: what context parallelism broadcasts."""
    B, Hq = query.shape[:2]
    Nk = key.shape[2]
    tables = head_tables(patterns, query.device)
    vertical, slash = map(ranking_scores, vertical_slash_scores(query, key, scale))
    col_budgets, off_budgets = map(set, zip(*(scored_budgets(p.kind, p.a, p.b) for p in patterns
                                              if p.kind in SCORED_KINDS)))
    n_cols, n_offs = scored_column_count(patterns, Nk), min(Nk, max(off_budgets))
    # Ranks run below n_cols / n_offs <= Nk, so budgets past the length need no capping; with one
    # count for all scored heads and no mass target the top-k needs no order (the columns are
    # sorted below, the offsets scattered).
    target = tables.mass_target if any(p.kind == VERTICAL_SLASH_MASS for p in patterns) else None
    col_idx, col_valid = _top_scored(vertical, FORCED_COLUMNS, n_cols, tables.columns, target,
                                     ranked=target is not None or len(col_budgets) > 1)
    columns = torch.where(col_valid, col_idx, Nk).sort(dim=-1).values
    off_idx, off_valid = _top_scored(slash, FORCED_OFFSETS, n_offs, tables.slashes, target,
                                     ranked=target is not None or len(off_budgets) > 1)
    slashes = torch.zeros(B, Hq, Nk, dtype=torch.bool, device=query.device).scatter_(-1, off_idx, off_valid)
    return columns, slashes


def scored_column_count(patterns: tuple[Pattern, ...], nk: int) -> int:
    """V, the width of ``scored_selection``'s column list for ``nk`` keys (0 without scored heads)."""
    return min(nk, max([0] + [scored_budgets(p.kind, p.a, p.b)[0] for p in patterns if p.kind in SCORED_KINDS]))


def select(query: Tensor, key: Tensor, patterns: tuple[Pattern, ...], scale: float,
           scored: tuple[Tensor, Tensor] | None = None) -> Selection:
    """Estimate every head's kept cells for this call (no host synchronisation).

    ``scored``: the scored heads' (columns [B, Hq, V], slashes [B, Hq, Nk]) as ``scored_selection``
    returns them, estimated elsewhere (context parallelism: from the last queries of a longer
    sequence, restricted to this call's keys), used instead of estimating them from ``query``."""
    B, Hq, Nq, _ = query.shape
    Nk = key.shape[2]
    device = query.device
    tables = head_tables(patterns, device)
    kinds = {p.kind for p in patterns}

    # Offsets kept by construction (dense heads, A-shape windows), and the A-shape sinks.
    offsets = None
    if kinds & {DENSE, A_SHAPE}:
        offsets = (torch.arange(Nk, device=device) < tables.window[:, None]).expand(B, Hq, Nk)
    sink = tables.sink.clamp(max=Nk) if A_SHAPE in kinds else tables.sink
    # Bounds over the Python budgets first, then clamped to the length once (symbolic under
    # torch.compile: one Min(Nk, constant), which inductor's size hints handle; a max of two such
    # expressions failed there).
    max_sink = min(max([0] + [p.a for p in patterns if p.kind == A_SHAPE]), Nk)
    kept_bound = max([0] + [max(p.b, 1) for p in patterns if p.kind == A_SHAPE]
                     + [scored_budgets(p.kind, p.a, p.b)[1] for p in patterns if p.kind in SCORED_KINDS])
    max_offsets = Nk if DENSE in kinds else min(kept_bound, Nk)

    columns = None
    if kinds & set(SCORED_KINDS):
        if scored is None:
            columns, slashes = scored_selection(query, key, patterns, scale)
        else:
            columns, slashes = scored
            if tuple(columns.shape[:2]) != (B, Hq) or tuple(slashes.shape) != (B, Hq, Nk):
                raise ValueError(f"scored: columns [B, Hq, V] and slashes [B, Hq, Nk] = [{B}, {Hq}, {Nk}], got "
                                 f"{tuple(columns.shape)} and {tuple(slashes.shape)}")
        offsets = slashes if offsets is None else offsets | slashes
    if offsets is None:  # block heads only
        offsets = torch.zeros(B, Hq, Nk, dtype=torch.bool, device=device)

    blocks = []
    for size in sorted({p.block_size for p in patterns if p.kind == BLOCK_SPARSE}):
        in_group = tables.block_sparse & (tables.block_size == size)
        max_a = max(p.a for p in patterns if p.kind == BLOCK_SPARSE and p.block_size == size)
        blocks.append(block_sparse_selection(query, key, tables, size, in_group, max_a))
    if kinds & set(MASS_KINDS):
        blocks.append(block_mass_selection(query, key, patterns, scale))

    return Selection(
        nq=Nq,
        nk=Nk,
        offsets=offsets.contiguous(),
        sink=sink,
        block_sparse=tables.whole_blocks,
        columns=columns,
        blocks=tuple(blocks),
        max_sink=max_sink,
        max_offsets=max_offsets,
    )


def alignment(selection: Selection, tile: int) -> int:
    """Query rows to pad in front so that query tiles start on a multiple of every block size."""
    align = math.lcm(tile, *(g.block_size for g in selection.blocks))
    return selection.q_offset % align
