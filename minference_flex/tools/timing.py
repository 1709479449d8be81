"""Timing and row checks the benchmarks share (bench, ttft, layer): milliseconds of calls (CUDA
events or wall clock) and the float64 check of sampled query rows against the kept cells."""
from __future__ import annotations

import statistics
import time

import torch


def time_ms(fn, warmup: int = 3, reps: int = 10, device: str = "cuda") -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA events; on the
    CPU wall-clock time)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_runs(fn, reps, device))


def timed_runs(fn, reps: int, device: str = "cuda") -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()``: CUDA events on ``"cuda"``, else wall clock."""
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``reps`` runs (the caller warms up)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sample_rows(n: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` query rows (fixed seed) spread over the prompt, the last 8 always among them."""
    if count >= n:
        return torch.arange(n, device=device)
    g = torch.Generator().manual_seed(1)
    last = min(8, count)
    rows = torch.cat([torch.randperm(n - last, generator=g)[: count - last], torch.arange(n - last, n)])
    return rows.sort().values.to(device)


def row_stats(q, k, v, out, kept: torch.Tensor, rows: torch.Tensor, scale: float) -> tuple[float, float]:
    """On query ``rows`` (kept [B, H, R, Nk] bool): the attention recall of the kept cells (mean over
    heads and rows of the dense causal softmax mass they hold) and the largest relative error
    ||out - ref|| / ||ref|| over heads and rows, ref being float64 attention over the kept cells."""
    G = q.shape[1] // k.shape[1]
    Nq, Nk = q.shape[2], k.shape[2]
    causal = torch.arange(Nk, device=q.device) <= (Nk - Nq + rows)[:, None]
    recalls, errs = [], []
    for h in range(q.shape[1]):  # one head at a time: float64 keys of all heads are 34 GB at 1M tokens
        kh, vh = k[:, h // G].double(), v[:, h // G].double()
        scores = (q[:, h, rows].double() @ kh.transpose(-1, -2)) * scale          # [B, R, Nk]
        recalls.append((scores.masked_fill(~causal, float("-inf")).softmax(-1) * kept[:, h]).sum(-1))
        ref = scores.masked_fill(~kept[:, h], float("-inf")).softmax(-1) @ vh
        errs.append((out[:, h, rows].double() - ref).norm(dim=-1) / ref.norm(dim=-1))
    recall, err = torch.stack(recalls, 1).mean().item(), torch.stack(errs, 1)
    return recall, err.max().item()
