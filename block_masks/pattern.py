"""The per-head sparse pattern vocabulary: what one attention head keeps."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

DENSE = "dense"
A_SHAPE = "stream_llm"
VERTICAL_SLASH = "vertical_and_slash"
BLOCK_SPARSE = "block_sparse"
BLOCK_MASS = "block_mass"
VERTICAL_SLASH_MASS = "vertical_slash_mass"
ANTIDIAGONAL_MASS = "antidiagonal_mass"
KINDS = (DENSE, A_SHAPE, VERTICAL_SLASH, BLOCK_SPARSE, BLOCK_MASS, VERTICAL_SLASH_MASS, ANTIDIAGONAL_MASS)
#: Kinds estimated from the last queries' vertical and slash scores (``estimate.vertical_slash_scores``).
SCORED_KINDS = (VERTICAL_SLASH, VERTICAL_SLASH_MASS)
#: Kinds that keep whole key blocks per query block (FlexAttention BlockMask lists).
BLOCK_KINDS = (BLOCK_SPARSE, BLOCK_MASS, ANTIDIAGONAL_MASS)
#: Kinds that keep, per query block of 64, the key blocks reaching an estimated share of its
#: attention (``estimate.kept_mass_blocks``); they differ in the estimate.
MASS_KINDS = (BLOCK_MASS, ANTIDIAGONAL_MASS)
ALIASES = {"vertical_slash": VERTICAL_SLASH, "a_shape": A_SHAPE}

#: Query and key tile size of every BlockMask built here; block-sparse blocks are multiples of it.
TILE = 64

#: Vertical-slash constants of MInference 1.0 (see docs/patterns.md).
LAST_Q = 64
FORCED_COLUMNS = 30
FORCED_OFFSETS = 100

def scored_budgets(kind: str, a: int, b: int) -> tuple[int, int]:
    """(columns, offsets) of a head of ``SCORED_KINDS``, the forced ones included: what a
    ``vertical_and_slash`` head keeps, or the most a ``vertical_slash_mass`` head keeps (its cap ``b``)."""
    return max(a if kind == VERTICAL_SLASH else b, FORCED_COLUMNS), max(b, FORCED_OFFSETS)


def query_blocks(n_queries: int, n_keys: int, block: int = TILE) -> tuple[int, int]:
    """(first, count) of the blocks of ``block`` positions (counted from position 0) that hold the
    queries, which are the last ``n_queries`` of ``n_keys`` positions."""
    first = (n_keys - n_queries) // block
    return first, (n_keys - 1) // block - first + 1


#: Sampled query rows per block allowed for ``block_mass``, and square sides allowed for
#: ``antidiagonal_mass`` (divisors of TILE).
SAMPLED_ROWS = (1, 2, 4, 8, 16, 32, 64)


def _budget(name: str, value: object) -> int:
    """A budget as a Python int: an int (Python, numpy, or a 0-d integer tensor) or an integral float
    (Python or numpy), of any size (budgets past the prompt length keep everything they can).
    TypeError for bools (Python, numpy, tensors) and other values, ValueError for negative ones."""
    if isinstance(value, int) and not isinstance(value, bool):
        pass  # dynamo passes a traced int (torch.compile(dynamic=True) makes closure ints symbolic) as an int
    elif isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"pattern budget {name} must be an integer, got a bool ({value!r})")
    else:
        try:
            value = operator.index(value)
        except TypeError:
            if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
                value = int(value)
            else:
                raise TypeError(f"pattern budget {name} must be an integer (or an integral float), "
                                f"got {value!r}") from None
    if value < 0:
        raise ValueError(f"pattern budget {name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Pattern:
    """One head's sparse pattern. Every pattern is causal and always keeps the diagonal cell.

    kind: one of ``KINDS`` (aliases ``vertical_slash`` and ``a_shape`` are accepted).
    - ``vertical_and_slash``: ``a`` vertical key columns and ``b`` slash diagonals, estimated from the
      last 64 queries (at least 30 columns and 100 diagonals, the first ones always included).
    - ``stream_llm`` (A-shape): keep key j for the query at position p if ``j < a`` (sinks) or
      ``p - j < max(b, 1)`` (local window).
    - ``block_sparse``: ``a`` key blocks of ``block_size`` tokens per query block (the diagonal block
      always kept and counted); ``b`` is ignored.
    - ``block_mass`` (an extension, not in MInference's files): per query block of 64 rows, the fewest
      64-key blocks whose estimated softmax mass reaches ``a`` thousandths of the row mass (1..1000),
      the mass estimated exactly from ``b`` evenly spaced rows of the query block (1, 2, 4, .., 64;
      the block's last row is one of them); the diagonal block and key block 0 are always kept.
      ``block_size`` must be 64.
    - ``vertical_slash_mass`` (an extension): the columns and diagonals of ``vertical_and_slash``, as
      many as the prompt needs: the forced ones (30 columns, 100 diagonals), then the best by
      estimated mass until the kept columns hold ``a`` thousandths (1..1000) of the last queries'
      column mass, and likewise the diagonals; at most ``max(b, 30)`` columns and ``max(b, 100)``
      diagonals (``b`` is a cap: ``0`` keeps only the forced ones, a cap past the length none).
    - ``antidiagonal_mass`` (an extension): ``block_mass``'s rule on another estimate of the block
      masses, XAttention's: the positions are cut into squares of ``b`` x ``b`` cells (1, 2, 4, .., 64),
      each square scored by the sum of its antidiagonal's ``q.k`` (``b`` cells, one per query row
      and key), a causal softmax over squares, summed per 64x64 block. It costs about ``2 / b`` of a
      causal ``q kᵀ`` where ``block_mass`` costs ``2 b / 64``.
    - ``dense``: causal attention; ``a`` and ``b`` are ignored.
    """

    kind: str
    a: int = 0
    b: int = 0
    block_size: int = TILE

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise TypeError(f"pattern type must be a string, got {self.kind!r}")
        kind = ALIASES.get(self.kind, self.kind)
        if kind not in KINDS:
            allowed = ", ".join(repr(k) for k in KINDS + tuple(ALIASES))
            raise ValueError(f"unknown pattern type {self.kind!r}; allowed: {allowed}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "a", _budget("a", self.a))
        object.__setattr__(self, "b", _budget("b", self.b))
        bs = _budget("block_size", self.block_size)
        if bs == 0 or bs % TILE:
            raise ValueError(f"block_size must be a positive multiple of {TILE}, got {bs}")
        object.__setattr__(self, "block_size", bs)
        if kind == BLOCK_MASS:
            if not 1 <= self.a <= 1000:
                raise ValueError(f"block_mass keeps a mass of a thousandths, 1..1000; got a={self.a}")
            if self.b not in SAMPLED_ROWS:
                raise ValueError(f"block_mass samples b rows per query block, one of {SAMPLED_ROWS}; got b={self.b}")
            if bs != TILE:
                raise ValueError(f"block_mass works on blocks of {TILE}, got block_size={bs}")
        if kind == ANTIDIAGONAL_MASS:
            if not 1 <= self.a <= 1000:
                raise ValueError(f"antidiagonal_mass keeps a mass of a thousandths, 1..1000; got a={self.a}")
            if self.b not in SAMPLED_ROWS:
                raise ValueError(f"antidiagonal_mass scores squares of b x b cells, b one of {SAMPLED_ROWS}; got b={self.b}")
            if bs != TILE:
                raise ValueError(f"antidiagonal_mass works on blocks of {TILE}, got block_size={bs}")
        if kind == VERTICAL_SLASH_MASS and not 1 <= self.a <= 1000:
            raise ValueError(f"vertical_slash_mass keeps a mass of a thousandths, 1..1000; got a={self.a}")

    @classmethod
    def parse(cls, entry: "Pattern | list | tuple") -> "Pattern":
        """Accept a Pattern or a MInference entry ``[type, a, b]`` / ``[type, a, b, score]``, or
        ``[type, a, b, score, block_size]`` (``to_list``'s form for a block size other than 64)."""
        if isinstance(entry, Pattern):
            return entry
        if isinstance(entry, (list, tuple)) and len(entry) in (1, 3, 4, 5):
            if len(entry) == 1:
                return cls(entry[0])
            if len(entry) == 5:
                return cls(entry[0], entry[1], entry[2], block_size=entry[4])
            return cls(entry[0], entry[1], entry[2])
        raise ValueError(
            "a pattern must be an mf.Pattern or a list [type, a, b], [type, a, b, score] or "
            f"[type, a, b, score, block_size]; got {entry!r}"
        )

    def to_list(self, score: float = 0.0) -> list:
        """The MInference JSON form ``[type, a, b, score]``; a block size other than 64 is kept as a
        fifth element (MInference's files, which have none, read as before)."""
        entry = [self.kind, self.a, self.b, score]
        return entry if self.block_size == TILE else entry + [self.block_size]
