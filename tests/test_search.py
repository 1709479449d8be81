"""The offline pattern search on a tiny random-weight Llama: scores, choice, checkpoints, file format."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import minference_flex as mf
import minference_flex.search as search
from block_masks import Pattern, select, token_cells
from minference_flex.cost import H100
from minference_flex.hooks import wrap_attention

N = 320
CANDIDATES = [Pattern("stream_llm", 4, 32), Pattern("stream_llm", 16, 128), Pattern("vertical_and_slash", 30, 100),
              Pattern("vertical_and_slash", 64, 200), Pattern("block_sparse", 1), Pattern("block_sparse", 3),
              Pattern("block_mass", 900, 8), Pattern("antidiagonal_mass", 900, 8)]


def tiny_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def texts(count: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (N + 5,), generator=g).tolist() for _ in range(count)]


def captured_qk(model, ids):
    """Post-RoPE query and key of every layer for one prompt, and the layer's scale."""
    out = {}

    def grab(inner, module, query, key, value, attention_mask, **kwargs):
        out[module.layer_idx] = (query.clone(), key.clone(), kwargs["scaling"])
        return inner(module, query, key, value, attention_mask, **kwargs)

    with torch.inference_mode(), wrap_attention(model, grab):
        model(torch.tensor([ids[:N]]))
    return out


def test_scores_equal_float64_recall_and_blockmask_tiles():
    model, prompts = tiny_model(), texts()
    result = mf.search_patterns(model, None, prompts, length=N, cost_budget=0.5, candidates=CANDIDATES,
                                chunk=50, progress=False)
    assert result.recall.shape == result.cost.shape == (3, 4, len(CANDIDATES))
    recall = torch.zeros(3, 4, len(CANDIDATES), dtype=torch.float64)
    cost = torch.zeros_like(recall)
    for ids in prompts:
        for layer, (q, k, scale) in captured_qk(model, ids).items():
            kk = k.double().repeat_interleave(2, dim=1)
            probs = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(
                ~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
            for c, pattern in enumerate(CANDIDATES):
                cells = token_cells(select(q, k, (pattern,) * 4, scale))
                recall[layer, :, c] += (probs * cells)[0].sum(dim=(-1, -2)) / N / len(prompts)
                plan = mf.plan_attention(q, k, [pattern] * 4, scale=scale, full_width=False, fold_columns=False)
                # the mass kinds' estimate, in tiles of the same time (8 rows, or squares of 8: 8 rows)
                estimate = 8 * H100.mass_cell_ms * (N // 64) * N / (H100.flex_tile_ms * H100.min_dim_factor)
                tiles = plan.visited_tiles()[0].double() + (estimate if "mass" in pattern.kind else 0)
                cost[layer, :, c] += tiles / plan.causal_tiles() / len(prompts)
    assert torch.allclose(result.recall, recall, atol=1e-5)
    assert torch.allclose(result.cost, cost)
    assert ((result.recall > 0) & (result.recall <= 1 + 1e-6)).all()


def test_head_choice_is_best_recall_within_budget():
    recall = torch.tensor([[[0.5, 0.9, 0.99], [0.7, 0.6, 0.95]]], dtype=torch.float64)
    cost = torch.tensor([[[0.1, 0.3, 0.8], [0.2, 0.1, 0.25]]], dtype=torch.float64)
    assert search.choose(recall, cost, 0.3, "head").tolist() == [[1, 2]]
    assert search.choose(recall, cost, 0.2, "head").tolist() == [[0, 0]]
    assert search.choose(recall, cost, 0.05, "head").tolist() == [[0, 1]]  # nothing fits: the cheapest


def test_model_allocation_respects_the_mean_budget_and_beats_per_head_budgets():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 3, 4, generator=g, dtype=torch.float64)
    recall = (cost + 0.3 * torch.rand(3, 3, 4, generator=g, dtype=torch.float64)).clamp(max=1)
    for budget in (0.2, 0.35, 0.5, 0.8):
        choice = search.choose(recall, cost, budget, "model")
        spent = cost.gather(-1, choice[..., None]).mean()
        assert spent <= budget + 1e-9 or torch.equal(choice, cost.argmin(-1))
        got = recall.gather(-1, choice[..., None]).mean()
        per_head = search.choose(recall, cost, budget, "head")
        if (cost.gather(-1, per_head[..., None]) <= budget).all():
            assert got >= recall.gather(-1, per_head[..., None]).mean() - 1e-12
    # Exhaustive check on a small problem: within 1 candidate step of the best assignment.
    cost2, recall2 = cost[:1, :2], recall[:1, :2]
    best = max(float(recall2[0, 0, a] + recall2[0, 1, b]) / 2 for a, b in itertools.product(range(4), repeat=2)
               if float(cost2[0, 0, a] + cost2[0, 1, b]) / 2 <= 0.5)
    choice = search.choose(recall2, cost2, 0.5, "model")
    got = float(recall2.gather(-1, choice[..., None]).mean())
    assert got <= best + 1e-12 and got >= best - float(recall2.max() - recall2.min()) / 2


def test_checkpoint_resumes_without_recomputing(tmp_path, monkeypatch):
    model, prompts = tiny_model(), texts()
    ckpt = tmp_path / "search.ckpt"
    calls = []
    real = search.score_layer
    monkeypatch.setattr(search, "score_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(length=N, cost_budget=0.4, candidates=CANDIDATES, checkpoint=ckpt, progress=False)
    first = mf.search_patterns(model, None, prompts, **kw)
    assert len(calls) == 3 * 2
    again = mf.search_patterns(model, None, prompts, **kw)
    assert len(calls) == 6, "a finished search recomputed layers"
    data = json.loads(ckpt.read_text())
    del data["layers"]["1/2"], data["layers"]["0/0"]       # as if interrupted after those layers
    ckpt.write_text(json.dumps(data))
    resumed = mf.search_patterns(model, None, prompts, **kw)
    assert len(calls) == 8
    for r in (again, resumed):
        assert torch.equal(r.choice, first.choice) and torch.allclose(r.recall, first.recall)
    with pytest.raises(ValueError, match="another search"):
        mf.search_patterns(model, None, prompts, **{**kw, "length": N - 64})


def test_output_is_minference_format_and_round_trips(tmp_path):
    model, prompts = tiny_model(), texts(1)
    result = mf.search_patterns(model, None, prompts, length=N, cost_budget=0.5, candidates=CANDIDATES,
                                allocate="model", progress=False)
    path = tmp_path / "patterns.json"
    result.save(path)
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == 3
    for layer in data:
        assert sorted(layer, key=int) == ["0", "1", "2", "3"]
        for kind, a, b, score in layer.values():
            assert kind in ("vertical_and_slash", "stream_llm", "block_sparse", "block_mass", "vertical_slash_mass",
                            "antidiagonal_mass") and 0 < score <= 1
    model.set_attn_implementation("minference_flex")
    mf.set_patterns(model, path)
    assert mf.get_patterns(model) == data == result.patterns()
    again = search.SearchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.patterns() == result.patterns() and again.mean_cost == result.mean_cost
    assert result.mean_cost <= 0.5 + 1e-9


def test_figure_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    n = len(CANDIDATES)
    result = search.SearchResult(candidates=tuple(CANDIDATES), recall=torch.rand(3, 4, n, dtype=torch.float64),
                                 cost=torch.rand(3, 4, n, dtype=torch.float64),
                                 choice=torch.randint(0, n, (3, 4)), length=N, cost_budget=0.3, allocate="head",
                                 prompts=1, seconds=0.0)
    search.plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(cost_budget=0.0), "cost_budget"), (dict(cost_budget=1.5), "cost_budget"),
    (dict(allocate="layer"), "allocate"), (dict(length=N + 100), "fewer than the search length"),
    (dict(candidates=[]), "candidates is empty"), (dict(candidates=[["bogus", 1, 2]]), "unknown pattern type"),
])
def test_bad_arguments_raise(kwargs, message):
    model = tiny_model()
    args = {**dict(length=N, cost_budget=0.3, progress=False), **kwargs}
    with pytest.raises(ValueError, match=message):
        mf.search_patterns(model, None, texts(1), **args)
    with pytest.raises(ValueError, match="at least one"):
        mf.search_patterns(model, None, [], length=N, cost_budget=0.3)


