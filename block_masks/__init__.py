"""Pattern estimation and BlockMask construction for MInference's sparse patterns.

Pure functions of tensors: ``select`` estimates what each head keeps (a Selection), the builders
turn a Selection into FlexAttention BlockMasks, and ``cells`` gives dense views for tests.
"""
from .build import TileGeometry, Tiles, compact, gather_columns, kept_diagonals, main_block_mask, vertical_block_mask
from .cells import tile_states, token_cells, visited_cells
from .estimate import BlockSelection, Selection, block_means, select, vertical_slash_scores
from .pattern import ALIASES, KINDS, TILE, Pattern

__all__ = [
    "ALIASES", "KINDS", "TILE", "Pattern", "BlockSelection", "Selection", "TileGeometry", "Tiles",
    "block_means", "compact", "gather_columns", "kept_diagonals", "main_block_mask", "select",
    "tile_states", "token_cells", "vertical_block_mask", "vertical_slash_scores", "visited_cells",
]
