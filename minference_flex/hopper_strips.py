"""The diagonal strips on Hopper (sm_90): a Gluon kernel, two strips per iteration.

The Triton strip kernel (``strip_kernel``) computes one 64x64 strip per loop iteration, and every
iteration pays a fixed price besides the strip's cells: the row maxima and the rescale of the 64 x
head-dim accumulator, the loop and its barriers, a copy issue per tile. Here each iteration takes
two strips of the head's list at once: their keys and values land as two TMA copies in the two
halves of one 128-key buffer, one wgmma gives the [64, 128] scores, one softmax step and one
rescale cover both strips, one wgmma adds P.V. Written in Gluon (Triton's layout-explicit dialect)
because the pairing needs what plain Triton does not give: the buffers, their barriers and the
asynchronous wgmma are explicit, so the keys of the next pair and the values of a later one arrive
while the current softmax runs, with one buffer for keys and two for values (112 KiB of
shared memory at head dim 128: two programs per SM; Triton's pipeliner would double-buffer all four
tiles and leave one). Measured on the H100 (docs/performance.md): 11-21% less time per strip than
the Triton kernel at 32K-1M.

Only the diagonal strips run here; the sink strips and the gathered vertical columns of the same
heads then continue the online softmax in the Triton kernel from this kernel's output and
log-sum-exp (``strip_kernel.strip_attention``). The cells are those of the strip layout
(``block_masks.strips``): strip t of a head holds keys i0 - sigma_t .. i0 - sigma_t + 63 for the
query block at i0, its four words tell which offsets count, keys below the head's sink (or below
0) never count here.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from block_masks.strips import STRIP, Strips

#: Oldest Triton whose Gluon API this kernel is written against (Gluon is experimental: its API moves).
MIN_TRITON = (3, 6)

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < MIN_TRITON:
        raise ImportError(f"the Hopper strip kernel needs Triton >= {MIN_TRITON}")
except ImportError:  # pragma: no cover - older Triton, or none: the Triton strip kernel runs alone
    gluon = None

#: Head dims and dtypes the kernel is built for (wgmma operands; a [64, 2 * 64] score tile).
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
#: Value buffers (pairs in flight); keys have one.
VALUE_BUFFERS = 2


def supported(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether this kernel runs these tensors: a Hopper GPU, Triton >= 3.6 (Gluon), bf16/fp16, head dim
    64 or 128."""
    if gluon is None or not query.is_cuda or query.dtype not in DTYPES or query.shape[-1] not in HEAD_DIMS:
        return False
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    return torch.cuda.get_device_capability(query.device)[0] == 9


