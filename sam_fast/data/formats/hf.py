"""Hugging Face ``datasets``-style data: any object with ``len()`` and ``obj[i] -> dict`` (a
``datasets.Dataset`` is one, so is a list of dicts), with an image column and two text columns.

An image value is one image or a list of them, each a PIL image (what datasets' ``Image`` feature
decodes to), a path, raw encoded bytes, or a ``{"bytes", "path"}`` dict (its undecoded form). PIL
images are written as PNG, as the model sees them (EXIF orientation applied, 8-bit RGB); encoded
bytes are written as they are (no re-compression) once they decode; path images are copied. Files
go to ``OUTPUT/images/<id>_<k>.<ext>``; identical image bytes in several rows are stored once.

Columns default to the first present of ``images``/``image``, ``instruction``/``question`` and
``output``/``answer``; ids come from an ``id`` column, else the row number. ``<image>`` placeholders
in an instruction are numbered into ``{image#1}``, ``{image#2}``, ... (their count must equal the
row's images); an instruction that names no image gets ``{image#1} ... {image#n}`` in front (sam_fast's
convention, as in the synthesized data), unless ``add_references=False``.

sam_fast does not depend on ``datasets``: `load_hf_disk` (``sam-fast convert hf-disk``) imports it
only when called, to read a folder written by ``Dataset.save_to_disk``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, ImageOps

from sam_fast.data.formats._common import (
    ConversionReport,
    DataImage,
    FileImage,
    FormatError,
    Options,
    Outcome,
    Problem,
    Sample,
    count_placeholders,
    has_references,
    references,
    replace_placeholders,
    short,
    write_dataset,
)
from sam_fast.data.images import to_rgb
from sam_fast.data.paths import safe_filename

CANDIDATES = {"image": ("images", "image"), "instruction": ("instruction", "question"), "output": ("output", "answer")}
_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
NO_DATASETS = ("hf-disk reads a folder written by datasets' save_to_disk and needs the `datasets` package, which "
               "sam_fast does not install: pip install datasets (or, from Python, pass any dataset with len() and "
               "ds[i] -> dict to sam_fast.data.formats.convert_hf)")


def convert_hf(dataset, output, *, image_column: str | None = None, instruction_column: str | None = None,
               output_column: str | None = None, id_column: str | None = None, image_root=None,
               add_references: bool = True, overwrite: bool = False, skip_missing: bool = False,
               skip_bad: bool = False, progress: bool = False, source: str = "dataset") -> ConversionReport:
    """Convert rows of a datasets-style object into an ``annotations.json`` dataset folder.

    Args:
        dataset: ``len(dataset)`` rows, ``dataset[i]`` a dict (``column_names``, when present, names the columns).
        output: the dataset folder to write (images under ``OUTPUT/images/``).
        image_column, instruction_column, output_column: column names (default: module docstring).
        id_column: the column of sample ids (default ``id`` when present, else the row number).
        image_root: the folder relative image paths are read from (default: the working directory).
        add_references: put ``{image#1} ... {image#n}`` before an instruction that names no image.
        overwrite, skip_missing, skip_bad, progress: as `convert_llava`.
        source: how messages name the dataset.

    Raises:
        FormatError: one line naming the row id and the reason (a missing column: the columns there are).
    """
    names = _column_names(dataset, source)
    cols = {what: _pick(names, given, what, source) for what, given in
            (("image", image_column), ("instruction", instruction_column), ("output", output_column))}
    if id_column is not None and names is not None and id_column not in names:
        raise FormatError(f"{source}: no id column {short(id_column)} (columns: {short(names, 200)})")
    cols["id"] = id_column if id_column is not None else ("id" if names and "id" in names else None)
    root = Path(image_root) if image_root is not None else Path()
    outcomes = (_row(dataset, i, cols, root, add_references) for i in range(len(dataset)))
    opts = Options(overwrite, True, skip_missing, skip_bad, progress)
    return write_dataset(outcomes, len(dataset), source, output, opts, "row", "convert hf")


def _column_names(dataset, source: str) -> list[str] | None:
    """The dataset's column names (``column_names``, else the first row's keys); a DatasetDict is refused."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, Mapping):
        raise FormatError(f"{source}: a dataset of splits ({short(list(names), 120)}): convert one split, "
                          "e.g. dataset['train']")
    if names is None and len(dataset):
        first = dataset[0]
        names = list(first) if isinstance(first, Mapping) else None
    return None if names is None else [str(n) for n in names]


def _pick(names, given: str | None, what: str, source: str) -> str:
    """The column holding `what`: `given`, checked, or the first default candidate present."""
    if given is not None:
        if names is not None and given not in names:
            raise FormatError(f"{source}: no {what} column {short(given)} (columns: {short(names, 200)})")
        return given
    found = next((c for c in CANDIDATES[what] if names is None or c in names), None)
    if found is None:
        raise FormatError(f"{source}: no {what} column (looked for {', '.join(CANDIDATES[what])}; columns: "
                          f"{short(names, 200)}); name it with {what}_column= (--{what}-column)")
    return found


