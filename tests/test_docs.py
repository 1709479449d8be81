"""The code blocks of README.md and docs/*.md run as written.

- Every fenced block names its language (```python, ```bash, ```json or ```text).
- A ```python block runs as a script of its own (``__main__``, a fresh namespace, CPU only, the
  working directory a temporary folder, this repository first on PYTHONPATH), unless the line right
  before its fence is a fragment marker ``<!-- fragment: see examples/NAME.py -->``; the marked file
  must exist. Each script runs in a process forked from one interpreter that has imported torch and
  transformers but not minference_flex (tests/docs_runner.py), which saves ~5 s of CPU a block. A
  block that runs may not contain ``...`` (a placeholder is what fragments are for). Nothing is
  substituted: the blocks are small as written. Blocks that load the real SmolLM2 or compile a model
  with inductor are marked ``slow`` (deselect with ``-m "not slow"``).
- ```bash blocks do not run. Every ``minference-flex COMMAND`` (or ``python -m minference_flex
  COMMAND``) in them, and in backticked prose, names a real sub-command, and each ``--option`` it
  passes appears in that sub-command's ``--help``; every ``python examples/X.py`` names an existing
  file whose ``--help`` lists the options passed; ``pip install -e ".[extras]"`` names extras that
  pyproject.toml defines; no argument in a block is ``...``.

Tracebacks of a failing block carry the markdown file's own line numbers.
"""
from __future__ import annotations

import io
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "json", "text"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>.*)$")
FRAGMENT = re.compile(r"^\s*<!--\s*fragment:\s*(?:see\s+)?(?P<path>\S+?)\s*-->\s*$")
#: Why a block is slow, by a piece of its text.
SLOW = {
    "smollm2(": "loads SmolLM2-135M from its GGUF file (15-25 s on 2 CPU cores)",
    "torch.compile(model, dynamic=False)": "inductor compiles a tiny model on CPU (~10 s with a warm inductor "
                                          "cache, 1-2 min cold)",
}
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    path: str           # relative to the repository
    line: int           # line of the opening fence (1-based)
    info: str           # the fence's language
    code: str           # dedented by the fence's indentation
    fragment: str | None  # the path a fragment marker right before the fence names

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(text: str, path: str) -> tuple[list[Block], list[str]]:
    """(the fenced blocks of a markdown text, problems: unclosed fences, markers before no block)."""
    blocks, problems = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            marker = FRAGMENT.match(lines[i])
            if marker:
                following = next((l for l in lines[i + 1:] if l.strip()), "")
                if not FENCE.match(following):
                    problems.append(f"{path}:{i + 1}: fragment marker not followed by a code block")
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        start = i
        body = []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        else:
            problems.append(f"{path}:{start + 1}: unclosed code fence")
        before = next((l for l in reversed(lines[:start]) if l.strip()), "")
        marker = FRAGMENT.match(before)
        blocks.append(Block(path, start + 1, m["info"].strip().split(" ")[0] if m["info"].strip() else "",
                            "\n".join(body) + "\n", marker["path"] if marker else None))
        i += 1
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for doc in DOCS:
        b, p = parse_blocks(doc.read_text(), str(doc.relative_to(REPO)))
        blocks += b
        problems += p
    return blocks, problems


BLOCKS, PARSE_PROBLEMS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.info == "python" and b.fragment is None]


def fragment_problems(blocks: list[Block], root: Path = REPO) -> list[str]:
    out = []
    for b in blocks:
        if b.fragment is None:
            continue
        target = root / b.fragment
        if not b.fragment.endswith(".py") or not target.is_file():
            out.append(f"{b.name}: the fragment marker names {b.fragment!r}, which is no existing .py file")
    return out


def placeholder_lines(code: str) -> list[int]:
    """Lines (1-based, of the block) holding the ``...`` token."""
    toks = tokenize.generate_tokens(io.StringIO(code).readline)
    return sorted({t.start[0] for t in toks if t.type == tokenize.OP and t.string == "..."})


