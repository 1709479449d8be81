"""Pattern estimation and BlockMask construction for MInference's sparse patterns.

Pure functions of tensors: ``select`` estimates what each head keeps (a Selection), the builders
turn a Selection into FlexAttention BlockMasks, ``cells`` gives dense views for tests and
``recall`` measures how much exact attention mass a Selection keeps (for the offline search).
"""
from .build import TileGeometry, Tiles, compact, gather_columns, kept_diagonals, main_block_mask, vertical_block_mask
from .cells import tile_states, token_cells, visited_cells
from .estimate import BlockSelection, Selection, block_means, diagonal_sums, select, vertical_slash_scores
from .pattern import ALIASES, KINDS, TILE, Pattern
from .recall import attention_recall
from .strips import SEGMENT, STRIP, Segments, Strips, segment_cells, strip_cells, strip_layout, strip_segments

__all__ = [
    "ALIASES", "KINDS", "SEGMENT", "STRIP", "TILE", "Pattern", "Segments", "Strips", "segment_cells", "strip_layout",
    "strip_cells", "strip_segments", "BlockSelection", "Selection", "TileGeometry", "Tiles",
    "attention_recall", "block_means", "compact", "diagonal_sums", "gather_columns", "kept_diagonals", "main_block_mask", "select",
    "tile_states", "token_cells", "vertical_block_mask", "vertical_slash_scores", "visited_cells",
]