def _row(dataset, i: int, cols: dict, root: Path, add_refs: bool) -> Outcome:
    """Row `i` as a sample, or the problem that stops it."""
    rid = i
    try:
        try:
            row = dataset[i]
        except Exception as e:  # whatever the dataset raises (a datasets Image feature that cannot decode)
            raise Problem(f"reading row {i} failed ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(row, Mapping):
            raise Problem(f"row {i} is a {type(row).__name__}, not a mapping of columns")
        missing = [c for c in cols.values() if c is not None and c not in row]
        if missing:
            raise Problem(f"row {i} has no column {short(missing[0])}")
        rid = row[cols["id"]] if cols["id"] is not None else i
        texts = {what: row[cols[what]] for what in ("instruction", "output")}
        for what, text in texts.items():
            if not isinstance(text, str):
                raise Problem(f"column {short(cols[what])} ({what}) is a {type(text).__name__}, not text")
        stem = f"images/{safe_filename(str(rid))}"
        cells = _values(row[cols["image"]])
        files = [_image(v, f"{stem}_{k + 1}", root, cols["image"], k) for k, v in enumerate(cells)]
        instruction = _refer(texts["instruction"], len(files), add_refs)
    except Problem as p:
        return Outcome(rid, problem=p)
    return Outcome(rid, [Sample(rid, files, instruction, texts["output"])])


def _values(value) -> list:
    """An image cell as a list of images (one image, or a list / tuple of them)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _image(value, stem: str, root: Path, column: str, k: int):
    """One image cell item as a `DataImage` (PIL images, bytes) or a `FileImage` (paths)."""
    where = f"column {short(column)} image {k + 1}"
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise Problem(f"{where} is a dict with neither 'bytes' nor 'path'")
        value = data if data is not None else path
    if isinstance(value, Image.Image):
        return DataImage(_png(value, where), f"{stem}.png")
    if isinstance(value, (bytes, bytearray)):
        return _encoded(bytes(value), stem, where)
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        path = root / value
        return FileImage(path, f"{stem}{path.suffix.lower() or '.img'}")
    raise Problem(f"{where} is a {type(value).__name__}, not a PIL image, a path, bytes or a {{'bytes', 'path'}} dict")


def _png(img: Image.Image, where: str) -> bytes:
    """`img` as PNG bytes, as the model sees it (EXIF orientation applied, 8-bit RGB)."""
    try:
        rgb = to_rgb(ImageOps.exif_transpose(img))
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
    except Exception as e:  # a closed or damaged image, NaN pixels
        raise Problem(f"{where} cannot be read as an image ({type(e).__name__}: {str(e)[:120]})") from None
    return buf.getvalue()


def _encoded(data: bytes, stem: str, where: str) -> DataImage:
    """Encoded image bytes, decoded once to check them, kept as they are."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
    except Exception as e:
        raise Problem(f"{where}: its bytes are not a readable image ({type(e).__name__}: {str(e)[:120]})") from None
    return DataImage(data, f"{stem}{_EXT.get(fmt, '.' + str(fmt).lower())}")


def _refer(instruction: str, n: int, add_refs: bool) -> str:
    """The instruction with its ``<image>`` placeholders numbered (their count must be `n`), or with
    ``{image#1} ... {image#n}`` in front when it names no image (and `add_refs`)."""
    tokens = count_placeholders(instruction)
    if tokens:
        if tokens != n:
            raise Problem(f"{tokens} <image> token(s) in the instruction but {n} image(s)")
        return replace_placeholders(instruction, 1)[0]
    if add_refs and n and not has_references(instruction):
        return f"{references(n)} {instruction}"
    return instruction


def load_hf_disk(path, split: str | None = None):
    """``datasets.load_from_disk(path)`` (one split of a DatasetDict: `split`), for ``sam-fast convert hf-disk``."""
    try:
        import datasets
    except ImportError:
        raise FormatError(NO_DATASETS) from None
    if not Path(path).is_dir():
        raise FormatError(f"{path}: no such folder (hf-disk reads a folder written by save_to_disk)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise FormatError(f"{path}: not a saved dataset ({type(e).__name__}: {msg})") from None
    names = getattr(ds, "column_names", None)
    if isinstance(names, Mapping):
        if split is None or split not in names:
            what = "choose one with --split" if split is None else f"no split {short(split)}"
            raise FormatError(f"{path}: a dataset of splits {short(list(names), 120)}: {what}")
        ds = ds[split]
    elif split is not None:
        raise FormatError(f"{path}: --split {short(split)} given but the folder holds one dataset, not splits")
    return ds
