"""The strips and columns on Hopper (sm_90): a warp-specialized Gluon kernel over segments of 32 keys.

The Triton strip kernel (``triton_strips``) computes one 64x64 strip per loop iteration. This kernel
computes the same cells in steps of 128 keys: the diagonal strips are cut into segments of
``block_masks.strips.SEGMENT`` keys with the empty ones dropped (``strip_segments``: a narrow cluster
of kept offsets needs 64 + its width keys, its chain of strips holds up to twice that; at 1M the
segments are 0.90 of the strips' area), and each step copies four segments' keys and values (TMA)
into one 128-key buffer each, computes the [64, 128] scores in one wgmma, one softmax step and one
rescale, and adds P.V in one wgmma. Written in Gluon (Triton's layout-explicit dialect) because it
needs what plain Triton does not give:

- warp specialization: one warp issues the copies (each TMA copy is fenced by a barrier of the
  warps that issue it; in the computing warpgroup eight of them a step cost more than the segments
  save), while the computing warpgroup (232 registers; the copying warp's group keeps 24) runs the
  wgmmas and the softmax;
- explicit buffers and barriers: one key buffer (released once the scores are in, so the next
  step's keys arrive during the softmax) and two value buffers, 112 KiB of shared memory at head
  dim 128: two programs per SM.

The vertical columns run here too, before the segments: their keys and values gathered per query
head (``block_masks.gather_columns``), copied 128 at a time, each step's cells found from one
64-bit window of the head's allowed offsets per column (as in the Triton kernel), one step at a
time (a budget of V columns is at most V / 128 steps). Keys below the head's sink (or below 0) never
count here: heads with sink tokens (A-shape) get their sink strips from the Triton kernel, which
continues the online softmax from this kernel's output and log-sum-exp
(``dispatch.strip_attention``). Measured on the H100 in docs/performance.md.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from block_masks.build import gather_columns

from minference_flex.kernels.contract import ALLOWED_FRONT, STRIP, Segments, Strips, triton

#: Oldest Triton whose Gluon API this kernel is written against (Gluon is experimental: its API moves).
MIN_TRITON = (3, 6)

try:
    if triton is None:
        raise ImportError("no Triton")
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
#: Value buffers (steps in flight); keys have one.
VALUE_BUFFERS = 2
#: Registers per thread at launch: 8 warps (the computing warpgroup and the copying warp's) at 128 fit two
#: programs on an SM; the copying warpgroup gives all but 24 to the computing one.
REGISTERS = 128


def supported(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether this kernel runs these tensors: a Hopper GPU, Triton >= 3.6 (Gluon), bf16/fp16, head dim
    64 or 128."""
    if gluon is None or not query.is_cuda or query.dtype not in DTYPES or query.shape[-1] not in HEAD_DIMS:
        return False
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    # get_device_properties, not get_device_capability: dynamo folds it when a plan is traced.
    return torch.cuda.get_device_properties(query.device).major == 9


