"""Hypothesis strategies and tensor builders shared by the property tests."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import minference_flex as mf

#: Sequence lengths around tile (64) and block (128) boundaries, plus odd ones.
LENGTHS = (1, 2, 17, 30, 63, 64, 65, 99, 100, 101, 127, 128, 129, 150, 191, 192, 200, 255, 256, 257, 300)
HEAD_DIMS = (16, 32, 64, 128)
KINDS = ("vertical_and_slash", "vertical_slash", "stream_llm", "a_shape", "block_sparse", "block_mass",
         "vertical_slash_mass", "antidiagonal_mass", "dense")


def examples(n: int) -> int:
    """Per-test example counts, scaled by MF_EXAMPLES_SCALE (e.g. 10 for a long bug hunt)."""
    return max(1, int(n * float(os.environ.get("MF_EXAMPLES_SCALE", "1"))))


@dataclass
class Case:
    """One random attention problem (tensors are built lazily from ``seed``)."""

    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    patterns: list
    scale: float | None
    seed: int

    def tensors(self, dtype=torch.float32, value: bool = True):
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.B, self.Hq, self.Nq, self.D, generator=g).to(dtype)
        k = torch.randn(self.B, self.Hkv, self.Nk, self.D, generator=g).to(dtype)
        v = torch.randn(self.B, self.Hkv, self.Nk, self.D, generator=g).to(dtype)
        return (q, k, v) if value else (q, k)

    @property
    def effective_scale(self) -> float:
        return 1.0 / math.sqrt(self.D) if self.scale is None else self.scale


def budgets(Nk: int):
    """Budgets: 0, small, around the forced counts (30 columns, 100 offsets), around Nk, huge."""
    special = st.sampled_from([0, 1, 2, 3, 5, 29, 30, 31, 64, 99, 100, 101, 128,
                               max(Nk - 1, 0), Nk, Nk + 1, 10**6])
    return st.one_of(special, st.integers(0, 2 * Nk + 2))


@st.composite
def patterns(draw, Nk: int, kinds=KINDS):
    """One head's pattern, as an mf.Pattern, a 3-element list or a 4-element list with a score."""
    kind = draw(st.sampled_from(kinds))
    a, b = draw(budgets(Nk)), draw(budgets(Nk))
    block_size = 64
    form = draw(st.sampled_from(["pattern", "list3", "list4"]))
    if kind in ("block_mass", "antidiagonal_mass"):
        a = draw(st.one_of(st.sampled_from([1, 500, 900, 980, 999, 1000]), st.integers(1, 1000)))
        b = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    if kind == "vertical_slash_mass":
        a = draw(st.one_of(st.sampled_from([1, 300, 500, 900, 990, 1000]), st.integers(1, 1000)))
    if kind == "block_sparse":
        block_size = draw(st.sampled_from([64, 64, 128, 192, 256]))
        if block_size != 64:
            form = "pattern"  # the list form has no block size
    if form == "pattern":
        return mf.Pattern(kind, a, b, block_size=block_size)
    if form == "list3":
        return [kind, a, b]
    return [kind, a, b, draw(st.floats(0, 1))]


@st.composite
def cases(draw, kinds=KINDS, max_nk: int = 300, lengths=LENGTHS, head_dims=HEAD_DIMS, scales=True):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([g for g in (1, 2, 3, 4, 8) if Hkv * g <= 8]))
    Hq = Hkv * G
    Nk = draw(st.sampled_from([n for n in lengths if n <= max_nk]))
    Nq = draw(st.one_of(st.sampled_from([n for n in lengths if n <= Nk]), st.integers(1, Nk)))
    D = draw(st.sampled_from(head_dims))
    pats = [draw(patterns(Nk, kinds)) for _ in range(Hq)]
    scale = draw(st.one_of(st.none(), st.sampled_from([0.05, 0.125, 0.2]))) if scales else None
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(B, Hq, Hkv, Nq, Nk, D, pats, scale, seed)
