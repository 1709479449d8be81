"""Independent, loop-based float64 reference of the sparse-attention semantics.

Deliberately imports nothing from ``block_masks`` or ``minference_flex``: patterns are read by duck
typing (``.kind/.a/.b/.block_size``) or as MInference lists, and every selection is recomputed
head by head, row by row, in float64 with plain loops.

Semantics (query i sits at position p_i = Nk - Nq + i, offset o = p_i - j):
- every pattern is causal (j <= p_i) and keeps the diagonal;
- stream_llm(a, b): j < a or o < max(b, 1);
- vertical_and_slash(a, b): scores from the last min(64, Nq) queries; columns 0..29 and offsets
  0..99 forced; keep top min(Nk, max(a, 30)) columns and top min(Nk, max(b, 100)) offsets;
- block_sparse(a): top min(max(a, 1), qb + 1) causal key blocks by pooled_q . pooled_k, diagonal
  block always kept and counted;
- block_mass(a, b): per query block of 64 positions, the mean over b sampled rows (in-block rows
  64/b - 1, 2*64/b - 1, .., 63, clamped to the rows present) of each row's causal softmax summed per
  key block of 64; blocks ranked by that mass, kept while mass > 0 and the mass ranked above is
  < a/1000 of the total; the diagonal block and key block 0 always kept;
- antidiagonal_mass(a, b): block_mass's rule on another estimate: squares of b x b positions, the
  square (g, h) scored by scale / b * sum_i q[g b + i] . k[h b + b - 1 - i] (zero vectors where the
  call has no query or key), a softmax over h <= g for each square g holding a query, the mean over
  a query block's such squares summed per key block of 64;
- vertical_slash_mass(a, b): the vertical and slash scores of vertical_and_slash; columns 0..29 and
  offsets 0..99 forced and ranked first, then the others by score (best first); an entry is kept while
  its rank is below min(Nk, max(b, 30)) columns / max(b, 100) offsets, its score is above 0 and the
  entries ranked above hold less than a/1000 of the total score (forced entries always kept);
- dense: causal.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LAST_Q = 64
FORCED_COLUMNS = 30
FORCED_OFFSETS = 100
ALIASES = {"vertical_slash": "vertical_and_slash", "a_shape": "stream_llm"}


def parse(entry):
    """(kind, a, b, block_size) of a Pattern-like object or a [type, a, b(, score(, block_size))] list."""
    if isinstance(entry, (list, tuple)):
        kind, a, b = entry[0], entry[1], entry[2]
        bs = entry[4] if len(entry) == 5 else 64
    else:
        kind, a, b, bs = entry.kind, entry.a, entry.b, entry.block_size
    kind = ALIASES.get(kind, kind)
    assert kind in ("vertical_and_slash", "stream_llm", "block_sparse", "block_mass", "vertical_slash_mass",
                    "antidiagonal_mass", "dense"), kind
    return kind, int(a), int(b), int(bs)


def _top_with_forced(scores: np.ndarray, forced: int, budget: int, rel_tol: float,
                     magnitude: np.ndarray | None = None):
    """Keep indices 0..forced-1 plus the best ``budget - forced`` of the others with a finite score
    (budget counts the forced ones). Returns (kept bool array, ambiguous). ``ambiguous``: the last kept and the first
    dropped non-forced scores are within ``rel_tol`` of the scale of the scores (so float32
    rounding could swap them)."""
    n = len(scores)
    forced = min(forced, n)
    budget = min(max(budget, forced), n)
    kept = np.zeros(n, dtype=bool)
    kept[:forced] = True
    # A score that is not finite (from NaN or infinite inputs) is never kept.
    rest = [i for i in range(forced, n) if np.isfinite(scores[i])]
    k = budget - forced
    # Sort the free candidates best first, by a plain insertion of (score, index) pairs.
    order = sorted(rest, key=lambda i: -scores[i])
    for i in order[:k]:
        kept[i] = True
    ambiguous = False
    if 0 < k < len(order):
        scale = float(np.max(np.abs(scores if magnitude is None else magnitude)))
        gap = scores[order[k - 1]] - scores[order[k]]
        ambiguous = gap <= rel_tol * max(scale, 1e-30)
    return kept, ambiguous


def vertical_slash_scores(q: np.ndarray, k: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """q [Nq, D], k [Nk, D] float64 -> (vertical [Nk], slash [Nk]): attention mass of the last
    min(64, Nq) queries per key column and per offset, each row's softmax over its causal keys."""
    Nq, Nk = q.shape[0], k.shape[0]
    m = min(LAST_Q, Nq)
    vertical = np.zeros(Nk)
    slash = np.zeros(Nk)
    for r in range(Nq - m, Nq):
        p = Nk - Nq + r
        logits = (k[: p + 1] @ q[r]) * scale  # causal keys 0..p of this row
        w = np.exp(logits - logits.max())
        w /= w.sum()
        vertical[: p + 1] += w
        slash[: p + 1] += w[::-1]  # key j = p - o contributes to offset o
    return vertical, slash


