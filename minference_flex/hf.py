"""The transformers backend: ``attn_implementation="minference_flex"``.

Importing ``minference_flex`` registers the name with transformers' ``AttentionInterface`` and
``AttentionMaskInterface``, so any model whose attention goes through the attention interface (Llama,
Qwen2, Qwen3, Mistral, Phi-3, ...) can be loaded with

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="minference_flex")
    mf.set_patterns(model, "patterns.json")      # optional: MInference per-head configuration

Prefill of ``min_sparse_len`` tokens or more runs ``mf.sparse_attention`` with each layer's per-head
patterns; shorter prefills and decoding (one query) run ``scaled_dot_product_attention``. Padded
batches are run sequence by sequence on their real tokens, so each sequence gets exactly the result
it gets alone. Static caches work: the queries sit at their real positions and the cache slots not
written yet are no keys. Two cases run SDPA for the whole call instead (each logged once through the
``minference_flex`` logger): a 2-D mask whose real tokens are not one contiguous run per sequence
(holes), and a call whose gradient autograd needs (the sparse kernel has no backward). Attention
dropout in training mode raises.

SDPA fallback (``sdpa_fallback``, default on): on a CUDA device each prefill layer call of
``min_sparse_len`` keys or more first asks the model's cost model (``cost_model``, ``minference_flex.cost``)
whether the sparse kernel could be slower than SDPA for its batch, heads, lengths, head dim and the
layer's patterns, and then runs SDPA (``cost.choose``): "sparse" and "sdpa" decisions read no tensor;
a "check" plans, predicts the kernel time from the plan's tiles and runs the faster side (one host
sync), so a layer loses at most ``cost.MAX_LOSS`` (5%) of SDPA's time to planning. Under
``torch.compile`` a "check" runs sparse (no sync, no graph break). The model is calibrated for CUDA
only: on other device types than the model's ``fallback_devices`` (default ``["cuda"]``) every
prefill from ``min_sparse_len`` on runs sparse. ``dispatch_counts(model)`` counts which way the
model's uncompiled calls went.

The configuration lives on the (text) config as ``config.minference_flex`` (a JSON-serialisable
dict, so ``save_pretrained`` keeps it; ``set_patterns`` first gives a model its own copy of a config
object another model shares); a model without it uses ``DEFAULT_PATTERN`` for every head,
``DEFAULT_MIN_SPARSE_LEN`` and the SDPA fallback.

Run settings, per model and stored in the same dict (``configure`` or keyword arguments of
``set_patterns``): ``compiled`` (default True) selects the compiled FlexAttention kernel, False its
eager emulation (tests use it, to avoid one CPU compile per prompt length); ``cost_model`` is the
SDPA fallback's cost model as a name of ``cost.COST_MODELS`` (default ``"H100"``), a dict of
``CostModel`` fields or None (never fall back); ``fallback_devices`` the device types it applies on.
No module-level switch changes how a model runs.

Tensor parallelism (transformers' ``tp_plan="auto"``, one process per rank): each rank's attention
gets its contiguous share of the query and KV heads, and runs the layer's patterns of those heads
(``_local_layer``; docs/distributed.md).
"""
from __future__ import annotations

import copy
import functools
import gc
import json
import logging
import math
import numbers
import operator
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from block_masks import Pattern

from minference_flex.attention import kernel_plan, run_plan, sparse_attention
from minference_flex.head_patterns import DEFAULT_PATTERN
from minference_flex.cost import COST_MODELS, CostModel, choose, kernel_beats_sdpa

NAME = "minference_flex"

#: Below ~10K tokens sparsity gives no gain (MInference paper, arXiv:2407.02490); to be re-measured on
#: the GPU.
DEFAULT_MIN_SPARSE_LEN = 8192

#: Run settings of a model without them (``configure``): the compiled kernel, the H100 cost model
#: (``cost.COST_MODELS``), applied on CUDA only (it is calibrated for CUDA; tests add "cpu").
DEFAULT_SETTINGS = {"compiled": True, "cost_model": "H100", "fallback_devices": ["cuda"]}
_DEFAULT_DEVICES = ("cuda",)  # DEFAULT_SETTINGS["fallback_devices"] where a stored dict has none (compared by value)

_CONFIG_ATTR = "minference_flex"

logger = logging.getLogger("minference_flex")
#: Reasons ``_log_once`` has logged in this process.
_LOGGED: set[str] = set()


