"""Running FlexAttention: the compiled kernel (one compile for all lengths and budgets), or an eager
emulation of exactly what that kernel computes, for tests at small sizes."""
from __future__ import annotations

import functools
import math
import warnings
from collections import Counter

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from block_masks import visited_cells

from minference_flex.kernels.contract import HAS_TRITON
from minference_flex.kernels.merge import merge_pair

try:  # torch >= 2.9; older versions return the log-sum-exp through return_lse
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - exercised on old torch only
    AuxRequest = None

#: Kernel options per BlockMask tile on CUDA, measured on the H100 (docs/performance.md): the
#: default Triton configuration for 64x64 tiles runs dense attention 1.8x slower than this one.
CUDA_KERNEL_OPTIONS = {(64, 64): {"num_warps": 4, "num_stages": 2}}


@functools.lru_cache(maxsize=None)
def compiled_flex(options: tuple[tuple[str, int], ...] = (), signature: tuple = (), generation: int = 0):
    """``torch.compile(flex_attention, dynamic=True)`` with these kernel options baked in, one per
    kernel ``signature`` (dtype, head counts, head dim, ...) and ``generation`` (``_GENERATIONS``).

    The options are closed over, not passed: passed as arguments, a second set of options would
    make dynamo trace them as symbolic integers, which the kernel cannot be built from. Each
    signature gets a code object of its own because dynamo keeps one cache, and one recompile limit,
    per code object: past that limit it would silently run flex_attention eagerly, which ignores
    the tile lists (see ``_NO_EAGER_FALLBACK``).
    """
    kernel_options = dict(options)

    def attend(query, key, value, block_mask, score_mod, enable_gqa, **aux):
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                              enable_gqa=enable_gqa, kernel_options=kernel_options or None, **aux)

    attend.__code__ = attend.__code__.replace(co_name=f"attend_{abs(hash((options, signature))):x}_{generation}")
    # The CPU template fails to build with dynamic shapes (torch 2.13): one compile per length there.
    return torch.compile(attend, dynamic=signature[:1] != ("cpu",))


# Never let dynamo fall back to eager execution: eager flex_attention evaluates mask_mod on every
# cell and ignores the BlockMask's tile lists, so a fallback would be slow *and* compute other cells.
# The limit is raised for the CPU kernel, which compiles once per prompt length.
_NO_EAGER_FALLBACK = {"fail_on_recompile_limit_hit": True, "recompile_limit": 64}

#: Per (options, signature), how many of its compiled functions failed: dynamo marks a code object
#: whose compile raised as one to skip, and would then run flex_attention eagerly on every later
#: call (tile lists ignored: other cells, no error), so a failure moves on to a fresh code object.
_GENERATIONS: Counter = Counter()


@torch.compiler.assume_constant_result
def _patch_cpu_lowering() -> bool:
    """Work around three bugs of torch 2.13's CPU FlexAttention lowering (``lower_cpu``) that show
    only inside an outer ``torch.compile``, where the masks are built in the same graph:

    1. it records the tensors captured by ``mask_mod`` / ``score_mod`` as buffers *before* it
       realizes them: a captured tensor computed in the graph (the per-head tables of the sparse
       masks) is still an unnamed ``Pointwise`` node, the C++ template fails to render and
       lowering ends in ``NoValidChoicesError``. The standalone kernel does not see this: its
       captures are graph inputs, already buffers.
    2. the C++ template reads its tensors from the start of their buffers and ignores a view's
       storage offset: a value sliced out of a fused qkv projection (offset ``(Hq + Hkv) * D``)
       is read from the queries' storage instead, silently giving wrong results. (Inductor
       copies q/k/v when two of them share a buffer, which hides this in the common case.)
    3. it lowers ``mask_mod`` in a graph of its own, which does not know the outer graph's mutated
       buffers: a captured tensor made by scattering into zeros (the kept offsets of
       ``vertical_and_slash`` heads when no other kind adds to them) is inlined as its zeros, not
       read, so the kept diagonals silently vanish.

    The wrapper realizes the captures first (what ``lower_cpu`` does itself a few lines later),
    copies any q/k/v or tile-list input that is a view with a storage offset, and lowers with
    inlining of computed buffers turned off. Installed once, from the traced call (dynamo runs this
    function while tracing and keeps its result); the CUDA lowering is not touched.
    """
    try:
        from torch._inductor.ir import ComputedBuffer, ExternKernel
        from torch._inductor.kernel.flex import flex_attention as lowering
    except ImportError:  # pragma: no cover - other torch layouts
        return False
    lower_cpu = getattr(lowering, "lower_cpu", None)
    if lower_cpu is None or getattr(lower_cpu, "_minference_flex", False):
        return lower_cpu is not None

    def from_start(x):
        if x is None:
            return x
        x = ExternKernel.realize_input(x)
        layout = x.maybe_get_layout()
        return ExternKernel.copy_input(x) if layout is not None and layout.offset != 0 else x

    @functools.wraps(lower_cpu)
    def patched_lower_cpu(query, key, value, subgraph, block_mask, scale, kernel_options,
                          score_mod_other_buffers, mask_mod_other_buffers):
        for buf in (*score_mod_other_buffers, *mask_mod_other_buffers):
            if hasattr(buf, "realize"):  # IR tensors; symbolic sizes have nothing to realize
                buf.realize()
        query, key, value = map(from_start, (query, key, value))
        # (q_len, kv_len, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, ...)
        block_mask = (*block_mask[:2], *map(from_start, block_mask[2:6]), *block_mask[6:])
        with ComputedBuffer.force_realize():  # read captured buffers, never inline them
            return lower_cpu(query, key, value, subgraph, block_mask, scale, kernel_options,
                             score_mod_other_buffers, mask_mod_other_buffers)

    patched_lower_cpu._minference_flex = True
    lowering.lower_cpu = patched_lower_cpu
    return True


