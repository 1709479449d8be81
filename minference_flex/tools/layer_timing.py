"""Per-layer timing of the attention calls of a transformers model (CUDA events, no host sync).

    with LayerTimes("sdpa") as times:
        model(input_ids)
    times.medians()          # {layer_idx: median ms of that layer's attention calls}

While active, the attention function registered under the given name is wrapped: every call of a
module with a ``layer_idx`` records a CUDA event before and after it. Times are read (one
synchronize) only when asked for. Used by ``minference-flex ttft --layer-times`` to compare each
layer's attention under ``sdpa`` and ``minference_flex`` (the target: no layer call slower than SDPA by
more than 5%).
"""
from __future__ import annotations

import statistics

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class LayerTimes:
    """Context manager timing the attention calls of ``name`` (a registered attention
    implementation, e.g. "sdpa" or "minference_flex") per layer; CUDA only."""

    def __init__(self, name: str):
        if not torch.cuda.is_available():
            raise ValueError("LayerTimes measures CUDA kernels and needs a GPU")
        self.name = name
        self.events: dict[int, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self._original = None

    def __enter__(self) -> LayerTimes:
        original = ALL_ATTENTION_FUNCTIONS[self.name]
        events = self.events

        def timed(module, *args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = original(module, *args, **kwargs)
            end.record()
            events.setdefault(int(getattr(module, "layer_idx", -1)), []).append((start, end))
            return result

        self._original = original
        AttentionInterface.register(self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        AttentionInterface.register(self.name, self._original)

    def clear(self) -> None:
        self.events.clear()

    def medians(self) -> dict[int, float]:
        """{layer_idx: median milliseconds of its recorded calls}."""
        torch.cuda.synchronize()
        return {layer: statistics.median(s.elapsed_time(e) for s, e in pairs)
                for layer, pairs in sorted(self.events.items())}
