"""``minference-flex capture``: the query, key and value one SmolLM2-135M layer receives on real prose.

    minference-flex capture                                   # 16384 tokens, layer 15, CPU, -> smollm2_capture.pt
    minference-flex capture --length 131072 --device cuda --out smollm2_capture_128k.pt
    minference-flex capture --length 1024 --layers 0 15 29 --dtype float32

SmolLM2-135M-Instruct (``models.smollm2``; YaRN over the original 8192 positions when the length
needs it, ``models.ModelSpec.context_for``; ``--model qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct,
12 query heads, 2 KV heads, head dim 128, YaRN beyond 32768) runs one prefill with ``attn_implementation="sdpa"`` over
``--length`` tokens of real prose (the pydoc topic texts, ``haystack.Haystack``, from ``--start``;
wrapping around past its ~113K tokens). While it runs, transformers' ``"sdpa"`` attention function
is wrapped (``hooks.wrap_attention``), and for each chosen layer the post-RoPE query [1, 9, N, 64],
key and value [1, 3, N, 64] it is handed are copied. The forward stops after the last chosen layer
(the layers above it and the vocabulary projection do not change what was captured).

The file (``torch.save``) holds a dict: ``query`` [L, 9, N, 64], ``key``/``value`` [L, 3, N, 64]
(dim 0 runs over ``layer``, the list of captured layer indices), ``layer``, ``length``, ``text``
("pydoc_data.topics"), ``start`` (first token of the haystack used), ``input_ids`` [N], ``model``,
``model_dtype`` (dtype of the forward), ``dtype`` (of the saved tensors, ``--dtype``, bfloat16 by
default), ``rope`` (the model's rope parameters), ``device`` and ``torch``. ``minference-flex bench
--inputs capture`` reads it (``bench.load_capture``); query position i of the capture is what the
model computes at token i for any prompt starting with the same tokens, so a prefix of a long
capture serves every shorter length.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from minference_flex.tools.checks import check_device, check_model, check_output, non_negative_int, positive_int
from minference_flex.tools.haystack import Haystack
from minference_flex.hooks import wrap_attention
from minference_flex.tools.models import MODELS, QWEN_NAME, SMOLLM2_DESCRIPTION, SMOLLM2_LAYERS
from minference_flex.tools.sides import add_model_option

log = logging.getLogger(__name__)

DEFAULT_LENGTH = 16384
DEFAULT_LAYERS = [15]
DEFAULT_OUT = "smollm2_capture.pt"
TEXT_NAME = "pydoc_data.topics"


class _Captured(Exception):
    """Raised inside the forward once every chosen layer has been captured."""


@torch.inference_mode()
def capture_qkv(model, input_ids: torch.Tensor, layers, *, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{layer: (query [1, Hq, N, D], key [1, Hkv, N, D], value [1, Hkv, N, D])} for one prefill of
    ``input_ids`` [1, N] through ``model`` (loaded with ``attn_implementation="sdpa"``), on the CPU in
    ``dtype``: the post-RoPE tensors the attention function receives (``hooks.wrap_attention``). The
    forward stops once the last of ``layers`` has been reached."""
    if model.config._attn_implementation != "sdpa":
        raise ValueError(f"capture needs the model on attn_implementation='sdpa', not "
                         f"{model.config._attn_implementation!r}")
    num_layers = model.config.num_hidden_layers
    wanted = set(layers)
    if not wanted or any(not 0 <= layer < num_layers for layer in wanted):
        raise ValueError(f"layers must be between 0 and {num_layers - 1}, got {list(layers)}")
    store: dict = {}

    def capturing(inner, module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer in wanted and layer not in store:
            store[layer] = tuple(t.detach().to(device="cpu", dtype=dtype, copy=True) for t in (query, key, value))
            if wanted <= store.keys():
                raise _Captured
        return inner(module, query, key, value, attention_mask, **kwargs)

    with wrap_attention(model, capturing):
        try:
            model.get_decoder()(input_ids=input_ids.to(model.device), use_cache=False)
        except _Captured:
            pass
    missing = sorted(wanted - store.keys())
    if missing:
        raise RuntimeError(f"layers {missing} never called the attention function")
    return store


def prose_ids(tokenizer, length: int, start: int | None = None) -> tuple[torch.Tensor, int]:
    """(input_ids [1, length], start): ``length`` tokens of the pydoc haystack from token ``start``
    (default: the first sentence boundary, as eval's perplexity text)."""
    hay = Haystack.build(tokenizer)
    start = hay.boundaries[0] if start is None else start
    return torch.tensor([hay.text_ids(start, length)]), start


def capture(model, tokenizer, length: int, layers=DEFAULT_LAYERS, *, dtype: torch.dtype = torch.bfloat16,
            start: int | None = None, description: str = SMOLLM2_DESCRIPTION) -> dict:
    """The capture dict (see the module docstring) for ``length`` tokens of prose; ``description``
    names the model in it."""
    ids, start = prose_ids(tokenizer, length, start)
    layers = sorted(set(layers))
    store = capture_qkv(model, ids, layers, dtype=dtype)
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    return {
        "query": torch.cat([store[layer][0] for layer in layers]),
        "key": torch.cat([store[layer][1] for layer in layers]),
        "value": torch.cat([store[layer][2] for layer in layers]),
        "layer": layers,
        "length": length,
        "text": TEXT_NAME,
        "start": start,
        "input_ids": ids[0].to(torch.int32),
        "model": description,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "rope": {k: v for k, v in rope.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "device": str(model.device),
        "torch": str(torch.__version__),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=positive_int, default=DEFAULT_LENGTH, help=f"prompt tokens (default {DEFAULT_LENGTH})")
    p.add_argument("--layers", type=non_negative_int, nargs="+", default=DEFAULT_LAYERS,
                   help=f"layers to capture, 0..{SMOLLM2_LAYERS - 1} for SmolLM2, 0..{MODELS[QWEN_NAME].layers - 1} "
                        "for Qwen (default 15, a middle layer)")
    add_model_option(p)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the saved tensors (default bfloat16)")
    p.add_argument("--model-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the forward (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--start", type=non_negative_int, default=None,
                   help="first haystack token (default the first sentence boundary)")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    # Every check before the model loads.
    layers = MODELS[args.model].layers
    outside = [layer for layer in args.layers if layer >= layers]
    if outside:
        p.error(f"--layers must be between 0 and {layers - 1} ({args.model}'s layers), got {outside[0]}")
    check_device(p, args.device)
    check_model(p, args.model)
    check_output(p, "--out", args.out, make_folder=True)
    if args.model_dtype is None:
        args.model_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    spec = MODELS[args.model]
    model, tokenizer = spec.load(dtype=getattr(torch, args.model_dtype), device=args.device,
                                 context=spec.context_for(args.length), attn_implementation="sdpa")
    t1 = time.perf_counter()
    data = capture(model, tokenizer, args.length, args.layers, dtype=getattr(torch, args.dtype), start=args.start,
                   description=spec.description)
    seconds = time.perf_counter() - t1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, args.out)
    rope = data["rope"].get("rope_type", "default")
    print(f"captured layers {data['layer']} of {data['model']} ({args.model_dtype} on {args.device}, rope {rope}"
          + (f" factor {data['rope'].get('factor')}" if rope == "yarn" else "") + f") on {args.length} tokens of "
          f"{data['text']} from token {data['start']}: query {tuple(data['query'].shape)}, key/value "
          f"{tuple(data['key'].shape)}, {data['dtype']}; forward {seconds:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
