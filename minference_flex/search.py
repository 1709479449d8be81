"""Offline kernel-aware pattern search: one pattern per head, chosen on calibration prompts.

For every layer and head, each candidate pattern is scored on the calibration prompts by
* its **recall**: the share of the head's exact softmax mass that the kept cells hold, averaged over
  all query rows (``block_masks.attention_recall``: dense scores in query chunks, so 32K-token
  prompts fit in memory), and
* its **cost**: the KV tiles the sparse kernel visits for it, counted from the real BlockMasks of the
  GPU layout (main mask + gathered vertical columns, ``AttentionPlan.visited_tiles``), plus, for the
  mass kinds, their block-mass estimate in tiles of equal time (``cost.H100``'s ``mass_ms`` over
  its ``flex_tile_ms``), as a fraction of the tiles of dense causal attention at the same length.
The candidates are estimated exactly as at inference (``select``), so the dynamic patterns are scored
with the columns, diagonals and blocks the prompt itself selects.

Choice (``allocate``):
* ``"head"``: every head takes the candidate of highest recall whose cost is at most ``cost_budget``;
* ``"model"``: the mean cost over all heads of all layers is at most ``cost_budget`` and the mean
  recall is maximised (greedy over each head's recall/cost frontier): heads that need it get more.

Layers are measured inside one forward pass per prompt (attention itself runs with the model's
current implementation, normally ``sdpa``); with ``checkpoint=`` every finished layer is written to
a JSON file and an interrupted search resumes from it.

    model, tokenizer = minference_flex.tools.models.smollm2(context=16384)
    result = mf.search_patterns(model, tokenizer, [text], length=16384, cost_budget=0.3)
    result.save("patterns.json")            # MInference format, score = recall
    mf.set_patterns(model, "patterns.json")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from block_masks import Pattern, attention_recall, select
from block_masks.pattern import A_SHAPE, ANTIDIAGONAL_MASS, BLOCK_MASS, BLOCK_SPARSE, VERTICAL_SLASH, VERTICAL_SLASH_MASS

from minference_flex.attention import plan_selection
from minference_flex.cost import H100
from minference_flex.hf import text_config
from minference_flex.hooks import wrap_attention

log = logging.getLogger(__name__)

#: The three MInference types at several budgets (A-shape: 64 sink tokens and a local window;
#: vertical-slash: columns and diagonals; block-sparse: key blocks of 64 per query block),
#: vertical-slash by mass (a share of the estimated mass, at most 8192 columns and diagonals), and
#: key blocks by antidiagonal mass (a share of the estimated mass of each query block, squares of 8).
DEFAULT_CANDIDATES: tuple[Pattern, ...] = (
    Pattern(A_SHAPE, 64, 512), Pattern(A_SHAPE, 64, 1024), Pattern(A_SHAPE, 64, 2048), Pattern(A_SHAPE, 64, 4096),
    Pattern(VERTICAL_SLASH, 30, 300), Pattern(VERTICAL_SLASH, 100, 800), Pattern(VERTICAL_SLASH, 300, 1500),
    Pattern(VERTICAL_SLASH, 500, 3000), Pattern(VERTICAL_SLASH, 1000, 6096), Pattern(VERTICAL_SLASH, 2000, 12288),
    Pattern(BLOCK_SPARSE, 8), Pattern(BLOCK_SPARSE, 16), Pattern(BLOCK_SPARSE, 32), Pattern(BLOCK_SPARSE, 64),
    Pattern(VERTICAL_SLASH_MASS, 900, 8192), Pattern(VERTICAL_SLASH_MASS, 950, 8192),
    Pattern(VERTICAL_SLASH_MASS, 990, 8192),
    Pattern(ANTIDIAGONAL_MASS, 950, 8), Pattern(ANTIDIAGONAL_MASS, 980, 8),
)

ALLOCATIONS = ("head", "model")


@dataclass
class SearchResult:
    """Per-layer, per-head scores of every candidate and the choice.

    recall, cost: [layers, heads, candidates] float64 (means over the calibration prompts; cost as a
    fraction of the dense causal tiles); choice: [layers, heads] int64 index into ``candidates``."""

    candidates: tuple[Pattern, ...]
    recall: Tensor
    cost: Tensor
    choice: Tensor
    length: int
    cost_budget: float
    allocate: str
    prompts: int
    seconds: float

    def chosen(self, table: Tensor) -> Tensor:
        """[layers, heads] values of ``table`` [layers, heads, candidates] at the chosen candidates."""
        return table.gather(-1, self.choice[..., None])[..., 0]

    @property
    def mean_recall(self) -> float:
        return float(self.chosen(self.recall).mean())

    @property
    def mean_cost(self) -> float:
        return float(self.chosen(self.cost).mean())

    def patterns(self) -> list[dict[str, list]]:
        """The MInference configuration: one dict per layer, head -> [type, a, b, recall]."""
        recall = self.chosen(self.recall)
        return [{str(h): self.candidates[int(c)].to_list(round(float(recall[layer, h]), 6))
                 for h, c in enumerate(row)} for layer, row in enumerate(self.choice)]

    def save(self, path) -> None:
        """Write the MInference JSON file (loadable by ``mf.set_patterns`` and by MInference)."""
        Path(path).write_text(json.dumps(self.patterns(), indent=1) + "\n")

    def to_dict(self) -> dict:
        """Everything, JSON-serialisable (``from_dict`` restores it)."""
        return {"candidates": [[p.kind, p.a, p.b, p.block_size] for p in self.candidates],
                "recall": self.recall.tolist(), "cost": self.cost.tolist(), "choice": self.choice.tolist(),
                "length": self.length, "cost_budget": self.cost_budget, "allocate": self.allocate,
                "prompts": self.prompts, "seconds": self.seconds,
                "mean_recall": self.mean_recall, "mean_cost": self.mean_cost}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchResult":
        return cls(candidates=tuple(Pattern(k, a, b, block_size=bs) for k, a, b, bs in data["candidates"]),
                   recall=torch.tensor(data["recall"], dtype=torch.float64),
                   cost=torch.tensor(data["cost"], dtype=torch.float64),
                   choice=torch.tensor(data["choice"], dtype=torch.int64), length=data["length"],
                   cost_budget=data["cost_budget"], allocate=data["allocate"], prompts=data["prompts"],
                   seconds=data["seconds"])

    def rechoose(self, cost_budget: float, allocate: str | None = None) -> "SearchResult":
        """The same scores with another budget or allocation (no new measurement)."""
        allocate = self.allocate if allocate is None else allocate
        return dataclasses.replace(self, choice=choose(self.recall, self.cost, cost_budget, allocate),
                                   cost_budget=float(cost_budget), allocate=allocate)

    def uniform(self, pattern: Pattern) -> tuple[float, float]:
        """(mean recall, mean cost) of one candidate used for every head (for comparisons)."""
        i = self.candidates.index(pattern)
        return float(self.recall[..., i].mean()), float(self.cost[..., i].mean())


# --------------------------------------------------------------------------- choosing

def _check_choice(cost_budget, allocate: str) -> None:
    if isinstance(cost_budget, bool) or not (isinstance(cost_budget, (int, float)) and 0 < cost_budget <= 1):
        raise ValueError(f"cost_budget is a fraction of the dense causal tiles in (0, 1], got {cost_budget!r}")
    if allocate not in ALLOCATIONS:
        raise ValueError(f"allocate must be one of {ALLOCATIONS}, got {allocate!r}")


def choose(recall: Tensor, cost: Tensor, cost_budget: float, allocate: str = "head") -> Tensor:
    """[layers, heads] index of the chosen candidate (see the module docstring).

    recall, cost: [layers, heads, candidates]. Where the budget cannot be met (a head's every
    candidate, or for ``"model"`` the cheapest ones together, cost more) heads get their cheapest
    candidate, with a warning."""
    _check_choice(cost_budget, allocate)
    if allocate == "head":
        fits = cost <= cost_budget + 1e-12
        best = torch.where(fits, recall, -1.0).argmax(-1)
        cheapest = cost.argmin(-1)
        none = ~fits.any(-1)
        if none.any():
            log.warning("%d heads have no candidate within cost %.3f: they get their cheapest candidate",
                        int(none.sum()), cost_budget)
        return torch.where(none, cheapest, best)
    return _allocate_model(recall, cost, cost_budget)


def _allocate_model(recall: Tensor, cost: Tensor, cost_budget: float) -> Tensor:
    """Mean cost <= budget, maximal mean recall: start every head at its cheapest candidate and take
    upgrades along each head's upper convex recall/cost frontier, best recall per cost first."""
    L, H, C = recall.shape
    choice = cost.argmin(-1)
    spent = float(cost.gather(-1, choice[..., None]).sum())
    allowed = cost_budget * L * H
    if spent > allowed:
        log.warning("the cheapest candidates already cost %.3f of the causal tiles on average, more than the "
                    "budget %.3f: every head gets its cheapest candidate", spent / (L * H), cost_budget)
    steps = []  # (gain per cost, head, from-candidate, to-candidate, extra cost)
    for flat in range(L * H):
        l, h = divmod(flat, H)
        r, c = recall[l, h].tolist(), cost[l, h].tolist()
        at = int(choice[l, h])
        while True:  # next frontier point: the steepest recall gain per extra cost
            best, best_slope = None, 0.0
            for j in range(C):
                dc, dr = c[j] - c[at], r[j] - r[at]
                if dr <= 0:
                    continue
                slope = math.inf if dc <= 0 else dr / dc
                if slope > best_slope or (slope == best_slope and best is not None and c[j] > c[best]):
                    best, best_slope = j, slope
            if best is None:
                break
            steps.append((best_slope, l, h, best, max(c[best] - c[at], 0.0)))
            at = best
    # Slopes along one head's frontier decrease, so sorting keeps each head's steps in order.
    steps.sort(key=lambda s: -s[0])
    blocked = set()
    for slope, l, h, to, extra in steps:
        if (l, h) in blocked:
            continue
        if spent + extra > allowed + 1e-9:
            blocked.add((l, h))
            continue
        choice[l, h] = to
        spent += extra
    return choice


