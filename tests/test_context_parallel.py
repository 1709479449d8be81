"""Context parallelism (``minference_flex.context_parallel``) on CPU with the gloo backend.

``test_two_ranks_equal_single_process`` spawns 2 processes; each runs ``context_parallel_attention``
on its load-balanced shard of several cases (every pattern kind, GQA 8:2, batch 2, a block size of
128, a case of block kinds only, a given scale) in float32 with the eager emulation, and the main
process compares every rank's output with the rows of the single-process ``mf.sparse_attention``
(1e-5), with a refused call and a single-process call between the cases on every rank (the process
as a whole: neither changes a later collective call). The same check rejects a selection estimated
per rank (each chunk as its own call): that output differs from the single-process one. The other tests run in this process (shard layout,
argument errors, a group of one process, and (``slow``: compiles) the compiled CPU kernel). The
multi-process test takes ~30 s on 2 CPU cores.
"""
from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.distributed as dist

import minference_flex as mf
from minference_flex.context_parallel import chunk_size_multiple, context_parallel_attention, shard, unshard

WORLD = 2

#: name -> (batch, query heads, KV heads, N, head dim, patterns, scale)
CASES = {
    "mixed": (2, 8, 2, 512, 16, [
        ["dense"],
        ["stream_llm", 16, 64],
        ["vertical_and_slash", 40, 110],
        ["block_sparse", 2, 0],
        ["block_mass", 600, 4],
        ["vertical_slash_mass", 500, 200],
        mf.Pattern("block_sparse", 2, block_size=128),
        ["vertical_and_slash", 60, 150],
    ], None),
    "blocks": (1, 4, 2, 256, 32, [
        ["block_sparse", 2, 0], ["block_mass", 500, 8], ["antidiagonal_mass", 600, 16], ["stream_llm", 4, 32]], None),
    "scored_mha": (1, 2, 2, 256, 16, [["vertical_slash_mass", 300, 120], ["vertical_and_slash", 35, 105]], 0.3),
}