def block_means(x: np.ndarray, start: int, block: int) -> np.ndarray:
    """x [N, D] at positions start.. -> [n_blocks, D]: mean of the rows present in each block of
    positions, blocks counted from position 0, covering blocks start // block onwards."""
    groups: dict[int, list[int]] = {}
    for i in range(x.shape[0]):
        groups.setdefault((start + i) // block, []).append(i)
    first = start // block
    assert sorted(groups) == list(range(first, first + len(groups)))
    return np.stack([x[groups[b]].sum(0) / len(groups[b]) for b in sorted(groups)])


def _vertical_slash_head(q: np.ndarray, k: np.ndarray, a: int, b: int, scale: float, rel_tol: float):
    """q [Nq, D], k [Nk, D] float64 -> (kept [Nq, Nk], ambiguous)."""
    Nq, Nk = q.shape[0], k.shape[0]
    vertical, slash = vertical_slash_scores(q, k, scale)
    cols, amb_c = _top_with_forced(vertical, FORCED_COLUMNS, max(a, FORCED_COLUMNS), rel_tol)
    offs, amb_o = _top_with_forced(slash, FORCED_OFFSETS, max(b, FORCED_OFFSETS), rel_tol)
    kept = np.zeros((Nq, Nk), dtype=bool)
    for i in range(Nq):
        p = Nk - Nq + i
        kept[i, : p + 1] = cols[: p + 1] | offs[p::-1]  # offs[p - j] for j = 0..p
    return kept, amb_c or amb_o


def _mass_prefix_with_forced(scores: np.ndarray, forced: int, cap: int, target: float, rel_tol: float):
    """Keep indices 0..forced-1, then the others with a finite score, best first, while the rank is
    below ``cap`` (forced included), the score is above 0 and the kept ones before hold less than
    ``target`` of the total. Returns (kept, ambiguous): ambiguous when float32 rounding could change
    a decision (the mass before an entry within ``rel_tol`` of the total from the threshold, two
    entries on either side of the cut within ``rel_tol`` of each other, or a kept score that could
    underflow to 0)."""
    n = len(scores)
    forced = min(forced, n)
    cap = min(max(cap, forced), n)
    mass = np.where(np.isfinite(scores), np.maximum(scores, 0.0), 0.0)
    total = float(mass.sum())
    reach, tol = target * total, rel_tol * max(total, 1e-30)
    kept = np.zeros(n, dtype=bool)
    kept[:forced] = True
    above = float(mass[:forced].sum())
    order = sorted((i for i in range(forced, n) if np.isfinite(scores[i])), key=lambda i: -scores[i])
    ambiguous = False
    for t, i in enumerate(order):
        in_cap = forced + t < cap and mass[i] > 0
        kept[i] = in_cap and above < reach
        ambiguous |= in_cap and abs(above - reach) <= tol
        ambiguous |= bool(kept[i]) and mass[i] < 1e-30
        above += mass[i]
    for i, j in zip(order, order[1:]):
        ambiguous |= kept[i] != kept[j] and abs(mass[i] - mass[j]) <= rel_tol * max(mass[i], mass[j])
    return kept, ambiguous


def _vertical_slash_mass_head(q: np.ndarray, k: np.ndarray, a: int, b: int, scale: float, rel_tol: float):
    """q [Nq, D], k [Nk, D] float64 -> (kept [Nq, Nk], ambiguous)."""
    Nq, Nk = q.shape[0], k.shape[0]
    vertical, slash = vertical_slash_scores(q, k, scale)
    cols, amb_c = _mass_prefix_with_forced(vertical, FORCED_COLUMNS, max(b, FORCED_COLUMNS), a / 1000, rel_tol)
    offs, amb_o = _mass_prefix_with_forced(slash, FORCED_OFFSETS, max(b, FORCED_OFFSETS), a / 1000, rel_tol)
    kept = np.zeros((Nq, Nk), dtype=bool)
    for i in range(Nq):
        p = Nk - Nq + i
        kept[i, : p + 1] = cols[: p + 1] | offs[p::-1]
    return kept, amb_c or amb_o


def _block_sparse_head(q: np.ndarray, k: np.ndarray, a: int, bs: int, rel_tol: float):
    Nq, Nk = q.shape[0], k.shape[0]
    n_kb = -(-Nk // bs)
    pooled_k = []
    for kb in range(n_kb):
        rows = [j for j in range(Nk) if j // bs == kb]
        pooled_k.append(sum(k[j] for j in rows) / len(rows))
    q_blocks = {}
    for i in range(Nq):
        q_blocks.setdefault((Nk - Nq + i) // bs, []).append(i)
    kept = np.zeros((Nq, Nk), dtype=bool)
    ambiguous = False
    for qb, members in q_blocks.items():
        pooled_q = sum(q[i] for i in members) / len(members)
        # Candidates: causal key blocks, with the diagonal block moved to the front (forced).
        cand = [qb] + [kb for kb in range(qb)]
        scores = np.array([float(np.dot(pooled_q, pooled_k[kb])) for kb in cand])
        magnitude = np.array([float(np.sum(np.abs(pooled_q * pooled_k[kb]))) for kb in cand])
        scores[0] = np.inf
        magnitude[0] = 0.0
        keep, amb = _top_with_forced(scores, 1, max(a, 1), rel_tol, magnitude=magnitude)
        ambiguous |= amb
        blocks = {cand[t] for t in range(len(cand)) if keep[t]}
        key_in_kept_block = np.array([(j // bs) in blocks for j in range(Nk)])
        for i in members:
            p = Nk - Nq + i
            kept[i, : p + 1] = key_in_kept_block[: p + 1]
    return kept, ambiguous


def _mass_blocks(mass: np.ndarray, qb: int, a: int, rel_tol: float):
    """The mass kinds' keep rule for query block qb: (kept key blocks, ambiguous). Causal key blocks
    ranked by mass, kept while mass > 0 and the mass ranked above is < a/1000 of the total; blocks 0
    and qb always kept."""
    total = mass.sum()
    order = sorted(range(qb + 1), key=lambda kb: -mass[kb])
    blocks, above, ambiguous = {0, qb}, 0.0, False
    for t, kb in enumerate(order):
        take = mass[kb] > 0 and above < a / 1000 * total
        if take:
            blocks.add(kb)
        # near a tie, or near the threshold, or a mass near zero: float32 may decide otherwise
        near = abs(above - a / 1000 * total) <= rel_tol or 0 < mass[kb] <= rel_tol
        if t + 1 < len(order):
            near |= abs(mass[kb] - mass[order[t + 1]]) <= rel_tol and take != (
                mass[order[t + 1]] > 0 and above + mass[kb] < a / 1000 * total)
        ambiguous |= near and kb not in (0, qb)
        above += mass[kb]
    return blocks, ambiguous


def _mass_head(q: np.ndarray, k: np.ndarray, a: int, rel_tol: float, block_mass) -> tuple[np.ndarray, bool]:
    """kept [Nq, Nk] and ambiguity of a mass-kind head whose estimate of query block qb's key-block
    masses is ``block_mass(qb)``."""
    Nq, Nk = q.shape[0], k.shape[0]
    q0, T = Nk - Nq, 64
    kept = np.zeros((Nq, Nk), dtype=bool)
    ambiguous = False
    for qb in range(q0 // T, (Nk - 1) // T + 1):
        blocks, amb = _mass_blocks(block_mass(qb), qb, a, rel_tol)
        ambiguous |= amb
        key_in_kept_block = np.array([(j // T) in blocks for j in range(Nk)])
        for p in range(max(qb * T, q0), min(qb * T + T - 1, Nk - 1) + 1):
            kept[p - q0, : p + 1] = key_in_kept_block[: p + 1]
    return kept, ambiguous


def _block_mass_head(q: np.ndarray, k: np.ndarray, a: int, rows: int, scale: float, rel_tol: float):
    Nq, Nk = q.shape[0], k.shape[0]
    q0, T = Nk - Nq, 64

    def block_mass(qb):
        lo, hi = max(qb * T, q0), min(qb * T + T - 1, Nk - 1)
        step = T // rows
        mass = np.zeros(-(-Nk // T))
        for p in [min(max(qb * T + t, lo), hi) for t in range(step - 1, T, step)]:
            s = np.array([float(np.dot(q[p - q0], k[j])) * scale for j in range(p + 1)])
            e = np.exp(s - s.max())
            e /= e.sum()
            for j in range(p + 1):
                mass[j // T] += e[j] / rows
        return mass

    return _mass_head(q, k, a, rel_tol, block_mass)


def _antidiagonal_mass_head(q: np.ndarray, k: np.ndarray, a: int, side: int, scale: float, rel_tol: float):
    Nq, Nk = q.shape[0], k.shape[0]
    q0, T, D = Nk - Nq, 64, q.shape[1]

    def qv(p):  # the query at position p, zeros where the call has none
        return q[p - q0] if q0 <= p < Nk else np.zeros(D)

    def kv(p):
        return k[p] if p < Nk else np.zeros(D)

    def block_mass(qb):
        mass = np.zeros(-(-Nk // T))
        squares = [g for g in range(qb * T // side, (qb + 1) * T // side)
                   if any(q0 <= p < Nk for p in range(g * side, g * side + side))]
        for g in squares:
            s = np.array([sum(float(np.dot(qv(g * side + i), kv(h * side + side - 1 - i))) for i in range(side))
                          * scale / side for h in range(g + 1)])
            e = np.exp(s - s.max())
            e /= e.sum()
            for h in range(g + 1):
                mass[h * side // T] += e[h] / len(squares)
        return mass

    return _mass_head(q, k, a, rel_tol, block_mass)


def naive_mask(query: torch.Tensor, key: torch.Tensor, patterns, scale: float | None = None,
               rel_tol: float | None = None):
    """(mask bool [B, Hq, Nq, Nk], ambiguous) for the given inputs, computed in float64.

    ``ambiguous`` is True when some top-k selection boundary is within rounding of a tie
    (rel_tol defaults to 1e-5 for float32/float16 inputs and 1e-4 for bfloat16)."""
    if rel_tol is None:
        rel_tol = 1e-4 if query.dtype == torch.bfloat16 else 1e-5
    B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qn = query.detach().to(torch.float64).cpu().numpy()
    kn = key.detach().to(torch.float64).cpu().numpy()
    mask = np.zeros((B, Hq, Nq, Nk), dtype=bool)
    ambiguous = False
    for h in range(Hq):
        kind, a, b, bs = parse(patterns[h])
        for bi in range(B):
            qh, kh = qn[bi, h], kn[bi, h // G]
            if kind == "dense":
                for i in range(Nq):
                    mask[bi, h, i, : Nk - Nq + i + 1] = True
            elif kind == "stream_llm":
                for i in range(Nq):
                    p = Nk - Nq + i
                    j = np.arange(p + 1)
                    mask[bi, h, i, : p + 1] = (j < a) | ((p - j) < max(b, 1))
            elif kind == "vertical_and_slash":
                m, amb = _vertical_slash_head(qh, kh, a, b, scale, rel_tol)
                mask[bi, h] = m
                ambiguous |= amb
            elif kind == "vertical_slash_mass":
                m, amb = _vertical_slash_mass_head(qh, kh, a, b, scale, rel_tol)
                mask[bi, h] = m
                ambiguous |= amb
            elif kind in ("block_mass", "antidiagonal_mass"):
                head = _block_mass_head if kind == "block_mass" else _antidiagonal_mass_head
                m, amb = head(qh, kh, a, b, scale, rel_tol)
                mask[bi, h] = m
                ambiguous |= amb
            else:
                m, amb = _block_sparse_head(qh, kh, a, bs, rel_tol)
                mask[bi, h] = m
                ambiguous |= amb
    return torch.from_numpy(mask), bool(ambiguous)


def causal_mask(Nq: int, Nk: int) -> torch.Tensor:
    """[Nq, Nk] bool: query i (position Nk - Nq + i) sees keys j <= its position."""
    m = torch.zeros(Nq, Nk, dtype=torch.bool)
    for i in range(Nq):
        m[i, : Nk - Nq + i + 1] = True
    return m


def reference_attention(query, key, value, mask, scale: float | None = None) -> torch.Tensor:
    """float64 softmax(q k^T * scale, restricted to mask [B or 1, Hq or 1, Nq, Nk]) v, [B, Hq, Nq, D]."""
    B, Hq, Nq, D = query.shape
    G = Hq // key.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q = query.double()
    k = key.double().repeat_interleave(G, dim=1)
    v = value.double().repeat_interleave(G, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v
