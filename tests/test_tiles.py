"""The BlockMasks of a plan cover exactly token_mask: main + vertical cells, disjoint, each tile
listed once."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minference_flex as mf
from block_masks import Tiles, tile_states, visited_cells
from tests.naive import reference_attention
from tests.strategies import Case, cases, examples

#: Query x key tile sizes of the BlockMasks (query side a multiple of the key side).
TILES = [Tiles(), Tiles(128, 64), Tiles(64, 32), Tiles(128, 32), Tiles(32, 32), Tiles(256, 64)]


def listed_cells(block_mask) -> torch.Tensor:
    """Independent reading of a BlockMask's tile lists: [B, H, Nq, Nk] bool of the cells a kernel
    visits (every in-range cell of a full tile, the mask_mod cells of a partial tile)."""
    nq, nk = block_mask.seq_lengths
    tq, tk = block_mask.BLOCK_SIZE
    B, H = block_mask.kv_num_blocks.shape[:2]
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    seen = torch.zeros(B, H, -(-nq // tq), -(-nk // tk), dtype=torch.int64)
    lists = [(block_mask.kv_num_blocks, block_mask.kv_indices, False)]
    if block_mask.full_kv_num_blocks is not None:
        lists.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True))
    for num, idx, full in lists:
        for b in range(B):
            for h in range(H):
                for t in range(num.shape[-1]):
                    rows = torch.arange(t * tq, min((t + 1) * tq, nq))
                    for n in range(int(num[b, h, t])):
                        kt = int(idx[b, h, t, n])
                        assert 0 <= kt < seen.shape[-1], f"tile index {kt} out of range"
                        seen[b, h, t, kt] += 1
                        cols = torch.arange(kt * tk, min((kt + 1) * tk, nk))
                        if full:
                            cells = torch.ones(len(rows), len(cols), dtype=torch.bool)
                        else:
                            cells = block_mask.mask_mod(torch.tensor(b), torch.tensor(h), rows[:, None], cols[None, :])
                        out[b, h, rows[:, None], cols[None, :]] = cells
    assert (seen <= 1).all(), "a tile is listed twice"
    return out


def check_plan(case, dtype, full_width, tiles=Tiles(), fold_columns=False):
    q, k, v = case.tensors(dtype)
    block_sizes = {mf.Pattern.parse(p).block_size for p in case.patterns
                   if mf.Pattern.parse(p).kind in ("block_sparse", "block_mass", "antidiagonal_mass")}
    if any(bs % tiles.q for bs in block_sizes):
        with pytest.raises(ValueError, match="multiple"):
            mf.plan_attention(q, k, case.patterns, scale=case.scale, full_width=full_width, tiles=tiles,
                              fold_columns=fold_columns)
        return
    plan = mf.plan_attention(q, k, case.patterns, scale=case.scale, full_width=full_width, tiles=tiles,
                             fold_columns=fold_columns)
    mask = mf.token_mask(q, k, case.patterns, scale=case.scale)
    B, Hq, Nq, Nk = mask.shape
    pad = plan.pad
    n_q_tiles, n_k_tiles = -(-(Nq + pad) // tiles.q), -(-Nk // tiles.kv)

    # Geometry: the padded query rows start on a query tile and on every block-sparse block.
    q_offset = Nk - Nq
    assert 0 <= pad and (q_offset - pad) % tiles.q == 0
    for bs in block_sizes:
        assert (q_offset - pad) % bs == 0
    assert tuple(plan.main.BLOCK_SIZE) == (tiles.q, tiles.kv)
    assert tuple(plan.main.seq_lengths) == (Nq + pad, Nk)
    assert plan.main.kv_num_blocks.shape == (B, Hq, n_q_tiles)
    if full_width:
        assert plan.main.kv_indices.shape[-1] == n_k_tiles
        assert plan.main.full_kv_indices.shape[-1] == n_k_tiles

    tile_states(plan.main)  # raises if a tile is listed twice
    main = visited_cells(plan.main)
    assert torch.equal(main, listed_cells(plan.main))
    main = main[:, :, pad:]

    vertical = torch.zeros_like(mask)
    has_vertical = any(mf.Pattern.parse(p).kind in ("vertical_and_slash", "vertical_slash_mass") for p in case.patterns)
    assert (plan.vertical is not None) == (has_vertical and not fold_columns)
    n_vertical_cells = 0
    if plan.vertical is not None:
        columns = plan.selection.columns
        V = columns.shape[-1]
        assert columns.shape == (B, Hq, V) and columns.dtype == torch.int64
        assert tuple(plan.vertical.seq_lengths) == (Nq + pad, V)
        tile_states(plan.vertical)
        vc = visited_cells(plan.vertical)
        assert torch.equal(vc, listed_cells(plan.vertical))
        vc = vc[:, :, pad:]
        for b in range(B):
            for h in range(Hq):
                cols = columns[b, h]
                real = cols[cols < Nk]
                assert (cols[cols >= Nk] == Nk).all(), "padding columns must equal Nk"
                assert torch.equal(cols, cols.sort().values), "columns must be sorted"
                assert len(real.unique()) == len(real), "a column is listed twice"
                assert not vc[b, h][:, cols >= Nk].any(), "a padding column is visited"
                vertical[b, h][:, real] = vc[b, h][:, cols < Nk]
        n_vertical_cells = int(vc.sum())

    assert not (main & vertical).any(), "a cell is in both the main and the vertical mask"
    assert int(main.sum()) + n_vertical_cells == int(mask.sum())
    got = main | vertical
    assert torch.equal(got, mask), f"{int((got != mask).sum())} cells differ: {(got != mask).nonzero()[:8].tolist()}"
    return plan, (q, k, v), mask


@settings(max_examples=examples(40))
@given(case=cases(), full_width=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       fold_columns=st.booleans())
def test_tiles_cover_token_mask(case, full_width, dtype, fold_columns):
    """Split plans (GPU: main + gathered verticals) and folded plans (CPU kernel: one mask)."""
    check_plan(case, dtype, full_width, fold_columns=fold_columns)


@settings(max_examples=examples(40))
@given(case=cases(), full_width=st.booleans(), tiles=st.sampled_from(TILES), fold_columns=st.booleans())
def test_other_tile_sizes_cover_token_mask_and_run(case, full_width, tiles, fold_columns):
    """Non-default BlockMask tiles: exact coverage, and the eager run of the plan is still exact."""
    result = check_plan(case, torch.float32, full_width, tiles, fold_columns)
    if result is None:
        return  # block size not a multiple of the query tile: rejected (checked above)
    plan, (q, k, v), mask = result
    out = mf.run_plan(plan, q, k, v, compiled=False)
    ref = reference_attention(q, k, v, mask, case.scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err


@pytest.mark.parametrize("tiles", TILES[:3], ids=str)
@pytest.mark.parametrize("full_width,fold_columns", [(False, False), (True, True)])
@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 300), (65, 129), (100, 257), (256, 256), (37, 300)])
def test_tiles_mixed_block_sizes(Nq, Nk, full_width, fold_columns, tiles):
    """Block-sparse heads with 128 and 256 blocks next to every other kind (padding to their lcm)."""
    pats = [mf.Pattern("block_sparse", 2, 0, 256), mf.Pattern("block_sparse", 1, 0, 128),
            ["vertical_and_slash", 33, 101], ["stream_llm", 70, 65], ["dense", 0, 0],
            mf.Pattern("block_sparse", 0, 0, 128)]
    check_plan(Case(2, 6, 2, Nq, Nk, 32, pats, None, Nq * 1000 + Nk), torch.float32, full_width, tiles,
               fold_columns)


@pytest.mark.parametrize("q,kv", [(64, 48), (32, 64), (64, 0), (64, -64), (0, 64), (-64, 64)])
def test_bad_tiles(q, kv):
    with pytest.raises(ValueError):
        Tiles(q, kv)


@pytest.mark.parametrize("Nq,Nk", [(300, 300), (77, 200), (1, 129)])
def test_tile_counts_match_the_listed_tiles(Nq, Nk):
    g = torch.Generator().manual_seed(Nq + Nk)
    q, k = torch.randn(1, 4, Nq, 16, generator=g), torch.randn(1, 2, Nk, 16, generator=g)
    pats = [["vertical_and_slash", 40, 110], ["stream_llm", 70, 20], ["block_sparse", 2, 0], ["dense", 0, 0]]
    plan = mf.plan_attention(q, k, pats, fold_columns=False, full_width=False)
    counts = plan.tile_counts()
    listed = sum(int((tile_states(m) > 0).sum()) for m in (plan.main, plan.vertical))
    assert counts["visited"] == listed == counts["partial"] + counts["full"] + counts["vertical"]
    # Causal 64x64 tiles per head: query tile t (absolute tile a) sees key tiles 0..a.
    first = (Nk - Nq - plan.pad) // 64
    n_q_tiles, n_k_tiles = -(-(Nq + plan.pad) // 64), -(-Nk // 64)
    assert counts["causal"] == 4 * sum(min(first + t + 1, n_k_tiles) for t in range(n_q_tiles))
    # The strip layout: strips and blocks of 64 gathered columns in the strip kernel, block-sparse
    # tiles in FlexAttention, no vertical part.
    plan = mf.plan_attention(q, k, pats, fold_columns=False, full_width=False, strips=True)
    counts = plan.tile_counts()
    assert plan.vertical is None and counts["vertical"] == 0
    st = plan.strips
    i0 = Nk - Nq + 64 * torch.arange(-(-Nq // 64))
    sink_strips = -(-torch.minimum(st.sink.long()[:, None], i0 + 64) // 64)
    columns = plan.selection.columns[0]                                      # [H, V], padding Nk
    col_blocks = -(-(columns[:, None, :] <= (i0 + 63).clamp(max=Nk - 1)[None, :, None]).sum(-1) // 64)
    assert counts["strips"] == int(st.counts.sum() + sink_strips.sum() + col_blocks.sum())
    assert col_blocks.sum() > 0
    assert counts["visited"] == int(plan.visited_tiles().sum()) == counts["strips"] + counts["partial"] + \
        counts["full"]
