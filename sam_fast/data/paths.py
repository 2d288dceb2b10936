"""Paths and file names built from data: containment in the dataset folder, safe output names.

A dataset's ``img_list`` entries are paths relative to its folder. `contained_path` refuses an
entry that leaves the folder (an absolute path, ``..`` components that climb out, or a symlink whose
target is outside) before the file is opened or even tested for existence, so the refusal says
nothing about files outside the folder. ``allow_outside=True`` (``--allow-outside-paths``) turns the
check off for datasets that deliberately point elsewhere.

`refuse_code_in` refuses a model folder whose files would make transformers or diffusers import
Python code from it (an ``auto_map`` entry in a config, a diffusers component from a local module):
sam_fast loads weights, JSON and tokenizer files from a folder, never code.

`safe_filename` turns a sample id (any text) into one path component that cannot climb out of the
output directory, and `UniqueNames` keeps two ids that clean to the same name (``a/b`` and ``a_b``,
``A`` and ``a`` on a case-insensitive file system, ``1`` and ``"1"``) from overwriting each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 96


class OutsidePathError(ValueError):
    """An ``img_list`` entry leaves the dataset folder (and outside paths were not allowed)."""


def contained_path(root: str | os.PathLike, rel: str, allow_outside: bool = False) -> Path:
    """``root / rel``, refused with `OutsidePathError` when it resolves outside `root` (after following
    symlinks) unless `allow_outside`. The check uses only the path and the links, never the target file."""
    root = Path(root)
    path = root / rel
    if allow_outside:
        return path
    if os.path.isabs(rel) or Path(rel).is_absolute() or Path(rel).drive:
        raise OutsidePathError(f"image path {rel!r} is absolute; paths must be relative to the dataset folder")
    base = root.resolve()
    target = path.resolve()  # strict=False: a missing file resolves the same way as an existing one
    if target != base and base not in target.parents:
        raise OutsidePathError(f"image path {rel!r} leaves the dataset folder {root} (it resolves outside it)")
    return path


class RemoteCodeError(ValueError):
    """A model folder asks to run Python code from its own files."""


# the configs through which transformers / diffusers would import a module from the folder
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                 "image_processor_config.json", "video_preprocessor_config.json", "feature_extractor_config.json",
                 "model_index.json")
_LIBRARIES = {"diffusers", "transformers"}  # diffusers components from these are library classes
_MAX_CONFIG_BYTES = 64 << 20  # a config beyond this is not a config: refused, not skipped
_CODE_KEYS = {b'"auto_map"': "an auto_map entry (custom classes)",  # looked for in the raw text: at any
              b'"custom_pipeline"': "a custom_pipeline entry"}      # depth, whether the file parses or not


def refuse_code_in(folder: str | os.PathLike, depth: int = 2) -> None:
    """Raise `RemoteCodeError`, naming the file, when a config in `folder` or its subfolders (down to
    `depth` levels: a SAM folder's ``tokenizer/llm``) would make a loader import code from the folder:
    an ``auto_map`` (transformers' custom classes, loaded with ``trust_remote_code``), a
    ``custom_pipeline`` (either key anywhere in the file, at any depth, found in its raw text so that
    a file too nested or too damaged to parse cannot hide one), or a diffusers ``model_index.json``
    component whose library is not diffusers or transformers (a ``.py`` module beside it). A config
    over 64 MB is refused too; other unreadable configs are left to the loaders, which name them."""
    root = Path(folder)
    if not root.is_dir():
        return
    todo = [(root, 0)]
    while todo:
        here, level = todo.pop()
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if level < depth:
                    todo.append((Path(entry.path), level + 1))
            elif entry.name in _CODE_CONFIGS and entry.is_file():
                _refuse_code_config(Path(entry.path))


def _refuse_code_config(path: Path) -> None:
    try:
        size = path.stat().st_size
        if size > _MAX_CONFIG_BYTES:
            raise RemoteCodeError(f"{path}: {size} bytes, too large to be a config (at most {_MAX_CONFIG_BYTES}); "
                                  "not reading it")
        raw = path.read_bytes()
    except OSError:
        return
    why = next((what for key, what in _CODE_KEYS.items() if key in raw), None)
    if why is None and path.name == "model_index.json":
        try:
            config = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            config = None
        if isinstance(config, dict):
            local = sorted(k for k, v in config.items() if isinstance(v, list) and len(v) == 2
                           and isinstance(v[0], str) and v[0] not in _LIBRARIES)
            if local:
                why = f"components from local modules ({', '.join(local[:3])})"
    if why:
        raise RemoteCodeError(f"{path}: asks to run Python code from the model folder ({why}); sam_fast never "
                              "loads code from a folder: remove the entry, or use a folder with the library's "
                              "own classes")


def safe_filename(text: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """`text` as one safe file-name component: only ``A-Z a-z 0-9 . _ -``, no leading dot, at most
    `max_chars` characters. A name that had to change gets an 8-hex-digit hash of `text` appended, so
    different texts keep different names."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".")
    if cleaned == text and 0 < len(text) <= max_chars:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{(cleaned or '_')[: max_chars - 9]}-{digest}"


class UniqueNames:
    """Safe, distinct file names for a sequence of sample ids: ``names.name(sid, "sample_", ".png")``.

    Names are compared case-insensitively; a repeat gets ``-2``, ``-3``, ... before the suffix.
    """

    def __init__(self):
        self._used: set[str] = set()

    def name(self, sample_id, prefix: str = "", suffix: str = "") -> str:
        """The next unused ``prefix + safe_filename(str(sample_id)) + suffix``."""
        stem = prefix + safe_filename(str(sample_id))
        candidate, k = stem + suffix, 1
        while candidate.lower() in self._used:
            k += 1
            candidate = f"{stem}-{k}{suffix}"
        self._used.add(candidate.lower())
        return candidate