def case_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole q, k, v of a case (the same in every process). Scaled so attention is peaked and the
    estimates matter."""
    B, Hq, Hkv, N, D, _, _ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q = 2 * torch.randn(B, Hq, N, D, generator=g)
    k = 2 * torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q, k, v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, root: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        with torch.no_grad():
            for name, (*_, patterns, scale) in CASES.items():
                q, k, v = (shard(x, rank, WORLD) for x in case_inputs(name))
                results[name] = context_parallel_attention(q, k, v, patterns, scale=scale, compiled=False)
                # Mixed in between: a call every rank refuses before any collective, and a plain
                # single-process call; neither may change a later collective call.
                try:
                    context_parallel_attention(q[:, :, :-64], k[:, :, :-64], v[:, :, :-64], patterns,
                                               scale=scale, compiled=False)
                except ValueError as e:
                    results[name + "/refused"] = str(e)
                results[name + "/local"] = mf.sparse_attention(q, k, v, patterns, scale=scale, compiled=False)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{root}/rank{rank}.pt")


def _gloo() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def per_rank_estimate(q, k, v, patterns, scale, world):
    """What a selection estimated per chunk gives: each chunk of the load-balanced sharding as its
    own call over the keys up to it (its own last queries, its own blocks). Whole-sequence layout."""
    c = q.shape[2] // (2 * world)
    outs = [mf.sparse_attention(q[:, :, i * c:(i + 1) * c], k[:, :, :(i + 1) * c], v[:, :, :(i + 1) * c],
                                patterns, scale=scale, compiled=False) for i in range(2 * world)]
    return torch.cat(outs, dim=2)


@pytest.mark.distributed
@pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="spawns processes that rendezvous over TCP")
def test_two_ranks_equal_single_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    with torch.no_grad():
        for name, (*_, patterns, scale) in CASES.items():
            q, k, v = case_inputs(name)
            expected = mf.sparse_attention(q, k, v, patterns, scale=scale, compiled=False)
            # The patterns matter: dense attention differs.
            dense = mf.sparse_attention(q, k, v, [["dense"]] * q.shape[1], scale=scale, compiled=False)
            assert (dense - expected).abs().max() > 1e-2, name
            for rank in range(WORLD):
                torch.testing.assert_close(got[rank][name], shard(expected, rank, WORLD), atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{name}, rank {rank}: {m}")
                assert "multiple of" in got[rank][name + "/refused"]
                local = [shard(x, rank, WORLD) for x in (q, k, v)]
                torch.testing.assert_close(got[rank][name + "/local"],
                                           mf.sparse_attention(*local, patterns, scale=scale, compiled=False))
            if name != "blocks":
                # Would the check catch a selection estimated per rank? Block kinds estimate per query
                # block anyway (the same), the scored heads would not.
                wrong = per_rank_estimate(q, k, v, patterns, scale, WORLD)
                assert max((shard(wrong, r, WORLD) - shard(expected, r, WORLD)).abs().max()
                           for r in range(WORLD)) > 1e-3, name
            else:
                wrong = per_rank_estimate(q, k, v, patterns, scale, WORLD)
                torch.testing.assert_close(wrong, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- in this process

def test_shard_layout_and_unshard():
    """Rank r holds chunks r and 2W-1-r of 2W; unshard inverts it."""
    for world in (1, 2, 3, 4):
        x = torch.arange(2 * world * 3).view(1, 1, -1, 1).float()
        shards = [shard(x, r, world) for r in range(world)]
        for r, s in enumerate(shards):
            assert s.flatten().tolist() == [*range(3 * r, 3 * r + 3), *range(3 * (2 * world - 1 - r), 3 * (2 * world - r))]
        assert torch.equal(unshard(shards), x)
    y = torch.randn(2, 3, 40, 5)
    assert torch.equal(unshard([shard(y, r, 4) for r in range(4)]), y)
    # Every rank has the same causal work: sum of positions + 1 per rank equal.
    work = [int(shard(torch.arange(1, 17).view(1, 1, -1, 1), r, 4).sum()) for r in range(4)]
    assert len(set(work)) == 1


def test_shard_errors():
    with pytest.raises(ValueError, match="not divisible by 2 \\* world = 4"):
        shard(torch.zeros(1, 1, 6, 2), 0, 2)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        shard(torch.zeros(1, 1, 8, 2), 2, 2)
    with pytest.raises(ValueError, match="at least one shard"):
        unshard([])


def test_chunk_size_multiple():
    assert chunk_size_multiple(mf.parse_patterns([["dense"]], 1)) == 64
    assert chunk_size_multiple(mf.parse_patterns([mf.Pattern("block_sparse", 2, block_size=192), ["block_mass", 500, 4]], 2)) == 192


def test_no_process_group_raises():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 128, 16)
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        context_parallel_attention(q, q, q, [["dense"]] * 2, compiled=False)


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone (world 1), destroyed afterwards."""
    if not _gloo():
        pytest.skip("gloo not available")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=[
    pytest.mark.slow, pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                         reason="the compiled CPU kernel needs AVX2")])], ids=["eager", "compiled"])
@torch.no_grad()
def test_world_of_one_equals_single_process(one_process_group, compiled):
    """With W = 1 the shard is the sequence in order, and the op is mf.sparse_attention, with the
    eager emulation and with the compiled CPU kernel (vertical columns folded into the main mask)."""
    q, k, v = case_inputs("mixed")
    patterns = CASES["mixed"][5]
    got = context_parallel_attention(q, k, v, patterns, compiled=compiled)
    torch.testing.assert_close(got, mf.sparse_attention(q, k, v, patterns, compiled=False), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_argument_errors(one_process_group):
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    with pytest.raises(ValueError, match="same length"):
        context_parallel_attention(q[:, :, :128], k, k, [["dense"]] * 4, compiled=False)
    with pytest.raises(ValueError, match="positive multiple of 128, got 192"):
        context_parallel_attention(q[:, :, :192], k[:, :, :192], k[:, :, :192], [["dense"]] * 4, compiled=False)
    with pytest.raises(ValueError, match="positive multiple of 512, got 256"):   # 128-token chunks, 256-token blocks
        context_parallel_attention(q, k, k, [mf.Pattern("block_sparse", 1, block_size=256)] * 4, compiled=False)
    empty = torch.randn(0, 4, 256, 16)
    assert context_parallel_attention(empty, empty[:, :2], empty[:, :2], [["dense"]] * 4).shape == empty.shape
    with pytest.raises(ValueError, match="value shape"):
        context_parallel_attention(q, k, k[:, :1], [["dense"]] * 4, compiled=False)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        context_parallel_attention(q[:, :3], k, k, [["dense"]] * 3, compiled=False)
