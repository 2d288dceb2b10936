"""The build backend of sam_fast: setuptools', asking for torch only where a build compiles.

torch is needed to compile the extension (a wheel or an editable install with
``SAM_FAST_BUILD_EXT`` unset or 1). Writing the sdist compiles nothing, so an isolated
``python -m build --sdist`` must not download a ~1-4 GB torch just to pack the sources; a
pure-Python build (``SAM_FAST_BUILD_EXT=0``) needs none either.
"""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the PEP 517 hooks this module does not change)

TORCH = "torch>=2.4"


def _compiles() -> bool:
    flag = os.environ.get("SAM_FAST_BUILD_EXT", "1").strip().lower()
    return flag not in ("0", "false", "no", "off")


def _with_torch(requires: list[str]) -> list[str]:
    return [*requires, TORCH] if _compiles() else list(requires)


def get_requires_for_build_wheel(config_settings=None):
    return _with_torch(_setuptools.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings=None):
    return _with_torch(_setuptools.get_requires_for_build_editable(config_settings))


def _packing_sources(hook):
    """Run setuptools' sdist `hook` with setup.py told that it only packs sources (setuptools runs
    setup.py as ``egg_info``/``sdist`` from here; the variable makes it skip the extension)."""

    def run(*args, **kwargs):
        before = os.environ.get(SDIST_FLAG)
        os.environ[SDIST_FLAG] = "1"
        try:
            return hook(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(SDIST_FLAG, None)
            else:
                os.environ[SDIST_FLAG] = before

    run.__name__, run.__doc__ = hook.__name__, hook.__doc__
    return run


SDIST_FLAG = "SAM_FAST_PACKING_SDIST"
get_requires_for_build_sdist = _packing_sources(_setuptools.get_requires_for_build_sdist)
build_sdist = _packing_sources(_setuptools.build_sdist)
