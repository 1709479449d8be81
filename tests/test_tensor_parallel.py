"""Tensor parallelism: transformers' own TP (``tp_plan="auto"``) on CPU with the gloo backend, 2 processes.

``test_tp_logits_equal_single_process`` saves tiny random-weight Llama models with per-head patterns
of every kind, spawns 2 processes that load them with ``from_pretrained(...,
distributed_config=DistributedConfig(tp_plan="auto"), attn_implementation="minference_flex")`` (the
``tp_plan="auto"`` argument, deprecated, is turned into that) (transformers initialises gloo from RANK/WORLD_SIZE and
shards q/k/v_proj column-wise, o_proj row-wise: each rank's attention gets its 1/2 of the heads),
and compares their logits with the single-process model's, on a batch without padding and a
left-padded batch. ``test_example_under_torchrun`` runs docs/distributed.md's two commands (one
process, then torchrun). The other tests check the slice rule and its errors in this process.
The two multi-process tests (marker ``distributed``) take ~30 s on 2 CPU cores.
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import minference_flex as mf
import minference_flex.hf as mf_hf

KINDS = [
    ["dense", 0, 0],
    ["stream_llm", 4, 16],
    ["vertical_and_slash", 8, 16],
    ["block_sparse", 1, 0],
    ["block_mass", 500, 4],
    ["vertical_slash_mass", 900, 64],
]
#: name -> (query heads, KV heads): GQA groups of 4 (2 per rank: 4 query heads over 1 KV head), and
#: MHA (groups of 1).
MODELS = {"gqa": (8, 2), "mha": (4, 4)}
LAYERS = 4
WORLD = 2
N = 256
PAD = 56  # left padding of the second sequence of the padded batch


def config(heads: int, kv_heads: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                                    vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def layer_patterns(heads: int) -> list[dict]:
    """Every kind on every rank, different heads per layer, so a wrong slice changes the result."""
    return [{str(h): KINDS[(3 * layer + h) % len(KINDS)] for h in range(heads)} for layer in range(LAYERS)]


def configure(model, heads: int) -> None:
    mf.set_patterns(model, layer_patterns(heads), min_sparse_len=64, sdpa_fallback=False, compiled=False)


def inputs() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    plain = torch.randint(3, 128, (1, N), generator=g)
    padded = torch.randint(3, 128, (2, N), generator=g)
    mask = torch.ones(2, N, dtype=torch.long)
    padded[1, :PAD] = 0
    mask[1, :PAD] = 0
    return {"plain": {"input_ids": plain}, "padded": {"input_ids": padded, "attention_mask": mask}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, root: str, port: int) -> None:
    """One TP rank: load every model with tp_plan="auto", configure it, run the inputs, save logits,
    dispatch counts and the patterns each layer ran with."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    try:
        for name, (heads, _) in MODELS.items():
            # from_pretrained(..., tp_plan="auto") does the same (a deprecated form, turned into this config).
            model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name), dtype=torch.float32,
                                                         distributed_config=DistributedConfig(tp_plan="auto"),
                                                         attn_implementation="minference_flex").eval()
            configure(model, heads)
            attn = model.model.layers[0].self_attn
            results[name] = {
                "local_q_rows": attn.q_proj.weight.to_local().shape[0],
                "tp_size": model.config.distributed_config.tp_size,
            }
            with torch.no_grad():
                for key, batch in inputs().items():
                    results[name][key] = model(**batch).logits
            results[name]["counts"] = dict(mf.dispatch_counts(model))
            results[name]["local_patterns"] = [
                layer.self_attn.__dict__[mf_hf._LOCAL_CACHE][2].patterns for layer in model.model.layers]
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    torch.save(results, os.path.join(root, f"rank{rank}.pt"))


