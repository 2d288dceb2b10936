"""What every converter shares: the output folder, the image store, record checks and the report.

A converter turns each source record into `Sample`s (or a `Problem`) and hands them to
`write_dataset`, which:

- refuses an output folder that already holds ``annotations.json`` unless ``overwrite=True`` (and a
  path that is a file), before anything is read or written;
- checks every sample as `load_records` will (texts, ``{image#k}`` references, a non-empty answer,
  distinct ids) and every image file (it exists, it decodes) before placing its images, so that a
  refused or skipped record leaves no file behind;
- places the images: copied under ``OUT/images/`` (a file already there with other bytes is never
  replaced: the copy takes the next free name, ``x-2.jpg``), or with ``copy_images=False`` referenced
  where they lie, which must be inside OUT (the path written is relative and free of symlinks: the
  file's real location);
- writes ``annotations.json`` last, atomically; a conversion that fails or is interrupted removes the
  files and folders it created, and nothing else.

A record that cannot be converted stops the conversion with one line naming the source, the record
id and the reason; ``skip_missing`` skips (and counts) records whose image files do not exist,
``skip_bad`` any record that cannot be converted. `ConversionReport` says what was written and what
was skipped or left out: nothing is dropped silently.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sam_fast.data.dataset import _PLACEHOLDER, DataError, _check_record
from sam_fast.data.images import check_image
from sam_fast.data.paths import OutsidePathError, contained_path
from sam_fast.data.tokenization import _IMAGE_REFERENCE

ANNOTATIONS = "annotations.json"


class FormatError(DataError):
    """Data that cannot be converted; the one-line message names the source and the record id."""


class Problem(Exception):
    """Why one record cannot be converted; ``missing``: because an image file does not exist."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


def short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to `limit` characters: ids and values come from user data."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FileImage:
    """An image file to copy (to `name`, a path under the output folder) or reference."""

    path: Path
    name: str


@dataclass(frozen=True)
class DataImage:
    """Encoded image bytes (already decoded once by the converter) to write to `name`."""

    data: bytes
    name: str


@dataclass
class Sample:
    """One converted sample before its images are placed."""

    id: int | str
    images: list  # FileImage | DataImage, in order
    instruction: str
    output: str


@dataclass
class Outcome:
    """What one source record became: samples, or the problem that stops it; `unused`: exchanges left out."""

    id: object
    samples: list[Sample] = field(default_factory=list)
    problem: Problem | None = None
    unused: int = 0


@dataclass
class ConversionReport:
    """What a conversion wrote and what it skipped (record id, reason), in the order met."""

    source: str
    output: Path
    samples: int = 0
    images: int = 0  # distinct image files the annotations name
    written: int = 0  # of those, files this conversion wrote into the output folder
    skipped: list[tuple[object, str]] = field(default_factory=list)
    missing: int = 0  # skipped records whose image files do not exist
    unused_turns: int = 0  # conversation exchanges left out (LLaVA, turns="first")

    def summary(self) -> str:
        """One line: samples and images written, then what was skipped or left out and why."""
        line = (f"{self.samples} sample(s), {self.images} image(s) ({self.written} written) -> "
                f"{self.output / ANNOTATIONS}")
        if self.unused_turns:
            line += f"; {self.unused_turns} later conversation exchange(s) left out (turns='first')"
        if self.skipped:
            head = "; ".join(f"id {short(i, 40)}: {r[:120]}" for i, r in self.skipped[:3])
            more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
            line += (f"; skipped {len(self.skipped)} record(s), {self.missing} for missing image files: "
                     f"{head}{more}")
        return line


def replace_placeholders(text: str, first: int) -> tuple[str, int]:
    """`text` with each ``<image>`` (any spelling the dataset refuses: ``< Image >``) replaced, in order, by
    ``{image#first}``, ``{image#first+1}``, ...; and how many there were."""
    count = 0

    def number(_match) -> str:
        """The next reference, for re.sub."""
        nonlocal count
        count += 1
        return f"{{image#{first + count - 1}}}"

    return _PLACEHOLDER.sub(number, text), count


def count_placeholders(text: str) -> int:
    """How many ``<image>`` placeholders `text` holds."""
    return len(_PLACEHOLDER.findall(text))