def _log_once(reason: str, message: str) -> None:
    """``logger.warning(message)`` the first time ``reason`` comes up in this process (not while
    torch.compile traces: a log call would break the graph)."""
    if torch.compiler.is_compiling() or reason in _LOGGED:
        return
    _LOGGED.add(reason)
    logger.warning(message)


# --------------------------------------------------------------------------- configuration

def text_config(model):
    """The (text) configuration of a model or configuration: where layer and head counts live."""
    config = model.config if hasattr(model, "config") else model
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _score(value) -> int | float:
    """A MInference entry's score as a plain JSON number; ValueError unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"the score (fourth element) must be a finite number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _entry(entry) -> list:
    """A normalised MInference entry [type, a, b, score] (score kept when given, else 0.0), with the
    block size as a fifth element when it is not 64 (``Pattern.to_list``)."""
    pattern = Pattern.parse(entry)
    score = _score(entry[3]) if isinstance(entry, (list, tuple)) and len(entry) >= 4 else 0.0
    return pattern.to_list(score)


def _head(layer: int, key, num_heads: int) -> int:
    """The head number of a layer dict's key: a string of decimal digits or an integer (not a bool)."""
    if isinstance(key, str):
        head = int(key) if key.isascii() and key.isdecimal() else None
    elif isinstance(key, bool) or not isinstance(key, numbers.Integral):
        head = None
    else:
        head = operator.index(key)
    if head is None:
        raise ValueError(f"layer {layer}: head key {key!r} is not a head number")
    if not 0 <= head < num_heads:
        raise ValueError(f"layer {layer} names head {head} but the model has {num_heads} attention heads")
    return head


def _layer_entry(layer: int, key, entry) -> list:
    """``_entry`` with the layer and the head key named in its error."""
    try:
        return _entry(entry)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {layer}, head key {key!r}: {e}") from None


def _is_single_entry(source) -> bool:
    return isinstance(source, Pattern) or (
        isinstance(source, (list, tuple)) and len(source) in (1, 3, 4, 5) and isinstance(source[0], str)
    )


def _config_shared(model, config) -> bool:
    """Whether a module outside ``model`` holds ``config`` or its text config: nn.Module instance
    dicts among their referrers (about 30 ms with a few 100K objects alive; set_patterns is no hot path)."""
    ours = {id(m.__dict__) for m in model.modules()}
    configs = {id(config): config, id(text_config(config)): text_config(config)}.values()
    return any(type(r) is dict and "_parameters" in r and "_modules" in r and id(r) not in ours
               for c in configs for r in gc.get_referrers(c))


