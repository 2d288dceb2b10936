"""VIST storytelling (SIS) JSON: the paper's visual storytelling benchmark.

A SIS file holds ``{"images": [...], "albums": [...], "annotations": [[{"story_id",
"photo_flickr_id", "worker_arranged_photo_order", "text", "original_text", "album_id", ...}], ...]}``:
one annotation per (story, photo). Annotations are grouped by ``story_id`` (stories in the order of
their first annotation) and ordered by ``worker_arranged_photo_order``; a story becomes one sample
whose id is its ``story_id``, whose images are its photos in that order (``<photo_flickr_id>.jpg``,
``.jpeg``, ``.png`` or ``.gif`` in the image folder) and whose output is their sentences (``text``,
or ``original_text``) joined with spaces.

The instruction is one template for every story: ``{images}`` in it becomes the story's image
references (``{image#1} {image#2} ...``, sam_fast's convention for naming images) and ``{n}`` its
number of images; nothing else is substituted, so ``{image#k}`` may be written literally.
"""

from __future__ import annotations

from pathlib import Path

from sam_fast.data.dataset import text_problem
from sam_fast.data.formats._common import (
    ConversionReport,
    FileImage,
    FormatError,
    Options,
    Outcome,
    Problem,
    Sample,
    read_json,
    references,
    short,
    write_dataset,
)
from sam_fast.data.paths import safe_filename

VIST_INSTRUCTION = "{images} Write a story about these {n} images."
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")
TEXT_FIELDS = ("text", "original_text")


def convert_vist(src, output, images=None, *, instruction: str = VIST_INSTRUCTION, text_field: str = "text",
                 copy_images: bool = True, overwrite: bool = False, skip_missing: bool = False,
                 skip_bad: bool = False, progress: bool = False) -> ConversionReport:
    """Convert a VIST SIS file (e.g. ``train.story-in-sequence.json``) into an ``annotations.json`` folder.

    Args:
        src: the SIS JSON file.
        output: the dataset folder to write (images copied under ``OUTPUT/images/``).
        images: the folder holding ``<photo_flickr_id>.jpg`` (or .jpeg/.png/.gif) (default: `src`'s folder).
        instruction: the template of every story's instruction (module docstring).
        text_field: ``"text"`` (VIST's normalised sentences) or ``"original_text"``.
        copy_images, overwrite, skip_missing, skip_bad, progress: as `convert_llava`.

    Raises:
        FormatError: one line naming the file, the story id and the reason.
    """
    if text_field not in TEXT_FIELDS:
        raise ValueError(f"text_field must be one of {TEXT_FIELDS}, got {short(text_field)}")
    problem = text_problem("instruction", instruction)
    if problem:
        raise FormatError(f"instruction template: {problem}")
    src = Path(src)
    data = read_json(src, "VIST SIS")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise FormatError(f"{src}: not a VIST SIS file (expected an object with an 'annotations' list)")
    stories = _stories(anns)
    folder = Path(images) if images is not None else src.parent
    outcomes = (_story(sid, items, folder, instruction, text_field) for sid, items in stories.items())
    opts = Options(overwrite, copy_images, skip_missing, skip_bad, progress)
    return write_dataset(outcomes, len(stories), src, output, opts, "story", "convert vist")


def _stories(anns: list) -> dict:
    """story_id -> its annotations (dicts), in the order stories first appear; an annotation that is not an
    object with a ``story_id`` becomes a story of its own, ``annotation #i``, refused with the reason."""
    stories: dict = {}
    for i, item in enumerate(anns):
        for a in item if isinstance(item, list) else [item]:
            sid = a.get("story_id") if isinstance(a, dict) else None
            if not isinstance(sid, (str, int)) or isinstance(sid, bool):
                stories[f"annotation #{i}"] = Problem(f"annotation #{i} is not an object with a 'story_id': {short(a)}")
            elif not isinstance(stories.get(sid, []), Problem):
                stories.setdefault(sid, []).append(a)
    return stories


def _story(sid, items, folder: Path, template: str, text_field: str) -> Outcome:
    """One story as a sample, or the problem that stops it."""
    if isinstance(items, Problem):
        return Outcome(sid, problem=items)
    try:
        orders = [_order(a) for a in items]
        if len(set(orders)) != len(orders):
            raise Problem(f"worker_arranged_photo_order values repeat: {sorted(orders)}")
        ranked = [a for _, a in sorted(zip(orders, items, strict=True), key=lambda pair: pair[0])]
        texts = [a.get(text_field) for a in ranked]
        for a, t in zip(ranked, texts, strict=True):
            if not isinstance(t, str):
                raise Problem(f"photo {short(a.get('photo_flickr_id'))}: {text_field!r} is not text: {short(t)}")
        files = [_photo(folder, a.get("photo_flickr_id")) for a in ranked]
    except Problem as p:
        return Outcome(sid, problem=p)
    n = len(files)
    if n == 1:  # the default's "these 1 images"
        template = template.replace("these {n} images", "this image")
    instruction = template.replace("{images}", references(n)).replace("{n}", str(n))
    return Outcome(sid, [Sample(sid, files, instruction, " ".join(t.strip() for t in texts))])


def _order(a: dict) -> int:
    """An annotation's ``worker_arranged_photo_order`` (an int, or digits as VIST sometimes writes it)."""
    value = a.get("worker_arranged_photo_order")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Problem(f"photo {short(a.get('photo_flickr_id'))} has no integer worker_arranged_photo_order "
                      f"(got {short(value)})")
    return value


def _photo(folder: Path, pid) -> FileImage:
    """The image file of photo `pid`: the first of ``<pid>.jpg``, ``.jpeg``, ``.png``, ``.gif`` that exists."""
    name = str(pid) if isinstance(pid, (str, int)) and not isinstance(pid, bool) else ""
    if not name or safe_filename(name) != name:
        raise Problem(f"photo_flickr_id {short(pid)} is not a file name")
    for ext in EXTENSIONS:
        path = folder / f"{name}{ext}"
        if path.is_file():
            return FileImage(path, f"images/{name}{ext}")
    raise Problem(f"image file {folder / name}.jpg (or {', '.join(EXTENSIONS[1:])}) does not exist", missing=True)