def _gloo() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.distributed
@pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="spawns processes that rendezvous over TCP")
def test_tp_logits_equal_single_process(tmp_path):
    expected = {}
    for name, (heads, kv_heads) in MODELS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config(heads, kv_heads), attn_implementation="minference_flex",
                                                 dtype=torch.float32).eval()
        configure(model, heads)
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = {key: model(**batch).logits for key, batch in inputs().items()}
            # The patterns matter at this length: dense attention gives other logits.
            model.set_attn_implementation("sdpa")
            dense = model(**inputs()["plain"]).logits
        assert (dense - expected[name]["plain"]).abs().max() > 1e-3

    torch.multiprocessing.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)  # written by _worker
        for name, (heads, kv_heads) in MODELS.items():
            result = got[name]
            local = heads // WORLD
            assert result["tp_size"] == WORLD and result["local_q_rows"] == local * 16  # transformers sharded q_proj
            full = [mf_hf._parse_layer(layer, heads) for layer in layer_patterns(heads)]
            assert result["local_patterns"] == [p[rank * local:(rank + 1) * local] for p in full]
            # Every layer call of both inputs (one per sequence of the padded batch) ran the sparse kernel.
            assert result["counts"] == {"sparse": LAYERS * 3}
            for key in ("plain", "padded"):
                torch.testing.assert_close(result[key], expected[name][key], atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"rank {rank}, {name}, {key}: {m}")


# --------------------------------------------------------------------------- the slice rule, in this process

def test_slice_follows_rank(monkeypatch):
    """Rank r of W gets query heads r*Hq/W .. (r+1)*Hq/W - 1, from the rank torch.distributed gives."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(8, 2), attn_implementation="minference_flex").eval()
    configure(model, 8)
    attn = model.model.layers[1].self_attn
    layer = mf_hf._layer_config(attn)
    assert mf_hf._local_layer(attn, layer, 8, 2) is layer  # all heads: unchanged
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for world, rank in [(2, 0), (2, 1), (4, 3)]:
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        attn.__dict__.pop(mf_hf._LOCAL_CACHE, None)
        if world == 4:  # 2 query heads per rank would split the GQA groups of 4
            with pytest.raises(ValueError, match="GQA groups"):
                mf_hf._local_layer(attn, layer, 2, 1)
            continue
        local = mf_hf._local_layer(attn, layer, 8 // world, 2 // world)
        assert local.patterns == layer.patterns[rank * 4:(rank + 1) * 4]
        assert local[1:] == layer[1:]
        assert mf_hf._local_layer(attn, layer, 4, 1) is local  # kept on the module
    # A TP group inside a larger world (transformers' mesh: tp innermost): rank 5 of 6 is TP rank 1 of 2.
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 6)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 5)
    assert mf_hf._tp_slice(8, 2, 4, 1, 2) == (2, 1)


@pytest.mark.parametrize("local_q, local_kv, recorded, match", [
    (3, 1, None, "fits no tensor-parallel split"),
    (16, 2, None, "fits no tensor-parallel split"),
    (4, 2, None, "2 of 2 key/value heads"),
    (4, 1, 4, "sharded with tp_size=4"),
])
def test_head_counts_that_fit_no_layout_raise(local_q, local_kv, recorded, match, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    with pytest.raises(ValueError, match=match):
        mf_hf._tp_slice(8, 2, local_q, local_kv, recorded)


@torch.no_grad()
def test_fewer_heads_without_process_group_raise():
    """A call with half the configured heads outside torch.distributed names the problem."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(8, 2), attn_implementation="minference_flex").eval()
    configure(model, 8)
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 96, 16), torch.randn(1, 1, 96, 16)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        mf_hf.minference_flex_attention(attn, q, k, k, None)


@pytest.mark.distributed
@pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="spawns processes that rendezvous over TCP")
def test_example_under_torchrun(tmp_path):
    """docs/distributed.md's commands: examples/tensor_parallel.py in one process, then under torchrun."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    example = str(repo / "examples" / "tensor_parallel.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, example, "--out", "single.pt"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                         example, "--check", "single.pt"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert "2 process(es), 4 of 8 query heads each; layer calls {'sparse': 4}" in tp.stdout, tp.stdout
    difference = float(tp.stdout.rsplit("max |difference| from single.pt:", 1)[1].split()[0])
    assert difference < 1e-5, tp.stdout