def _own_config(model) -> None:
    """Give ``model`` a copy of its config when another model's modules use the same config object
    (``from_config(other.config)`` shares it), so that what ``set_patterns`` stores reaches this
    model only. Every module of ``model`` that held the shared config (or one of its sub-configs)
    gets the copy. A model whose config no other module uses keeps it."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        return
    config = model.config
    if not _config_shared(model, config):
        return
    gc.collect()  # modules of a model that is gone but not collected yet do not count
    if not _config_shared(model, config):
        return
    from transformers import PretrainedConfig

    memo: dict = {}
    copy.deepcopy(config, memo)  # memo: id of each original -> its copy (sub-configs included)
    for module in model.modules():
        for name, value in list(module.__dict__.items()):
            if isinstance(value, PretrainedConfig) and id(value) in memo:
                module.__dict__[name] = memo[id(value)]


#: "Keep the stored value" for the run settings of ``set_patterns`` and ``configure``.
_KEEP = object()


def _cost_setting(value):
    """A ``cost_model`` setting in its stored (JSON) form: None, a name of ``COST_MODELS`` (a
    ``CostModel`` among them is stored by name) or a dict of ``CostModel`` fields."""
    if value is None:
        return None
    if isinstance(value, CostModel):
        names = [name for name, model in COST_MODELS.items() if model == value]
        return names[0] if names else asdict(value)
    if isinstance(value, str):
        if value not in COST_MODELS:
            raise ValueError(f"unknown cost model {value!r}; known: {sorted(COST_MODELS)}")
        return value
    if isinstance(value, Mapping):
        try:
            return asdict(CostModel(**value))
        except TypeError as e:
            raise ValueError(f"cost_model: {e}") from None
    raise ValueError(f"cost_model must be None, a name, a dict of CostModel fields or a CostModel, got {value!r}")


def _cost_model(value) -> CostModel | None:
    """The ``CostModel`` of a stored ``cost_model`` setting (``_cost_setting``)."""
    if value is None or isinstance(value, CostModel):
        return value
    return COST_MODELS[value] if isinstance(value, str) else CostModel(**value)


def _settings(stored: dict | None, compiled=_KEEP, cost_model=_KEEP, fallback_devices=_KEEP) -> dict:
    """The run settings of a stored dict (defaults where it has none) with the given ones changed."""
    old = stored or {}
    out = {name: old.get(name, default) for name, default in DEFAULT_SETTINGS.items()}
    if compiled is not _KEEP:
        if not isinstance(compiled, bool):
            raise ValueError(f"compiled must be True or False, got {compiled!r}")
        out["compiled"] = compiled
    if cost_model is not _KEEP:
        out["cost_model"] = _cost_setting(cost_model)
    if fallback_devices is not _KEEP:
        if isinstance(fallback_devices, str) or not all(isinstance(d, str) for d in fallback_devices):
            raise ValueError(f"fallback_devices must be a list of device types, got {fallback_devices!r}")
        out["fallback_devices"] = list(fallback_devices)
    else:
        out["fallback_devices"] = list(out["fallback_devices"])
    return out


def _store(model, stored: dict) -> None:
    """Put ``stored`` on the model's (own) text config and build each attention layer's LayerConfig
    now, so that no forward pays for parsing."""
    _own_config(model)
    config = text_config(model)
    setattr(config, _CONFIG_ATTR, stored)
    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            if getattr(module, "layer_idx", None) is not None and getattr(module, "config", None) is not None \
                    and _stored(module) is stored:
                _layer_config(module)


def configure(model, *, compiled=_KEEP, cost_model=_KEEP, fallback_devices=_KEEP, min_sparse_len=_KEEP,
              sdpa_fallback=_KEEP) -> None:
    """Change run settings of one model, keeping its patterns (``DEFAULT_PATTERN`` for every head
    if it has none) and every setting not given.

    ``compiled``: the compiled FlexAttention kernel (True, the default) or its eager emulation.
    ``cost_model``: the SDPA fallback's cost model: a name of ``cost.COST_MODELS`` (default
    ``"H100"``), a dict of ``CostModel`` fields, a ``CostModel`` (stored by name or as its fields:
    the config stays JSON) or None (never fall back). ``fallback_devices``: the device types the
    cost model applies on (default ``["cuda"]``). ``min_sparse_len`` and ``sdpa_fallback`` as in
    ``set_patterns``."""
    stored = getattr(text_config(model), _CONFIG_ATTR, None)
    if min_sparse_len is _KEEP:
        min_sparse_len = _min_sparse_len(stored)
    if sdpa_fallback is _KEEP:
        sdpa_fallback = stored.get("sdpa_fallback", True) if stored else True
    set_patterns(model, get_patterns(model), min_sparse_len=min_sparse_len, sdpa_fallback=sdpa_fallback,
                 compiled=compiled, cost_model=cost_model, fallback_devices=fallback_devices)


def settings(model) -> dict:
    """The model's run settings (``configure``): compiled, cost_model, fallback_devices."""
    return _settings(getattr(text_config(model), _CONFIG_ATTR, None))


