"""The needle-in-a-haystack data of the real-model tools (eval, demo, ttft, capture): the haystacks
(English prose shipped with Python, the offline default; Paul Graham's essays and Moby-Dick once
``minference-flex fetch haystacks`` has put them in the cache), needle prompts in the model's chat
template, and the RoPE context a prompt length needs."""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import torch

from minference_flex.tools.cache import ESSAYS_FILE, HAYSTACKS_HINT, MOBY_DICK_FILE, haystacks_folder
from minference_flex.tools.models import SMOLLM2_ORIGINAL_CONTEXT, yarn_context

NEEDLE = "The special magic number is {number}."
QUESTION_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n")
QUESTION_TAIL = "\nWhat is the special magic number mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number mentioned in the provided text is"
SENTINEL = "<<<CONTEXT>>>"
#: Shortest needle prompt (tokens): the chat template, question and needle take ~95 SmolLM2 tokens and
#: ``needle_prompt`` wants at least 16 tokens of haystack.
NEEDLE_MIN_LENGTH = 128


def haystack_text() -> str:
    """~113K tokens of English prose shipped with Python (the pydoc topic help texts)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics))


def _cached_text(name: str, cache: str | None) -> str:
    """The text file ``name`` of ``<cache>/haystacks``; FileNotFoundError naming the fetch command."""
    folder = haystacks_folder(cache)
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} is not in {folder}; download it with: {HAYSTACKS_HINT}"
                                + (f" --cache {cache}" if cache else ""))
    with open(path, encoding="utf-8") as f:
        return f.read()


def essays_text(cache: str | None = None) -> str:
    """Paul Graham's essays (~180K tokens), the classic needle-in-a-haystack haystack, from the cache
    (``cache``, else ``$MINFERENCE_FLEX_CACHE``, else ``~/.cache/minference_flex``)."""
    return _cached_text(ESSAYS_FILE, cache)


def moby_dick_text(cache: str | None = None) -> str:
    """Herman Melville's Moby-Dick (~300K tokens) from the cache (as ``essays_text``)."""
    return _cached_text(MOBY_DICK_FILE, cache)


#: ``--haystack`` names -> text loaders (``pydoc`` needs no download).
HAYSTACKS = {"pydoc": haystack_text, "essays": essays_text, "moby-dick": moby_dick_text}


def perplexity_text() -> tuple[str, str]:
    """(name, text) of the prose perplexity is measured on: Moby-Dick when fetched, else pydoc."""
    try:
        return "moby-dick", moby_dick_text()
    except FileNotFoundError:
        return "pydoc", haystack_text()


@dataclass
class Haystack:
    """The tokenised haystack and the chat template split around the context, as token ids."""

    ids: list[int]
    prefix: list[int]
    suffix: list[int]
    boundaries: list[int]  # indices i where ids[i-1] ends a sentence or line

    @classmethod
    def build(cls, tokenizer, text: str | None = None) -> "Haystack":
        """``text`` (default: the pydoc prose, ``haystack_text``) tokenised, with the chat template."""
        ids = tokenizer(haystack_text() if text is None else text, add_special_tokens=False)["input_ids"]
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION_HEAD + SENTINEL + QUESTION_TAIL}],
            tokenize=False, add_generation_prompt=True)
        head, tail = chat.split(SENTINEL)
        prefix = tokenizer(head, add_special_tokens=False)["input_ids"]
        suffix = tokenizer(tail + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        pieces = tokenizer.convert_ids_to_tokens(ids)
        ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "Ċ")) or "Ċ" in p]
        return cls(ids=ids, prefix=prefix, suffix=suffix, boundaries=ends)

    def text_ids(self, start: int, count: int) -> list[int]:
        """``count`` haystack tokens from ``start``, wrapping around."""
        n = len(self.ids)
        start %= n
        out = self.ids[start:start + count]
        while len(out) < count:
            out += self.ids[: count - len(out)]
        return out


def needle_prompt(hay: Haystack, tokenizer, length: int, depth: float, number: str, start: int):
    """(input_ids [1, length], needle token position): the chat prompt with exactly ``length`` tokens,
    the needle inserted at the sentence boundary nearest ``depth`` (0..1) of the haystack."""
    needle = tokenizer(" " + NEEDLE.format(number=number) + " ", add_special_tokens=False)["input_ids"]
    budget = length - len(hay.prefix) - len(hay.suffix) - len(needle)
    if budget < 16:
        raise ValueError(f"length {length} leaves no room for a haystack")
    start = hay.boundaries[start % len(hay.boundaries)]  # begin on a sentence
    context = hay.text_ids(start, budget)
    target = int(round(depth * budget))
    # nearest sentence boundary inside this slice (positions relative to the slice)
    bounds = [b - start for b in hay.boundaries if start < b <= start + budget]
    if bounds and 0 < depth < 1:
        i = bisect.bisect_left(bounds, target)
        near = [bounds[j] for j in (i - 1, i) if 0 <= j < len(bounds)]
        target = min(near, key=lambda b: abs(b - target))
    ids = hay.prefix + context[:target] + needle + context[target:] + hay.suffix
    assert len(ids) == length, (len(ids), length)
    return torch.tensor([ids]), len(hay.prefix) + target


def passes(number: str, answer: str) -> bool:
    """A needle answer passes when the planted number appears in it (thousands separators ignored)."""
    return number in answer.replace(",", "")


def context_for(length: int) -> int | None:
    """SmolLM2's RoPE context for ``length``: None (native 8K) or the YaRN context, a multiple of 8192,
    that covers it (``ModelSpec.context_for`` for any model)."""
    return yarn_context(length, SMOLLM2_ORIGINAL_CONTEXT)
