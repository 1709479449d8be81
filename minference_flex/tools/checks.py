"""Argument checks shared by the ``minference-flex`` commands (``cli.py``).

Every failure goes through ``parser.error``: the usage, then one line ``PROG: error: MESSAGE`` on
stderr, exit status 2, no traceback. The tools run these checks right after ``parse_args``, before
any model, capture or input tensor is loaded, so a wrong argument costs a fraction of a second
instead of a model load (20-30 s on a CPU) or a whole run.

* argparse ``type=`` converters (argparse names the option in the error line): ``positive_int``,
  ``non_negative_int``, ``percent``, ``fraction``, ``budgets``.
* checks of parsed values: ``check_at_least``, ``check_device``, ``check_output``,
  ``check_output_folder``, ``check_files``, ``check_json``, ``check_patterns``, ``check_model``,
  ``check_matplotlib``.

A pattern file is checked against the model's layer and head counts. The tools that take one run
SmolLM2-135M (the default) or Qwen2.5-Coder-1.5B (``--model``), whose counts are constants
(``models.MODELS``; a test compares SmolLM2's with the GGUF file's metadata), so no configuration or
weights are read for the check;
the check itself is ``mf.set_patterns`` on a stand-in configuration, the same code the model runs.
"""
from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

from minference_flex.tools.models import MODELS, SMOLLM2_HEADS, SMOLLM2_LAYERS

ENTRY_EXAMPLE = "vertical_and_slash,100,800"


# --------------------------------------------------------------------------- argparse type= converters

def _number(text: str, convert, ok, allowed: str):
    """``convert(text)`` if it parses and ``ok`` holds for it, else argparse's error saying ``allowed``."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def percent(text: str) -> float:
    """A percentage, 0..100."""
    return _number(text, float, lambda v: 0 <= v <= 100, "a percentage between 0 and 100")


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    return _number(text, float, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1")


def budgets(text: str) -> tuple[int, int]:
    """``VERTICAL,SLASH``: two integers >= 0."""
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        a = b = -1
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"expected VERTICAL,SLASH (two integers >= 0), got {text!r}")
    return a, b


# --------------------------------------------------------------------------- patterns

def parse_entry(text: str, what: str = "--patterns: expected a JSON file or") -> list:
    """``"type,a,b"`` -> ``[type, a, b]`` (a and b integers); ValueError starting with ``what`` otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        return [parts[0], int(parts[1]), int(parts[2])]
    except ValueError:
        raise ValueError(f"{what} 'type,a,b' (e.g. {ENTRY_EXAMPLE}), got {text!r}") from None


