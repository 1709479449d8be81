"""RULER's synthetic long-context tasks (Hsieh et al. 2024), generated offline as pure functions of
(tokenizer, haystack text, length in tokens, seed).

Tasks (``TASKS``): needle retrieval with number, word or UUID values (``niah_single_*``), a needle among
needles with other keys (``niah_multikey``), all values of one key (``niah_multivalue``), several keys
asked at once (``niah_multiquery``), variable tracking (``vt``), common-word extraction (``cwe``) and
frequent-word extraction (``fwe``). The needle tasks hide their needles in real prose (the project's
haystack, see ``haystack.haystack_text``); ``vt`` uses RULER's repeated noise sentences; ``cwe`` and
``fwe`` are word lists synthesised from the seed.

Prompts are in the project's chat format (the same wrapping as ``haystack.needle_prompt``: the
question in one user turn, the generation prompt, then the start of the answer). Exact length holds on
the token-id level: ``RulerSample.input_ids`` is built by concatenating separately tokenised pieces
and has exactly ``length`` ids; ``RulerSample.text`` is its decoding, which re-tokenises to about, not
always exactly, the same length. Feed the model ``input_ids``.

Scoring is RULER's ``string_match_all``: ``score(output, answers)`` is the fraction of expected values
found (case-insensitively) in the output; ``passed`` when all are.
"""
from __future__ import annotations

import functools
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from minference_flex.tools.haystack import haystack_text

_SENTINEL = "<<<CONTEXT>>>"
_MIN_BODY = 32  # tokens of context a prompt must leave room for

# Word needle keys/values are "adjective-noun" pairs as in RULER; the lists are fixed so that
# generation needs no data.
_ADJECTIVES = (
    "amber ancient brave bright calm clever crimson curious damp eager early faint fierce fragile "
    "gentle gloomy golden hollow humble icy jolly keen lively lonely loyal lucky mellow misty modest "
    "nimble noisy odd pale patient proud quiet rapid rustic scarlet shy silent sleepy smooth solemn "
    "sturdy swift tender tidy timid vivid wary wild witty young zealous").split()
_NOUNS = (
    "anchor badger beacon biscuit blossom canyon castle cedar comet cottage dolphin ember falcon "
    "feather fiddle glacier harbor hazel island jasmine kettle lantern lemon lighthouse marble meadow "
    "mitten nectar orchard otter pebble pepper pigeon quarry raven ribbon saddle sparrow spruce "
    "thistle thimble tulip turnip valley violin walnut willow wizard yarrow zephyr").split()

# RULER's variable-tracking noise.
_VT_NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class RulerSample:
    """One generated prompt. ``input_ids`` has exactly ``length`` ids (the chat-wrapped prompt, ending
    with the start of the answer); ``text`` is its decoding; ``answers`` the expected values, each of
    which appears in ``text``; ``positions`` the token index in ``input_ids`` where each needle (or
    variable assignment) starts, empty for ``cwe``/``fwe``."""

    task: str
    length: int
    seed: int
    input_ids: list[int]
    text: str
    answers: list[str]
    positions: list[int] = field(default_factory=list)


class Score(NamedTuple):
    fraction: float  # fraction of expected values present in the output
    passed: bool     # all present


def score(output: str, expected: list[str]) -> Score:
    """RULER's string_match_all: each expected value counts if it occurs in ``output`` (case-insensitive)."""
    out = output.lower()
    hits = sum(1 for e in expected if e.lower() in out)
    frac = hits / len(expected) if expected else 1.0
    return Score(frac, hits == len(expected))