if gluon is not None:

    @gluon.jit
    def _group_copy(desc, bar, buf, tops, j, n, i0, b, kvh, nbytes: gl.constexpr, WIDTH: gl.constexpr):
        """TMA copies of the keys (or values) of the segments of group j (WIDTH keys each, 128 keys in
        all) into ``buf``. A missing segment repeats the group's first (its cells are masked; its values
        must be finite)."""
        NSEG: gl.constexpr = 128 // WIDTH
        # All tops in one load: each copy is fenced by a barrier, a load per copy would wait behind it.
        idx = gl.arange(0, NSEG, layout=gl.BlockedLayout([NSEG], [32], [1], [0]))
        t = NSEG * j + idx
        starts = i0 - gl.load(tops + gl.where(t < n, t, NSEG * j), mask=NSEG * j < n, other=0)
        mbarrier.expect(bar, NSEG * nbytes, pred=NSEG * j < n)
        for m in gl.static_range(NSEG):
            start = gl.sum(gl.where(idx == m, starts, 0), axis=0)
            tma.async_copy_global_to_shared(desc, [b, kvh, start, 0], bar, buf.slice(m * WIDTH, WIDTH, dim=2),
                                            pred=NSEG * j < n)

    # Triton twin of this bit window: triton_strips._diagonal_strip.
    @gluon.jit
    def _segment_window(words, t, live, rows, WIDTH: gl.constexpr):
        """Bits r .. r + WIDTH - 1 of segment t's words for each row r (zeros for a segment that does not
        exist): bit WIDTH - 1 - c of row r's window tells whether key c counts."""
        w0 = gl.load(words + t * 4, mask=live, other=0)
        w1 = gl.load(words + t * 4 + 1, mask=live, other=0)
        w2 = gl.load(words + t * 4 + 2, mask=live, other=0)
        w3 = gl.load(words + t * 4 + 3, mask=live, other=0)
        lo = ((w1.to(gl.int64) << 32) | (w0.to(gl.int64) & 0xFFFFFFFF)).to(gl.uint64, bitcast=True)
        hi = ((w3.to(gl.int64) << 32) | (w2.to(gl.int64) & 0xFFFFFFFF)).to(gl.uint64, bitcast=True)
        window = gl.where(rows == 0, lo, (lo >> rows.to(gl.uint64)) | (hi << (64 - rows).to(gl.uint64)))
        return (window & ((1 << WIDTH) - 1)).to(gl.int32)

    # Triton twin: triton_strips._softmax_step.
    @gluon.jit
    def _online_softmax(qk, m_i, l_i, s):
        """One online-softmax step over scores ``qk`` (unscaled, -inf where a cell does not count):
        (m, l, P float32, alpha). The scale ``s`` (log2 domain) enters the exponent as one FMA."""
        m_new = gl.maximum(m_i, gl.max(qk, 1) * s)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk * s - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        return m_new, l_i * alpha + gl.sum(p, 1), p, alpha

    @gluon.jit
    def _group_softmax(qk, tops, words, full, j, n, i0, low, m_i, l_i, s, rows, cols, WIDTH: gl.constexpr):
        """``_online_softmax`` over the scores [64, 128] of the segments of group j. Cell (r, c) of a
        segment counts iff bit r - c + WIDTH - 1 of its words is set and its key is at least ``low``
        (the head's sink, or 0)."""
        NSEG: gl.constexpr = 128 // WIDTH
        lowest = i0 - gl.load(tops + gl.minimum(NSEG * j + NSEG, n) - 1)  # first key of the group's last segment
        every = True
        for m in gl.static_range(NSEG):
            has = NSEG * j + m < n
            every = every & has & (gl.load(full + NSEG * j + m, mask=has, other=0) != 0)
        if (not every) | (lowest < low):
            # The segment of a column is known per register: the selects below fold away.
            seg = cols // WIDTH
            c = cols % WIDTH
            word = gl.zeros_like(qk, dtype=gl.int32)
            start = gl.zeros_like(cols)
            for m in gl.static_range(NSEG):
                has = NSEG * j + m < n
                window = _segment_window(words, NSEG * j + m, has, rows, WIDTH)
                word = gl.where((seg == m)[None, :], window[:, None], word)
                start = gl.where(seg == m, i0 - gl.load(tops + NSEG * j + m, mask=has, other=0), start)
            keep = ((word >> (WIDTH - 1 - c)[None, :]) & 1) != 0
            qk = gl.where(keep & ((start + c) >= low)[None, :], qk, float("-inf"))
        return _online_softmax(qk, m_i, l_i, s)

    @gluon.jit
    def _column_copy(desc, bar, buf, b, h, g, nbytes: gl.constexpr, WIDTH: gl.constexpr):
        """TMA copies of gathered columns 128 g .. 128 g + 127 of query head h (rows past the last
        read zeros) into ``buf``."""
        NSEG: gl.constexpr = 128 // WIDTH
        mbarrier.expect(bar, NSEG * nbytes)
        for m in gl.static_range(NSEG):
            tma.async_copy_global_to_shared(desc, [b, h, 128 * g + m * WIDTH, 0], bar, buf.slice(m * WIDTH, WIDTH, dim=2))

    # Triton twin of this column window: the column loop of triton_strips._strip_forward.
    @gluon.jit
    def _column_words(columns, allowed, n_cols, g, i0, cols, FRONT: gl.constexpr):
        """Which rows count in gathered columns 128 g ..: (bits for rows 0..31, rows 32..63), one
        32-bit word each per column. Column c's cell in row r counts iff c is among the block's first
        ``n_cols`` and bit FRONT + i0 + r - c of the head's allowed offsets is set (causal and not
        kept: the diagonals compute kept offsets)."""
        j = 128 * g + cols
        live = j < n_cols
        c = gl.load(columns + j, mask=live, other=0)
        first = gl.maximum(i0 - c, -FRONT) + FRONT  # a window wholly before offset 0 reads zeros
        word = allowed + (first >> 5)
        a0 = gl.load(word, mask=live, other=0).to(gl.uint32, bitcast=True).to(gl.uint64)
        a1 = gl.load(word + 1, mask=live, other=0).to(gl.uint32, bitcast=True).to(gl.uint64)
        a2 = gl.load(word + 2, mask=live, other=0).to(gl.uint32, bitcast=True).to(gl.uint64)
        shift = (first & 31).to(gl.uint64)
        low = (a0 | (a1 << 32)) >> shift
        window = gl.where(shift == 0, low, low | (a2 << (64 - shift)))
        return (window & 0xFFFFFFFF).to(gl.uint32), (window >> 32).to(gl.uint32)

    @gluon.jit
    def _produce(QD, KD, VD, CKD, CVD, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, tops, n,
                 n_col_steps, i0, b, h, kvh, qb, WIDTH: gl.constexpr, NUM_V: gl.constexpr):
        """The copying warp: the queries, then per step its keys (one buffer) and values (NUM_V buffers),
        each once the consumer has released the buffer: the gathered columns' steps first, then the
        segment groups."""
        NSEG: gl.constexpr = 128 // WIDTH
        nbytes: gl.constexpr = KD.block_type.nbytes
        mbarrier.expect(q_bar, QD.block_type.nbytes)
        tma.async_copy_global_to_shared(QD, [b, h, qb * 64, 0], q_bar, q_smem)
        for g in range(n_col_steps):
            mbarrier.wait(k_empty, (g & 1) ^ 1)
            _column_copy(CKD, k_ready, k_smem, b, h, g, nbytes, WIDTH)
            vb = g % NUM_V
            mbarrier.wait(v_empty.index(vb), ((g // NUM_V) & 1) ^ 1)
            _column_copy(CVD, v_ready.index(vb), v_smem.index(vb), b, h, g, nbytes, WIDTH)
        for j in range((n + NSEG - 1) // NSEG):
            u = n_col_steps + j  # buffer uses so far
            mbarrier.wait(k_empty, (u & 1) ^ 1)
            _group_copy(KD, k_ready, k_smem, tops, j, n, i0, b, kvh, nbytes, WIDTH)
            vb = u % NUM_V
            mbarrier.wait(v_empty.index(vb), ((u // NUM_V) & 1) ^ 1)
            _group_copy(VD, v_ready.index(vb), v_smem.index(vb), tops, j, n, i0, b, kvh, nbytes, WIDTH)

    @gluon.jit
    def _consume(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out, Lse, tops, words, full, n,
                 columns, allowed, n_cols, n_col_steps, i0, low, s, b, h, bh, qb, sob, soh, som, Nq,
                 dtype: gl.constexpr, HEAD_DIM: gl.constexpr, WIDTH: gl.constexpr, NUM_V: gl.constexpr,
                 FRONT: gl.constexpr):
        """The computing warpgroup: the column steps (one at a time), then per segment group Q.K^T, the
        online softmax and P.V, overlapped; then the output and its log-sum-exp."""
        BLOCK: gl.constexpr = 64
        W: gl.constexpr = 128
        NSEG: gl.constexpr = W // WIDTH
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, W, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        n_groups = (n + NSEG - 1) // NSEG
        C = n_col_steps
        rows = gl.arange(0, BLOCK, layout=row_s)
        cols = gl.arange(0, W, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
        no_scores = gl.zeros([BLOCK, W], gl.float32, layout=s_layout)
        p = gl.zeros([BLOCK, W], dtype, layout=p_layout)
        q = q_smem.reshape([BLOCK, HEAD_DIM])
        k = k_smem.reshape([W, HEAD_DIM])
        mbarrier.wait(q_bar, phase=0)
        # Column steps: few (a budget of V columns is V / 128 steps at most), so not overlapped.
        for g in range(C):
            # The rows' words before the scores: the loads' addresses are dead by the time they land.
            lo, hi = _column_words(columns, allowed, n_cols, g, i0, cols, FRONT)
            mbarrier.wait(k_ready, phase=g & 1)
            qk = warpgroup_mma(q, k.permute((1, 0)), no_scores, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            mbarrier.arrive(k_empty, count=1)
            half = gl.where((rows >= 32)[:, None], hi[None, :], lo[None, :])
            qk = gl.where(((half >> (rows % 32).to(gl.uint32)[:, None]) & 1) != 0, qk, float("-inf"))
            m_i, l_i, pf, alpha = _online_softmax(qk, m_i, l_i, s)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            vb = g % NUM_V
            mbarrier.wait(v_ready.index(vb), phase=(g // NUM_V) & 1)
            acc = warpgroup_mma(gl.convert_layout(pf.to(dtype), p_layout), v_smem.index(vb).reshape([W, HEAD_DIM]),
                                acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(v_empty.index(vb), count=1)
        # Group j: its Q.K^T, then the P.V of group j - 1 behind it; the key buffer is released once the
        # scores are in, a value buffer once its P.V is done. Group 0 has no P.V before it.
        if n_groups > 0:
            mbarrier.wait(k_ready, phase=C & 1)
            qk = warpgroup_mma(q, k.permute((1, 0)), no_scores, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            mbarrier.arrive(k_empty, count=1)
            m_i, l_i, pf, alpha = _group_softmax(qk, tops, words, full, 0, n, i0, low, m_i, l_i, s, rows, cols, WIDTH)
            p = gl.convert_layout(pf.to(dtype), p_layout)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        for j in range(1, n_groups):
            u = C + j
            mbarrier.wait(k_ready, phase=u & 1)
            qk = warpgroup_mma(q, k.permute((1, 0)), no_scores, use_acc=False, is_async=True)
            vb = (u - 1) % NUM_V
            mbarrier.wait(v_ready.index(vb), phase=((u - 1) // NUM_V) & 1)
            acc = warpgroup_mma(p, v_smem.index(vb).reshape([W, HEAD_DIM]), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
            mbarrier.arrive(k_empty, count=1)
            m_i, l_i, pf, alpha = _group_softmax(qk, tops, words, full, j, n, i0, low, m_i, l_i, s, rows, cols, WIDTH)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(v_empty.index(vb), count=1)
            # P is converted only now: until the wait its registers are the running P.V's operand.
            p = gl.convert_layout(pf.to(dtype), p_layout)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        if n_groups > 0:
            u = C + n_groups - 1
            vb = u % NUM_V
            mbarrier.wait(v_ready.index(vb), phase=(u // NUM_V) & 1)
            acc = warpgroup_mma(p, v_smem.index(vb).reshape([W, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        l_safe = gl.where(l_i > 0, l_i, 1.0)
        lse = gl.where(l_i > 0, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out = acc / gl.convert_layout(l_safe, row_o)[:, None]
        rows_o = qb * BLOCK + gl.arange(0, BLOCK, layout=row_o)
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptr = Out + b.to(gl.int64) * sob + h.to(gl.int64) * soh + rows_o[:, None].to(gl.int64) * som + d[None, :]
        gl.store(ptr, out.to(Out.dtype.element_ty), mask=rows_o[:, None] < Nq)
        rows_l = qb * BLOCK + rows
        gl.store(Lse + bh.to(gl.int64) * Nq + rows_l, lse, mask=rows_l < Nq)

    # Lengths and the strides that follow them are not specialised on: one build for every length.
    @gluon.jit(do_not_specialize=["Nq", "q_start", "sob", "soh", "ssb", "ssh", "scb", "sch", "svb", "svh", "snb",
                                  "snh", "sab", "sah"])
    def _segments_and_columns(QD, KD, VD, CKD, CVD, Out, Lse, Tops, Words, Full, Counts, Sink, Columns, ColCounts, Allowed,
                              sob, soh, som, ssb, ssh, scb, sch, svb, svh, snb, snh, sab, sah,
                              n_heads, group, Nq, q_start, qk_scale,
                              HEAD_DIM: gl.constexpr, WIDTH: gl.constexpr, NUM_V: gl.constexpr, COLUMNS: gl.constexpr,
                              FRONT: gl.constexpr):
        BLOCK: gl.constexpr = 64
        W: gl.constexpr = 128
        # The last query blocks hold the most segments: launched first (as in the Triton kernel).
        qb = gl.num_programs(0) - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        kvh = h // group
        i0 = q_start + qb * BLOCK
        low = gl.maximum(gl.load(Sink + h), 0)
        q_smem = gl.allocate_shared_memory(QD.dtype, [1, 1, BLOCK, HEAD_DIM], QD.layout)
        k_smem = gl.allocate_shared_memory(KD.dtype, [1, 1, W, HEAD_DIM], KD.layout)
        v_smem = gl.allocate_shared_memory(VD.dtype, [NUM_V, 1, 1, W, HEAD_DIM], VD.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_V, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_V, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(k_ready, count=1)
        mbarrier.init(k_empty, count=1)
        for i in gl.static_range(NUM_V):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=1)
        n = gl.load(Counts + b.to(gl.int64) * scb + h * sch + qb)
        head = b.to(gl.int64) * ssb + h * ssh
        if COLUMNS:
            n_cols = gl.load(ColCounts + b.to(gl.int64) * snb + h * snh + qb)
        else:
            n_cols = 0
        n_col_steps = (n_cols + W - 1) // W
        gl.warp_specialize([
            (_consume, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out, Lse, Tops + head,
                        Words + head * 4, Full + head, n, Columns + b.to(gl.int64) * svb + h * svh,
                        Allowed + b.to(gl.int64) * sab + h * sah, n_cols, n_col_steps, i0, low, qk_scale, b, h, bh,
                        qb, sob, soh, som, Nq, QD.dtype, HEAD_DIM, WIDTH, NUM_V, FRONT)),
            (_produce, (QD, KD, VD, CKD, CVD, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                        Tops + head, n, n_col_steps, i0, b, h, kvh, qb, WIDTH, NUM_V)),
        ], [1], [24])

    @functools.lru_cache(maxsize=8)
    def _shared_layout(dtype: torch.dtype, head_dim: int):
        return gl.NVMMASharedLayout.get_default_for([1, 1, STRIP, head_dim], gl.bfloat16 if dtype == torch.bfloat16
                                                    else gl.float16)

    def _launch(query: Tensor, key: Tensor, value: Tensor, column_keys: Tensor | None, column_values: Tensor | None,
                tops: Tensor, words: Tensor, full: Tensor, counts: Tensor, sink: Tensor, columns: Tensor,
                col_counts: Tensor, allowed: Tensor, q_start: int, width: int, scale: float) -> tuple[Tensor, Tensor]:
        B, Hq, Nq, D = query.shape
        # One head offset (from the tops' strides) addresses tops, words and flags: all contiguous.
        tops, words, full = tops.contiguous(), words.contiguous(), full.contiguous()
        layout = _shared_layout(query.dtype, D)
        descriptors = [TensorDescriptor.from_tensor(query, [1, 1, STRIP, D], layout)]
        with_columns = column_keys is not None
        gathered = (column_keys, column_values) if with_columns else (key, value)  # unread without columns
        descriptors += [TensorDescriptor.from_tensor(t, [1, 1, width, D], layout) for t in (key, value, *gathered)]
        out = torch.empty(B, Hq, Nq, D, dtype=query.dtype, device=query.device)
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=query.device)
        grid = (triton.cdiv(Nq, STRIP), B * Hq)
        _segments_and_columns[grid](
            *descriptors, out, lse, tops, words, full, counts, sink, columns, col_counts, allowed,
            out.stride(0), out.stride(1), out.stride(2), tops.stride(0), tops.stride(1), counts.stride(0),
            counts.stride(1), columns.stride(0), columns.stride(1), col_counts.stride(0), col_counts.stride(1),
            allowed.stride(0), allowed.stride(1), Hq, Hq // key.shape[1], Nq, q_start, scale * math.log2(math.e),
            HEAD_DIM=D, WIDTH=width, NUM_V=VALUE_BUFFERS, COLUMNS=with_columns, FRONT=ALLOWED_FRONT, num_warps=4,
            maxnreg=REGISTERS)
        return out, lse

    # Inside torch.compile the kernel is an opaque op (dynamo does not trace Gluon launches); outside,
    # ``_launch`` is called directly, without the op's dispatch cost.
    _hopper_strips = torch.library.custom_op("minference_flex::hopper_strips", _launch, mutates_args=())

    @_hopper_strips.register_fake
    def _(query, key, value, column_keys, column_values, tops, words, full, counts, sink, columns, col_counts, allowed,
          q_start, width, scale):
        B, Hq, Nq, D = query.shape
        return query.new_empty(B, Hq, Nq, D), query.new_empty(B, Hq, Nq, dtype=torch.float32)


def hopper_attention(query: Tensor, key: Tensor, value: Tensor, strips: Strips, segments: Segments,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Attention of query [B, Hq, Nq, D] over the diagonal-strip and column cells of ``strips`` (no sink
    strips): (out [B, Hq, Nq, D] in the query dtype, lse [B, Hq, Nq] float32, -inf for rows with no
    such cell). ``segments``: ``strip_segments(strips)``, made by the caller (the plan); the columns'
    keys and values are gathered here (``block_masks.gather_columns``, [B, Hq, V, D]).
    ``supported(query, key, value)`` must hold; query, key and value must be TMA-addressable
    (``contract.tma_operand`` makes them so)."""
    if not supported(query, key, value):
        raise ValueError("the Hopper strip kernel needs a compute-capability 9.x GPU, Triton >= 3.6 (Gluon), "
                         f"bf16/fp16 and head dim in {HEAD_DIMS}; got {query.dtype}, head dim {query.shape[-1]} "
                         f"on {query.device}")
    column_keys = column_values = None
    if strips.has_columns:
        column_keys, column_values = gather_columns(key, strips.columns), gather_columns(value, strips.columns)
    launch = torch.ops.minference_flex.hopper_strips if torch.compiler.is_compiling() else _launch
    return launch(query, key, value, column_keys, column_values, segments.tops, segments.words, segments.full,
                  segments.counts, strips.sink, strips.columns, strips.col_counts, strips.allowed, strips.q_start,
                  segments.width, scale)
