"""Estimation and mask building for MInference's sparse patterns: what each head keeps, and the kernel
metadata that says so.

The package is pure functions of tensors (no state, nothing of ``minference_flex`` imported). Three
of them have a Triton twin that runs on CUDA in their place (``score_kernel``: the vertical-slash
scores; ``mass_kernel``: the ``block_mass`` estimate; ``strip_build_kernel``: the strip layout),
each entering an outer ``torch.compile`` graph as one custom operator; the PyTorch definition is the
CPU path and the reference of the twin's tests.

The flow of one call::

    patterns (Pattern per head)
      -> select(q, k, patterns, scale)                -> Selection (token-level, exact)
      -> strip_layout(selection)                      -> Strips (strip kernel; strip_segments: Hopper)
         main_block_mask / vertical_block_mask(...)   -> FlexAttention BlockMasks

Beside the flow, for tests and the offline search: dense views (``token_cells``, ``visited_cells``,
``strip_cells``, ...) that build ``[B, H, Nq, Nk]`` tensors at small sizes, and ``attention_recall``,
the share of a head's exact attention mass that a Selection keeps.
"""
# Patterns: what one head keeps, and the tile size everything is counted in.
from .pattern import ALIASES, KINDS, TILE, Pattern

# Estimation: the kept columns, diagonals and blocks of every head for this prompt.
from .estimate import BlockSelection, Selection, block_means, diagonal_sums, select, vertical_slash_scores

# BlockMask building: a Selection as FlexAttention tile lists.
from .build import TileGeometry, Tiles, compact, gather_columns, kept_diagonals, main_block_mask, vertical_block_mask

# Strip layout: the kept diagonals, sinks and columns for the strip kernels (segments for Hopper).
from .strips import SEGMENT, STRIP, Segments, Strips, strip_layout, strip_segments

# Dense views, for tests and inspection at small sizes.
from .cells import tile_states, token_cells, visited_cells
from .strips import segment_cells, strip_cells

# Recall: the exact attention mass a Selection keeps (the offline search's measure).
from .recall import attention_recall

__all__ = [
    # patterns
    "ALIASES", "KINDS", "TILE", "Pattern",
    # estimation
    "BlockSelection", "Selection", "block_means", "diagonal_sums", "select", "vertical_slash_scores",
    # BlockMask building
    "TileGeometry", "Tiles", "compact", "gather_columns", "kept_diagonals", "main_block_mask", "vertical_block_mask",
    # strip layout
    "SEGMENT", "STRIP", "Segments", "Strips", "strip_layout", "strip_segments",
    # dense views
    "segment_cells", "strip_cells", "tile_states", "token_cells", "visited_cells",
    # recall
    "attention_recall",
]
