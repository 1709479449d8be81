"""Merging the parts of a plan on CUDA: one Triton pass per pair of parts.

``flex.merge`` says what a merge is (attentions over disjoint key sets, combined through their
log-sum-exp) in plain PyTorch, which builds float32 copies of every part: 16 GB each at 1M tokens in
Llama-3-8B geometry. This kernel reads each part once and writes the result in the output dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from minference_flex.kernels.contract import HAS_TRITON, tl, triton  # CPU installs without Triton merge in PyTorch

if triton is not None:

    # Not specialised on the row count or the strides that follow it: one build for every length.
    @triton.jit(do_not_specialize=["M", "t1b", "t1h", "t2b", "t2h"])
    def _merge_pair(O1, L1, O2, L2, Out, Lse, n_heads, M,
                    s1b, s1h, s1m, t1b, t1h, s2b, s2h, s2m, t2b, t2h, sob, soh, som,
                    DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(1)
        b = (bh // n_heads).to(tl.int64)
        h = (bh % n_heads).to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        live = rows < M
        cells = live[:, None] & (d[None, :] < DIM)
        r64 = rows.to(tl.int64)
        l1 = tl.load(L1 + b * t1b + h * t1h + r64, mask=live, other=float("-inf"))
        l2 = tl.load(L2 + b * t2b + h * t2h + r64, mask=live, other=float("-inf"))
        m = tl.maximum(l1, l2)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row empty in both parts stays 0, not nan
        w1 = tl.exp(l1 - m)
        w2 = tl.exp(l2 - m)
        total = w1 + w2
        o1 = tl.load(O1 + b * s1b + h * s1h + r64[:, None] * s1m + d[None, :], mask=cells, other=0.0).to(tl.float32)
        o2 = tl.load(O2 + b * s2b + h * s2h + r64[:, None] * s2m + d[None, :], mask=cells, other=0.0).to(tl.float32)
        out = (o1 * w1[:, None] + o2 * w2[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(Out + b * sob + h * soh + r64[:, None] * som + d[None, :], out.to(Out.dtype.element_ty), mask=cells)
        tl.store(Lse + bh.to(tl.int64) * M + r64, tl.where(total > 0, m + tl.log(total), float("-inf")), mask=live)


def merge_pair(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(out [B, H, M, D] in ``dtype``, lse [B, H, M] float32) of two parts (out, lse) on CUDA; the
    outs may be strided views (unit stride in D), the lse [B, H, M] views with unit stride in M."""
    if triton is None:
        raise ValueError("the merge kernel needs Triton")
    (o1, l1), (o2, l2) = first, second
    B, H, M, D = o1.shape
    if o2.shape != o1.shape or l1.shape != (B, H, M) or l2.shape != (B, H, M):
        raise ValueError(f"parts to merge differ in shape: {tuple(o1.shape)}, {tuple(o2.shape)}, "
                         f"{tuple(l1.shape)}, {tuple(l2.shape)}")
    o1, o2 = (o if o.stride(-1) == 1 else o.contiguous() for o in (o1, o2))
    l1, l2 = (lse if lse.stride(-1) == 1 else lse.contiguous() for lse in (l1, l2))
    out = torch.empty(B, H, M, D, dtype=dtype, device=o1.device)
    lse = torch.empty(B, H, M, dtype=torch.float32, device=o1.device)
    block_m = 64
    _merge_pair[(triton.cdiv(M, block_m), B * H)](
        o1, l1, o2, l2, out, lse, H, M,
        o1.stride(0), o1.stride(1), o1.stride(2), l1.stride(0), l1.stride(1),
        o2.stride(0), o2.stride(1), o2.stride(2), l2.stride(0), l2.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        DIM=D, HEAD_DIM=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, num_warps=4)
    return out, lse
