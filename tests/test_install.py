"""Installs as people type them: the loader's warning when a built sam_fast._C is refused (an
isolated build against another torch among the reasons), what the build records in the library,
and the packaging round trip (sdist -> wheel in a fresh venv -> import -> one op through the
extension), marked slow."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sam_fast import _ext

ROOT = Path(__file__).resolve().parents[1]
_INFO = _ext.info()
needs_ext = pytest.mark.skipif(not _INFO["built"], reason=f"compiled extension unavailable: {_INFO['error']}")


def _fake_library(path: Path, torch_version: str, isolated: str | None = None, torch_dir: str = "") -> Path:
    """A file carrying sam_fast's build tags the way a built library does (never loaded: the
    loader refuses it on the tags alone)."""
    data = b"\x7fELF\0junk\0sam_fast-build-tag{torch=" + torch_version.encode() + b";with_cuda=0}\0"
    if isolated is not None:
        data += (b"sam_fast-build-env{torch=" + torch_version.encode() + b";isolated=" + isolated.encode()
                 + b";torch_dir=" + torch_dir.encode() + b"}\0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data + b"more junk")
    return path


@pytest.fixture
def fresh_loader(monkeypatch):
    """_ext with its per-process state cleared (restored afterwards), pointed at a given file."""
    monkeypatch.setattr(_ext, "_state", None)
    monkeypatch.setattr(_ext, "_warned", False, raising=False)
    monkeypatch.delenv(_ext.DISABLE_ENV, raising=False)

    def point_at(path: Path):
        monkeypatch.setattr(_ext, "_find", lambda: str(path))
        return _ext

    return point_at


def _sam_fast_warnings(caught):
    return [w for w in caught if issubclass(w.category, UserWarning) and "sam_fast" in str(w.message)]


def test_refused_library_warns_once_with_the_reason_and_the_fix(fresh_loader, tmp_path):
    ext = fresh_loader(_fake_library(tmp_path / "site" / "sam_fast" / "_C.so", "0.0.1+elsewhere"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ext.load() is None
        assert ext.load() is None
        ext.info()
    found = _sam_fast_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in caught]
    msg = str(found[0].message)
    assert "0.0.1+elsewhere" in msg and torch.__version__ in msg
    assert "pip install --no-build-isolation ." in msg
    assert found[0].category.__name__ == "ExtensionWarning"
    assert ext.info()["fix"].startswith("pip install --no-build-isolation")


def test_isolated_build_against_another_torch_is_named_as_such(fresh_loader, tmp_path):
    build_torch = "/tmp/pip-build-env-abc123/overlay/lib/python3.11/site-packages/torch"
    ext = fresh_loader(_fake_library(tmp_path / "sam_fast" / "_C.so", "2.7.1", isolated="pip", torch_dir=build_torch))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ext.load() is None
    info = ext.info()
    assert info["built_isolated"] == "pip" and info["built_torch_dir"] == build_torch
    assert "built against torch 2.7.1 in an isolated build environment (pip)" in info["error"]
    assert f"torch {torch.__version__} is installed here" in info["error"]
    assert "--no-build-isolation" in info["error"]


def test_build_environment_that_is_gone_is_reported(fresh_loader, tmp_path):
    gone = str(tmp_path / "no-such-build-env" / "torch")
    ext = fresh_loader(_fake_library(tmp_path / "sam_fast" / "_C.so", "2.7.1", isolated="", torch_dir=gone))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ext.load() is None
    assert f"a build environment that no longer exists ({gone})" in ext.info()["error"]


def test_refused_editable_build_says_to_rebuild_in_place(fresh_loader, tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "setup.py").write_text("")
    ext = fresh_loader(_fake_library(tmp_path / "sam_fast" / "_C.so", "0.0.1"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ext.load() is None
    assert ext.info()["fix"] == f"pip install --no-build-isolation -e {tmp_path}"


def test_disabled_extension_gives_no_warning(fresh_loader, tmp_path, monkeypatch):
    ext = fresh_loader(_fake_library(tmp_path / "sam_fast" / "_C.so", "0.0.1"))
    monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ext.load() is None
    assert _sam_fast_warnings(caught) == []
    assert ext.info()["fix"] is None


@needs_ext
def test_first_use_under_another_torch_prints_one_warning():
    """The real library in a process whose torch claims another version: importing the ops (where
    the extension is first used) prints the warning once, on stderr, without any filter set."""
    code = (
        "import torch\n"
        "torch.__version__ = '0.0.1+other'\n"
        "import sam_fast\n"
        "from sam_fast.ops import context_reweight\n"
        "from sam_fast import _ext\n"
        "assert _ext.load() is None and _ext.load() is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (_ext.DISABLE_ENV, "PYTHONWARNINGS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("ExtensionWarning") == 1, r.stderr[-3000:]
    assert "0.0.1+other" in r.stderr and "--no-build-isolation" in r.stderr


@needs_ext
def test_build_records_the_torch_it_compiled_against():
    """setup.py writes the build environment into the library: here a plain (not isolated) build
    against the running torch."""
    info = _ext.info()
    assert info["built_with_torch"] == torch.__version__
    assert info["built_isolated"] is None
    assert info["built_torch_dir"] is not None, "library carries no build-environment tag (rebuilt since?)"
    assert os.path.samefile(info["built_torch_dir"], os.path.dirname(torch.__file__))