def set_patterns(model, source, *, min_sparse_len: int = DEFAULT_MIN_SPARSE_LEN, sdpa_fallback: bool = True,
                 compiled=_KEEP, cost_model=_KEEP, fallback_devices=_KEEP) -> None:
    """Configure a model loaded with ``attn_implementation="minference_flex"``.

    ``source``: a path to a MInference JSON file (a list with one dict per layer, head number as a
    string -> ``[type, a, b, score]``, or ``[type, a, b, score, block_size]`` for a block size other
    than 64), that list already loaded, or one pattern entry (``[type, a, b]``, ``[type, a, b, score]``
    or ``mf.Pattern``) used for every head of every layer.
    Heads a file leaves out get ``DEFAULT_PATTERN``. Prefills shorter than ``min_sparse_len`` keys
    run dense. ``sdpa_fallback`` lets the backend run SDPA where the cost model predicts the sparse
    kernel to be slower (on CUDA; see the module docstring); False always runs the sparse kernel
    from ``min_sparse_len`` on (accuracy measurements of the patterns themselves). ``compiled``,
    ``cost_model`` and ``fallback_devices`` are the run settings of ``configure``: those not given
    stay as the model had them.

    The configuration is stored on the model's config. A config object that another model's modules
    also use (``from_config(other.config)`` does not copy it) is first replaced by a copy in every
    module of ``model``, so that configuring one model never changes another.
    """
    config = text_config(model)
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    if isinstance(min_sparse_len, bool) or not isinstance(min_sparse_len, numbers.Integral) or min_sparse_len < 1:
        raise ValueError(f"min_sparse_len must be a positive integer, got {min_sparse_len!r}")
    if not isinstance(sdpa_fallback, bool):
        raise ValueError(f"sdpa_fallback must be True or False, got {sdpa_fallback!r}")
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            source = json.load(f)
    if _is_single_entry(source):
        entry = _entry(source)
        layers = [{str(h): list(entry) for h in range(num_heads)} for _ in range(num_layers)]
    else:
        if isinstance(source, (str, bytes, Mapping)) or not isinstance(source, Sequence):
            raise ValueError("patterns must be a path, a MInference list (one dict per layer) or one pattern "
                             f"entry, got {type(source).__name__}")
        if len(source) != num_layers:
            raise ValueError(f"the pattern configuration has {len(source)} layers but the model has "
                             f"{num_layers} layers")
        layers = []
        for i, layer in enumerate(source):
            if not isinstance(layer, Mapping):
                raise ValueError(f"layer {i} of the pattern configuration must be a dict from head number to "
                                 f"[type, a, b, score], got {type(layer).__name__}")
            heads = {str(h): DEFAULT_PATTERN.to_list() for h in range(num_heads)}
            keys = {}
            for key, entry in layer.items():
                head = _head(i, key, num_heads)
                if head in keys:
                    raise ValueError(f"layer {i}: head keys {keys[head]!r} and {key!r} both name head {head}")
                keys[head] = key
                heads[str(head)] = _layer_entry(i, key, entry)
            layers.append(heads)
    run = _settings(getattr(config, _CONFIG_ATTR, None), compiled, cost_model, fallback_devices)
    for heads in layers:
        _parse_layer(heads, num_heads)  # every entry parses before anything is stored
    _store(model, {"patterns": layers, "min_sparse_len": operator.index(min_sparse_len),
                   "sdpa_fallback": sdpa_fallback, **run})


def dispatch_counts(model) -> Counter:
    """Which way the model's prefill layer calls of ``min_sparse_len`` keys or more ran, summed over
    its layers: "sparse" (the sparse kernel, without a check), "sdpa", "check-sparse", "check-sdpa"
    (after planning). Counted outside torch.compile only (a compiled graph does not run Python). A
    new Counter: ``clear_dispatch_counts(model)`` starts the counts again. The counts live on the
    attention modules, not in the config (``save_pretrained`` does not write them)."""
    total = Counter()
    for module in model.modules():
        counts = module.__dict__.get(_COUNTS)
        if counts:
            total.update(counts)
    return total


def clear_dispatch_counts(model) -> None:
    """Set the model's ``dispatch_counts`` back to zero."""
    for module in model.modules():
        counts = module.__dict__.get(_COUNTS)
        if counts is not None:
            counts.clear()


def get_patterns(model) -> list[dict[str, list]]:
    """The model's configuration as a MInference list: one dict per layer, head string -> [type, a, b, score]
    (and block_size as a fifth element where it is not 64)."""
    config = text_config(model)
    stored = getattr(config, _CONFIG_ATTR, None)
    if stored:
        return json.loads(json.dumps(stored["patterns"]))
    num_heads = int(config.num_attention_heads)
    return [{str(h): DEFAULT_PATTERN.to_list() for h in range(num_heads)}
            for _ in range(int(config.num_hidden_layers))]


def save_patterns(model, path) -> None:
    """Write ``get_patterns(model)`` as a MInference JSON file (strict JSON: a score that is not a
    finite number, which only an edit of the stored dict can put there, raises ValueError)."""
    try:
        text = json.dumps(get_patterns(model), indent=1, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"the stored pattern configuration is not valid JSON: {e}") from None
    Path(path).write_text(text + "\n")


#: Where ``_layer_config`` keeps a module's LayerConfig (in the module's ``__dict__``), and where the
#: module's dispatch Counter lives (``dispatch_counts``).
_LAYER_CACHE = "_minference_flex_layer"
_COUNTS = "_minference_flex_counts"


class LayerConfig(NamedTuple):
    """What one layer's attention calls run with (``_layer_config``)."""

    patterns: tuple[Pattern, ...] | None  # one per query head; None: DEFAULT_PATTERN for every head
    min_sparse_len: int
    sdpa_fallback: bool
    compiled: bool  # the compiled kernel (else the eager emulation)
    cost: CostModel | None  # the fallback's cost model; None: no fallback (sdpa_fallback off included)
    fallback_devices: tuple[str, ...]  # device types the cost model applies on
    counts: Counter | None  # the module's dispatch counts (None while torch.compile traces)


