"""Running FlexAttention: the compiled kernel (one compile for all lengths and budgets), or an eager
emulation of exactly what that kernel computes, for tests at small sizes."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from block_masks import visited_cells

try:  # torch >= 2.9; older versions return the log-sum-exp through return_lse
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - exercised on old torch only
    AuxRequest = None

_compiled_flex = None


def compiled_flex():
    """The process-wide ``torch.compile(flex_attention, dynamic=True)``."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def _emulate(block_mask: BlockMask) -> BlockMask:
    """A BlockMask whose mask_mod alone yields the cells the kernel visits (eager flex_attention
    ignores the tile lists and evaluates mask_mod everywhere)."""
    cells = visited_cells(block_mask)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=block_mask.kv_num_blocks,
        kv_indices=block_mask.kv_indices,
        full_kv_num_blocks=block_mask.full_kv_num_blocks,
        full_kv_indices=block_mask.full_kv_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=lambda b, h, q, kv: cells[b, h, q, kv],
        seq_lengths=block_mask.seq_lengths,
        compute_q_blocks=False,
    )


def flex(query: Tensor, key: Tensor, value: Tensor, block_mask: BlockMask, scale: float, *,
         compiled: bool, kernel_options: dict | None = None) -> tuple[Tensor, Tensor]:
    """Attention of query [B, Hq, M, D] over key/value [B, Hkv, N, D] restricted to ``block_mask``.

    Returns (out [B, Hq, M, D] in the query dtype, lse [B, Hq, M] float32, -inf for empty rows).
    Inside an outer torch.compile the call is traced into that graph; otherwise ``compiled`` picks
    the compiled kernel or the eager emulation. On CUDA the kernel's tile is the mask's tile unless
    ``kernel_options`` says otherwise.
    """
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    if query.is_cuda:
        q_tile, kv_tile = block_mask.BLOCK_SIZE
        kwargs["kernel_options"] = {"BLOCK_M": q_tile, "BLOCK_N": kv_tile, **(kernel_options or {})}
    if AuxRequest is not None:
        kwargs["return_aux"] = AuxRequest(lse=True)
    else:  # pragma: no cover
        kwargs["return_lse"] = True
    if torch.compiler.is_compiling():
        out, aux = flex_attention(query, key, value, **kwargs)
    elif compiled:
        out, aux = compiled_flex()(query, key, value, **kwargs)
    else:
        kwargs["block_mask"] = _emulate(block_mask)
        kwargs.pop("kernel_options", None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            out, aux = flex_attention(query, key, value, **kwargs)
    lse = aux.lse if AuxRequest is not None else aux
    return out, lse


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine two attentions over disjoint key sets into one (float32). Rows empty in ``b``
    (lse -inf) keep ``a``; ``a`` must have no empty row."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return out_a.float() * w_a + out_b.float() * w_b
