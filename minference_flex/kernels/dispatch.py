"""The strip part of a plan, run with the backend the plan chose.

``strip_backend`` is what ``plan_attention`` asks when it plans (``strip_kernel="auto"``: the Gluon
kernel of ``hopper_strips`` where ``hopper_strips.supported`` holds for these tensors, else the Triton
kernel of ``triton_strips``); the plan stores the answer and, for the Hopper backend, its segments.
``strip_attention`` then runs what it is given and decides nothing: the Hopper kernel computes the
diagonal strips and columns, and for heads with sink tokens the Triton kernel resumes its online
softmax over the sink strips; the Triton backend runs everything in the Triton kernel.
``strip_attention_op`` is the same as one opaque operator, for calls inside a caller's ``torch.compile``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minference_flex.kernels import hopper_strips
from minference_flex.kernels.contract import TensorDescriptor, Segments, Strips, tma_operand, triton
from minference_flex.kernels.triton_strips import triton_strips

#: ``plan_attention``'s ``strip_kernel`` choices, and the backends a plan holds.
KERNELS = ("auto", "triton", "hopper")
BACKENDS = ("triton", "hopper")


def check_kernel(kernel: str) -> None:
    """ValueError unless ``kernel`` is one of ``KERNELS``."""
    if kernel not in KERNELS:
        raise ValueError(f"strip_kernel must be one of {KERNELS}, got {kernel!r}")


def strip_backend(query: Tensor, key: Tensor, kernel: str = "auto") -> str:
    """The backend (``"triton"`` or ``"hopper"``) of the strip part for these query and key (the value
    has the key's shape and dtype: ``run_plan`` checks it). ``"auto"``: ``"hopper"`` where
    ``hopper_strips.supported`` holds, else ``"triton"``; ``"hopper"`` where it does not: ValueError."""
    check_kernel(kernel)
    if kernel == "triton":
        return "triton"
    if hopper_strips.supported(query, key, key):
        return "hopper"
    if kernel == "hopper":
        raise ValueError("the Hopper strip kernel needs a compute-capability 9.x GPU, Triton >= 3.6 (Gluon), "
                         f"bf16/fp16 and head dim in {hopper_strips.HEAD_DIMS}; got {query.dtype}, head dim "
                         f"{query.shape[-1]} on {query.device}: plan with strip_kernel='auto' or 'triton'")
    return "triton"


def strip_attention(query: Tensor, key: Tensor, value: Tensor, strips: Strips, scale: float,
                    backend: str = "triton", segments: Segments | None = None) -> tuple[Tensor, Tensor]:
    """Attention of query [B, Hq, Nq, D] over the strip and column cells of key/value [B, Hkv, Nk, D].

    Returns (out [B, Hq, Nq, D] in the query dtype, lse [B, Hq, Nq] float32, -inf for rows with no
    such cell). ``backend`` (``strip_backend``): ``"triton"`` runs the Triton kernel (on CUDA; on CPU
    only under ``TRITON_INTERPRET=1``); ``"hopper"`` runs the diagonal strips and columns in the Gluon
    kernel over ``segments`` (``block_masks.strip_segments(strips)``) and the sink strips, if any, in the
    Triton kernel, which continues from its output.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hopper" and segments is None:
        raise ValueError("the Hopper backend runs the plan's segments: pass segments=strip_segments(strips)")
    if triton is None or TensorDescriptor is None:
        raise ValueError("the strip kernel needs Triton >= 3.3 (tensor descriptors): install or upgrade it, "
                         "or plan with strips=False")
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    if tuple(strips.sigma.shape[:2]) != (B, Hq) or (strips.nq, strips.nk) != (Nq, Nk):
        raise ValueError(f"strips made for batch x heads {tuple(strips.sigma.shape[:2])}, {strips.nq} queries and "
                         f"{strips.nk} keys cannot run on {B} x {Hq}, {Nq} queries and {Nk} keys")
    if not 1 <= D <= 256:
        raise ValueError(f"the strip kernel supports head dims up to 256, got {D}")
    if not all(t.is_contiguous() for t in (strips.sigma, strips.words, strips.columns, strips.allowed)):
        raise ValueError("strip tops, words, columns and allowed offsets must be contiguous (as strip_layout makes them)")
    query = query if query.stride(-1) == 1 else query.contiguous()
    key, value = tma_operand(key), tma_operand(value)
    if backend == "hopper":
        part = hopper_strips.hopper_attention(tma_operand(query), key, value, strips, segments, scale)
        if not strips.has_sinks:
            return part
        return triton_strips(query, key, value, strips, scale, resume=part, columns=False)
    return triton_strips(query, key, value, strips, scale)


@torch.library.custom_op("minference_flex::strip_attention", mutates_args=())
def _strip_attention_op(query: Tensor, key: Tensor, value: Tensor, sigma: Tensor, counts: Tensor, words: Tensor,
                        sink: Tensor, columns: Tensor, col_counts: Tensor, allowed: Tensor, q_start: int, nq: int,
                        nk: int, has_sinks: bool, has_columns: bool, scale: float, backend: str,
                        seg_tops: Tensor | None, seg_words: Tensor | None, seg_full: Tensor | None,
                        seg_counts: Tensor | None, seg_width: int) -> tuple[Tensor, Tensor]:
    strips = Strips(sigma, counts, words, sink, columns, col_counts, allowed, q_start, nq, nk, has_sinks, has_columns)
    segments = None if seg_tops is None else Segments(seg_tops, seg_words, seg_full, seg_counts, seg_width)
    out, lse = strip_attention(query, key, value, strips, scale, backend, segments)
    return out.contiguous(), lse.contiguous()


@_strip_attention_op.register_fake
def _(query, key, value, sigma, counts, words, sink, columns, col_counts, allowed, q_start, nq, nk, has_sinks,
      has_columns, scale, backend, seg_tops, seg_words, seg_full, seg_counts, seg_width):
    return torch.empty_like(query, memory_format=torch.contiguous_format), query.new_empty(query.shape[:3], dtype=torch.float32)


def strip_attention_op(query: Tensor, key: Tensor, value: Tensor, strips: Strips, scale: float,
                       backend: str = "triton", segments: Segments | None = None) -> tuple[Tensor, Tensor]:
    """``strip_attention`` as one opaque operator, for calls inside a caller's ``torch.compile``:
    inductor then neither traces nor re-plans the Triton and Gluon launches (traced into larger
    graphs they gave wrong results and failed to build with dynamic shapes). The segments travel as
    tensor inputs (None for the Triton backend)."""
    s, g = strips, segments
    seg = (None, None, None, None, 0) if g is None else (g.tops, g.words, g.full, g.counts, g.width)
    return _strip_attention_op(query, key, value, s.sigma, s.counts, s.words, s.sink, s.columns, s.col_counts,
                               s.allowed, s.q_start, s.nq, s.nk, s.has_sinks, s.has_columns, scale, backend, *seg)
