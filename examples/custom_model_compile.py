"""A small decoder of one's own with MInference sparse attention, under torch.compile(fullgraph=True).

Every layer calls ``mf.sparse_attention(q, k, v, patterns)`` with its own per-head patterns; the
whole model (estimation, BlockMask building and the FlexAttention kernel of every layer) is traced
into one graph and compiled once per prompt length. The compiled output is checked against the same
model run uncompiled, with the kernel's eager emulation (``compiled=False``) and with a float64
softmax over the cells ``mf.token_mask`` names. Random weights: this shows the mechanics, not quality.

    pip install -e . && python examples/custom_model_compile.py [--length N] [--device cpu] [--dtype bfloat16]

Defaults: CUDA when available (bfloat16, 2048 tokens), else CPU (float32, 1024 tokens; the first
call compiles for about a minute on 2 cores). docs/custom_model_compile.md explains what is traced.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import minference_flex as mf

# The per-head pattern tables are behind an lru_cache (one host-to-device copy per pattern list in
# eager mode); dynamo traces through it and makes them constants of the graph, which is what we want.
warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")

# One list per layer, one entry per query head: each layer mixes kinds and budgets of its own.
PATTERNS = [
    [["vertical_and_slash", 64, 256], ["vertical_and_slash", 30, 100], ["stream_llm", 64, 256],
     ["stream_llm", 16, 128], ["block_sparse", 4, 0], ["block_sparse", 2, 0], ["dense", 0, 0],
     ["vertical_and_slash", 100, 400]],
    [["stream_llm", 4, 64], ["block_sparse", 8, 0], mf.Pattern("block_sparse", 2, block_size=128),
     ["vertical_and_slash", 200, 300], ["vertical_and_slash", 40, 120], ["stream_llm", 128, 512],
     ["dense", 0, 0], ["block_sparse", 1, 0]],
]


@dataclass
class Config:
    vocab_size: int = 512
    dim: int = 512
    n_heads: int = 8
    n_kv_heads: int = 2          # GQA: 4 query heads per key/value head
    head_dim: int = 64
    hidden: int = 1024
    rope_base: float = 10000.0


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def sparse(q, k, v, patterns):
    """What the compiled model runs: estimation, masks and kernel, all traced."""
    return mf.sparse_attention(q, k, v, patterns)


def emulated(q, k, v, patterns):
    """The eager emulation of exactly the cells the kernel visits (small lengths only)."""
    return mf.sparse_attention(q, k, v, patterns, compiled=False)


def reference(q, k, v, patterns):
    """float64 softmax over the cells mf.token_mask keeps (small lengths only)."""
    mask = mf.token_mask(q, k, patterns)                               # [B, Hq, N, N] bool
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, patterns):
        super().__init__()
        self.cfg, self.patterns = cfg, patterns   # patterns: a Python constant of the traced graph
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attend):
        B, N, _ = x.shape
        c = self.cfg
        q, k, v = self.wqkv(x).split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                                      c.n_kv_heads * c.head_dim], dim=-1)
        q = q.view(B, N, c.n_heads, c.head_dim).transpose(1, 2)         # [B, Hq, N, D]
        k = k.view(B, N, c.n_kv_heads, c.head_dim).transpose(1, 2)      # [B, Hkv, N, D]
        v = v.view(B, N, c.n_kv_heads, c.head_dim).transpose(1, 2)
        y = attend(rope(q, cos, sin), rope(k, cos, sin), v, self.patterns)
        return self.wo(y.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config, patterns):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg, patterns)
        self.w1 = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attend):
        x = x + self.attn(self.attn_norm(x), cos, sin, attend)
        gate, up = self.w1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, cfg: Config, patterns=PATTERNS):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, p) for p in patterns)
        self.norm = nn.RMSNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens, attend=sparse):
        c = self.cfg
        pos = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.float32)
        inv = c.rope_base ** -(torch.arange(0, c.head_dim, 2, device=tokens.device) / c.head_dim)
        angles = torch.outer(pos, inv)
        x = self.embed(tokens)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.out(self.norm(x))


def timed(fn, *args, repeat: int = 1):
    """(result, mean seconds over ``repeat`` calls)."""
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    sync()
    return out, (time.perf_counter() - start) / repeat


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=None, help="prompt tokens (default 1024 on CPU, 2048 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    length = args.length or (2048 if cuda else 1024)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))

    torch.manual_seed(0)
    model = Decoder(Config()).to(device, dtype).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (1, length), device=device)
    # dynamic=False: one graph per prompt length. The planning does not trace with a symbolic length
    # yet, and on CPU the FlexAttention template does not build with one (docs/custom_model_compile.md).
    compiled = torch.compile(model, fullgraph=True, dynamic=False)

    out, first = timed(compiled, tokens)                  # traces, compiles, runs
    _, steady = timed(compiled, tokens, repeat=3)
    emu, t_emu = timed(lambda t: model(t, attend=emulated), tokens)
    ref, t_ref = timed(lambda t: model(t, attend=reference), tokens)
    scale = ref.double().abs().max().item()
    print(f"{device.type} {dtype} {length} tokens, {len(model.layers)} layers, {model.cfg.n_heads} query heads, "
          f"{model.cfg.n_kv_heads} key/value heads")
    print(f"compiled model: first call (compile) {first:.1f} s, then {steady * 1e3:.1f} ms per call")
    print(f"uncompiled: eager emulation {t_emu * 1e3:.0f} ms, float64 masked reference {t_ref * 1e3:.0f} ms")
    for name, other in (("eager emulation", emu), ("float64 masked reference", ref)):
        err = (out.double() - other.double()).abs().max().item()
        print(f"max |compiled - {name}| = {err:.2e} (logits up to {scale:.2f})")


if __name__ == "__main__":
    main()