def test_rechoose_and_cli_rechoose(tmp_path):
    from minference_flex.tools import search_cli

    model = tiny_model()
    result = mf.search_patterns(model, None, texts(1), length=N, cost_budget=0.9, candidates=CANDIDATES,
                                progress=False)
    cheaper = result.rechoose(0.5, "model")
    assert cheaper.mean_cost <= 0.5 + 1e-9 < result.mean_cost and cheaper.allocate == "model"
    assert torch.equal(cheaper.choice, search.choose(result.recall, result.cost, 0.5, "model"))
    details = tmp_path / "d.json"
    details.write_text(json.dumps(result.to_dict()))
    out = tmp_path / "p.json"
    assert search_cli.main(["--rechoose", str(details), "--cost-budget", "0.5", "--allocate", "model",
                            "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == cheaper.patterns()


def test_shipped_smollm2_configuration_is_the_searched_one():
    """The packaged file is the saved GPU search re-chosen at cost 0.5 (docs/search.md), loads on a
    model of SmolLM2's shape, and beats the uniform default's recall at a lower cost."""
    from pathlib import Path

    from minference_flex.tools.models import SMOLLM2_PATTERNS

    root = Path(__file__).resolve().parent.parent
    details = json.loads((root / "docs/search/smollm2_16k_gpu_details.json").read_text())
    shipped = json.loads(Path(SMOLLM2_PATTERNS).read_text())
    result = search.SearchResult.from_dict(details).rechoose(0.5, "model")
    assert shipped == result.patterns()
    default = result.uniform(mf.DEFAULT_PATTERN)
    assert result.mean_cost <= default[1] and result.mean_recall > default[0]
    config = transformers.LlamaConfig(hidden_size=72, intermediate_size=16, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=16)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="minference_flex")
    mf.set_patterns(model, SMOLLM2_PATTERNS)
    assert mf.get_patterns(model) == shipped


def test_shipped_qwen_configuration_is_the_searched_one():
    """The packaged Qwen2.5-Coder file is the saved GPU search at cost 0.3 (docs/real_model.md) and
    loads on a model of Qwen2's shape (28 layers, 12 query heads, 2 KV heads)."""
    from pathlib import Path

    from minference_flex.tools.models import QWEN_SEARCHED_PATTERNS

    root = Path(__file__).resolve().parent.parent
    details = json.loads((root / "docs/search/qwen2_5_coder_16k_gpu_details.json").read_text())
    shipped = json.loads(Path(QWEN_SEARCHED_PATTERNS).read_text())
    result = search.SearchResult.from_dict(details).rechoose(0.3, "model")
    assert shipped == result.patterns() and result.length == 16384
    assert len(shipped) == 28 and all(len(layer) == 12 for layer in shipped)
    config = transformers.Qwen2Config(hidden_size=48, intermediate_size=16, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2, vocab_size=16)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="minference_flex")
    mf.set_patterns(model, QWEN_SEARCHED_PATTERNS)
    assert mf.get_patterns(model) == shipped