def references(n: int) -> str:
    """``{image#1} {image#2} ... {image#n}``: how instructions name their images."""
    return " ".join(f"{{image#{k}}}" for k in range(1, n + 1))


def has_references(text: str) -> bool:
    """Whether `text` names an image as ``{image#k}``."""
    return _IMAGE_REFERENCE.search(text) is not None


def read_json(path: Path, what: str):
    """The JSON in `path` (a ``.jsonl`` file: a list of its lines' values); `FormatError` in one line."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = " ".join(str(e).split())[:200]
        raise FormatError(f"{path}: not a readable {what} JSON file ({type(e).__name__}: {msg})") from None


def prepare_output(output, overwrite: bool) -> Path:
    """The output folder, checked: not a file, no ``annotations.json`` unless `overwrite`."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FormatError(f"{out}: the output is a file, not a folder")
    ann = out / ANNOTATIONS
    if (ann.exists() or ann.is_symlink()) and not overwrite:
        raise FormatError(f"{ann} exists; pass --overwrite (overwrite=True) to replace it, or choose another output")
    return out


class ImageStore:
    """Places images in the output folder (copies, or references with ``copy=False``) and remembers
    every file and folder it created, so that a failed conversion can remove exactly those."""

    def __init__(self, out: Path, copy: bool):
        self.out, self.copy = out, copy
        self.by_source: dict[object, str] = {}  # resolved source path (or bytes) -> path in the annotations
        self.used: set[str] = set()  # names handed out, lower-cased (case-insensitive file systems)
        self.created: list[Path] = []
        self.checked: dict[Path, Problem | None] = {}
        self.written = 0

    def check(self, image) -> None:
        """Raise `Problem` when `image` cannot be used: a file that does not exist or does not decode,
        or (references) lies outside the output folder. Each file is checked once."""
        if not isinstance(image, FileImage):
            return
        if image.path not in self.checked:
            self.checked[image.path] = self._problem(image.path)
        if self.checked[image.path] is not None:
            raise self.checked[image.path]

    def _problem(self, path: Path) -> Problem | None:
        """Why the file at `path` cannot be used, or None (decoded once, as load_records will)."""
        try:
            if not path.is_file():
                return Problem(f"image file {path} does not exist", missing=True)
            check_image(path)
        except Exception as e:  # PIL raises many types for corrupt files; OSError for unreadable ones
            return Problem(f"image file {path} is not a readable image ({type(e).__name__}: {str(e)[:120]})")
        if not self.copy:
            try:
                self._inside(path)
            except Problem as p:
                return p
        return None

    def _inside(self, path: Path) -> str:
        """The real location of `path` relative to the output folder (references)."""
        real, base = path.resolve(), self.out.resolve()
        if base not in real.parents:
            raise Problem(f"image file {path} lies outside the output folder {self.out}: only images inside it can "
                          "be referenced (copy the images instead: drop --no-copy / copy_images=False)")
        return real.relative_to(base).as_posix()

    def place(self, image) -> str:
        """The path (relative to the output folder) the annotations give `image`, copying or writing it there."""
        if isinstance(image, FileImage):
            key = image.path.resolve()
            if key not in self.by_source:
                self.by_source[key] = self._inside(image.path) if not self.copy else self._claim(
                    image.name, lambda dest: _same_file(dest, key), lambda dest: shutil.copyfile(key, dest))
            return self.by_source[key]
        key = ("data", image.data)
        if key not in self.by_source:
            self.by_source[key] = self._claim(image.name, lambda dest: _same_bytes(dest, image.data),
                                              lambda dest: dest.write_bytes(image.data))
        return self.by_source[key]

    def _claim(self, name: str, same, write) -> str:
        """`name`, or the first of ``stem-2.ext``, ``stem-3.ext``, ... that is not handed out yet and is free
        in the output folder or holds the same bytes already (a file with other bytes is never replaced)."""
        pure, k = PurePosixPath(name), 1
        while True:
            cand = name if k == 1 else str(pure.with_name(f"{pure.stem}-{k}{pure.suffix}"))
            k += 1
            if cand.lower() in self.used:
                continue
            try:
                dest = contained_path(self.out, cand)
            except OutsidePathError as e:  # a folder of OUT that links elsewhere: never write through it
                raise Problem(f"{e}: not writing there") from None
            if dest.exists() or dest.is_symlink():
                if not same(dest):
                    continue
            else:
                self._mkdirs(dest.parent)
                self.created.append(dest)
                write(dest)
                self.written += 1
            self.used.add(cand.lower())
            return cand

    def _mkdirs(self, folder: Path) -> None:
        """Create `folder` and its missing parents, remembering each one created."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            d.mkdir()
            self.created.append(d)

    def remove_created(self) -> None:
        """Remove what this store created, newest first (folders only when empty)."""
        for p in reversed(self.created):
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass  # a folder the user filled meanwhile stays


def _same_file(dest: Path, source: Path) -> bool:
    """Whether `dest` is `source` or a file with its bytes (then it is used, not copied again)."""
    if not dest.is_file():
        return False
    return dest.resolve() == source or filecmp.cmp(dest, source, shallow=False)


def _same_bytes(dest: Path, data: bytes) -> bool:
    """Whether `dest` is a file holding exactly `data`."""
    return dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data


@dataclass
class Options:
    """How `write_dataset` treats existing files, images and records that cannot be converted."""

    overwrite: bool = False
    copy_images: bool = True
    skip_missing: bool = False
    skip_bad: bool = False
    progress: bool = False


def write_dataset(outcomes: Iterable[Outcome], total: int, source, output, opts: Options, noun: str = "record",
                  desc: str = "convert") -> ConversionReport:
    """Check and place every outcome's samples, then write ``OUTPUT/annotations.json`` (module docstring).

    `noun` names a source record in messages (``record id 'a1'``, ``story id '45530'``); `total` sizes
    the progress bar."""
    out = prepare_output(output, opts.overwrite)
    report = ConversionReport(str(source), out)
    store = ImageStore(out, opts.copy_images)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=noun, disable=not opts.progress)
    try:
        store._mkdirs(out)
        entries, seen = [], set()
        for outcome in outcomes:
            try:
                entries += _accept(outcome, store, seen, len(entries))
                report.unused_turns += outcome.unused
            except Problem as p:
                if not (opts.skip_bad or (p.missing and opts.skip_missing)):
                    raise FormatError(f"{source}: {noun} id {short(outcome.id)}: {p}") from None
                report.skipped.append((outcome.id, str(p)))
                report.missing += p.missing
            bar.update(1)
        if not entries:
            raise FormatError(f"{source}: no sample to write ({len(report.skipped)} {noun}(s) skipped)")
        _write_annotations(out, entries, opts.overwrite, store)
    except BaseException:
        store.remove_created()
        raise
    finally:
        bar.close()
    report.samples, report.images, report.written = len(entries), len(store.by_source), store.written
    return report


def _accept(outcome: Outcome, store: ImageStore, seen: set, start: int) -> list[dict]:
    """The annotation entries of one record: every sample checked as `load_records` will check it and
    every image checked, before any image is placed (a refused record leaves no file behind)."""
    if outcome.problem is not None:
        raise outcome.problem
    ids = set()
    for i, s in enumerate(outcome.samples):
        rec = {"id": s.id, "img_list": [img.name for img in s.images], "instruction": s.instruction,
               "output": s.output}
        _, problem = _check_record(rec, start + i, Path(ANNOTATIONS), True)
        if problem is None and (s.id in seen or s.id in ids):
            problem = f"sample id {short(s.id)} is used twice"
        if problem:
            raise Problem(problem if len(outcome.samples) == 1 else f"sample {short(s.id)}: {problem}")
        ids.add(s.id)
        for img in s.images:
            store.check(img)
    entries = [{"id": s.id, "img_list": [store.place(img) for img in s.images], "instruction": s.instruction,
                "output": s.output} for s in outcome.samples]
    seen |= ids
    return entries


def _write_annotations(out: Path, entries: list[dict], overwrite: bool, store: ImageStore) -> None:
    """``OUT/annotations.json``, written beside and renamed into place (never half written)."""
    fd, tmp = tempfile.mkstemp(prefix=".annotations.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, ensure_ascii=False)
            f.write("\n")
        ann = out / ANNOTATIONS
        if (ann.exists() or ann.is_symlink()) and not overwrite:  # appeared while converting
            raise FormatError(f"{ann} appeared while converting; pass --overwrite (overwrite=True) to replace it")
        os.replace(tmp, ann)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
