"""Turning user input (mf.Pattern objects or MInference-style lists) into one Pattern per head."""
from __future__ import annotations

from collections.abc import Sequence

from block_masks import Pattern

#: What MInference assigns to a head its configuration file leaves out.
DEFAULT_PATTERN = Pattern("vertical_and_slash", 1000, 6096)


def parse_patterns(patterns: Sequence, num_heads: int) -> tuple[Pattern, ...]:
    """One Pattern per query head, or ValueError naming what is wrong."""
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
        raise ValueError(
            "patterns must be a list with one entry per query head (mf.Pattern or [type, a, b(, score)]), "
            f"got {type(patterns).__name__}"
        )
    if len(patterns) != num_heads:
        raise ValueError(f"patterns has {len(patterns)} entries but the query has {num_heads} heads")
    return tuple(Pattern.parse(p) for p in patterns)