def read_json(path, option: str):
    """The parsed JSON file ``path``; ValueError (one line, naming ``option``) when it is missing, a
    folder or not valid JSON."""
    if not os.path.exists(path):
        raise ValueError(f"{option}: {path} not found")
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path} is a folder, not a JSON file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option}: {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    except UnicodeDecodeError:
        raise ValueError(f"{option}: {path} is not valid JSON (not UTF-8 text)") from None


def read_patterns(spec: str, option: str = "--patterns"):
    """One ``--patterns`` value: a MInference JSON file (its parsed list) or ``type,a,b`` (one entry for
    every head, ``[type, a, b]``). Without a comma or when the file exists it is a file name.
    ValueError (one line) when the file is missing or malformed or the entry is not ``type,a,b``."""
    if "," in spec and not os.path.exists(spec):
        return parse_entry(spec, f"{option}: expected a JSON file or")
    if not os.path.exists(spec):
        raise ValueError(f"{option}: {spec} not found (expected a JSON file or 'type,a,b', e.g. {ENTRY_EXAMPLE})")
    return read_json(spec, option)


def validate_patterns(patterns, num_layers: int = SMOLLM2_LAYERS, num_heads: int = SMOLLM2_HEADS) -> None:
    """ValueError when ``mf.set_patterns`` would reject ``patterns`` on a model of ``num_layers``
    layers and ``num_heads`` query heads (layer count, head numbers, pattern types and budgets)."""
    from minference_flex.hf import set_patterns

    stand_in = SimpleNamespace(num_hidden_layers=num_layers, num_attention_heads=num_heads)
    try:
        set_patterns(stand_in, patterns)
    except TypeError as exc:  # a budget that is no integer
        raise ValueError(str(exc)) from None


def check_patterns(parser: argparse.ArgumentParser, spec: str, option: str = "--patterns", *,
                   num_layers: int = SMOLLM2_LAYERS, num_heads: int = SMOLLM2_HEADS):
    """The patterns value of ``spec`` (``read_patterns``), checked against a model of ``num_layers``
    layers and ``num_heads`` heads (SmolLM2-135M by default); ``parser.error`` otherwise."""
    try:
        patterns = read_patterns(spec, option)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        validate_patterns(patterns, num_layers, num_heads)
    except ValueError as exc:
        parser.error(f"{option} {spec}: {exc}")
    return patterns


# --------------------------------------------------------------------------- other values

def check_at_least(parser: argparse.ArgumentParser, option: str, values, minimum: int, why: str = "") -> None:
    """Every one of ``values`` (a number or a list) at least ``minimum``."""
    values = values if isinstance(values, (list, tuple)) else [values]
    low = [v for v in values if v < minimum]
    if low:
        parser.error(f"{option} must be at least {minimum}{f' ({why})' if why else ''}, got {low[0]}")


def check_device(parser: argparse.ArgumentParser, device: str | None, option: str = "--device") -> None:
    """A device torch knows; a CUDA one only where CUDA is available (and the index exists)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parser.error(f"{option} {device!r} is not a device (cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"{option} {device}: no CUDA device is available (torch {torch.__version__}); "
                         "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"{option} {device}: there are {torch.cuda.device_count()} CUDA devices")


def check_output(parser: argparse.ArgumentParser, option: str, path, *, make_folder: bool = False) -> None:
    """``path`` can be written as a file: not a folder, and its folder exists (or the tool makes it:
    ``make_folder``). Empty or None: no file is written."""
    if not path:
        return
    path = os.fspath(path)
    if os.path.isdir(path):
        parser.error(f"{option} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folder and not os.path.isdir(folder):
        parser.error(f"{option} {path}: folder {os.path.dirname(path) or folder} not found")


def check_output_folder(parser: argparse.ArgumentParser, option: str, path) -> None:
    """``path`` is a folder or can become one (it is not a file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {os.fspath(path)} is a file, not a folder")


def check_files(parser: argparse.ArgumentParser, option: str, paths) -> None:
    """Each of ``paths`` is an existing file."""
    for path in paths or ():
        if not os.path.exists(path):
            parser.error(f"{option}: {path} not found")
        if os.path.isdir(path):
            parser.error(f"{option}: {path} is a folder, not a file")


def check_json(parser: argparse.ArgumentParser, option: str, path):
    """The parsed JSON file ``path`` (``read_json``); ``parser.error`` when missing or malformed."""
    try:
        return read_json(path, option)
    except ValueError as exc:
        parser.error(str(exc))


def check_model(parser: argparse.ArgumentParser, name: str, option: str = "--model"):
    """The ``models.ModelSpec`` of ``name`` (one of ``models.MODELS``) once its files are in place;
    ``parser.error`` with the loader's message (how to install or fetch them) otherwise."""
    if name not in MODELS:
        parser.error(f"{option} {name!r}: expected one of {', '.join(MODELS)}")
    spec = MODELS[name]
    try:
        spec.check_files()
    except (FileNotFoundError, ImportError) as exc:
        parser.error(f"{option} {name}: {exc}")
    return spec


def check_matplotlib(parser: argparse.ArgumentParser, option: str = "--plot") -> None:
    """matplotlib importable (checked before a run whose figure needs it, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error(f"{option} needs matplotlib: pip install matplotlib (or the project's [plot] extra)")
