"""Runs the scripts of tests/test_docs.py, each in a forked child of one interpreter.

The interpreter imports torch and transformers once (about 5 s of CPU a time otherwise); each script
then runs in a child forked from it, as ``python SCRIPT`` would run it: ``__main__`` with a fresh
namespace, its own working directory and output file, so no script sees another's state.
minference_flex itself is not imported here: importing it registers ``"minference_flex"`` with
transformers, and a script that forgets the import must fail as it would on its own.

Protocol, one JSON object a line: the server says ``{"ready": true}``; then for each request
``{"script": PATH, "cwd": DIR, "log": FILE}`` on stdin it answers ``{"pid": CHILD}`` at once and
``{"rc": EXIT_STATUS}`` (negative: killed by that signal) when the child ends. EOF on stdin ends it.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

PRELOAD = ("torch", "torch._dynamo", "torch.nn.attention.flex_attention", "transformers",
           "transformers.models.llama.modeling_llama", "transformers.generation.utils")


def child(request: dict) -> int:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    script = request["script"]
    sys.argv = [script]
    sys.path[0] = os.path.dirname(os.path.abspath(script))   # as `python SCRIPT` has it (here: tests/)
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                               # stray output of the imports cannot corrupt the protocol
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    print(json.dumps({"ready": True}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            protocol.close()
            code = child(request)
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(code)
        print(json.dumps({"pid": pid}), file=protocol, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=protocol, flush=True)


if __name__ == "__main__":
    main()