class Runner:
    """tests/docs_runner.py: runs scripts, each in a process forked from one preloaded interpreter."""

    def __init__(self, startup_timeout: float = 300):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")   # CPU, no hub
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "docs_runner.py")], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.buf = b""
        assert self._read(startup_timeout) == {"ready": True}

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"tests/docs_runner.py ended (exit {self.proc.wait()})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def run(self, script: Path, timeout: float) -> tuple[int, str]:
        """(exit status, output) of ``python script`` in the script's folder."""
        log = script.with_suffix(".log")
        self.proc.stdin.write((json.dumps({"script": str(script), "cwd": str(script.parent), "log": str(log)})
                               + "\n").encode())
        self.proc.stdin.flush()
        pid = self._read(60)["pid"]
        try:
            rc = self._read(timeout)["rc"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(60)
            return -signal.SIGKILL, log.read_text() + f"\n[killed after {timeout} s]"
        return rc, log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def run_block(runner: Runner, code: str, name: str, first_line: int, cwd: Path,
              timeout: float = BLOCK_TIMEOUT_S) -> tuple[int, str]:
    """Run ``code`` as a script in ``cwd``; the script's line numbers are the markdown's."""
    script = cwd / (re.sub(r"[^\w.]+", "_", name) + ".py")
    script.write_text("\n" * first_line + code)
    return runner.run(script, timeout)


def _block_param(b: Block):
    why = [reason for sign, reason in SLOW.items() if sign in b.code]
    return pytest.param(b, id=b.name, marks=[pytest.mark.slow] if why else [])


# --------------------------------------------------------------------------- structure

def test_fences_are_closed_and_name_their_language():
    assert not PARSE_PROBLEMS, "\n".join(PARSE_PROBLEMS)
    bad = [f"{b.name}: fence language {b.info!r}" for b in BLOCKS if b.info not in LANGUAGES]
    assert not bad, "\n".join(bad) + f"\n(use one of {sorted(LANGUAGES)})"


def test_fragment_markers_name_existing_examples():
    problems = fragment_problems(BLOCKS)
    assert not problems, "\n".join(problems)


def test_runnable_blocks_have_no_placeholders():
    bad = [f"{b.path}:{b.line + n}: `...` in a block that runs (write it out, or mark the block as a fragment)"
           for b in RUNNABLE for n in placeholder_lines(b.code)]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- python blocks

@pytest.mark.parametrize("block", [_block_param(b) for b in RUNNABLE])
def test_python_block_runs(block: Block, runner, tmp_path):
    rc, output = run_block(runner, block.code, block.name, block.line, tmp_path)
    if rc != 0:
        pytest.fail(f"{block.name} failed (exit {rc}):\n{output[-6000:]}", pytrace=False)


# --------------------------------------------------------------------------- commands

def command_lines(code: str) -> list[list[str]]:
    """The simple commands of a bash block, as token lists (continuations joined, comments dropped,
    split at &&, ||, ;, | and &)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        current: list[str] = []
        for tok in lex:
            if tok in ("&&", "||", ";", "|", "&"):
                out.append(current)
                current = []
            else:
                current.append(tok)
        out.append(current)
    return [c for c in out if c]


def classify(tokens: list[str]) -> tuple[str, str | None, list[str]] | None:
    """("cli", sub-command, args) | ("example", path, args) | ("pip", None, args) | None."""
    while tokens and re.match(r"^\w+=", tokens[0]):  # leading VAR=value
        tokens = tokens[1:]
    if not tokens:
        return None
    head = tokens[0]
    if head == "minference-flex":
        return "cli", tokens[1] if len(tokens) > 1 else None, tokens[2:]
    if head in ("python", "python3"):
        if tokens[1:3] == ["-m", "minference_flex"]:
            return "cli", tokens[3] if len(tokens) > 3 else None, tokens[4:]
        if len(tokens) > 1 and tokens[1].endswith(".py"):
            return "example", tokens[1], tokens[2:]
    if head == "pip" and "install" in tokens:
        return "pip", None, tokens[tokens.index("install") + 1:]
    return None


def options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def prose_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens) of every backticked ``minference-flex ...`` span outside code blocks."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        text = re.sub(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", lambda m: "\n" * m.group(0).count("\n"), text,
                      flags=re.S | re.M)
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            if span.startswith(("minference-flex ", "python -m minference_flex ")):
                line = text.count("\n", 0, m.start()) + 1
                # In prose `...` stands for "and so on": dropped; in a bash block it is an error.
                out.append((f"{doc.relative_to(REPO)}:{line}", [t for t in shlex.split(span) if t != "..."]))
    return out


def collect_commands():
    """(where, kind, name, args) of every command the bash blocks and the prose spans name."""
    found = []
    for b in BLOCKS:
        if b.info == "bash":
            for tokens in command_lines(b.code):
                c = classify(tokens)
                if c:
                    found.append((b.name, *c, tokens))
    for where, tokens in prose_commands():
        c = classify(tokens)
        if c:
            found.append((where, *c, tokens))
    return found


HELP_SCRIPT = r"""
import contextlib, io, json, runpy, sys
commands, examples, out = json.loads(ARGS)
from minference_flex.tools import cli

def capture(fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            fn()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except Exception as e:
            code, _ = 1, print(repr(e))
    return [code, buf.getvalue()]

helps = {"commands": list(cli.COMMANDS)}
for c in commands:
    if c in cli.COMMANDS:
        helps[c] = capture(lambda: cli.main([c, "--help"]))
for e in examples:
    def run(e=e):
        sys.argv = [e, "--help"]
        runpy.run_path(e, run_name="__main__")
    helps[e] = capture(run)
with open(out, "w") as f:
    json.dump(helps, f)
"""


@pytest.fixture(scope="module")
def helps(runner, tmp_path_factory):
    """``--help`` of every sub-command and example the docs name, from one script."""
    found = collect_commands()
    commands = sorted({name for _, kind, name, _, _ in found if kind == "cli" and name})
    examples = sorted({str(REPO / name) for _, kind, name, _, _ in found
                       if kind == "example" and (REPO / name).is_file()})
    folder = tmp_path_factory.mktemp("helps")
    script = folder / "helps.py"
    script.write_text(HELP_SCRIPT.replace("ARGS", repr(json.dumps([commands, examples, str(folder / "helps.json")]))))
    rc, output = runner.run(script, timeout=300)
    assert rc == 0, output
    helps = json.loads((folder / "helps.json").read_text())
    return {(str(Path(k).relative_to(REPO)) if k.startswith(str(REPO)) else k): v for k, v in helps.items()}


def extras() -> set[str]:
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"].get("optional-dependencies", {}))


def command_problems(found, helps) -> list[str]:
    problems = []
    defined_extras = extras()
    for where, kind, name, args, tokens in found:
        text = " ".join(tokens)
        if "..." in tokens:
            problems.append(f"{where}: `{text}`: `...` is no argument")
        if kind == "pip":
            for a in args:
                m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
                for extra in (m[1].split(",") if m else []):
                    if extra not in defined_extras:
                        problems.append(f"{where}: `{text}`: pyproject.toml defines no extra {extra!r}")
            continue
        if kind == "cli" and name not in helps["commands"]:
            problems.append(f"{where}: `{text}`: {name!r} is no minference-flex sub-command "
                            f"(those are {', '.join(helps['commands'])})")
            continue
        if kind == "example" and not (REPO / name).is_file():
            problems.append(f"{where}: `{text}`: {name} does not exist")
            continue
        code, help_text = helps[name]
        if code != 0:
            problems.append(f"{where}: `{name} --help` failed:\n{help_text[-2000:]}")
            continue
        for opt in options(args):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text):
                problems.append(f"{where}: `{text}`: {name} has no option {opt}")
    return problems


def test_commands_exist_and_take_their_options(helps):
    found = collect_commands()
    assert any(kind == "cli" for _, kind, *_ in found), "no minference-flex command found in the docs"
    problems = command_problems(found, helps)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the checks can fail

def test_checks_catch_broken_blocks(runner, tmp_path):
    doc = ("text\n\n```python\nimport json\nprint(json.dumps(undefined_name))\n```\n\n"
           "<!-- fragment: see examples/no_such_example.py -->\n```python\nq, k, v = ...\n```\n\n"
           "<!-- fragment: see examples/custom_model_compile.py -->\n\nno block\n\n```\nbare\n```\n")
    blocks, problems = parse_blocks(doc, "bad.md")
    assert [b.line for b in blocks] == [3, 9, 17] and [b.info for b in blocks] == ["python", "python", ""]
    assert problems == ["bad.md:13: fragment marker not followed by a code block"]
    assert fragment_problems(blocks) == ["bad.md:9: the fragment marker names 'examples/no_such_example.py', "
                                         "which is no existing .py file"]
    assert placeholder_lines(blocks[1].code) == [1] and placeholder_lines(blocks[0].code) == []
    rc, output = run_block(runner, blocks[0].code, blocks[0].name, blocks[0].line, tmp_path, timeout=60)
    assert rc != 0 and "NameError: name 'undefined_name' is not defined" in output
    assert 'bad.md_3.py", line 5' in output             # the markdown's own line number
    # minference_flex is not preloaded: without the import, its attention name is unknown to transformers
    code = ("from transformers import AutoModelForCausalLM, LlamaConfig\n"
            "AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,"
            " intermediate_size=128, vocab_size=128), attn_implementation='minference_flex')\n")
    rc, output = run_block(runner, code, "no_import", 0, tmp_path, timeout=120)
    assert rc != 0 and "minference_flex" in output, output[-2000:]


def test_command_checks_catch_wrong_commands():
    code = ('minference-flex nosuch --x && python examples/missing.py\n'
            'pip install -e ".[real,nosuch]" && minference-flex demo --length 1 \\\n    --no-such-option ... # comment\n')
    found = [("x.md:1", *classify(t), t) for t in command_lines(code)]
    fake = {"commands": ["demo"], "demo": [0, "usage: demo [--length N]"]}
    problems = command_problems(found, fake)
    assert len(problems) == 5, problems
    assert "'nosuch' is no minference-flex sub-command" in problems[0]
    assert "examples/missing.py does not exist" in problems[1]
    assert "no extra 'nosuch'" in problems[2]
    assert "`...` is no argument" in problems[3] and "has no option --no-such-option" in problems[4]
