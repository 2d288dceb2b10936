"""Loader of the compiled extension ``sam_fast._C`` (ops registered as ``torch.ops.sam_fast.*``).

    >>> from sam_fast import _ext
    >>> _ext.load()      # the module, or None: never raises
    >>> _ext.info()      # {"built", "path", "built_with_torch", "torch_matches", "with_cuda", "error"}

`load` imports torch first (the library links against libtorch), then the extension, once per
process. It returns None, with the reason in ``info()["error"]``, when

- ``SAM_FAST_DISABLE_EXT=1`` is set;
- the package was installed with ``SAM_FAST_BUILD_EXT=0`` (no ``_C`` file);
- the library was built against another torch than the running one: the build tag is read from
  the file *before* loading it, since a libtorch ABI mismatch can crash rather than raise;
- the import fails for any other reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from types import ModuleType
from typing import Any

DISABLE_ENV = "SAM_FAST_DISABLE_EXT"
_NAME = "sam_fast._C"
_TAG = re.compile(rb"sam_fast-build-tag\{torch=([^;}]*);with_cuda=([01])\}")

_state: dict[str, Any] | None = None


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _find() -> str | None:
    try:
        spec = importlib.util.find_spec(_NAME)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _read_tag(path: str) -> tuple[str | None, bool | None]:
    """(built_with_torch, with_cuda) from the build tag embedded in the library file."""
    try:
        with open(path, "rb") as f:
            m = _TAG.search(f.read())
    except OSError:
        return None, None
    if m is None:
        return None, None
    return m.group(1).decode(), m.group(2) == b"1"


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
    }
    if path is not None:
        built_with, with_cuda = _read_tag(path)
        st["built_with_torch"], st["with_cuda"] = built_with, bool(with_cuda)
        st["torch_matches"] = built_with == torch.__version__
    if _disabled():
        st["error"] = f"disabled by {DISABLE_ENV}"
        return st
    if path is None:
        st["error"] = f"{_NAME} is not built (installed with SAM_FAST_BUILD_EXT=0, or not installed)"
        return st
    if built_with is None:
        st["error"] = f"{path} carries no sam_fast build tag; rebuild with pip install --no-build-isolation -e ."
        return st
    if not st["torch_matches"]:
        st["error"] = (
            f"{_NAME} was built with torch {built_with} but torch {torch.__version__} is running; "
            "rebuild with pip install --no-build-isolation -e ."
        )
        return st
    try:
        module = importlib.import_module(_NAME)
    except Exception as exc:  # a broken build must not take sam_fast down
        st["error"] = f"import {_NAME} failed: {type(exc).__name__}: {exc}"
        return st
    st["built_with_torch"] = module.built_with_torch
    st["with_cuda"] = bool(module.with_cuda)
    st["torch_matches"] = module.built_with_torch == torch.__version__
    st["module"] = module
    return st


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
            }
    return _state


def load() -> ModuleType | None:
    """The ``sam_fast._C`` module (its import registers ``torch.ops.sam_fast.*``), or None."""
    return _get()["module"]


def info() -> dict[str, Any]:
    """What was built and whether it loaded: ``built`` (a ``_C`` library exists), ``path``,
    ``built_with_torch``, ``torch_matches`` (== running torch.__version__), ``with_cuda`` (CUDA op
    compiled in), ``error`` (why `load` returns None, else None)."""
    return {k: v for k, v in _get().items() if k != "module"}
