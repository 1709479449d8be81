"""Argument checks of every ``minference-flex`` command: a bad argument ends in one argparse error line
(exit status 2, on stderr, no traceback) before any model or input is loaded, and the tools say
where they wrote their results.

No test here loads a model: the ``no_model`` fixture replaces every loader (and the long-running
parts of ``layer`` and ``bench``) with one that raises ``Loaded``, so a check that comes too late
fails at once instead of running for minutes."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from minference_flex.tools import bench

from minference_flex.tools import capture

from minference_flex.tools import demo

from minference_flex.tools import layer_demo

from minference_flex.tools import models

from minference_flex.tools import search_cli

from minference_flex.tools import fetch

from minference_flex.tools import ttft
from minference_flex.tools.cli import main as cli_main


class Loaded(AssertionError):
    """A model loader (or a long run) was reached."""


@pytest.fixture
def no_model(monkeypatch):
    def loader(*args, **kwargs):
        raise Loaded("a model loader or a long run was reached")

    for module, name in ((models, "smollm2"), (models, "qwen2_5_coder"), (search_cli, "load_model"), (layer_demo, "run"),
                         (bench, "bench_length"), (bench, "compile_counts")):
        monkeypatch.setattr(module, name, loader)
    monkeypatch.setattr(sys, "argv", ["pytest"])  # cli.main names each command through sys.argv[0]
    return loader


def usage_error(capsys, argv: list[str]) -> str:
    """Run ``minference-flex ARGV``; assert an argparse error (exit 2, one error line last on stderr,
    no traceback) and return that line."""
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"minference-flex {argv[0]}") and ": error: " in lines[-1], err
    assert err.count("error:") == 1, err  # the message is that one line
    return lines[-1]


@pytest.fixture
def files(tmp_path):
    """Pattern files: missing, malformed, 2 layers, a head the model lacks, an unknown type; a valid one."""
    good = [{str(h): ["vertical_and_slash", 100, 800, 0.0] for h in range(models.SMOLLM2_HEADS)}
            for _ in range(models.SMOLLM2_LAYERS)]
    bad_head = json.loads(json.dumps(good))
    bad_head[3]["9"] = ["stream_llm", 64, 512, 0.0]
    bad_type = json.loads(json.dumps(good))
    bad_type[7]["2"] = ["foo", 1, 2, 0.0]
    paths = {"missing": tmp_path / "missing.json", "malformed": tmp_path / "malformed.json",
             "two_layers": tmp_path / "two_layers.json", "bad_head": tmp_path / "bad_head.json",
             "bad_type": tmp_path / "bad_type.json", "good": tmp_path / "good.json"}
    paths["malformed"].write_text('[{"0": ["vertical_and_slash", 100, 800]')
    paths["two_layers"].write_text(json.dumps(good[:2]))
    paths["bad_head"].write_text(json.dumps(bad_head))
    paths["bad_type"].write_text(json.dumps(bad_type))
    paths["good"].write_text(json.dumps(good))
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- --patterns (demo, eval, ttft)

PATTERN_CASES = [  # (--patterns value or a key of ``files``, what the error line says)
    ("foo,1,2", "unknown pattern type 'foo'"),
    ("vertical_and_slash,x,800", "'type,a,b'"),
    ("vertical_and_slash,-1,800", "must be >= 0"),
    ("missing", "not found"),
    ("nonexistent_name", "not found"),
    ("malformed", "not valid JSON"),
    ("two_layers", "2 layers but the model has 30"),
    ("bad_head", "head 9"),
    ("bad_type", "unknown pattern type 'foo'"),
]


@pytest.mark.parametrize("command", [["eval"], ["demo"], ["ttft", "--device", "cpu"]])
@pytest.mark.parametrize("value,message", PATTERN_CASES)
def test_bad_patterns_fail_before_the_model_loads(no_model, capsys, files, command, value, message):
    line = usage_error(capsys, command + ["--patterns", files.get(value, value)])
    assert "--patterns" in line and message in line


def test_eval_checks_every_patterns_value(no_model, capsys, files):
    line = usage_error(capsys, ["eval", "--patterns", files["good"], "stream_llm,64,oops"])
    assert "stream_llm,64,oops" in line


@pytest.mark.parametrize("command", [["eval"], ["demo"], ["ttft", "--device", "cpu"]])
@pytest.mark.parametrize("value", ["good", "stream_llm,64,1024", "a_shape,64,1024"])
def test_valid_patterns_reach_the_model(no_model, capsys, files, command, value):
    with pytest.raises(Loaded):
        cli_main(command + ["--patterns", files.get(value, value)])


def test_defaults_reach_the_model(no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["eval"], ["demo"], ["ttft", "--device", "cpu"], ["capture"], ["search"], ["layer"],
                 ["bench", "--device", "cpu", "--eager"]):
        with pytest.raises(Loaded):
            cli_main(argv)


# --------------------------------------------------------------------------- ranges, per command

RANGE_CASES = [  # (argv, option the error line names)
    (["eval", "--depths", "150"], "--depths"),
    (["eval", "--depths", "50", "-5"], "--depths"),
    (["eval", "--lengths", "-1"], "--lengths"),
    (["eval", "--lengths", "4096", "0"], "--lengths"),
    (["eval", "--lengths", "100"], "--lengths"),  # no room for the question around a haystack
    (["eval", "--samples", "0"], "--samples"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--min-sparse-len", "0"], "--min-sparse-len"),
    (["eval", "--ppl-length", "-8"], "--ppl-length"),
    (["eval", "--ppl-length", "1"], "--ppl-length"),
    (["eval", "--device", "gpu0"], "--device"),
    (["eval", "--out", "no_such_folder/results.json"], "--out"),
    (["demo", "--length", "100"], "--length"),
    (["demo", "--device", "gpu0"], "--device"),
    (["layer", "--budgets=-1,800"], "--budgets"),
    (["layer", "--device", "gpu0"], "--device"),
    (["demo", "--synthetic", "--budgets", "100,-8"], "--budgets"),
    (["ttft", "--device", "gpu0"], "--device"),
    (["ttft", "--device", "cpu", "--out", "no_such_folder/t.json"], "--out"),
    (["capture", "--layers", "30"], "--layers"),
    (["capture", "--layers", "0", "-1"], "--layers"),
    (["capture", "--start", "-3"], "--start"),
    (["capture", "--device", "gpu0"], "--device"),
    (["search", "--length", "0"], "--length"),
    (["search", "--length", "100"], "--length"),  # the calibration needle prompt needs room
    (["search", "--cost-budget", "0"], "--cost-budget"),
    (["search", "--cost-budget", "1.5"], "--cost-budget"),
    (["search", "--chunk", "0"], "--chunk"),
    (["search", "--candidates", "foo,1,2"], "--candidates"),
    (["search", "--candidates", "vertical_and_slash,100"], "--candidates"),
    (["search", "--device", "gpu0"], "--device"),
    (["search", "--out", "no_such_folder/p.json"], "--out"),
    (["bench", "--device", "cpu", "--eager", "--lengths", "-1"], "--lengths"),
    (["bench", "--device", "cpu", "--eager", "--reps", "0"], "--reps"),
    (["bench", "--device", "cpu", "--eager", "--warmup", "-1"], "--warmup"),
    (["bench", "--device", "cpu", "--eager", "--budgets", "1000"], "--budgets"),
    (["bench", "--device", "cpu", "--eager", "--budgets", "a,b"], "--budgets"),
    (["bench", "--device", "cpu", "--eager", "--budgets=-1,800"], "--budgets"),
    (["bench", "--device", "cpu", "--eager", "--configs", "12x"], "--configs"),
    (["eval", "--resume"], "--resume"),  # the needle suite has nothing to resume
    (["eval", "--tasks", "vt", "--resume", "--out", ""], "--resume"),
]


@pytest.mark.parametrize("argv,option", RANGE_CASES, ids=[" ".join(a) for a, _ in RANGE_CASES])
def test_out_of_range_values_fail_before_the_model_loads(no_model, capsys, tmp_path, monkeypatch, argv, option):
    monkeypatch.chdir(tmp_path)
    assert option in usage_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.parametrize("command", ["eval", "demo", "capture", "search", "bench", "layer"])
def test_cuda_without_a_gpu_is_an_argument_error(no_model, capsys, command):
    assert "--device" in usage_error(capsys, [command, "--device", "cuda"])


def test_search_input_files(no_model, capsys, files, tmp_path):
    assert "not found" in usage_error(capsys, ["search", "--texts", files["missing"]])
    assert "not found" in usage_error(capsys, ["search", "--model", str(tmp_path / "no_model_here")])
    assert "not found" in usage_error(capsys, ["search", "--rechoose", files["missing"]])
    assert "not valid JSON" in usage_error(capsys, ["search", "--rechoose", files["malformed"]])
    assert "--details file" in usage_error(capsys, ["search", "--rechoose", files["good"]])
    assert "not valid JSON" in usage_error(capsys, ["search", "--checkpoint", files["malformed"]])


def test_resume_needs_a_results_file_of_eval(no_model, capsys, files, tmp_path):
    """--resume reads --out before the model loads: a file that is no RULER result, or one made with
    other settings, is a usage error."""
    for name in ("malformed", "good"):  # not JSON; a pattern file
        assert "not a results file" in usage_error(capsys, ["eval", "--tasks", "vt", "--resume", "--out", files[name]])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"suite": "ruler", "config": {"samples": 3}}))
    assert "other settings" in usage_error(capsys, ["eval", "--tasks", "vt", "--resume", "--out", str(other)])


def test_plot_without_matplotlib_fails_first(no_model, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert "matplotlib" in usage_error(capsys, ["search", "--plot", str(tmp_path / "s.png")])
    assert "matplotlib" in usage_error(capsys, ["bench", "--device", "cpu", "--eager", "--plot",
                                                str(tmp_path / "b.png")])
    assert "matplotlib" in usage_error(capsys, ["eval", "--tasks", "vt", "--plot", str(tmp_path / "e.png")])


# --------------------------------------------------------------------------- --model, --tasks, --haystack

MODEL_COMMANDS = [["eval"], ["demo"], ["ttft", "--device", "cpu"], ["capture"], ["search"]]


@pytest.mark.parametrize("command", MODEL_COMMANDS[:4], ids=lambda c: c[0])
def test_unknown_model_is_rejected(no_model, capsys, command):
    line = usage_error(capsys, command + ["--model", "llama-70b"])
    assert "--model" in line and "qwen2.5-coder-1.5b" in line


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c[0])
def test_missing_qwen_file_is_one_error_line(no_model, capsys, monkeypatch, tmp_path, command):
    monkeypatch.setenv("MINFERENCE_FLEX_CACHE", str(tmp_path))
    line = usage_error(capsys, command + ["--model", "qwen2.5-coder-1.5b"])
    assert "--model qwen2.5-coder-1.5b" in line and "minference-flex fetch qwen2.5-coder-1.5b" in line


@pytest.fixture
def qwen_file(monkeypatch, tmp_path):
    """An (empty) Qwen GGUF file in the cache: the checks pass, the (replaced) loader is reached."""
    monkeypatch.setenv("MINFERENCE_FLEX_CACHE", str(tmp_path))
    (tmp_path / fetch.QWEN_FILE).write_bytes(b"")


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c[0])
def test_qwen_reaches_its_loader(no_model, qwen_file, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Loaded):
        cli_main(command + ["--model", "qwen2.5-coder-1.5b"])


@pytest.mark.parametrize("command", [["eval"], ["demo"], ["ttft", "--device", "cpu"]], ids=lambda c: c[0])
def test_patterns_are_checked_against_qwen(no_model, qwen_file, capsys, files, command):
    line = usage_error(capsys, command + ["--model", "qwen2.5-coder-1.5b", "--patterns", files["good"]])
    assert "30 layers but the model has 28" in line


def test_qwen_limits(no_model, qwen_file, capsys):
    assert "between 128 and 32768" in usage_error(capsys, ["demo", "--model", "qwen2.5-coder-1.5b",
                                                           "--length", "40000"])
    assert "--layers" in usage_error(capsys, ["capture", "--model", "qwen2.5-coder-1.5b", "--layers", "28"])


@pytest.mark.parametrize("argv,message", [
    (["eval", "--tasks", "niah_bogus"], "--tasks"),
    (["eval", "--tasks", "vt", "--haystack", "wikipedia"], "--haystack"),
    (["eval", "--tasks", "vt", "--lengths", "200"], "--lengths must be at least 256"),
    (["eval", "--plot", "x.png"], "--plot draws the RULER suite"),
    (["eval", "--tasks", "vt", "--plot", "no_such_folder/x.png"], "--plot"),
], ids=["task", "haystack", "length", "plot-needle", "plot-folder"])
def test_bad_ruler_arguments_fail_before_the_model_loads(no_model, capsys, argv, message):
    assert message in usage_error(capsys, argv)


def test_unfetched_haystack_names_the_fetch_command(no_model, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINFERENCE_FLEX_CACHE", str(tmp_path))
    for name in ("essays", "moby-dick"):
        line = usage_error(capsys, ["eval", "--tasks", "vt", "--haystack", name])
        assert f"--haystack {name}" in line and "minference-flex fetch haystacks" in line


def test_ruler_arguments_reach_the_model(no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["eval", "--tasks", "all"], ["eval", "--tasks", "vt", "cwe", "--lengths", "256", "--samples", "3",
                                              "--haystack", "pydoc"]):
        with pytest.raises(Loaded):
            cli_main(argv)


def test_model_constants_match_the_gguf_file():
    """The layer and head counts the checks use before loading are those of the installed GGUF file."""
    pytest.importorskip("gguf")
    try:
        folder, name = models.smollm2_gguf()
    except ImportError as exc:
        pytest.skip(str(exc))
    from gguf import GGUFReader

    fields = GGUFReader(os.path.join(folder, name)).fields

    def value(key):
        field = fields[key]
        return int(field.parts[field.data[0]][0])

    assert value("llama.block_count") == models.SMOLLM2_LAYERS == 30
    assert value("llama.attention.head_count") == models.SMOLLM2_HEADS == 9
    assert value("llama.attention.head_count_kv") == models.SMOLLM2_KV_HEADS == 3


# --------------------------------------------------------------------------- readable output (item 16)

def _bench_row(n: int) -> dict:
    run = dict(config="strips", strip_kernel="auto", budgets=[100, 800], dense_pattern_ms=2.0, rel_err=1e-3,
               recall=0.95, cell_fraction=0.1, tiles={"fraction": 0.2}, metadata_bytes=0, peak_memory_bytes=None,
               estimate_ms=0.1, build_ms=0.2, kernel_ms=0.5, total_ms=0.8, speedup_vs_sdpa=2.5)
    return {"length": n, "sdpa_ms": 2.0, "flex_dense_ms": 1.9, "runs": [run]}


def test_bench_table_has_units_and_says_where_it_wrote(no_model, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "bench_length", lambda n, *a, **k: _bench_row(n))
    out = tmp_path / "res"
    bench.main(["--device", "cpu", "--eager", "--lengths", "256", "--out", str(out)])
    text = capsys.readouterr().out
    assert f"wrote {out / 'bench.json'}" in text
    table = bench.format_table(json.loads((out / "bench.json").read_text()))
    header = "\n".join(table.splitlines()[:3])
    assert "ms" in header and "x SDPA" in header and "tokens" in header
    assert table in text


def test_search_says_where_it_wrote_every_file(no_model, capsys, tmp_path):
    from minference_flex.search import SearchResult

    result = SearchResult.from_dict({
        "candidates": [["vertical_and_slash", 100, 800, 64], ["stream_llm", 64, 512, 64]],
        "recall": [[[0.9, 0.8], [0.7, 0.95]]], "cost": [[[0.5, 0.2], [0.5, 0.2]]], "choice": [[0, 1]],
        "length": 1024, "cost_budget": 0.3, "allocate": "head", "prompts": 1, "seconds": 1.0})
    details = tmp_path / "details.json"
    details.write_text(json.dumps(result.to_dict()))
    out, again = tmp_path / "p.json", tmp_path / "details2.json"
    assert cli_main(["search", "--rechoose", str(details), "--out", str(out), "--details", str(again)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and f"wrote {again}" in text
