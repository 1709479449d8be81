"""The public attention op: plan (estimate + build BlockMasks), then run (sparse kernel + merge)."""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from block_masks import (
    Segments,
    Selection,
    Strips,
    TileGeometry,
    Tiles,
    gather_columns,
    main_block_mask,
    select,
    strip_layout,
    strip_cells,
    strip_segments,
    token_cells,
    vertical_block_mask,
)

from minference_flex.head_patterns import parse_patterns
from minference_flex.kernels.flex import cell_mask, flex, merge
from minference_flex.kernels.dispatch import BACKENDS, check_kernel, strip_attention, strip_attention_op, strip_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensors(query: Tensor, key: Tensor, value: Tensor | None, *, with_value: bool = True):
    """The query, key (and value) tensors: types, ranks, dtypes, devices and shapes (Python only)."""
    named = [("query", query), ("key", key)] + ([("value", value)] if with_value else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in named:
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, length, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but query has {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on device {t.device} but query is on device {query.device}")
    B, Hq, Nq, D = query.shape
    if key.shape[0] != B:
        raise ValueError(f"key batch {key.shape[0]} differs from query batch {B}")
    if key.shape[-1] != D:
        raise ValueError(f"key head dim {key.shape[-1]} differs from query head dim {D}")
    if D == 0:
        raise ValueError("head dim must be at least 1, got 0")
    if with_value and value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    Hkv, Nk = key.shape[1], key.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Nq > Nk:
        raise ValueError(f"need query length <= key length, got {Nq} queries and {Nk} keys")


def _scale(scale, head_dim: int) -> float:
    """The softmax scale as a Python float: 1 / sqrt(head_dim) for None, else a positive finite real
    number: a Python or numpy int or float, or a 0-d real tensor (a CUDA one is read back to the host,
    a synchronisation). TypeError for other types (bools included), ValueError for other values."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if type(scale) is not float:
        if isinstance(scale, torch.Tensor):
            if scale.dim() != 0 or scale.dtype == torch.bool or scale.is_complex():
                raise TypeError(f"a tensor scale must be a 0-d real tensor, got shape {tuple(scale.shape)} "
                                f"and dtype {scale.dtype}")
            scale = scale.item()
        elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number (int, float, numpy number or 0-d tensor), "
                            f"got {type(scale).__name__} {scale!r}")
        try:
            scale = float(scale)
        except OverflowError:
            scale = math.inf
    if not 0 < scale < math.inf:  # comparisons, not math.isfinite: dynamo traces them on a symbolic scale
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return scale


def _check_inference(query: Tensor, key: Tensor, value: Tensor) -> None:
    """The kernels are inference only: raise before any of them (and any compiled state) is touched
    when autograd would need the attention's gradient."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise ValueError("minference_flex's sparse attention is inference only (no backward): an input "
                         "requires grad; call it under torch.no_grad() or torch.inference_mode(), or pass "
                         "detached tensors")


def _check(query: Tensor, key: Tensor, value: Tensor | None, patterns: Sequence, scale: float | None,
           *, with_value: bool = True) -> tuple[tuple, float]:
    """The checked call: (one Pattern per query head, the scale as a float)."""
    _check_tensors(query, key, value, with_value=with_value)
    if with_value:
        _check_inference(query, key, value)
    return parse_patterns(patterns, query.shape[1]), _scale(scale, query.shape[-1])


@dataclass(frozen=True)
class AttentionPlan:
    """Everything one sparse attention call needs besides the tensors: the per-head selection and
    up to three parts over disjoint cells, merged through their log-sum-exp:

    - ``strips``: the kept diagonals, sinks and vertical columns, for the strip kernel (CUDA), or None;
    - ``main``: a BlockMask over queries padded by ``pad`` rows in front, of the block-sparse
      blocks (with ``strips``) or of everything but the gathered vertical columns (without), or None;
    - ``vertical``: without ``strips``, the BlockMask over the gathered vertical columns, when some
      head has them and they are not folded into ``main``.

    ``run_plan`` checks that its inputs have the shapes the plan was made for (batch, query heads and
    length, key length from ``selection``; ``head_dim`` and ``kv_heads`` where known) and its device.
    """

    selection: Selection
    main: BlockMask | None
    vertical: BlockMask | None
    pad: int
    scale: float
    tiles: Tiles
    kernel_options: dict | None = None
    strips: Strips | None = None
    head_dim: int | None = None   # None: not checked by run_plan (plan_selection without it)
    kv_heads: int | None = None
    strip_backend: str | None = None   # with strips: "triton" or "hopper" (kernels.dispatch.strip_backend)
    segments: Segments | None = None   # with the Hopper backend: strip_segments(strips)

    def flex_tiles(self) -> Tensor:
        """[B, Hq] int64: tiles the FlexAttention parts visit per head (partial and full tiles of the
        main mask, the tiles of the gathered vertical columns), at the plan's tile size."""
        B, H = self.selection.offsets.shape[:2]
        visited = torch.zeros(B, H, dtype=torch.int64, device=self.selection.offsets.device)
        for mask in (self.main, self.vertical):
            if mask is not None:
                visited = visited + mask.kv_num_blocks.sum(-1, dtype=torch.int64)
                if mask.full_kv_num_blocks is not None:
                    visited = visited + mask.full_kv_num_blocks.sum(-1, dtype=torch.int64)
        return visited

    def visited_tiles(self) -> Tensor:
        """[B, Hq] int64: tiles the kernel visits per head: ``flex_tiles`` and the strip kernel's
        64x64 blocks (strips and blocks of gathered columns)."""
        visited = self.flex_tiles()
        return visited + self.strips.visited() if self.strips is not None else visited

    def causal_tiles(self) -> int:
        """Tiles one head of dense causal attention visits at the same tile size and alignment."""
        geo = TileGeometry.of(self.selection, self.tiles)
        r = self.tiles.q // self.tiles.kv
        first = geo.base // self.tiles.q
        return sum(min(r * (first + t) + r, geo.n_k_tiles) for t in range(geo.n_q_tiles))

    def tile_counts(self) -> dict:
        """Tiles the kernel visits (``partial`` and ``full`` tiles of the main mask, ``vertical``
        tiles of gathered columns in FlexAttention, ``strips``: the strip kernel's strips and column
        blocks, ``visited`` in all), the ``causal`` tiles of dense
        attention at the same tile size, and the visited ``fraction`` of them. Reads counts back
        from the device (a host sync): for reports, not for the hot path."""
        main = self.main
        partial = int(main.kv_num_blocks.sum()) if main is not None else 0
        full = int(main.full_kv_num_blocks.sum()) if main is not None else 0
        vertical = int(self.vertical.kv_num_blocks.sum()) if self.vertical is not None else 0
        strips = int(self.strips.visited().sum()) if self.strips is not None else 0
        B, H = self.selection.offsets.shape[:2]
        causal = B * H * self.causal_tiles()
        visited = partial + full + vertical + strips
        return dict(partial=partial, full=full, vertical=vertical, strips=strips, visited=visited,
                    causal=causal, fraction=visited / causal)


def plan_attention(query: Tensor, key: Tensor, patterns: Sequence, *, scale: float | None = None,
                   full_width: bool | None = None, fold_columns: bool | None = None, strips: bool | None = None,
                   tiles: Tiles = Tiles(), kernel_options: dict | None = None,
                   strip_kernel: str = "auto", scored: tuple[Tensor, Tensor] | None = None) -> AttentionPlan:
    """Estimate each head's pattern from the prompt and build the kernel's metadata (no host sync).

    ``strips`` computes the kept diagonals, sinks and vertical columns with the strip kernel (``block_masks.strips``;
    the default on CUDA) instead of FlexAttention tiles. ``full_width`` pads the tile lists to every
    key tile and ``fold_columns`` puts the vertical columns into the main mask instead of a gathered
    second part, as the compiled CPU kernel requires (it returns no log-sum-exp to merge parts with).
    Both default to what the compiled kernel of the query's device needs.
    ``tiles`` sets the BlockMask tile (block-sparse block sizes must be multiples of its query side);
    ``kernel_options`` are passed to the FlexAttention kernel on CUDA.
    ``strip_kernel`` picks the backend of the strip part (``kernels.dispatch.KERNELS``), stored as
    ``plan.strip_backend``: ``"auto"`` the Hopper Gluon kernel where it runs these tensors
    (``hopper_strips.supported``), else the Triton kernel; ``"hopper"`` where it does not run them is a
    ValueError. The Hopper backend's segments are built here (``plan.segments``).

    ``scale``: a positive finite real number (Python or numpy, or a 0-d tensor: a CUDA tensor is read
    back to the host, one synchronisation; pass a Python float on the hot path); default 1/sqrt(D).
    Empty inputs (batch 0, no query heads or no queries) give an empty plan, with no parts, for which
    ``run_plan`` returns the empty output [B, Hq, Nq, D].

    ``scored``: the scored heads' kept columns and offsets estimated elsewhere (``block_masks.select``'s
    argument; context parallelism passes those of the whole sequence), else estimated from ``query``.
    """
    patterns, scale = _check(query, key, None, patterns, scale, with_value=False)
    check_kernel(strip_kernel)
    if query.numel() == 0:  # head dim >= 1 (checked): batch, query heads or queries are 0
        return _empty_plan(query, key, scale, tiles, kernel_options)
    cpu = query.device.type == "cpu"
    fold_columns = cpu if fold_columns is None else fold_columns
    strips = not (cpu or fold_columns) if strips is None else strips
    return plan_selection(select(query, key, patterns, scale, scored), scale=scale,
                          full_width=cpu if full_width is None else full_width, fold_columns=fold_columns,
                          strips=strips, tiles=tiles, kernel_options=kernel_options,
                          head_dim=query.shape[-1], kv_heads=key.shape[1],
                          strip_backend=strip_backend(query, key, strip_kernel) if strips else "triton")


def _empty_plan(query: Tensor, key: Tensor, scale: float, tiles: Tiles, kernel_options: dict | None) -> AttentionPlan:
    """The plan of an empty call: no cells, no parts."""
    B, Hq, Nq, D = query.shape
    device = query.device
    selection = Selection(
        nq=Nq, nk=key.shape[2],
        offsets=torch.zeros(B, Hq, key.shape[2], dtype=torch.bool, device=device),
        sink=torch.zeros(Hq, dtype=torch.int32, device=device),
        block_sparse=torch.zeros(Hq, dtype=torch.bool, device=device),
        columns=None, blocks=(), max_sink=0, max_offsets=0,
    )
    return AttentionPlan(selection=selection, main=None, vertical=None, pad=0, scale=scale, tiles=tiles,
                         kernel_options=kernel_options, head_dim=D, kv_heads=key.shape[1])


def plan_selection(selection: Selection, *, scale: float, full_width: bool, fold_columns: bool,
                   strips: bool = False, tiles: Tiles = Tiles(), kernel_options: dict | None = None,
                   head_dim: int | None = None, kv_heads: int | None = None,
                   strip_backend: str = "triton") -> AttentionPlan:
    """The kernel metadata of an already estimated Selection (see ``plan_attention``); ``head_dim``
    and ``kv_heads``, where given, are checked by ``run_plan``. ``strip_backend`` (``"triton"`` or
    ``"hopper"``, as ``kernels.dispatch.strip_backend`` chose it for the tensors) runs the strips."""
    bad = sorted({g.block_size for g in selection.blocks if g.block_size % tiles.q})
    if bad:
        raise ValueError(f"block sizes {bad} (block_sparse, block_mass heads) are not multiples of the query tile {tiles.q}")
    if strips and fold_columns:
        raise ValueError("strips=True computes the vertical columns in the strip kernel: it needs fold_columns=False")
    if strip_backend not in BACKENDS:
        raise ValueError(f"strip_backend must be one of {BACKENDS}, got {strip_backend!r}")
    split = selection.columns is not None and not fold_columns and not strips
    main = None
    if not strips or selection.blocks:
        main = main_block_mask(selection, tiles, full_width=full_width, fold_columns=fold_columns, diagonals=not strips)
    layout = strip_layout(selection) if strips else None
    hopper = strips and strip_backend == "hopper"
    return AttentionPlan(
        selection=selection,
        main=main,
        vertical=vertical_block_mask(selection, tiles) if split else None,
        pad=TileGeometry.of(selection, tiles).pad,
        scale=scale,
        tiles=tiles,
        kernel_options=kernel_options,
        strips=layout,
        head_dim=head_dim,
        kv_heads=kv_heads,
        strip_backend=strip_backend if strips else None,
        segments=strip_segments(layout) if hopper else None,
    )


def _strip_part(plan: AttentionPlan, query: Tensor, key: Tensor, value: Tensor, compiled: bool):
    """(out, lse) of the strip cells: the strip kernels of the plan's backend (``plan.strip_backend``,
    ``plan.segments``), or their eager emulation with ``compiled=False``."""
    if compiled or torch.compiler.is_compiling():
        if query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the strip kernel runs on CUDA: on CPU plan with strips=False, "
                             "or run with compiled=False (eager emulation)")
        run = strip_attention_op if torch.compiler.is_compiling() else strip_attention
        return run(query, key, value, plan.strips, plan.scale, plan.strip_backend, plan.segments)
    cells = strip_cells(plan.strips) > 0
    return flex(query, key, value, cell_mask(cells, (plan.tiles.q, plan.tiles.kv)), plan.scale, compiled=False)


