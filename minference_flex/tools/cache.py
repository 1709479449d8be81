"""Where fetched files live: the cache folder, the names ``minference-flex fetch`` gives what it puts
there (the Qwen GGUF, the haystack texts) and the command that fetches each. The loaders
(``models``, ``haystack``) and the fetch command share these; this module imports nothing heavy."""
from __future__ import annotations

import os

QWEN_NAME = "qwen2.5-coder-1.5b"
QWEN_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
FETCH_HINT = f"minference-flex fetch {QWEN_NAME}"

HAYSTACKS_NAME = "haystacks"
HAYSTACKS_HINT = f"minference-flex fetch {HAYSTACKS_NAME}"
HAYSTACKS_FOLDER = "haystacks"
ESSAYS_FILE = "paul_graham_essays.txt"
MOBY_DICK_FILE = "moby_dick.txt"


def default_cache() -> str:
    """``$MINFERENCE_FLEX_CACHE`` or ``~/.cache/minference_flex``."""
    return os.environ.get("MINFERENCE_FLEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "minference_flex")


def cache_folder(cache: str | None = None) -> str:
    """The cache folder as an absolute path: ``cache`` (``~`` expanded), else ``default_cache()``."""
    return os.path.abspath(os.path.expanduser(cache or default_cache()))


def haystacks_folder(cache: str | None = None) -> str:
    """Where the haystack texts live: ``<cache folder>/haystacks``."""
    return os.path.join(cache_folder(cache), HAYSTACKS_FOLDER)