def _scale_mod(scale: float, head_dim: int, device: torch.device):
    """None for the default 1/sqrt(D), else a score_mod that rescales by a captured tensor.

    The scale is never passed to the compiled kernel as a Python float: dynamo would specialise
    it, and on the next distinct value recompile it as a symbolic float. Under a user's
    torch.compile with dynamic shapes the head dim, and so the ratio, can be symbolic: comparing it
    would break the graph, so it is always applied then.
    """
    ratio = scale * math.sqrt(head_dim)
    if not isinstance(ratio, torch.SymFloat) and math.isclose(ratio, 1.0, rel_tol=1e-12):
        return None
    ratio = torch.full((), ratio, dtype=torch.float32, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * ratio

    return score_mod


def cell_mask(cells: Tensor, block_size: tuple[int, int]) -> BlockMask:
    """A BlockMask whose every tile is partial and whose mask_mod is ``cells`` [B, H, Nq, Nk] bool:
    what eager flex_attention (which evaluates mask_mod everywhere) needs to compute these cells."""
    B, H, nq, nk = cells.shape
    n_q, n_k = -(-nq // block_size[0]), -(-nk // block_size[1])
    num = torch.full((B, H, n_q), n_k, dtype=torch.int32, device=cells.device)
    idx = torch.arange(n_k, dtype=torch.int32, device=cells.device).expand(B, H, n_q, n_k).contiguous()
    return BlockMask.from_kv_blocks(kv_num_blocks=num, kv_indices=idx, BLOCK_SIZE=block_size,
                                    mask_mod=lambda b, h, q, kv: cells[b, h, q, kv], seq_lengths=(nq, nk),
                                    compute_q_blocks=False)


def _emulate(block_mask: BlockMask) -> BlockMask:
    """A BlockMask whose mask_mod alone yields the cells the kernel visits."""
    return cell_mask(visited_cells(block_mask), tuple(block_mask.BLOCK_SIZE))


def flex(query: Tensor, key: Tensor, value: Tensor, block_mask: BlockMask, scale: float, *,
         compiled: bool, kernel_options: dict | None = None, lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Attention of query [B, Hq, M, D] over key/value [B, Hkv, N, D] restricted to ``block_mask``.

    Returns (out [B, Hq, M, D] in the query dtype, lse [B, Hq, M] float32 with -inf for empty rows,
    or None when ``lse`` is False).
    Inside an outer torch.compile the call is traced into that graph; otherwise ``compiled`` picks
    the compiled kernel or the eager emulation. On CUDA the kernel's tile is the mask's tile unless
    ``kernel_options`` says otherwise.
    """
    enable_gqa = query.shape[1] != key.shape[1]
    score_mod = _scale_mod(scale, query.shape[-1], query.device)
    options = {}
    if query.is_cuda:
        tile = block_mask.BLOCK_SIZE
        options = {"BLOCK_M": tile[0], "BLOCK_N": tile[1], **CUDA_KERNEL_OPTIONS.get(tuple(tile), {}),
                   **(kernel_options or {})}
    if not lse:
        aux = {}
    elif AuxRequest is not None:
        aux = {"return_aux": AuxRequest(lse=True)}
    else:  # pragma: no cover - torch < 2.9
        aux = {"return_lse": True}
    if torch.compiler.is_compiling():
        if query.device.type == "cpu":
            _patch_cpu_lowering()
        result = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                  enable_gqa=enable_gqa, kernel_options=options or None, **aux)
    elif compiled:
        # Head counts and head dim stay static (they are part of the kernel's signature below).
        for t in (query, key, value):
            torch._dynamo.mark_static(t, 1)
            torch._dynamo.mark_static(t, 3)
        signature = (query.device.type, query.dtype, query.shape[1], key.shape[1], query.shape[-1],
                     score_mod is None, lse)
        slot = (tuple(sorted(options.items())), signature)
        attend = compiled_flex(*slot, _GENERATIONS[slot])
        try:
            with torch._dynamo.config.patch(**_NO_EAGER_FALLBACK):
                result = attend(query, key, value, block_mask, score_mod, enable_gqa, **aux)
        except BaseException:
            _GENERATIONS[slot] += 1
            raise
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            result = flex_attention(query, key, value, score_mod=score_mod, block_mask=_emulate(block_mask),
                                      enable_gqa=enable_gqa, **aux)
    if not lse:
        return result, None
    out, aux = result
    return out, (aux.lse if AuxRequest is not None else aux)


def merge(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Combine attentions over disjoint key sets, given as (out [B, H, M, D], lse [B, H, M]) pairs,
    into one in ``dtype``. A part empty for a row (lse -inf) adds nothing to it.

    On CUDA outside ``torch.compile`` the Triton kernel of ``kernels.merge`` merges pair by pair
    without float32 copies of the parts; elsewhere (and inside a compiled graph, which fuses it) the
    definition below."""
    if parts[0][0].is_cuda and HAS_TRITON and not torch.compiler.is_compiling():
        merged = parts[0]
        for i, part in enumerate(parts[1:], start=2):
            merged = merge_pair(merged, part, dtype if i == len(parts) else torch.float32)
        return merged[0]
    lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    lse = torch.where(torch.isinf(lse), 0.0, lse)  # a row empty everywhere stays 0, not nan
    return sum(out.float() * torch.exp(part_lse - lse).unsqueeze(-1) for out, part_lse in parts).to(dtype)