# --------------------------------------------------------------------------- measuring

def _prompt_ids(tokenizer, text, length: int) -> Tensor:
    """The first ``length`` tokens of a calibration text (a string or a sequence of token ids)."""
    if isinstance(text, str):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(text, Tensor):
        ids = text.flatten().tolist()
    else:
        ids = list(text)
    if len(ids) < length:
        raise ValueError(f"a calibration text has {len(ids)} tokens, fewer than the search length {length}")
    return torch.tensor([ids[:length]])


def _fingerprint(config, prompts: list[Tensor], length: int, candidates: Sequence[Pattern]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([getattr(config, "_name_or_path", ""), config.num_hidden_layers,
                         config.num_attention_heads, length,
                         [[p.kind, p.a, p.b, p.block_size] for p in candidates]]).encode())
    for ids in prompts:
        h.update(ids.numpy().tobytes())
    return h.hexdigest()


def _load_checkpoint(path, fingerprint: str) -> dict:
    if path is None or not os.path.exists(path):
        return {}
    data = json.loads(Path(path).read_text())
    if data.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {path} belongs to another search (model, prompts, length or candidates "
                         "differ): delete it or pass another checkpoint path")
    return data["layers"]


def _save_checkpoint(path, fingerprint: str, layers: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps({"fingerprint": fingerprint, "layers": layers}))
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a broken checkpoint