def _config_attrs(config) -> dict:
    """The instance attributes of a transformers config. Read past the config's ``__getattribute__``,
    which costs about 1.3 us per attribute in transformers 5: at 4K tokens a layer call is host-bound,
    and three such reads made it 7% slower than ``sdpa``'s (measured on the GPU). Under torch.compile
    the plain attribute reads are traced instead."""
    if torch.compiler.is_compiling():
        return {name: getattr(config, name) for name in (_CONFIG_ATTR, "num_attention_heads") if hasattr(config, name)}
    return object.__getattribute__(config, "__dict__")


def _stored(module) -> dict | None:
    """The configuration ``set_patterns`` stored on the attention module's (model) config, or None."""
    config = getattr(module, "config", None)
    return None if config is None else _config_attrs(config).get(_CONFIG_ATTR)


def _min_sparse_len(stored: dict | None) -> int:
    """``min_sparse_len`` of a stored configuration (``_stored``; None: the default)."""
    return stored.get("min_sparse_len", DEFAULT_MIN_SPARSE_LEN) if stored else DEFAULT_MIN_SPARSE_LEN


def _settings_key(stored: dict) -> tuple:
    """The values of a stored dict a LayerConfig is built from, besides the head dict."""
    get = stored.get  # spelled out: this runs on every long layer call
    return (get("min_sparse_len", DEFAULT_MIN_SPARSE_LEN), get("sdpa_fallback", True), get("compiled", True),
            get("cost_model", "H100"), get("fallback_devices", _DEFAULT_DEVICES))


def _layer_config(module) -> LayerConfig:
    """The stored configuration of the attention module's layer (defaults without one).

    Outside torch.compile the result is kept on the module (``_LAYER_CACHE``) for as long as the
    stored dict, the layer's head dict and the values of the other settings stay the same: at 4K
    tokens a layer call is host-bound, and rebuilding it took 2.5 us of each call on the GPU
    machine's host. Edit a head dict in place and the change is not seen: call ``set_patterns``.
    The cache goes with the module."""
    stored = _stored(module)
    if stored:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError("minference_flex needs module.layer_idx to find the layer's patterns")
        heads, key = stored["patterns"][layer], _settings_key(stored)
    else:
        heads = key = None
    compiling = torch.compiler.is_compiling()
    if not compiling:
        cached = module.__dict__.get(_LAYER_CACHE)
        if cached is not None and cached[0] is stored and cached[1] is heads and cached[2] == key:
            return cached[3]
    if stored:
        # An attribute_map alias (e.g. n_head) is no instance attribute: read it the usual way then.
        config = module.config
        attrs = _config_attrs(config)
        num_heads = attrs["num_attention_heads"] if "num_attention_heads" in attrs else getattr(config, "num_attention_heads", None)
        # Parsed while tracing into constants of the graph (dynamo guards on the configuration).
        patterns = _parse_layer(heads, num_heads if num_heads is not None else len(heads))
        min_len, fallback, compiled, cost, devices = key
    else:
        patterns, min_len, fallback = None, DEFAULT_MIN_SPARSE_LEN, True
        compiled, cost, devices = DEFAULT_SETTINGS.values()
    counts = None if compiling else module.__dict__.setdefault(_COUNTS, Counter())
    result = LayerConfig(patterns, int(min_len), bool(fallback), bool(compiled),
                         _cost_model(cost) if fallback else None, tuple(devices), counts)
    if not compiling:
        module.__dict__[_LAYER_CACHE] = (stored, heads, copy.deepcopy(key), result)
    return result


# --------------------------------------------------------------------------- tensor parallelism

#: Where ``_local_layer`` keeps a module's LayerConfig for its local heads (in the module's ``__dict__``).
_LOCAL_CACHE = "_minference_flex_local"


