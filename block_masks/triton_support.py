"""The Triton import guard, written once for every kernel module (``block_masks``' own and
``minference_flex.kernels``, through ``minference_flex.kernels.contract``).

``triton`` and ``tl`` are None on installs without Triton (the PyTorch definitions and the eager
emulation run there); ``TensorDescriptor`` (host-side TMA descriptors) is None below Triton 3.3.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the PyTorch definitions
    triton = tl = None
try:  # host-side TMA descriptors: Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "TensorDescriptor", "tl", "triton"]