def score_layer(query: Tensor, key: Tensor, candidates: Sequence[Pattern], scale: float, *,
                chunk: int = 256) -> tuple[Tensor, Tensor]:
    """(recall, cost), both [heads, candidates] float64, of every candidate used for every head of
    one attention call (query [1, Hq, N, D], key [1, Hkv, N, D], a whole prompt)."""
    if query.shape[0] != 1:
        raise ValueError(f"score_layer takes one prompt (batch 1), got batch {query.shape[0]}")
    q, k = query.float(), key.float()
    Hq, N, D = q.shape[1], k.shape[2], q.shape[3]
    selections, costs = [], []
    for pattern in candidates:
        selection = select(q, k, (pattern,) * Hq, scale)
        plan = plan_selection(selection, scale=scale, full_width=False, fold_columns=False)
        estimate = H100.mass_ms(1, N, N, (pattern,)) / (H100.flex_tile_ms * H100.dim_factor(D))
        costs.append((plan.visited_tiles()[0].double() + estimate) / plan.causal_tiles())
        selections.append(selection)
    recall = attention_recall(q, k, selections, scale, chunk=chunk)[:, 0]
    return recall.T.cpu(), torch.stack(costs).T.cpu()


def search_patterns(model, tokenizer, texts: Sequence, *, length: int, cost_budget: float,
                    candidates: Sequence | None = None, allocate: str = "head", chunk: int = 256,
                    checkpoint: str | os.PathLike | None = None, progress: bool = True) -> SearchResult:
    """Choose one pattern per layer and head for ``model`` (see the module docstring).

    texts: calibration prompts, strings or token-id sequences of at least ``length`` tokens (the
    first ``length`` are used). cost_budget: fraction (0, 1] of the dense causal KV tiles.
    candidates: patterns (``mf.Pattern`` or ``[type, a, b]``), default ``DEFAULT_CANDIDATES``.
    chunk: query rows per dense scoring step (memory ~ heads x chunk x length floats).
    checkpoint: JSON file of finished layers; an existing one for the same search is resumed.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("search_patterns needs at least one calibration text")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    _check_choice(cost_budget, allocate)  # before the long measurement, not only in choose()
    candidates = tuple(Pattern.parse(c) for c in (DEFAULT_CANDIDATES if candidates is None else candidates))
    if not candidates:
        raise ValueError("candidates is empty")
    config = text_config(model)
    num_layers = int(config.num_hidden_layers)
    prompts = [_prompt_ids(tokenizer, t, length) for t in texts]
    fingerprint = _fingerprint(config, prompts, length, candidates)
    done = _load_checkpoint(checkpoint, fingerprint)
    if done:
        log.info("resuming the search from %s (%d layer results)", checkpoint, len(done))
    start = time.perf_counter()
    device = next(model.parameters()).device

    for p, ids in enumerate(prompts):
        todo = {layer for layer in range(num_layers) if f"{p}/{layer}" not in done}
        if not todo:
            continue
        bar = tqdm(total=num_layers, initial=num_layers - len(todo), desc=f"search prompt {p + 1}/{len(prompts)}",
                   unit="layer", disable=not progress, file=sys.stderr)

        def measure(inner, module, query, key, value, attention_mask, **kwargs):
            layer = module.layer_idx
            if layer in todo and query.shape[2] == key.shape[2] == length:
                scale = kwargs.get("scaling") or 1.0 / math.sqrt(query.shape[-1])
                recall, cost = score_layer(query, key, candidates, float(scale), chunk=chunk)
                done[f"{p}/{layer}"] = {"recall": recall.tolist(), "cost": cost.tolist()}
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, fingerprint, done)
                todo.discard(layer)
                bar.update(1)
            return inner(module, query, key, value, attention_mask, **kwargs)

        with torch.inference_mode(), wrap_attention(model, measure):
            model.get_decoder()(input_ids=ids.to(device), use_cache=False)
        bar.close()
        if todo:
            raise RuntimeError(f"layers {sorted(todo)} were never called with a {length}-token prefill")

    def mean_over_prompts(name: str) -> Tensor:  # [layers, heads, candidates]
        return torch.tensor([[done[f"{p}/{layer}"][name] for layer in range(num_layers)]
                             for p in range(len(prompts))], dtype=torch.float64).mean(0)

    recall, cost = mean_over_prompts("recall"), mean_over_prompts("cost")
    choice = choose(recall, cost, float(cost_budget), allocate)
    result = SearchResult(candidates=candidates, recall=recall, cost=cost, choice=choice, length=length,
                          cost_budget=float(cost_budget), allocate=allocate, prompts=len(prompts),
                          seconds=round(time.perf_counter() - start, 1))
    log.info("search: mean recall %.4f at mean cost %.3f of the causal tiles (%s allocation, %.1f s)",
             result.mean_recall, result.mean_cost, allocate, result.seconds)
    return result


# --------------------------------------------------------------------------- figure

TYPE_COLOURS = {A_SHAPE: "tab:blue", VERTICAL_SLASH: "tab:orange", BLOCK_SPARSE: "tab:green", BLOCK_MASS: "tab:purple",
                VERTICAL_SLASH_MASS: "tab:red", ANTIDIAGONAL_MASS: "tab:brown", "dense": "tab:grey"}


def plot(result: SearchResult, path) -> None:
    """PNG: the chosen type and budget per layer and head (left) and each head's recall (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    L, H = result.choice.shape
    kinds = list(TYPE_COLOURS)
    kind_index = torch.tensor([[kinds.index(result.candidates[int(c)].kind) for c in row] for row in result.choice])
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * H, 1.5 + 0.32 * L), constrained_layout=True)
    left.imshow(kind_index.numpy(), cmap=ListedColormap(list(TYPE_COLOURS.values())), vmin=0,
                vmax=len(kinds) - 1, aspect="auto")
    for layer in range(L):
        for h in range(H):
            p = result.candidates[int(result.choice[layer, h])]
            label = {A_SHAPE: f"{p.a}+{p.b}", VERTICAL_SLASH: f"{p.a}/{p.b}",
                     BLOCK_SPARSE: f"{p.a}x{p.block_size}", BLOCK_MASS: f"{p.a / 10:g}%/{p.b}",
                     VERTICAL_SLASH_MASS: f"{p.a / 10:g}%<{p.b}",
                     ANTIDIAGONAL_MASS: f"{p.a / 10:g}%/{p.b}x{p.b}"}.get(p.kind, "")
            left.text(h, layer, label, ha="center", va="center", fontsize=6)
    left.set_title("chosen pattern (A-shape sink+local, VS columns/diagonals, BS blocks, mass/rows, VS mass<cap, "
                   "mass/square)",
                   fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in TYPE_COLOURS.values()]
    left.legend(handles, kinds, fontsize=6, loc="upper right", bbox_to_anchor=(1.0, -0.02 - 0.3 / L), ncol=4)
    recall = result.chosen(result.recall).numpy()
    image = right.imshow(recall, cmap="viridis", vmin=min(0.8, float(recall.min())), vmax=1.0, aspect="auto")
    for ax in (left, right):
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.tick_params(labelsize=6)
    right.set_title(f"recall (mean {result.mean_recall:.3f}) at mean cost {result.mean_cost:.1%} of causal tiles",
                    fontsize=8)
    fig.colorbar(image, ax=right)
    fig.suptitle(f"pattern search at {result.length} tokens, cost budget {result.cost_budget:.0%} "
                 f"({result.allocate} allocation)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