def _tp_rank(tp_size: int) -> int:
    """This process's rank in its tensor-parallel group of ``tp_size`` ranks: ``rank % tp_size``.

    transformers builds its device mesh as ``init_device_mesh(type, (pp, dp_replicate, fsdp, tp))``
    (``transformers.distributed.utils.initialize_distributed_mesh``), ranks laid out row-major, so
    the TP coordinate of a rank is its innermost index; with TP alone it is the rank itself.
    ``torch.distributed.get_rank``/``get_world_size`` are constants to torch.compile (no graph break,
    no host sync). ValueError without an initialised process group, or when its world size is no
    multiple of ``tp_size``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"minference_flex got 1/{tp_size} of the configured attention heads but no torch.distributed "
                         "process group is initialised: tensor parallelism needs one (torchrun, tp_plan='auto')")
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"minference_flex got 1/{tp_size} of the configured attention heads but the process group "
                         f"has {world} ranks (no multiple of {tp_size})")
    return dist.get_rank() % tp_size


def _tp_slice(num_heads: int, num_kv_heads: int | None, local_heads: int, local_kv_heads: int,
              recorded_tp_size: int | None) -> tuple[int, int]:
    """The ``(tp_size, tp_rank)`` of an attention call that got ``local_heads`` of the model's
    ``num_heads`` query heads and ``local_kv_heads`` key/value heads: transformers' TP plans shard
    ``q_proj``/``k_proj``/``v_proj`` column-wise (``Shard(0)`` of the weight, contiguous even
    slices), so rank ``r`` of ``W`` holds query heads ``r*Hq/W .. (r+1)*Hq/W - 1`` and KV heads
    ``r*Hkv/W .. (r+1)*Hkv/W - 1``, whole GQA groups (query head ``h`` reads KV head ``h // G``, ``G = Hq/Hkv``,
    locally as globally). All arguments are Python integers (shapes and the config): nothing is
    read from a tensor.

    ValueError when the counts fit no such layout: ``local_heads`` no divisor of ``num_heads``, a
    TP size that splits a GQA group (``Hq/W`` no multiple of ``G``, i.e. ``W`` no divisor of
    ``Hkv``), a local KV head count other than ``Hkv/W``, or a TP size other than the one
    transformers recorded (``config.distributed_config.tp_size``)."""
    if local_heads < 1 or local_heads > num_heads or num_heads % local_heads:
        raise ValueError(f"minference_flex: the attention call has {local_heads} query heads, which fits no "
                         f"tensor-parallel split of the model's {num_heads} (num_attention_heads) heads")
    tp_size = num_heads // local_heads
    if recorded_tp_size is not None and recorded_tp_size != tp_size:
        raise ValueError(f"minference_flex: the attention call has {local_heads} of {num_heads} query heads "
                         f"(1/{tp_size}) but the model was sharded with tp_size={recorded_tp_size}")
    kv = num_kv_heads if num_kv_heads is not None else num_heads
    if kv % tp_size or num_heads % kv:
        raise ValueError(f"minference_flex: tensor parallelism over {tp_size} ranks splits the GQA groups of "
                         f"{num_heads} query heads over {kv} key/value heads (each rank's {local_heads} query heads "
                         f"must be whole groups of {num_heads // kv if kv and num_heads % kv == 0 else '?'})")
    if local_kv_heads != kv // tp_size:
        raise ValueError(f"minference_flex: the attention call has {local_heads} of {num_heads} query heads but "
                         f"{local_kv_heads} of {kv} key/value heads; tensor parallelism over {tp_size} ranks gives "
                         f"{kv // tp_size}")
    return tp_size, _tp_rank(tp_size)


def _local_layer(module, layer: LayerConfig, local_heads: int, local_kv_heads: int) -> LayerConfig:
    """``layer`` with the patterns of this rank's heads when the call has fewer query heads than
    the configuration (tensor parallelism: ``_tp_slice``): query heads ``r*Hq/W .. (r+1)*Hq/W - 1``
    of the layer's ``Hq`` patterns, in order. Unchanged when the counts agree or there are no
    patterns (``DEFAULT_PATTERN`` everywhere). Only Python integers decide the slice, so no host
    sync and no loop over heads; outside torch.compile the result is kept on the module
    (``_LOCAL_CACHE``) for as long as ``layer`` is the same object."""
    patterns = layer.patterns
    if patterns is None or len(patterns) == local_heads:
        return layer
    compiling = torch.compiler.is_compiling()
    if not compiling:
        cached = module.__dict__.get(_LOCAL_CACHE)
        if cached is not None and cached[0] is layer and cached[1] == (local_heads, local_kv_heads):
            return cached[2]
    config = module.config  # read the usual way: this runs once per module and head count (or while tracing)
    num_kv = getattr(config, "num_key_value_heads", None)
    recorded = getattr(getattr(config, "distributed_config", None), "tp_size", None)
    tp_size, rank = _tp_slice(len(patterns), num_kv, local_heads, local_kv_heads, recorded)
    result = layer._replace(patterns=patterns[rank * local_heads:(rank + 1) * local_heads])
    if not compiling:
        module.__dict__[_LOCAL_CACHE] = (layer, (local_heads, local_kv_heads), result)
    return result


def _parse_layer(heads: dict, count: int) -> tuple[Pattern, ...]:
    """One layer's stored head dict (head string -> entry) as one Pattern per head."""
    return tuple(Pattern.parse(heads.get(str(h), DEFAULT_PATTERN)) for h in range(count))


