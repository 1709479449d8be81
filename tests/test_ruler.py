"""RULER-style task generators (minference_flex.tools.ruler): exact token length, answers present,
determinism, no needle value duplicated in the filler, scoring. Needs only SmolLM2's tokenizer."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from minference_flex.tools import ruler
from minference_flex.tools.haystack import haystack_text

LENGTHS = (1024, 3000)
NEEDLE_TASKS = [t for t in ruler.TASKS if t.startswith("niah")]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from minference_flex.tools.models import smollm2_gguf

        folder, name = smollm2_gguf()
    except ImportError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_task(tokenizer, task, length):
    s = ruler.generate(task, tokenizer, length, seed=0)
    assert (s.task, s.length, s.seed) == (task, length, 0)
    # exact length on the token-id level, text is its decoding
    assert len(s.input_ids) == length
    assert s.text == tokenizer.decode(s.input_ids)
    assert s.answers and all(a in s.text for a in s.answers)
    # the prompt ends with the start of the answer, inside the chat's assistant turn
    assert s.text.rstrip().endswith(("are", "are:", "they are:"))
    # determinism
    again = ruler.generate(task, tokenizer, length, seed=0)
    assert (again.input_ids, again.answers, again.positions) == (s.input_ids, s.answers, s.positions)
    other = ruler.generate(task, tokenizer, length, seed=1)
    assert other.input_ids != s.input_ids and other.answers != s.answers
    hay = haystack_text().lower()
    if task.startswith("niah"):
        assert len(s.positions) == len(s.answers)
        for a, p in zip(s.answers, s.positions):
            assert s.text.count(a) == 1 and a.lower() not in hay  # only the needle carries it
            assert a in tokenizer.decode(s.input_ids[p:p + 80])
    elif task == "vt":
        assert len(s.positions) == len(s.answers) == 5
        for a, p in zip(s.answers, s.positions):
            assert a.lower() not in hay
            assert tokenizer.decode(s.input_ids[p:p + 12]).startswith(f" VAR {a} =")
            assert 1 <= s.text.count(a) <= 2  # assigned, and referenced by the next hop
        value = re.search(r"VAR %s = (\d+)\." % s.answers[0], s.text).group(1)
        assert s.text.count(value) == 3 and value not in hay  # the assignment, the question, the answer prefix
    elif task == "cwe":
        counts = Counter(re.findall(r"^\d+\. (\w+)$", s.text, flags=re.M))
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers)
        assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    elif task == "fwe":
        body = s.text.split("coded words.\n", 1)[1].split("\nQuestion:", 1)[0]
        counts = Counter(body.split())
        ranked = [c for _, c in counts.most_common()]
        assert [w for w, _ in counts.most_common(3)] == s.answers
        assert ranked[0] > ranked[1] > ranked[2] > ranked[3]
        assert all(a.lower() not in hay for a in s.answers)


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_score(tokenizer, task):
    s = ruler.generate(task, tokenizer, 1024, seed=3)
    full = ruler.score("Sure: " + ", ".join(a.upper() for a in s.answers), s.answers)
    assert full == (1.0, True)
    none = ruler.score("I do not know.", s.answers)
    assert none == (0.0, False)
    if len(s.answers) > 1:
        part = ruler.score(s.answers[0], s.answers)
        assert part.fraction == pytest.approx(1 / len(s.answers)) and not part.passed


def test_errors(tokenizer):
    with pytest.raises(ValueError):
        ruler.generate("niah_multikey", tokenizer, 100, seed=0)
    with pytest.raises(ValueError):
        ruler.generate("nope", tokenizer, 1024, seed=0)


def test_custom_haystack(tokenizer):
    text = "A short story. It repeats itself.\n" * 200
    s = ruler.niah_single(tokenizer, 1024, 5, haystack=text, value_type="word")
    assert len(s.input_ids) == 1024 and s.text.count(s.answers[0]) == 1
    assert "It repeats itself." in s.text
