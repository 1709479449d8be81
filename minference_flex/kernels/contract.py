"""The contract shared by the strip kernels (Triton ``triton_strips``, Gluon ``hopper_strips``) and the
layout they read (``block_masks.strips``), in one place.

- sizes: ``STRIP`` rows and keys of a strip (the 64x64 tile, ``TILE``), ``SEGMENT`` keys of a Hopper
  segment (``SEGMENT_WIDTHS`` those ``strip_segments`` makes), ``ALLOWED_FRONT`` bits of the allowed
  offsets' words before offset 0; defined in ``block_masks`` (where the layout is built), re-exported here;
- the Triton import guard (``triton``, ``tl``, ``TensorDescriptor``, ``HAS_TRITON``: None / False
  without Triton), written once in ``block_masks.triton_support``;
- the shared jit helper ``count_at_most`` (binary search over a head's ascending strip tops);
- ``tma_operand``: keys and values as both kernels' TMA copies need them.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from block_masks.pattern import TILE
from block_masks.strips import ALLOWED_FRONT, NO_STRIP, SEGMENT, SEGMENT_WIDTHS, STRIP, Segments, Strips
from block_masks.triton_support import HAS_TRITON, TensorDescriptor, tl, triton

if HAS_TRITON:
    from block_masks.strip_build_kernel import count_at_most
else:  # pragma: no cover
    count_at_most = None

log = logging.getLogger(__name__)

__all__ = ["ALLOWED_FRONT", "HAS_TRITON", "NO_STRIP", "SEGMENT", "SEGMENT_WIDTHS", "STRIP", "TILE", "Segments", "Strips",
           "TensorDescriptor", "count_at_most", "tl", "tma_operand", "triton"]


def tma_operand(t: Tensor) -> Tensor:
    """``t`` [B, H, N, D] itself if a TMA descriptor can address it (unit last stride, 16-byte aligned
    base and strides), else a contiguous copy with the head dim zero-padded to a multiple of 16 bytes."""
    unit = 16 // t.element_size()
    aligned = t.stride(-1) == 1 and all(stride % unit == 0 for stride in t.stride()[:-1])
    # Under torch.compile the base address is not known; buffers it allocates are aligned.
    compiling = torch.compiler.is_compiling()
    misalignment = 0 if compiling else t.data_ptr() % 16
    if aligned and misalignment == 0:
        return t
    if not compiling:
        _warn_copy(t.dtype, t.shape[-1], aligned, misalignment)
    return torch.nn.functional.pad(t, (0, -t.shape[-1] % unit)).contiguous()


@functools.lru_cache(maxsize=64)
def _warn_copy(dtype: torch.dtype, head_dim: int, aligned_strides: bool, misalignment: int) -> None:
    """Say once per layout (not per prompt length) that ``tma_operand`` copies keys/values: a slower
    path is never silent."""
    log.warning("strip kernel: keys/values (%s, head dim %d, %s, base %d bytes past a 16-byte boundary) "
                "are not 16-byte aligned for TMA: each call copies them; a contiguous tensor whose head dim "
                "x element size is a multiple of 16 bytes needs no copy", dtype, head_dim,
                "strides aligned" if aligned_strides else "strides not multiples of 16 bytes", misalignment)
