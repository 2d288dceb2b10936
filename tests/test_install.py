"""Installs as people type them: the loader's warning when a built sam_fast._C is refused (an
isolated build against another torch among the reasons), what the build records in the library,
and the packaging round trip (sdist -> wheel in a fresh venv -> import -> one op through the
extension), marked slow."""

from __future__ import annotations

import json
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


def test_env_report_names_the_build_environment_and_the_fix(fresh_loader, tmp_path):
    from sam_fast import env

    build_torch = "/tmp/pip-build-env-xyz/overlay/lib/python3.11/site-packages/torch"
    fresh_loader(_fake_library(tmp_path / "sam_fast" / "_C.so", "2.7.1", isolated="pip", torch_dir=build_torch))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        text = "\n".join(env._extension())
    assert "extension sam_fast._C: not loaded: sam_fast._C was built against torch 2.7.1" in text
    assert f"torch it was compiled against: {build_torch} (an isolated build environment: pip)" in text
    assert "to fix: pip install --no-build-isolation ." in text


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


# --------------------------------------------------------------------------- setup.py's build checks


def test_isolated_pip_build_against_another_torch_stops_with_the_command_to_type(tmp_path):
    """setup.py inside pip's isolated build environment (a torch under pip-build-env-*, here a stub
    of another version put first by PYTHONPATH the way pip does) while this interpreter's own
    environment has the real torch: the build stops before compiling and says what to type."""
    site = tmp_path / "pip-build-env-test" / "overlay" / "site-packages"
    (site / "torch" / "utils").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("__version__ = '0.0.1'\n")
    (site / "torch" / "utils" / "__init__.py").write_text("")
    (site / "torch" / "utils" / "cpp_extension.py").write_text("")
    src = tmp_path / "src"
    src.mkdir()
    (src / "setup.py").write_text((ROOT / "setup.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "SAM_FAST_BUILD_EXT"}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    r = subprocess.run([sys.executable, "setup.py", "egg_info"], cwd=src, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "isolated build environment downloaded torch 0.0.1" in r.stderr, r.stderr[-2000:]
    assert f"torch {torch.__version__} is installed" in r.stderr
    assert "pip install --no-build-isolation ." in r.stderr
    assert not (src / "build").exists()  # stopped before writing or compiling anything


# --------------------------------------------------------------------------- sdist -> fresh venv

_SKIP_COPY = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "demo_output", "results"}


def _copy_tree(dst: Path) -> Path:
    """The checkout without build outputs, so that building the sdist writes nothing into it."""
    import shutil

    def ignore(folder, names):
        return [n for n in names if n in _SKIP_COPY or n.endswith((".so", ".egg-info", ".pyc"))]

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def _run(cmd, cwd, timeout=600, **env):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **env})
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _fresh_venv(path: Path) -> Path:
    """A new venv that sees this one's packages (torch, setuptools, pip, ...) through a .pth path
    line, after its own site-packages: what pip installs there wins, and this venv's .pth files
    (the editable sam_fast among them) are not run."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    py = path / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout.strip()
    import sysconfig

    (Path(purelib) / "_outer_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


_OP_CHECK = r"""
import sys, torch
import sam_fast
from sam_fast import _ext
from sam_fast.ops.context_reweight import context_reweight
assert sam_fast.__file__.startswith(sys.prefix), sam_fast.__file__
assert _ext.load() is not None, _ext.info()
info = _ext.info()
assert info["path"].startswith(sys.prefix) and info["built_with_torch"] == torch.__version__, info
g = torch.Generator().manual_seed(0)
V, s = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, generator=g)
cu = torch.tensor([0, 2, 5])
got = context_reweight(V, s, cu, "shared")  # SAM_FAST_BACKEND=cpu: the C++ op or an error
expect = []
for lo, hi in ((0, 2), (2, 5)):  # softmax over a sample's images, per patch, of the scores
    x = V[lo:hi].double()
    a = torch.softmax(s[lo:hi].double(), 0)
    expect.append((a[..., None] * x).sum(0))
err = (got.double() - torch.stack(expect)).abs().max().item()
assert err < 1e-5, err
print("ok", info["path"])
"""


_HOOKS = r"""
import json, sys
sys.path.insert(0, "_build")
import sam_fast_build as backend
print(json.dumps({"sdist": backend.get_requires_for_build_sdist(),
                  "wheel": backend.get_requires_for_build_wheel(),
                  "editable": backend.get_requires_for_build_editable()}))