def _check_plan(plan: AttentionPlan, query: Tensor, key: Tensor, value: Tensor) -> None:
    """``run_plan``'s inputs: a plan, and tensors of the shapes and device it was made for. Compares
    Python shapes only (no host synchronisation)."""
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"plan must be an AttentionPlan (from mf.plan_attention), got {type(plan).__name__}")
    _check_tensors(query, key, value)
    _check_inference(query, key, value)
    sel = plan.selection
    B, Hq = sel.offsets.shape[:2]
    B_, Hq_, Nq_, D_ = query.shape
    wanted = [("batch", B, B_), ("query heads", Hq, Hq_), ("key heads", plan.kv_heads, key.shape[1]),
              ("query length", sel.nq, Nq_), ("key length", sel.nk, key.shape[2]), ("head dim", plan.head_dim, D_)]
    wrong = [f"{name} {made} (got {got})" for name, made, got in wanted if made is not None and made != got]
    if sel.offsets.device != query.device:
        wrong.append(f"device {sel.offsets.device} (got {query.device})")
    if wrong:
        raise ValueError("run_plan: the plan was made for " + ", ".join(wrong)
                         + "; make a plan for these inputs with plan_attention")


def run_plan(plan: AttentionPlan, query: Tensor, key: Tensor, value: Tensor, *, compiled: bool = True) -> Tensor:
    """Sparse attention [B, Hq, Nq, D] (query dtype) of a plan made for these query and key, with the
    kernels the plan chose (``plan.strip_backend``: see ``plan_attention``'s ``strip_kernel``).
    ValueError if the inputs are not those the plan was made for (shapes, device: Python checks only)."""
    _check_plan(plan, query, key, value)
    if query.requires_grad or key.requires_grad or value.requires_grad:
        # Outside grad mode (checked above) an input may still require grad: the kernels refuse it.
        query, key, value = query.detach(), key.detach(), value.detach()  # also where no strip kernel runs (no strips, or the eager emulation)
    if plan.vertical is not None and compiled and query.device.type == "cpu":
        raise ValueError("the compiled CPU kernel returns no log-sum-exp to merge a separate vertical part: "
                         "plan with fold_columns=True (the CPU default), or run with compiled=False")
    n_parts = sum(part is not None for part in (plan.strips, plan.main, plan.vertical))
    if n_parts == 0:  # the plan of an empty call
        return query.new_zeros(query.shape)
    parts = []
    if plan.strips is not None:
        parts.append(_strip_part(plan, query, key, value, compiled))
    # The FlexAttention parts run over queries padded by plan.pad rows in front (tile alignment);
    # the strips start anywhere and need no padding.
    needs_pad = plan.pad and (plan.main is not None or plan.vertical is not None)
    q = torch.nn.functional.pad(query, (0, 0, plan.pad, 0)) if needs_pad else query
    options = plan.kernel_options
    flex_parts = []
    if plan.main is not None:
        flex_parts.append(flex(q, key, value, plan.main, plan.scale, compiled=compiled, kernel_options=options,
                               lse=n_parts > 1))
    if plan.vertical is not None:
        columns = plan.selection.columns
        flex_parts.append(flex(q, gather_columns(key, columns), gather_columns(value, columns), plan.vertical,
                               plan.scale, compiled=compiled, kernel_options=options, lse=True))
    parts += [(out[:, :, plan.pad:], None if lse is None else lse[..., plan.pad:]) for out, lse in flex_parts]
    return parts[0][0].to(query.dtype) if n_parts == 1 else merge(parts, query.dtype)