# --------------------------------------------------------------------------- attention

def _sdpa(query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None, scale: float | None) -> Tensor:
    """Causal SDPA with the queries at the last positions; key_mask [B, Nk] bool or None. Rows that
    see no key (padded queries) get zeros."""
    B, Hq, Nq, _ = query.shape
    Nk = key.shape[2]
    gqa = key.shape[1] != Hq
    if key_mask is None and Nq == Nk:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    if Nq == 1:
        mask = None if key_mask is None else key_mask[:, None, None, :]
    else:
        causal = torch.ones(Nq, Nk, dtype=torch.bool, device=query.device).tril(Nk - Nq)
        mask = causal[None, None] if key_mask is None else causal[None, None] & key_mask[:, None, None, :]
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=gqa)
    seen = mask.any(-1, keepdim=True)  # [B or 1, 1, Nq, 1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask | ~seen, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~seen, 0)


#: ``cost.choose`` memoised on its (integer) arguments: a few microseconds per layer call instead of ~25.
_choose_cached = functools.lru_cache(maxsize=4096)(choose)


def _prefill(query, key, value, layer: LayerConfig, scale):
    """Attention of one batch without padding: sparse from min_sparse_len keys on (or SDPA where the
    cost model says so), else dense."""
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    if Nk < layer.min_sparse_len:
        return _sdpa(query, key, value, None, scale)
    patterns = layer.patterns if layer.patterns is not None else (DEFAULT_PATTERN,) * Hq
    cost = layer.cost if layer.cost is not None and query.device.type in layer.fallback_devices else None
    compiling = torch.compiler.is_compiling()
    if cost is None:
        way = "sparse"
    else:
        way = (choose if compiling else _choose_cached)(cost, B, Nq, Nk, D, patterns)
    if way == "check" and compiling:
        way = "sparse"  # no host sync (no graph break) inside a compiled graph: the 5% bound is not kept
    if way == "sparse":
        out = sparse_attention(query, key, value, patterns, scale=scale, compiled=layer.compiled)
    elif way == "sdpa":
        out = _sdpa(query, key, value, None, scale)
    else:
        plan = kernel_plan(query, key, patterns, scale=scale, compiled=layer.compiled)
        if bool(kernel_beats_sdpa(cost, plan, D)):  # the one host sync of a check
            way, out = "check-sparse", run_plan(plan, query, key, value, compiled=layer.compiled)
        else:
            way, out = "check-sdpa", _sdpa(query, key, value, None, scale)
    if layer.counts is not None:
        layer.counts[way] += 1
    return out


def _padded_prefill(query, key, value, key_mask, layer: LayerConfig, scale):
    """Each sequence on its real tokens only; padded query rows get zeros. A mask in which some
    sequence's real tokens are not one run (holes: a pad token inside a prompt, say)
    runs SDPA with that mask for the whole call."""
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    real = key_mask.to(torch.int8)
    counts, firsts, lasts = torch.stack([real.sum(-1), real.argmax(-1), real.flip(-1).argmax(-1)]).tolist()
    if all(n == Nk for n in counts):  # no padding (a static cache's prefill)
        return _prefill(query, key, value, layer, scale)
    if any(n and Nk - last - first != n for n, first, last in zip(counts, firsts, lasts)):
        _log_once("holes", "minference_flex: an attention mask whose real tokens are not one contiguous run per "
                           "sequence runs dense SDPA with that mask (sparse attention needs left or right padding "
                           "only)")
        return _sdpa(query, key, value, key_mask, scale)
    out = query.new_zeros(B, Hq, Nq, D)
    for b in range(B):
        n, s = int(counts[b]), int(firsts[b])
        e = s + n
        if n == 0:
            continue
        qs = max(s, Nk - Nq)
        if qs >= e:
            continue
        rows = slice(qs - (Nk - Nq), e - (Nk - Nq))
        q, k, v = query[b:b + 1, :, rows], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e]
        out[b:b + 1, :, rows] = _prefill(q, k, v, layer, scale)
    return out


