"""The run folder's bookkeeping: the ``synthesis.json`` marker, the append-only ``manifest.jsonl`` and
atomic file writes.

A sample is done when its manifest line is written (after its images): a run killed before that redoes the
sample (deterministically, overwriting its half-written files); a run killed while writing the line leaves a
line without its newline, which `Manifest` cuts off when the run resumes. Nothing else rewrites the manifest.
A sample made again (a source changed) gets a new line with ``replaces`` (why); the earlier line stays and
the later one wins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sam_fast.synthesis.errors import SynthesisError

MARKER = "synthesis.json"
MANIFEST = "manifest.jsonl"
FORMAT = "sam_fast.synthesis/1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # a full disk (or a signal) mid-write leaves no partial file in the dataset
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_image(image, path: Path) -> None:
    """Save a PIL image (format from the suffix) atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), "PNG"))
    atomic_write_bytes(Path(path), buf.getvalue())


def atomic_write_json(path: Path, obj) -> None:
    """JSON (indented, UTF-8) written atomically."""
    atomic_write_bytes(Path(path), json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def check_output_folder(out: Path) -> dict | None:
    """The marker's content when `out` is a synthesis run, None when `out` is missing or empty; raises
    `SynthesisError` for a non-empty folder that is not a synthesis run (never written into)."""
    if out.exists() and not out.is_dir():
        raise SynthesisError(f"--output {out} is a file, not a folder")
    marker = out / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SynthesisError(f"{marker}: unreadable synthesis marker ({e}); not touching {out}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SynthesisError(f"{marker}: not a {FORMAT} marker; not touching {out}")
        return data
    if out.is_dir() and any(out.iterdir()):
        raise SynthesisError(f"--output {out} is not empty and is not a sam-fast synthesis run (no {MARKER}); "
                             f"choose a new or empty folder")
    return None


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two (nested) dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(prefix + k)
    return out


class Manifest:
    """``OUT/manifest.jsonl``: one JSON line per finished sample (kept or dropped), appended and fsynced."""

    def __init__(self, out: Path):
        self.path = Path(out) / MANIFEST
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a line cut by a kill: its sample is redone
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            raw = raw[:end]
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                sid = entry["id"]
            except (ValueError, KeyError, TypeError):
                raise SynthesisError(f"{self.path}: line {n} is not a manifest record; not resuming") from None
            if sid in self.entries and not entry.get("replaces"):
                raise SynthesisError(f"{self.path}: line {n}: sample id {sid!r} recorded twice; not resuming")
            self.entries[sid] = entry  # a line that replaces an earlier one wins (a redone sample)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: dict, replace: bool = False) -> None:
        """Record one finished sample; durable when this returns. `replace`: the sample was made again
        (its entry must say why in ``replaces``); the earlier line stays, the new one wins."""
        sid = entry["id"]
        if replace and not entry.get("replaces"):
            raise SynthesisError(f"{self.path}: sample id {sid!r} replaces its earlier entry without saying why")
        if sid in self.entries and not replace:
            raise SynthesisError(f"{self.path}: sample id {sid!r} is already recorded")
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.entries[sid] = entry