# ---------------------------------------------------------------------------------------------- helpers

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _wrap(tokenizer, head: str, tail: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context: the chat template around ``head + context + tail``,
    the generation prompt, then ``answer_prefix`` (as ``haystack.needle_prompt`` does)."""
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": head + _SENTINEL + tail}], tokenize=False, add_generation_prompt=True)
    before, after = chat.split(_SENTINEL)
    return _ids(tokenizer, before), _ids(tokenizer, after + answer_prefix)


@dataclass
class _Filler:
    text: str
    ids: list[int]
    boundaries: list[int]  # indices i where ids[i-1] ends a sentence or line


@functools.lru_cache(maxsize=4)
def _filler(tokenizer, text: str) -> _Filler:
    ids = _ids(tokenizer, text)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip().endswith((".", "Ċ")) or "Ċ" in p]
    return _Filler(text=text, ids=ids, boundaries=ends)


def _haystack(tokenizer, haystack: str | None) -> _Filler:
    return _filler(tokenizer, haystack_text() if haystack is None else haystack)


def _budget(length: int, prefix: list[int], suffix: list[int], used: int = 0) -> int:
    budget = length - len(prefix) - len(suffix) - used
    if budget < _MIN_BODY:
        raise ValueError(f"length {length} leaves no room for a context ({budget} tokens)")
    return budget


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(f"ruler:{task}:{seed}")


def _fresh(rng: random.Random, make: Callable[[random.Random], str], taken: set[str], forbidden: str) -> str:
    """A value from ``make`` that is not yet taken, not a substring of a taken one (nor vice versa)
    and absent from ``forbidden`` (the haystack text, compared case-insensitively)."""
    for _ in range(10_000):
        v = make(rng)
        lv = v.lower()
        if lv in forbidden or any(lv in t.lower() or t.lower() in lv for t in taken):
            continue
        taken.add(v)
        return v
    raise RuntimeError("could not draw a fresh value")


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _word(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_VALUE_MAKERS = {"number": _number, "word": _word, "uuid": _uuid}
_VALUE_NAMES = {"number": "numbers", "word": "words", "uuid": "uuids"}


def _insert(context: list[int], pieces: list[list[int]], slots: list[int]) -> tuple[list[int], list[int]]:
    """``context`` with ``pieces[k]`` inserted before ``context[slots[k]]`` (slots ascending); returns
    the ids and the start index of each piece in them."""
    out: list[int] = []
    starts: list[int] = []
    prev = 0
    for piece, slot in zip(pieces, slots):
        out += context[prev:slot]
        starts.append(len(out))
        out += piece
        prev = slot
    out += context[prev:]
    return out, starts


def _slots(rng: random.Random, bounds: list[int], budget: int, count: int) -> list[int]:
    """``count`` distinct insertion points at sentence boundaries (falling back to any token) chosen at
    random depths, ascending."""
    candidates = sorted({0, budget, *[b for b in bounds if 0 < b < budget]})
    if len(candidates) < count:
        candidates = list(range(budget + 1))
    return sorted(rng.sample(candidates, count))


def _sample(task, length, seed, prefix, body, suffix, answers, positions, tokenizer) -> RulerSample:
    ids = prefix + body + suffix
    assert len(ids) == length, (task, len(ids), length)
    text = tokenizer.decode(ids)
    for a in answers:
        assert a in text, (task, a)
    return RulerSample(task=task, length=length, seed=seed, input_ids=ids, text=text, answers=answers,
                       positions=[len(prefix) + p for p in positions])


# ------------------------------------------------------------------------------------------- needles

def _niah(task: str, tokenizer, length: int, seed: int, haystack: str | None, *, value_type: str,
          keys: int, values_per_key: int, queries: int) -> RulerSample:
    rng = _rng(task, seed)
    hay = _haystack(tokenizer, haystack)
    forbidden = hay.text.lower()
    taken: set[str] = set()
    key_list = [_fresh(rng, _word, taken, forbidden) for _ in range(keys)]
    values = {k: [_fresh(rng, _VALUE_MAKERS[value_type], taken, forbidden) for _ in range(values_per_key)]
              for k in key_list}
    asked = key_list[:queries]
    vname = _VALUE_NAMES[value_type]
    query = asked[0] if queries == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    head = (f"Some special magic {vname} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {vname} afterwards.\n")
    tail = f"\nWhat are all the special magic {vname} for {query} mentioned in the provided text?"
    prefix, suffix = _wrap(tokenizer, head, tail,
                           f"The special magic {vname} for {query} mentioned in the provided text are")
    needles = [(k, v) for k in key_list for v in values[k]]
    rng.shuffle(needles)
    pieces = [_ids(tokenizer, f" One of the special magic {vname} for {k} is: {v}. ") for k, v in needles]
    budget = _budget(length, prefix, suffix, sum(map(len, pieces)))
    start = hay.boundaries[rng.randrange(len(hay.boundaries))]  # begin on a sentence
    n = len(hay.ids)
    context = (hay.ids[start:] + hay.ids * (budget // n + 1))[:budget]
    bounds = [b - start for b in hay.boundaries if start < b <= start + budget]
    slots = _slots(rng, bounds, budget, len(pieces))
    body, starts = _insert(context, pieces, slots)
    answers = [v for k in asked for v in values[k]]
    # positions in the order of ``answers``
    order = {kv: i for i, kv in enumerate(needles)}
    positions = [starts[order[(k, v)]] for k in asked for v in values[k]]
    return _sample(task, length, seed, prefix, body, suffix, answers, positions, tokenizer)


def niah_single(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                value_type: str = "number") -> RulerSample:
    """One needle ("One of the special magic numbers for KEY is: VALUE.") in prose; value_type is
    "number" (7 digits), "word" (adjective-noun) or "uuid"."""
    return _niah(f"niah_single_{value_type}", tokenizer, length, seed, haystack, value_type=value_type,
                 keys=1, values_per_key=1, queries=1)


def niah_multikey(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                  value_type: str = "number", keys: int = 4) -> RulerSample:
    """``keys`` needles with different keys; the question asks for one of them."""
    return _niah("niah_multikey", tokenizer, length, seed, haystack, value_type=value_type,
                 keys=keys, values_per_key=1, queries=1)


def niah_multivalue(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                    value_type: str = "number", values: int = 4) -> RulerSample:
    """``values`` needles with the same key; the answer is all their values."""
    return _niah("niah_multivalue", tokenizer, length, seed, haystack, value_type=value_type,
                 keys=1, values_per_key=values, queries=1)


def niah_multiquery(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                    value_type: str = "number", queries: int = 4) -> RulerSample:
    """``queries`` needles with different keys, all asked at once; the answer is all their values."""
    return _niah("niah_multiquery", tokenizer, length, seed, haystack, value_type=value_type,
                 keys=queries, values_per_key=1, queries=queries)


# -------------------------------------------------------------------------------- variable tracking

def variable_tracking(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                      chains: int = 1, hops: int = 4) -> RulerSample:
    """RULER's vt: ``VAR A = 12345``, ``VAR B = VAR A``, ... (``hops`` links per chain, ``chains`` chains,
    each with its own value) scattered in order through repeated noise sentences. The answer is every
    variable of the first chain. ``haystack`` is only checked for collisions (the noise is fixed)."""
    task = "vt"
    rng = _rng(task, seed)
    forbidden = (_VT_NOISE + (haystack_text() if haystack is None else haystack)).lower()
    taken: set[str] = set()
    letters = lambda r: "".join(r.choice(string.ascii_uppercase) for _ in range(5))  # noqa: E731
    numbers = [_fresh(rng, lambda r: str(r.randint(10_000, 99_999)), taken, forbidden) for _ in range(chains)]
    names = [[_fresh(rng, letters, taken, forbidden) for _ in range(hops + 1)] for _ in range(chains)]
    query = numbers[0]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = f"\nQuestion: Find all variables that are assigned the value {query} in the text above."
    prefix, suffix = _wrap(tokenizer, head, tail,
                           f"Answer: According to the chain(s) of variable assignment in the text above, "
                           f"{hops + 1} variables are assigned the value {query}, they are:")
    statements = []  # (chain, hop, text)
    for c in range(chains):
        statements.append((c, 0, f" VAR {names[c][0]} = {numbers[c]}."))
        statements += [(c, h, f" VAR {names[c][h]} = VAR {names[c][h - 1]}.") for h in range(1, hops + 1)]
    pieces_by_chain = [[_ids(tokenizer, s) for (cc, _, s) in statements if cc == c] for c in range(chains)]
    unit = _ids(tokenizer, _VT_NOISE)
    budget = _budget(length, prefix, suffix, sum(len(p) for ps in pieces_by_chain for p in ps))
    context = (unit * (budget // len(unit) + 1))[:budget]
    bounds = list(range(0, budget + 1, len(unit)))
    # interleave chains, keeping each chain's order: random slots, assigned to a random chain order
    total = sum(map(len, pieces_by_chain))
    slots = _slots(rng, bounds, budget, total) if len(bounds) >= total else sorted(rng.sample(range(budget + 1), total))
    owner = [c for c in range(chains) for _ in pieces_by_chain[c]]
    rng.shuffle(owner)
    cursor = [0] * chains
    pieces, which = [], []
    for c in owner:
        pieces.append(pieces_by_chain[c][cursor[c]])
        which.append((c, cursor[c]))
        cursor[c] += 1
    body, starts = _insert(context, pieces, slots)
    positions = [starts[which.index((0, h))] for h in range(hops + 1)]
    return _sample(task, length, seed, prefix, body, suffix, names[0], positions, tokenizer)


# --------------------------------------------------------------------------------------- word tasks

@functools.lru_cache(maxsize=4)
def _vocabulary(text: str) -> tuple[str, ...]:
    """Distinct lowercase alphabetic words (4-10 letters) of the haystack text, sorted."""
    words = {w for w in (t.strip(string.punctuation).lower() for t in text.split())
             if 4 <= len(w) <= 10 and w.isalpha() and w.isascii()}
    return tuple(sorted(words))


def _costs(tokenizer, words) -> dict[str, int]:
    enc = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return {w: len(e) for w, e in zip(words, enc)}


def common_words(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                 common: int = 10, common_freq: int = 30, rare_freq: int = 3) -> RulerSample:
    """RULER's cwe: a numbered list of words in which ``common`` words occur ``common_freq`` times
    each and as many other words as fit occur ``rare_freq`` times; the answer is the common words.
    Short prompts lower both frequencies (common words stay strictly most frequent). Words come from
    the haystack text's vocabulary; the list ends with newline padding to the exact length."""
    task = "cwe"
    rng = _rng(task, seed)
    vocab = list(_vocabulary(haystack_text() if haystack is None else haystack))
    rng.shuffle(vocab)
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    tail = f"\nQuestion: What are the {common} most common words in the above list?"
    prefix, suffix = _wrap(tokenizer, head, tail,
                           f"Answer: The top {common} words that appear most often in the list are:")
    budget = _budget(length, prefix, suffix)
    newline = _ids(tokenizer, "\n")
    cost = _costs(tokenizer, vocab[: common + 4000])
    # per entry: "\n" + "N." + " word"; the numbering cost only depends on the index
    num_ids = lambda i: _ids(tokenizer, f"{i}.")  # noqa: E731
    avg = 1 + 2 + sum(cost.values()) / len(cost)
    entries = int(budget / avg)
    fc = max(3, min(common_freq, int(entries * 0.4) // common))
    fr = max(1, min(rare_freq, fc - 2))
    chosen = vocab[:common]
    rare: list[str] = []
    pool = (w for w in vocab[common:common + 4000] if not any(c in w or w in c for c in chosen))

    num_cost: list[int] = []

    def total(n_rare: int) -> int:
        n = common * fc + n_rare * fr
        while len(num_cost) < n:
            num_cost.append(len(num_ids(len(num_cost) + 1)))
        return (n * len(newline) + sum(num_cost[:n]) + fc * sum(cost[w] for w in chosen)
                + fr * sum(cost[w] for w in rare))

    if total(0) > budget:
        raise ValueError(f"length {length} is too short for {common} common words")
    running = total(0)
    for w in pool:
        n = common * fc + (len(rare) + 1) * fr
        while len(num_cost) < n:
            num_cost.append(len(num_ids(len(num_cost) + 1)))
        step = fr * (cost[w] + len(newline)) + sum(num_cost[n - fr:n])
        if running + step > budget:
            break
        rare.append(w)
        running += step
    words = [w for w in chosen for _ in range(fc)] + [w for w in rare for _ in range(fr)]
    rng.shuffle(words)
    body: list[int] = []
    for i, w in enumerate(words, 1):
        body += newline + num_ids(i) + _ids(tokenizer, " " + w)
    assert len(body) == running, (len(body), running)
    body += newline * (budget - len(body))
    return _sample(task, length, seed, prefix, body, suffix, list(chosen), [], tokenizer)


def frequent_words(tokenizer, length: int, seed: int, haystack: str | None = None, *,
                   vocab_size: int = 2000, alpha: float = 2.0, top: int = 3) -> RulerSample:
    """RULER's fwe: "coded" (random-letter) words with frequencies proportional to 1/rank**alpha
    (deterministic quotas, shuffled); the answer is the ``top`` most frequent. ``haystack`` is only
    checked for collisions. The text ends with newline padding to the exact length."""
    task = "fwe"
    rng = _rng(task, seed)
    forbidden = (haystack_text() if haystack is None else haystack).lower()
    taken: set[str] = set()
    make = lambda r: "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(4, 7)))  # noqa: E731
    head = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n"
    tail = ("\nQuestion: Do not provide any explanation. "
            "What are the three most frequently appeared words in the above coded text?")
    prefix, suffix = _wrap(tokenizer, head, tail,
                           "Answer: According to the coded text above, the three most frequently appeared words are:")
    budget = _budget(length, prefix, suffix)
    # only the top words must be fresh (absent from the haystack, no substring of another word)
    tops = [_fresh(rng, make, taken, forbidden) for _ in range(top)]
    others: list[str] = []
    seen = set(tops)
    while len(others) < vocab_size - top:
        w = make(rng)
        if w not in seen and not any(w in t or t in w for t in tops):
            seen.add(w)
            others.append(w)
    vocab = tops + others
    cost = _costs(tokenizer, vocab)
    weights = [1 / (r + 1) ** alpha for r in range(len(vocab))]
    z = sum(weights)

    def counts(n: int) -> list[int]:
        c = [int(n * w / z) for w in weights]
        c[0] += n - sum(c)
        return c

    def size(n: int) -> int:
        return sum(k * cost[w] for k, w in zip(counts(n), vocab))

    avg = sum(k * cost[w] for k, w in zip(counts(10_000), vocab)) / 10_000
    n = int(budget / avg) + 2
    while n > 0 and size(n) > budget:
        n -= 1
    c = counts(n)
    if not all(c[i] > c[i + 1] for i in range(top)) or c[top] < 1:
        raise ValueError(f"length {length} is too short for a clear top {top}")
    words = [w for w, k in zip(vocab, c) for _ in range(k)]
    rng.shuffle(words)
    body: list[int] = []
    for w in words:
        body += _ids(tokenizer, " " + w)
    body += _ids(tokenizer, "\n") * (budget - len(body))
    return _sample(task, length, seed, prefix, body, suffix, tops, [], tokenizer)


# ------------------------------------------------------------------------------------------ registry

TASKS: dict[str, Callable[..., RulerSample]] = {
    "niah_single_number": functools.partial(niah_single, value_type="number"),
    "niah_single_word": functools.partial(niah_single, value_type="word"),
    "niah_single_uuid": functools.partial(niah_single, value_type="uuid"),
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": variable_tracking,
    "cwe": common_words,
    "fwe": frequent_words,
}


def generate(task: str, tokenizer, length: int, seed: int, haystack: str | None = None) -> RulerSample:
    """``TASKS[task](tokenizer, length, seed, haystack)`` with the task's RULER defaults."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    return TASKS[task](tokenizer, length, seed, haystack)