def minference_flex_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                              scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function: returns (out [B, q_len, Hq, D] contiguous, None)."""
    if dropout and dropout > 0 and getattr(module, "training", False):
        raise ValueError("attn_implementation='minference_flex' is inference only (attention dropout "
                         f"{dropout} requested in training mode): call model.eval()")
    Nq, Nk = query.shape[2], key.shape[2]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("minference_flex expects a 2-D padding mask [batch, kv_len] from its mask function, got "
                             f"shape {tuple(attention_mask.shape)}; pass a 2-D attention_mask")
        if attention_mask.shape[1] != Nk:
            if attention_mask.shape[1] > Nk:
                raise ValueError(f"minference_flex got a padding mask of {attention_mask.shape[1]} columns for {Nk} keys")
            # A static cache's prefill: the mask function cut off the cache slots after the queries,
            # which hold no token yet.
            Nk = attention_mask.shape[1]
            key, value = key[:, :, :Nk], value[:, :, :Nk]
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.bool()
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and Nk > sliding_window:
        raise NotImplementedError(f"minference_flex does not support sliding-window attention beyond the window "
                                  f"({Nk} keys > sliding_window {sliding_window})")
    if Nq == 1:
        out = _sdpa(query, key, value, attention_mask, scaling)
    elif attention_mask is None and Nq == Nk and Nk < _min_sparse_len(_stored(module)):
        # A short prefill without padding, the most frequent call, goes straight to SDPA's causal
        # kernel (as transformers' "sdpa" runs it), reading only min_sparse_len: at 4K tokens the
        # call is host-bound, and a microsecond of Python is 1-4% of it (docs/performance.md).
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    elif torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        # Autograd needs this call's gradient, and the sparse kernel has no backward: dense, exact mask.
        _log_once("grad", "minference_flex: attention calls that need gradients (grad mode on, inputs that require "
                          "grad) run dense SDPA; run inference under torch.no_grad() or torch.inference_mode() "
                          "for sparse attention")
        out = _sdpa(query, key, value, attention_mask, scaling)
    else:
        layer = _local_layer(module, _layer_config(module), query.shape[1], key.shape[1])
        if attention_mask is None:
            out = _prefill(query, key, value, layer, scaling)
        else:
            out = _padded_prefill(query, key, value, attention_mask, layer, scaling)
    return out.transpose(1, 2).contiguous(), None


def _padding_mask(attention_mask: Tensor, kv_length: int, kv_offset: int) -> Tensor:
    """The 2-D mask's columns of the ``kv_length`` keys from ``kv_offset`` on, as bool; keys past its
    end are masked (as in transformers' sdpa mask)."""
    mask = attention_mask.to(torch.bool)
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:
        mask = F.pad(mask, (0, missing))
    return mask[:, kv_offset:kv_offset + kv_length]


def _cache_slots_mask(batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset: int,
                      attention_mask: Tensor | None, device) -> Tensor:
    """The mask of a cache whose keys go past the queries: a static cache hands over all its slots,
    and the slots after the last query hold no token yet. A prefill's mask is cut after the last
    query (one host sync per forward for a static cache's offset tensor): the attention function
    drops the keys past the mask. A decoding step's mask keeps every slot and masks the empty ones
    by a comparison on the device (no host sync: decoding with a static cache is what gets compiled)."""
    padding = None if attention_mask is None else _padding_mask(attention_mask, kv_length, kv_offset)
    if q_length == 1:
        written = torch.arange(kv_offset, kv_offset + kv_length, device=device) < q_offset + q_length
        return written.expand(batch_size, kv_length) if padding is None else padding & written
    end = int(q_offset) + q_length - kv_offset
    if padding is None:
        return torch.ones(batch_size, end, dtype=torch.bool, device=device)
    return padding[:, :end]


def minference_flex_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                         mask_function=None, attention_mask: Tensor | None = None, **kwargs):
    """transformers mask function: the 2-D boolean padding mask [batch, keys] (True = real token),
    the queries being the last ``q_length`` of its keys, or None when there is no padding.

    For a prefill, a mask without padding is dropped here, once per forward (one host sync, as in
    transformers' FlashAttention path), so that no layer has to look at it. With a static cache
    (``kv_length`` cache slots, more than the tokens so far) see ``_cache_slots_mask``."""
    if isinstance(q_offset, Tensor) or q_offset + q_length != kv_offset + kv_length:
        device = kwargs.get("device")
        if device is None:
            device = attention_mask.device if attention_mask is not None else "cpu"
        return _cache_slots_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, device)
    if attention_mask is None:
        return None
    mask = _padding_mask(attention_mask, kv_length, kv_offset)
    if q_length > 1 and bool(mask.all()):
        return None
    return mask


def register() -> None:
    """Register ``"minference_flex"`` with transformers (done on ``import minference_flex``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, minference_flex_attention)
    AttentionMaskInterface.register(NAME, minference_flex_mask)