"""


@pytest.mark.parametrize("ext", ["1", "0"])
def test_build_backend_asks_for_torch_only_to_compile(tmp_path, ext):
    """An isolated `python -m build --sdist` installs what get_requires_for_build_sdist names: it
    must not be torch (a multi-GB download to pack sources), and setup.py must get through the hook
    where torch cannot be imported; a wheel that compiles the extension does need torch."""
    src = _copy_tree(tmp_path / "src")
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not in this build environment')\n")
    env = {"PYTHONPATH": str(blocker), "SAM_FAST_BUILD_EXT": ext}
    if ext == "1":  # the wheel hooks run setup.py, which then needs torch: give the sdist hook alone
        code = _HOOKS.replace('"wheel": backend.get_requires_for_build_wheel(),', "")
        code = code.replace('"editable": backend.get_requires_for_build_editable()', '"x": 0')
    else:
        code = _HOOKS
    out = json.loads(_run([sys.executable, "-c", code], cwd=src, **env).stdout.strip().splitlines()[-1])
    assert not [r for r in out["sdist"] if r.startswith("torch")], out
    if ext == "0":
        assert not [r for r in out["wheel"] + out["editable"] if r.startswith("torch")], out


def test_build_backend_adds_torch_for_a_compiled_wheel(monkeypatch):
    sys.path.insert(0, str(ROOT / "_build"))
    try:
        import sam_fast_build as backend
    finally:
        sys.path.remove(str(ROOT / "_build"))
    monkeypatch.setattr(backend._setuptools, "get_requires_for_build_wheel", lambda config_settings=None: [])
    monkeypatch.setattr(backend._setuptools, "get_requires_for_build_editable", lambda config_settings=None: [])
    monkeypatch.setenv("SAM_FAST_BUILD_EXT", "1")
    assert backend.get_requires_for_build_wheel() == ["torch>=2.4"]
    assert backend.get_requires_for_build_editable() == ["torch>=2.4"]
    monkeypatch.setenv("SAM_FAST_BUILD_EXT", "0")
    assert backend.get_requires_for_build_wheel() == []


@pytest.mark.slow
@needs_ext
def test_sdist_installs_into_a_fresh_venv_with_a_working_extension(tmp_path):
    """What a user of the sdist does: `python -m build --sdist`, then `pip install
    --no-build-isolation --no-deps sam_fast-*.tar.gz` into another venv; sam_fast imports from
    there with its extension loaded and runs context_reweight through the C++ op. Also checks what
    the sdist and the installed wheel hold, the torch each requires, and that
    `python -m build --wheel --no-isolation` of a pure-Python build works."""
    import tarfile

    pytest.importorskip("build", reason="python -m build is not installed (pip install build)")
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, src], cwd=tmp_path)
    (sdist,) = dist.glob("sam_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    for header in (ROOT / "csrc").iterdir():
        if header.suffix in (".h", ".cu", ".cpp"):
            assert f"csrc/{header.name}" in names, f"sdist lacks csrc/{header.name}"
    for need in ("CMakeLists.txt", "README.md", "MANIFEST.in", "setup.py", "pyproject.toml",
                 "sam_fast/_kernels/__init__.py", "sam_fast/_kernels/context_reweight.py", "sam_fast/_ext.py"):
        assert need in names, f"sdist lacks {need}"
    assert not [n for n in names if n.startswith(("tests/", "bench/", "build/")) or n.endswith((".so", ".pyc"))]
    assert "Requires-Dist: torch>=2.4" in pkg_info

    venv_py = _fresh_venv(tmp_path / "venv")
    env = {k: "" for k in ("SAM_FAST_DISABLE_EXT", "SAM_FAST_BUILD_EXT")}
    _run([venv_py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir",
          "--disable-pip-version-check", "-q", sdist], cwd=tmp_path, **env)
    (dist_info,) = (tmp_path / "venv").glob("lib/python*/site-packages/sam_fast-*.dist-info")
    record = {line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines()}
    assert any(n.startswith("sam_fast/_C.") and n.endswith(".so") for n in record), sorted(record)[:20]
    assert "sam_fast/_kernels/context_reweight.py" in record
    assert not [n for n in record if n.startswith(("csrc/", "tests/"))]
    public = torch.__version__.split("+")[0]
    assert f"Requires-Dist: torch=={public}\n" in (dist_info / "METADATA").read_text()

    r = _run([venv_py, "-I", "-c", _OP_CHECK], cwd=tmp_path, timeout=300, SAM_FAST_BACKEND="cpu", **env)
    assert r.stdout.startswith("ok "), r.stdout
    assert "ExtensionWarning" not in r.stderr, r.stderr

    # a pure-Python wheel from the unpacked sdist: python -m build --wheel --no-isolation, torch>=2.4
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "pure", unpacked],
         cwd=tmp_path, SAM_FAST_BUILD_EXT="0")
    (wheel,) = (tmp_path / "pure").glob("sam_fast-*-py3-none-any.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        assert "Requires-Dist: torch>=2.4\n" in z.read(meta).decode()
        assert not [n for n in z.namelist() if n.endswith(".so")]
