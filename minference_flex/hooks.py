"""Temporarily wrapping a transformers model's attention function (for measurements, not inference)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def wrap_attention(model, wrapper: Callable) -> Iterator[None]:
    """While active, every attention call of ``model`` goes to
    ``wrapper(inner, module, query, key, value, attention_mask, **kwargs)``, where ``inner`` is the
    attention function of the model's current implementation (``sdpa``, ``minference_flex``, ...).
    The registry entry is restored on exit, also after an exception."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = impl in local, local.get(impl)
    inner = ALL_ATTENTION_FUNCTIONS[impl]

    def wrapped(module, query, key, value, attention_mask, **kwargs):
        return wrapper(inner, module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = wrapped
    try:
        yield
    finally:
        if had:
            local[impl] = before
        else:
            local.pop(impl, None)