def sparse_attention(query: Tensor, key: Tensor, value: Tensor, patterns: Sequence, *,
                     scale: float | None = None, compiled: bool = True) -> Tensor:
    """Causal attention restricted, head by head, to MInference's sparse patterns.

    query [B, Hq, Nq, D]; key, value [B, Hkv, Nk, D] with Hq % Hkv == 0 and Nq <= Nk. The queries
    are the last Nq positions (query i at Nk - Nq + i). ``patterns``: one entry per query head, an
    ``mf.Pattern`` or ``[type, a, b(, score)]``. Returns [B, Hq, Nq, D] in the query's dtype, equal
    to softmax(q k^T * scale) v restricted to ``token_mask(query, key, patterns)``.

    ``compiled=False`` runs an eager emulation of the kernel that materialises every score: for
    tests and inspection at small sizes only. Inside an outer ``torch.compile`` the kernel is traced
    into the caller's graph. On CPU the compiled kernel (inference only, one compile per prompt
    length) gets one mask with the vertical columns folded in: it cannot return a log-sum-exp.
    """
    _, scale = _check(query, key, value, patterns, scale)  # the scale read once (a 0-d CUDA tensor syncs)
    plan = kernel_plan(query, key, patterns, scale=scale, compiled=compiled)
    return run_plan(plan, query, key, value, compiled=compiled)


