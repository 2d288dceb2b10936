"""Loader of the compiled extension ``sam_fast._C`` (ops registered as ``torch.ops.sam_fast.*``).

    >>> from sam_fast import _ext
    >>> _ext.load()      # the module, or None: never raises
    >>> _ext.info()      # {"built", "path", "built_with_torch", "torch_matches", "with_cuda", "error",
    ...                  #  "built_isolated", "built_torch_dir", "fix"}

`load` imports torch first (the library links against libtorch), then the extension, once per
process. It returns None, with the reason in ``info()["error"]``, when

- ``SAM_FAST_DISABLE_EXT=1`` is set;
- the package was installed with ``SAM_FAST_BUILD_EXT=0`` (no ``_C`` file);
- the library was built against another torch than the running one: the build tag is read from
  the file *before* loading it, since a libtorch ABI mismatch can crash rather than raise;
- the import fails for any other reason.

A library that exists but is refused (another torch, no build tag, a failed import) also gives one
`ExtensionWarning` per process, at the first `load`/`info`, with the reason and the command that
fixes it; sam_fast then runs its reference ops (same results, slower). An extension that was
disabled or deliberately not built gives no warning.

setup.py records how the library was built next to the torch version: whether the torch it
compiled against lived in an isolated build environment (``pip install .`` without
``--no-build-isolation`` downloads a torch of its own into one) and where. A library built in one
against another torch than the installed one is refused with a message that says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import warnings
from types import ModuleType
from typing import Any

DISABLE_ENV = "SAM_FAST_DISABLE_EXT"
_NAME = "sam_fast._C"
_TAG = re.compile(rb"sam_fast-build-tag\{torch=([^;}]*);with_cuda=([01])\}")
# Written by setup.py into a generated source of the library (absent in builds older than it).
_ENV_TAG = re.compile(rb"sam_fast-build-env\{torch=([^;}]*);isolated=([^;}]*);torch_dir=([^;}]*)\}")
FIX = "pip install --no-build-isolation ."

_state: dict[str, Any] | None = None
_warned = False


class ExtensionWarning(UserWarning):
    """A built ``sam_fast._C`` was refused; sam_fast runs its reference ops instead (slower)."""


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _find() -> str | None:
    try:
        spec = importlib.util.find_spec(_NAME)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _read_tags(path: str) -> dict[str, Any]:
    """What the library file says about its build, read without loading it: ``torch`` and
    ``with_cuda`` (the build tag), ``isolated`` and ``torch_dir`` (the build-environment tag)."""
    out: dict[str, Any] = {"torch": None, "with_cuda": None, "isolated": None, "torch_dir": None}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return out
    m = _TAG.search(data)
    if m is not None:
        out["torch"], out["with_cuda"] = m.group(1).decode(), m.group(2) == b"1"
    e = _ENV_TAG.search(data)
    if e is not None:
        out["isolated"] = e.group(2).decode(errors="replace") or None
        out["torch_dir"] = e.group(3).decode(errors="replace") or None
    return out


def _fix_command(path: str) -> str:
    """What to type to rebuild the library at `path` against the running torch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return f"pip install --no-build-isolation -e {root}"  # an editable install: rebuild in place
    return f"{FIX}  (in the sam_fast source directory, or with the sdist in place of '.')"


def _mismatch_reason(built_with: str, running: str, isolated: str | None, torch_dir: str | None) -> str:
    """Why a library built against torch `built_with` is refused under torch `running`."""
    gone = torch_dir is not None and not os.path.isdir(torch_dir)
    if isolated or gone:
        where = (f"an isolated build environment ({isolated})" if isolated
                 else f"a build environment that no longer exists ({torch_dir})")
        return (
            f"{_NAME} was built against torch {built_with} in {where}, but torch {running} is installed "
            "here: `pip install .` without --no-build-isolation builds against a torch it downloads for "
            "the build, not the one you have"
        )
    return f"{_NAME} was built with torch {built_with} but torch {running} is running (torch changed after the build)"


def _load_state() -> dict[str, Any]:
    import torch  # before the library: it needs libtorch's symbols

    path = _find()
    st: dict[str, Any] = {
        "module": None,
        "built": path is not None,
        "path": path,
        "built_with_torch": None,
        "torch_matches": False,
        "with_cuda": False,
        "error": None,
        "built_isolated": None,
        "built_torch_dir": None,
        "fix": None,
    }
    if path is not None:
        tags = _read_tags(path)
        built_with = tags["torch"]
        st["built_with_torch"], st["with_cuda"] = built_with, bool(tags["with_cuda"])
        st["built_isolated"], st["built_torch_dir"] = tags["isolated"], tags["torch_dir"]
        st["torch_matches"] = built_with == torch.__version__
    if _disabled():
        st["error"] = f"disabled by {DISABLE_ENV}"
        return st
    if path is None:
        st["error"] = f"{_NAME} is not built (installed with SAM_FAST_BUILD_EXT=0, or not installed)"
        return st
    fix = _fix_command(path)
    if built_with is None:
        st["fix"] = fix
        st["error"] = f"{path} carries no sam_fast build tag; rebuild with {fix}"
        return st
    if not st["torch_matches"]:
        st["fix"] = fix
        why = _mismatch_reason(built_with, torch.__version__, st["built_isolated"], st["built_torch_dir"])
        st["error"] = f"{why}; rebuild with {fix}"
        return st
    try:
        module = importlib.import_module(_NAME)
    except Exception as exc:  # a broken build must not take sam_fast down
        st["fix"] = fix
        st["error"] = f"import {_NAME} failed: {type(exc).__name__}: {exc}; rebuild with {fix}"
        return st
    st["built_with_torch"] = module.built_with_torch
    st["with_cuda"] = bool(module.with_cuda)
    st["torch_matches"] = module.built_with_torch == torch.__version__
    st["module"] = module
    return st


def _warn_refused(st: dict[str, Any]) -> None:
    """One ExtensionWarning per process when a built library was refused (not when disabled)."""
    global _warned
    if _warned or st["module"] is not None or st["fix"] is None:
        return
    _warned = True
    warnings.warn(
        f"sam_fast: the compiled extension is not used, sam_fast runs its reference ops instead "
        f"(same results, slower). {st['error']}. SAM_FAST_DISABLE_EXT=1 silences this warning.",
        ExtensionWarning,
        stacklevel=4,
    )


def _get() -> dict[str, Any]:
    global _state
    if _state is None:
        try:
            _state = _load_state()
        except Exception as exc:  # e.g. torch itself fails to import
            _state = {
                "module": None, "built": False, "path": None, "built_with_torch": None,
                "torch_matches": False, "with_cuda": False,
                "error": f"loading {_NAME} failed: {type(exc).__name__}: {exc}",
                "built_isolated": None, "built_torch_dir": None, "fix": None,
            }
        _warn_refused(_state)
    return _state


def load() -> ModuleType | None:
    """The ``sam_fast._C`` module (its import registers ``torch.ops.sam_fast.*``), or None."""
    return _get()["module"]


def info() -> dict[str, Any]:
    """What was built and whether it loaded: ``built`` (a ``_C`` library exists), ``path``,
    ``built_with_torch``, ``torch_matches`` (== running torch.__version__), ``with_cuda`` (CUDA op
    compiled in), ``error`` (why `load` returns None, else None), ``built_isolated`` (the kind of
    isolated build environment it was compiled in, e.g. ``"pip"``, else None), ``built_torch_dir``
    (where the torch it compiled against was), ``fix`` (the command that rebuilds a refused library
    against the running torch, else None)."""
    return {k: v for k, v in _get().items() if k != "module"}
