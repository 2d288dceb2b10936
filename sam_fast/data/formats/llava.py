"""LLaVA-style conversation JSON: LLaVA-1.5 (one image per record), LLaVA-NeXT-Interleave and Mantis
(a list of images).

A source file (``.json``: a list; ``.jsonl``: one record a line) holds records
``{"id", "image": "a.jpg" | ["a.jpg", "b.jpg", ...], "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`` ("images" is read too; "user"/"assistant"
as roles). Image paths are relative to the image folder and must stay inside it.

Each ``<image>`` in the human turns is, in order over the whole conversation, the next image of the
record: it becomes ``{image#1}``, ``{image#2}``, ... in the instruction (sam_fast's convention: the
model places the images' visual tokens itself, the markers stay text). A record whose count of
``<image>`` differs from its image list is refused, naming both counts; so is a record without an
image (a text-only conversation), with turns that do not alternate human, gpt, or with an empty answer.

``turns="first"`` (default) makes one sample of each record: its first human turn and the answer to
it; the later exchanges are counted in the report (`ConversionReport.unused_turns`), not converted.
``turns="all"`` makes one sample per exchange: the first keeps the record's id, exchange t > 1 gets
the id ``"<id>#<t>"`` and carries the earlier dialogue as text before its question
(``User: q1\\nAssistant: a1\\nUser: q2``; training cuts an instruction to its last 128 tokens, so
a long history loses its start, never the question). Every sample of a record keeps all its images.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from sam_fast.data.formats._common import (
    ConversionReport,
    FileImage,
    FormatError,
    Options,
    Outcome,
    Problem,
    Sample,
    count_placeholders,
    read_json,
    replace_placeholders,
    short,
    write_dataset,
)
from sam_fast.data.paths import OutsidePathError, contained_path

HUMAN, GPT = ("human", "user"), ("gpt", "assistant")
TURNS = ("first", "all")


def convert_llava(src, output, images=None, *, turns: str = "first", copy_images: bool = True,
                  overwrite: bool = False, skip_missing: bool = False, skip_bad: bool = False,
                  progress: bool = False) -> ConversionReport:
    """Convert a LLaVA-style conversation file into an ``annotations.json`` dataset folder.

    Args:
        src: the ``.json`` (list of records) or ``.jsonl`` file.
        output: the dataset folder to write (``OUTPUT/annotations.json``, images under ``OUTPUT/images/``).
        images: the folder the records' image paths are relative to (default: `src`'s folder).
        turns: ``"first"`` exchange of each conversation, or ``"all"`` (module docstring).
        copy_images: copy the images into `output` (default), or reference them where they lie, which
            must be inside `output`.
        overwrite: replace an existing ``OUTPUT/annotations.json`` (refused otherwise).
        skip_missing: skip records whose image files do not exist (counted in the report).
        skip_bad: skip every record that cannot be converted (counted, with the reason).
        progress: a tqdm progress bar.

    Raises:
        FormatError: one line naming the file, the record id and the reason.
    """
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {short(turns)}")
    src = Path(src)
    records = read_json(src, "LLaVA")
    if not isinstance(records, list):
        raise FormatError(f"{src}: expected a list of records, got a JSON {type(records).__name__}")
    folder = Path(images) if images is not None else src.parent
    outcomes = (_record(rec, i, folder, turns) for i, rec in enumerate(records))
    opts = Options(overwrite, copy_images, skip_missing, skip_bad, progress)
    return write_dataset(outcomes, len(records), src, output, opts, "record", "convert llava")


def _record(rec, index: int, folder: Path, turns: str) -> Outcome:
    """One record as samples, or the problem that stops it."""
    rid = rec.get("id", f"#{index}") if isinstance(rec, dict) else f"#{index}"
    try:
        if not isinstance(rec, dict):
            raise Problem(f"record #{index} is a {type(rec).__name__}, not an object")
        if not isinstance(rid, (int, str)) or isinstance(rid, bool):
            raise Problem(f"record #{index} has no valid 'id' (int or str)")
        paths = _image_list(rec)
        exchanges = _exchanges(rec.get("conversations"))
        tokens = sum(count_placeholders(q) for q, _ in exchanges)
        if tokens != len(paths):
            raise Problem(f"{tokens} <image> token(s) in its human turns but {len(paths)} image(s) in its "
                          f"image list (each <image> stands for the next image)")
        files = [_image(folder, p) for p in paths]
        questions, first = [], 1
        for q, _ in exchanges:
            text, n = replace_placeholders(q, first)
            questions.append(text)
            first += n
        answers = [a for _, a in exchanges]
    except Problem as p:
        return Outcome(rid, problem=p)
    if turns == "first":
        return Outcome(rid, [Sample(rid, files, questions[0], answers[0])], unused=len(exchanges) - 1)
    samples = [Sample(rid if t == 0 else f"{rid}#{t + 1}", files, _with_history(questions, answers, t), answers[t])
               for t in range(len(exchanges))]
    return Outcome(rid, samples)


def _image_list(rec: dict) -> list[str]:
    """The record's image paths: ``image`` (or ``images``), one path or a list of them."""
    key = "image" if "image" in rec else "images"
    value = rec.get(key)
    if value is None:
        raise Problem("has no 'image' (a text-only conversation: a sample needs at least one image)")
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise Problem(f"'{key}' must be an image path or a non-empty list of them, got {short(value)}")
    return paths


def _exchanges(conversation) -> list[tuple[str, str]]:
    """(human, gpt) pairs of a conversation whose turns alternate human, gpt, starting with human."""
    if not isinstance(conversation, list) or not conversation:
        raise Problem(f"'conversations' must be a non-empty list of turns, got {short(conversation)}")
    pairs = []
    for t, turn in enumerate(conversation):
        role = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        want = HUMAN if t % 2 == 0 else GPT
        if not isinstance(role, str) or role.lower() not in want:
            raise Problem(f"turn {t + 1} is from {short(role)}, expected {want[0]!r} (turns alternate human, gpt)")
        if not isinstance(value, str):
            raise Problem(f"turn {t + 1} has no text 'value' (got {short(value)})")
        if t % 2 == 0:
            pairs.append([value, None])
        else:
            pairs[-1][1] = value
    if pairs[-1][1] is None:
        raise Problem(f"turn {len(conversation)} (human) has no answer")
    return [(q, a) for q, a in pairs]


def _image(folder: Path, rel: str) -> FileImage:
    """The image file `rel` of the image folder, and where its copy goes (``images/<rel>``)."""
    try:
        path = contained_path(folder, rel)
    except OutsidePathError as e:
        raise Problem(f"{e} (image paths are relative to the image folder {folder})") from None
    norm = PurePosixPath(os.path.normpath(rel).replace(os.sep, "/"))
    if norm.is_absolute() or norm.parts[:1] == ("..",):  # stays inside only through links
        raise Problem(f"image path {short(rel)} climbs out of the image folder {folder}")
    return FileImage(path, str(PurePosixPath("images") / norm))


def _with_history(questions: list[str], answers: list[str], t: int) -> str:
    """Exchange t's instruction: its question, after the earlier exchanges as ``User:`` / ``Assistant:`` text."""
    if t == 0:
        return questions[0]
    lines = [f"User: {q}\nAssistant: {a}" for q, a in zip(questions[:t], answers[:t], strict=True)]
    return "\n".join([*lines, f"User: {questions[t]}"])