if gluon is not None:

    @gluon.jit
    def _pair_copy(desc, bar, buf, strips, j, n, i0, b, kvh, nbytes: gl.constexpr):
        """TMA copies of the keys (or values) of strips 2j and 2j + 1 into the two halves of ``buf``.
        A missing second strip repeats the first (its cells are masked; its values must be finite)."""
        live = 2 * j < n
        first = i0 - gl.load(strips + 2 * j, mask=live, other=0)
        has_second = 2 * j + 1 < n
        second = gl.where(has_second, i0 - gl.load(strips + 2 * j + 1, mask=has_second, other=0), first)
        mbarrier.expect(bar, 2 * nbytes, pred=live)
        tma.async_copy_global_to_shared(desc, [b, kvh, first, 0], bar, buf.slice(0, 64, dim=2), pred=live)
        tma.async_copy_global_to_shared(desc, [b, kvh, second, 0], bar, buf.slice(64, 64, dim=2), pred=live)

    @gluon.jit
    def _row_words(words, t, live, rows):
        """(bits r + 32 .. r + 63, bits r .. r + 31) of strip t's words for each row r (zeros for a
        strip that does not exist), and whether any of its cells is masked."""
        w0 = gl.load(words + t * 4, mask=live, other=0)
        w1 = gl.load(words + t * 4 + 1, mask=live, other=0)
        w2 = gl.load(words + t * 4 + 2, mask=live, other=0)
        w3 = gl.load(words + t * 4 + 3, mask=live, other=0)
        lo = ((w1.to(gl.int64) << 32) | (w0.to(gl.int64) & 0xFFFFFFFF)).to(gl.uint64, bitcast=True)
        hi = ((w3.to(gl.int64) << 32) | (w2.to(gl.int64) & 0xFFFFFFFF)).to(gl.uint64, bitcast=True)
        window = gl.where(rows == 0, lo, (lo >> rows.to(gl.uint64)) | (hi << (64 - rows).to(gl.uint64)))
        masked = (w0 & w1 & w2 & (w3 | -2147483648)) != -1  # bit 127 is no cell
        return (window >> 32).to(gl.uint32), (window & 0xFFFFFFFF).to(gl.uint32), masked

    @gluon.jit
    def _pair_softmax(qk, strips, words, j, n, i0, low, m_i, l_i, s, rows, cols):
        """One online-softmax step over the scores [64, 128] of strips 2j, 2j + 1: (m, l, P float32,
        alpha). Cell (r, c) of strip t counts iff bit r - c + 63 of its words is set and its key is at
        least ``low`` (the head's sink, or 0); the scale enters the exponent as one FMA."""
        has_second = 2 * j + 1 < n
        start_a = i0 - gl.load(strips + 2 * j)
        start_b = i0 - gl.load(strips + 2 * j + 1, mask=has_second, other=0)
        a_hi, a_lo, masked_a = _row_words(words, 2 * j, True, rows)
        b_hi, b_lo, masked_b = _row_words(words, 2 * j + 1, has_second, rows)
        if masked_a | masked_b | (start_a < low) | (start_b < low) | (not has_second):
            c = cols % 64
            second = cols >= 64
            word = gl.where(second[None, :], gl.where(c[None, :] >= 32, b_lo[:, None], b_hi[:, None]),
                            gl.where(c[None, :] >= 32, a_lo[:, None], a_hi[:, None]))
            keys = gl.where(second, start_b, start_a) + c
            keep = (((word >> (31 - c % 32).to(gl.uint32)[None, :]) & 1) != 0) & (keys >= low)[None, :]
            qk = gl.where(keep, qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1) * s)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk * s - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        return m_new, l_i * alpha + gl.sum(p, 1), p, alpha

    # Lengths and the strides that follow them are not specialised on: one build for every length.
    @gluon.jit(do_not_specialize=["Nq", "q_start", "sob", "soh", "ssb", "ssh", "scb", "sch"])
    def _diagonal_pairs(QD, KD, VD, Out, Lse, Sigma, Words, Counts, Sink,
                        sob, soh, som, ssb, ssh, scb, sch, n_heads, group, Nq, q_start, qk_scale,
                        HEAD_DIM: gl.constexpr, NUM_V: gl.constexpr):
        BLOCK: gl.constexpr = 64
        W: gl.constexpr = 2 * BLOCK
        # The last query blocks hold the most strips: launched first (as in the Triton kernel).
        qb = gl.num_programs(0) - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        kvh = h // group
        i0 = q_start + qb * BLOCK
        s = qk_scale
        low = gl.maximum(gl.load(Sink + h), 0)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, W, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_smem = gl.allocate_shared_memory(QD.dtype, [1, 1, BLOCK, HEAD_DIM], QD.layout)
        k_smem = gl.allocate_shared_memory(KD.dtype, [1, 1, W, HEAD_DIM], KD.layout)
        v_smem = gl.allocate_shared_memory(VD.dtype, [NUM_V, 1, 1, W, HEAD_DIM], VD.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [NUM_V, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(k_bar, count=1)
        for i in gl.static_range(NUM_V):
            mbarrier.init(v_bar.index(i), count=1)

        n = gl.load(Counts + b.to(gl.int64) * scb + h * sch + qb)
        n_pairs = (n + 1) // 2
        strips = Sigma + b.to(gl.int64) * ssb + h * ssh
        words = Words + (b.to(gl.int64) * ssb + h * ssh) * 4
        nbytes: gl.constexpr = KD.block_type.nbytes

        mbarrier.expect(q_bar, QD.block_type.nbytes)
        tma.async_copy_global_to_shared(QD, [b, h, qb * BLOCK, 0], q_bar, q_smem)
        _pair_copy(KD, k_bar, k_smem, strips, 0, n, i0, b, kvh, nbytes)
        for j in gl.static_range(NUM_V):
            _pair_copy(VD, v_bar.index(j), v_smem.index(j), strips, j, n, i0, b, kvh, nbytes)

        rows = gl.arange(0, BLOCK, layout=row_s)
        cols = gl.arange(0, W, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
        no_scores = gl.zeros([BLOCK, W], gl.float32, layout=s_layout)
        p = gl.zeros([BLOCK, W], QD.dtype, layout=p_layout)
        q = q_smem.reshape([BLOCK, HEAD_DIM])
        k = k_smem.reshape([W, HEAD_DIM])
        mbarrier.wait(q_bar, phase=0)

        # Pair j: its Q.K^T is issued, then the P.V of pair j - 1 behind it; once the scores are in, the
        # key buffer takes pair j + 1 while the softmax of pair j runs; once that P.V is done, its value
        # buffer takes pair j - 1 + NUM_V. Pair 0 has no P.V before it.
        if n_pairs > 0:
            mbarrier.wait(k_bar, phase=0)
            qk = warpgroup_mma(q, k.permute((1, 0)), no_scores, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            _pair_copy(KD, k_bar, k_smem, strips, 1, n, i0, b, kvh, nbytes)
            m_i, l_i, pf, alpha = _pair_softmax(qk, strips, words, 0, n, i0, low, m_i, l_i, s, rows, cols)
            p = gl.convert_layout(pf.to(QD.dtype), p_layout)
        for j in range(1, n_pairs):
            mbarrier.wait(k_bar, phase=j & 1)
            qk = warpgroup_mma(q, k.permute((1, 0)), no_scores, use_acc=False, is_async=True)
            vb = (j - 1) % NUM_V
            mbarrier.wait(v_bar.index(vb), phase=((j - 1) // NUM_V) & 1)
            acc = warpgroup_mma(p, v_smem.index(vb).reshape([W, HEAD_DIM]), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
            _pair_copy(KD, k_bar, k_smem, strips, j + 1, n, i0, b, kvh, nbytes)
            m_i, l_i, pf, alpha = _pair_softmax(qk, strips, words, j, n, i0, low, m_i, l_i, s, rows, cols)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            _pair_copy(VD, v_bar.index(vb), v_smem.index(vb), strips, j - 1 + NUM_V, n, i0, b, kvh, nbytes)
            # P is converted only now: until the wait its registers are the running P.V's operand.
            p = gl.convert_layout(pf.to(QD.dtype), p_layout)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        if n_pairs > 0:
            vb = (n_pairs - 1) % NUM_V
            mbarrier.wait(v_bar.index(vb), phase=((n_pairs - 1) // NUM_V) & 1)
            acc = warpgroup_mma(p, v_smem.index(vb).reshape([W, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.invalidate(q_bar)
        mbarrier.invalidate(k_bar)
        for i in gl.static_range(NUM_V):
            mbarrier.invalidate(v_bar.index(i))

        l_safe = gl.where(l_i > 0, l_i, 1.0)
        lse = gl.where(l_i > 0, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out = acc / gl.convert_layout(l_safe, row_o)[:, None]
        rows_o = qb * BLOCK + gl.arange(0, BLOCK, layout=row_o)
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptr = Out + b.to(gl.int64) * sob + h.to(gl.int64) * soh + rows_o[:, None].to(gl.int64) * som + d[None, :]
        gl.store(ptr, out.to(Out.dtype.element_ty), mask=rows_o[:, None] < Nq)
        rows_l = qb * BLOCK + rows
        gl.store(Lse + bh.to(gl.int64) * Nq + rows_l, lse, mask=rows_l < Nq)

    @functools.lru_cache(maxsize=8)
    def _shared_layout(dtype: torch.dtype, head_dim: int):
        return gl.NVMMASharedLayout.get_default_for([1, 1, STRIP, head_dim], gl.bfloat16 if dtype == torch.bfloat16
                                                    else gl.float16)

    def _launch(query: Tensor, key: Tensor, value: Tensor, sigma: Tensor, words: Tensor, counts: Tensor,
                sink: Tensor, q_start: int, scale: float) -> tuple[Tensor, Tensor]:
        B, Hq, Nq, D = query.shape
        layout = _shared_layout(query.dtype, D)
        descriptors = [TensorDescriptor.from_tensor(t, [1, 1, STRIP, D], layout) for t in (query, key, value)]
        out = torch.empty(B, Hq, Nq, D, dtype=query.dtype, device=query.device)
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=query.device)
        grid = (triton.cdiv(Nq, STRIP), B * Hq)
        _diagonal_pairs[grid](*descriptors, out, lse, sigma, words, counts, sink,
                              out.stride(0), out.stride(1), out.stride(2), sigma.stride(0), sigma.stride(1),
                              counts.stride(0), counts.stride(1), Hq, Hq // key.shape[1], Nq, q_start,
                              scale * math.log2(math.e), HEAD_DIM=D, NUM_V=VALUE_BUFFERS, num_warps=4)
        return out, lse

    # Inside torch.compile the kernel is an opaque op (dynamo does not trace Gluon launches); outside,
    # ``_launch`` is called directly, without the op's dispatch cost.
    _hopper_diagonals = torch.library.custom_op("minference_flex::hopper_diagonals", _launch, mutates_args=())

    @_hopper_diagonals.register_fake
    def _(query, key, value, sigma, words, counts, sink, q_start, scale):
        B, Hq, Nq, D = query.shape
        return query.new_empty(B, Hq, Nq, D), query.new_empty(B, Hq, Nq, dtype=torch.float32)


def diagonal_attention(query: Tensor, key: Tensor, value: Tensor, strips: Strips, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of query [B, Hq, Nq, D] over the diagonal-strip cells of ``strips`` only (no sink
    strips, no columns): (out [B, Hq, Nq, D] in the query dtype, lse [B, Hq, Nq] float32, -inf for
    rows with no such cell). ``supported(query, key, value)`` must hold; query, key and value must
    be TMA-addressable (``strip_kernel._tma_operand`` makes them so)."""
    if not supported(query, key, value):
        raise ValueError("the Hopper strip kernel needs a compute-capability 9.x GPU, Triton >= 3.6 (Gluon), "
                         f"bf16/fp16 and head dim in {HEAD_DIMS}; got {query.dtype}, head dim {query.shape[-1]} "
                         f"on {query.device}")
    launch = torch.ops.minference_flex.hopper_diagonals if torch.compiler.is_compiling() else _launch
    return launch(query, key, value, strips.sigma, strips.words, strips.counts, strips.sink, strips.q_start, scale)
