"""RoPE-structured synthetic long-context inputs: the documented benchmark input.

These are the inputs on which MInference's reference pipeline was measured (the project's
comparison in docs/performance.md), so timings on them compare directly with those numbers. Each KV head
has a content direction shared by its keys and by the queries of its GQA group, so after RoPE the
scores decay with distance (local slashes); key 0 is an attention sink and 64 random keys per KV
head are heavy hitters (verticals); queries are scaled by 1.5 so the last queries' attention is
peaky. With the same seed and device the tensors are bit-identical to the reference generator.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rope(x: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (half-split layout) of x [..., N, D] at positions 0..N-1."""
    N, D = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = torch.arange(N, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def structured_qk(Hq: int, Hkv: int, N: int, D: int, theta: float = 500000.0, device="cuda",
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """q [1, Hq, N, D] and k [1, Hkv, N, D] in bfloat16 on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(Hkv, 1, D, device=device, generator=g)
    q = base.repeat_interleave(Hq // Hkv, 0) + 0.8 * torch.randn(Hq, N, D, device=device, generator=g)
    k = base + 0.8 * torch.randn(Hkv, N, D, device=device, generator=g)
    heavy = torch.randint(1, N, (Hkv, 64), device=device, generator=g)
    k.scatter_(1, heavy[..., None].expand(Hkv, 64, D), (2.5 * base).expand(Hkv, 64, D).contiguous())
    k[:, 0] = 4 * base[:, 0]
    return (rope(q, theta) * 1.5)[None].to(torch.bfloat16), rope(k, theta)[None].to(torch.bfloat16)


def structured_qkv(Hq: int, Hkv: int, N: int, D: int, device="cuda", seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``structured_qk`` plus standard-normal values [1, Hkv, N, D] (bfloat16)."""
    q, k = structured_qk(Hq, Hkv, N, D, device=device, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    v = torch.randn(1, Hkv, N, D, device=device, generator=g).to(torch.bfloat16)
    return q, k, v