def kernel_plan(query: Tensor, key: Tensor, patterns: Sequence, *, scale: float | None = None,
                compiled: bool = True, scored: tuple[Tensor, Tensor] | None = None) -> AttentionPlan:
    """The plan ``sparse_attention(..., compiled=compiled)`` runs: the layout its kernel needs (on CPU
    under the compiled kernel full-width tile lists with the vertical columns folded in, else the
    device's default), so that ``run_plan(kernel_plan(...), ...)`` equals ``sparse_attention(...)``.
    ``scored``: as ``plan_attention``'s."""
    cpu_kernel = query.device.type == "cpu" and (compiled or torch.compiler.is_compiling())
    return plan_attention(query, key, patterns, scale=scale, full_width=cpu_kernel, fold_columns=cpu_kernel,
                          scored=scored)


def token_mask(query: Tensor, key: Tensor, patterns: Sequence, *, scale: float | None = None) -> Tensor:
    """The cells [B, Hq, Nq, Nk] bool that ``sparse_attention`` computes for these inputs.

    Builds a dense mask: for tests and inspection at small sizes; the fast path never builds it.
    """
    patterns, scale = _check(query, key, None, patterns, scale, with_value=False)
    if query.numel() == 0:  # empty call: an empty mask
        return torch.zeros(*query.shape[:3], key.shape[2], dtype=torch.bool, device=query.device)
    return token_cells(select(query, key, patterns, scale))
