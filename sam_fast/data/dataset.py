"""`annotations.json` datasets and the ragged collator.

A dataset is a folder with ``annotations.json``: a list of
``{"id": int|str, "img_list": [paths relative to the folder, in order], "instruction": str, "output": str}``.

Bad data stops with a `DataError` naming the sample id and the file: a missing or undecodable image,
an image path that leaves the dataset folder, a malformed record, an empty ``img_list``, an
instruction holding the image placeholder text ``<image>`` or referring to an image the sample
lacks (``{image#3}`` with two images), an instruction or output longer than `MAX_TEXT_CHARS`
characters or holding a lone surrogate (not Unicode text). With ``skip_bad=True`` such samples are
skipped instead and counted once each (`AnnotationDataset.skipped`, reported by the trainer and the
evaluation runner): nothing is dropped silently. Records are checked, and every image file decoded once (cheaply, see
`sam_fast.data.images.check_image`), when the dataset is opened, so a bad file stops a run before
its first step; an image that only fails later (changed on disk) raises then (or, with
``skip_bad``, its sample becomes ``None``, which `Collator` drops).

Image paths must stay inside the dataset folder after following symlinks (absolute paths, ``..``
that climbs out and links to elsewhere are refused before the file is touched) unless
``allow_outside_paths=True`` (``--allow-outside-paths`` on the command line).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sam_fast.data.images import check_image, open_image
from sam_fast.data.pack_plan import PackPlan, PackPlanError
from sam_fast.data.paths import OutsidePathError, contained_path
from sam_fast.data.tokenization import PromptBuilder, image_reference_problem, surrogate_problem

MAX_TEXT_CHARS = 65536
"""Longest instruction / output accepted, in characters. The LLM reads at most 128 instruction tokens
and 255 answer tokens, so longer texts only cost tokenisation time on every draw."""

_PLACEHOLDER = re.compile(r"<\s*image\s*>", re.IGNORECASE)


class DataError(ValueError):
    """Bad data; the message names the dataset file, the sample id and the offending file."""


EMPTY_OUTPUT = "'output' is empty (a sample with no answer would only teach the model to stop at once)"


def text_problem(name: str, text: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """Why an instruction (``name="instruction"``) or output cannot be used, or None: longer than
    `max_chars` characters, holding a lone surrogate (the tokenizer would fail on it in the first
    batch, naming no sample), or (instructions) holding the image placeholder text ``<image>``."""
    if len(text) > max_chars:
        return (f"'{name}' is {len(text)} characters long, over the limit of {max_chars} (the model reads at most "
                f"a few hundred tokens of it)")
    problem = surrogate_problem(name, text)
    if problem:
        return problem
    m = _PLACEHOLDER.search(text) if name == "instruction" else None
    if m:
        return (f"'{name}' contains the image placeholder text {m.group(0)!r} at character {m.start()}; refer to "
                f"images as {{image#1}}, {{image#2}}, ... (the model inserts the image tokens itself)")
    return None


@dataclass
class Record:
    """One checked sample: its id, image paths (``root / entry``), instruction and output."""

    id: int | str
    images: list[Path]
    instruction: str
    output: str | None


@dataclass
class SkipReport:
    """Samples skipped under ``skip_bad``: (sample id, reason) in the order met."""

    items: list[tuple[object, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, sample_id, reason: str) -> None:
        """Record one skipped sample and why."""
        self.items.append((sample_id, reason))

    def summary(self) -> str:
        if not self.items:
            return "no samples skipped"
        head = "; ".join(f"id {i!r}: {r}" for i, r in self.items[:5])
        more = f" (and {len(self.items) - 5} more)" if len(self.items) > 5 else ""
        return f"skipped {len(self.items)} bad sample(s) (--skip-bad): {head}{more}"


def _check_record(rec, index: int, ann_path: Path, require_output: bool,
                  max_text_chars: int = MAX_TEXT_CHARS) -> tuple[object, str | None]:
    """(id, problem or None) for one raw record."""
    if not isinstance(rec, dict):
        return f"#{index}", f"record #{index} is a {type(rec).__name__}, not an object"
    sid = rec.get("id", f"#{index}")
    if "id" not in rec or not isinstance(rec["id"], (int, str)) or isinstance(rec["id"], bool):
        return sid, f"record #{index} has no valid 'id' (int or str)"
    imgs = rec.get("img_list")
    if not isinstance(imgs, list) or not all(isinstance(p, str) and p for p in imgs):
        return sid, "'img_list' must be a list of relative image paths"
    if not imgs:
        return sid, "'img_list' is empty (a sample needs at least one image)"
    if any("\x00" in p for p in imgs):
        return sid, "an 'img_list' path contains a NUL character"
    instruction = rec.get("instruction")
    if not isinstance(instruction, str):
        return sid, "'instruction' is missing or not a string"
    out = rec.get("output")
    if (require_output and not isinstance(out, str)) or (out is not None and not isinstance(out, str)):
        return sid, "'output' is missing or not a string"
    for name, text in (("instruction", instruction), ("output", out)):
        problem = None if text is None else text_problem(name, text, max_text_chars)
        if problem:
            return sid, problem
    if require_output and not out.strip():
        return sid, EMPTY_OUTPUT
    return sid, image_reference_problem(instruction, len(imgs))


def _read_annotations(ann_path: Path, root: Path) -> list:
    """The parsed ``annotations.json`` list; DataError naming the file when it is missing,
    unreadable, not JSON or not a list."""
    if not ann_path.is_file():
        raise DataError(f"{ann_path}: no annotations.json in the dataset folder {root}")
    try:
        raw = json.loads(ann_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_path}: not valid JSON ({e})") from e
    except (OSError, RecursionError) as e:  # unreadable; or nested too deeply for the JSON parser
        raise DataError(f"{ann_path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(raw, list):
        raise DataError(f"{ann_path}: expected a list of samples, got {type(raw).__name__}")
    return raw


def _image_paths(root: Path, img_list: list[str], allow_outside_paths: bool, verify_images: bool
                 ) -> tuple[list[Path], str | None]:
    """The resolved image paths of one record and, at the first bad one, why it is bad (None: all
    good; the paths so far otherwise)."""
    paths: list[Path] = []
    for rel in img_list:
        try:  # before the file is touched: the refusal must not tell whether an outside file exists
            p = contained_path(root, rel, allow_outside_paths)
        except OutsidePathError as e:
            return paths, f"{e} (pass --allow-outside-paths / allow_outside_paths=True to read it)"
        except (OSError, RuntimeError) as e:  # e.g. a symlink loop
            return paths, f"image path {rel!r} cannot be resolved ({type(e).__name__}: {e})"
        paths.append(p)
        try:
            exists = p.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            return paths, f"image file {p} cannot be accessed ({type(e).__name__}: {e.strerror})"
        if not exists:
            return paths, f"image file {p} does not exist"
        if verify_images:
            try:
                check_image(p)
            except Exception as e:  # PIL raises many types for corrupt files
                return paths, f"image file {p} is not a readable image ({type(e).__name__}: {e})"
    return paths, None


def load_records(root: str | os.PathLike, skip_bad: bool = False, require_output: bool = True,
                 verify_images: bool = True, skipped: SkipReport | None = None, allow_outside_paths: bool = False,
                 max_text_chars: int = MAX_TEXT_CHARS) -> tuple[list[Record], SkipReport]:
    """Read and check ``ROOT/annotations.json``; returns (good records, skip report).

    Args:
        root: the dataset folder.
        skip_bad: skip (and count) bad samples instead of raising `DataError`.
        require_output: every record needs an ``output`` string (training, evaluation).
        verify_images: decode every image once now (`check_image`) rather than fail at first use.
        skipped: a report to add skipped samples to (a new one by default).
        allow_outside_paths: read image paths that leave ``root`` (absolute, ``..``, symlinks out).
        max_text_chars: longest instruction / output accepted.
    """
    root = Path(root)
    ann_path = root / "annotations.json"
    skipped = skipped if skipped is not None else SkipReport()
    raw = _read_annotations(ann_path, root)
    records, seen = [], set()
    for i, rec in enumerate(raw):
        sid, problem = _check_record(rec, i, ann_path, require_output, max_text_chars)
        if problem is None and sid in seen:
            problem = "duplicate id"
        paths = []
        if problem is None:
            paths, problem = _image_paths(root, rec["img_list"], allow_outside_paths, verify_images)
        if problem is not None:
            if not skip_bad:
                raise DataError(f"{ann_path}: sample id {sid!r}: {problem}")
            skipped.add(sid, problem)
            continue
        seen.add(sid)
        records.append(Record(rec["id"], paths, rec["instruction"], rec.get("output")))
    return records, skipped


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index` in `epoch` of a run seeded with `seed` (what `sample_generator` is seeded with)."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + index


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation RNG of one sample: a function of (seed, epoch, index) only."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class AnnotationDataset(torch.utils.data.Dataset):
    """A dataset folder. Item i: ``{"id", "pixel_values" [N,3,S,S], "instruction", "output"}``
    (or ``None`` for a sample whose image fails to decode, under ``skip_bad``).

    Args:
        root: the folder holding annotations.json.
        transform: a `sam_fast.data.transforms` transform (train or eval).
        skip_bad: skip bad samples (counted once each in `skipped`) instead of raising `DataError`.
        seed: augmentation seed; `set_epoch` changes the epoch part.
        require_output: every record needs an ``output``.
        verify_images: decode every image once when opened (default) instead of at first use.
        allow_outside_paths: read image paths that leave the folder (refused by default).
    """

    def __init__(self, root, transform, skip_bad: bool = False, seed: int = 0, require_output: bool = True,
                 verify_images: bool = True, allow_outside_paths: bool = False):
        self.root = Path(root)
        self.transform, self.skip_bad, self.seed, self.epoch = transform, skip_bad, int(seed), 0
        self.records, self.skipped = load_records(root, skip_bad, require_output, verify_images,
                                                  allow_outside_paths=allow_outside_paths)
        self._failed: set[int] = set()  # indices whose images failed to decode (skip_bad): counted once
        if not self.records:
            raise DataError(f"{self.root / 'annotations.json'}: no usable samples ({self.skipped.summary()})")

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of the following items for `epoch` (see `sample_generator`)."""
        self.epoch = int(epoch)

    def record_failure(self, index: int, sample_id, reason: str) -> bool:
        """Mark item `index` as undecodable (its later draws give ``None``) and add it to `skipped`, once;
        False when it was already marked. The trainer's loader workers decode in other processes and
        report their failures back through this."""
        if index in self._failed:
            return False
        self._failed.add(index)
        self.skipped.add(sample_id, reason)
        return True

    @property
    def failed_indices(self) -> frozenset[int]:
        """Indices whose images failed to decode under ``skip_bad``: each is in `skipped` once, however often
        it is drawn (the item is then ``None``)."""
        return frozenset(self._failed)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, rec: Record, path: Path) -> Image.Image:
        """The image at `path` as upright 8-bit RGB (`sam_fast.data.images.open_image`); `DataError` naming
        the sample and the file when it cannot be decoded."""
        try:
            return open_image(path)
        except Exception as e:
            raise DataError(f"{self.root / 'annotations.json'}: sample id {rec.id!r}: image file {path} "
                            f"could not be decoded ({type(e).__name__}: {e})") from e

    def __getitem__(self, index: int):
        rec = self.records[index]
        if index in self._failed:
            return None
        gen = sample_generator(self.seed, self.epoch, index)
        try:
            pixels = torch.stack([self.transform(self.load_image(rec, p), gen) for p in rec.images])
        except DataError as e:
            if not self.skip_bad:
                raise
            self.record_failure(index, rec.id, str(e))
            return None
        return {"id": rec.id, "pixel_values": pixels, "instruction": rec.instruction, "output": rec.output}


class Collator:
    """Ragged batches: images concatenated sample-major.

    Returns ``pixel_values [T,3,S,S]`` (or ``image_features [T,P,D]`` when items carry features),
    ``image_counts`` LongTensor [B], the padded Q-former and LLM ids/masks (`PromptBuilder.batch_text`),
    ``labels`` and ``pack_plan`` (the `PackPlan` of the packed training step, built from the token
    lists so that the step reads nothing back from the device) when ``train``, plus ``ids`` and
    ``outputs`` (lists, for evaluation). `None` items
    (undecodable under ``skip_bad``) are dropped and counted in ``dropped``, once per draw (a sample drawn in
    every epoch counts every time; the distinct samples are in the dataset's ``skipped``).
    ``pack_buckets=(tokens, targets)`` buckets the plans (`PackPlan.bucketed`): the packed row and its
    targets padded to multiples of those, so that a compiled step sees few shapes.
    """

    def __init__(self, prompt_builder: PromptBuilder, train: bool = True,
                 pack_buckets: tuple[int, int] | None = None):
        self.pb, self.train, self.dropped = prompt_builder, train, 0
        self.pack_buckets = None if pack_buckets is None else tuple(int(n) for n in pack_buckets)
        if self.pack_buckets is not None and (len(self.pack_buckets) != 2 or min(self.pack_buckets) < 1):
            raise ValueError(f"pack_buckets must be (tokens, targets), both >= 1; got {pack_buckets!r}")

    def __call__(self, items: list) -> dict | None:
        good = [it for it in items if it is not None]
        self.dropped += len(items) - len(good)
        if not good:
            return None
        key = "image_features" if "image_features" in good[0] else "pixel_values"
        counts = [it[key].shape[0] for it in good]
        encoded = []
        for it, n in zip(good, counts, strict=True):
            try:
                encoded.append(self.pb.encode(it["instruction"], n, it["output"] if self.train else None))
            except ValueError as e:
                raise DataError(f"sample id {it['id']!r}: {e}") from e
        batch = {key: torch.cat([it[key] for it in good]), "image_counts": torch.tensor(counts, dtype=torch.long)}
        batch.update(self.pb.batch_text(encoded, self.train))
        if self.train:
            batch["pack_plan"] = self._pack_plan(encoded, counts, batch["input_ids"].shape[1], good)
        batch["ids"] = [it["id"] for it in good]
        batch["outputs"] = [it["output"] for it in good]
        return batch

    def _pack_plan(self, encoded, counts: list[int], width: int, good: list) -> PackPlan:
        """The batch's pack plan from the token lists it was padded from (right-padded rows: prompt
        + answer from column 0, labels on the answer only)."""
        rows = [(0, e.prompt + e.answer, [-100] * len(e.prompt) + e.answer) for e in encoded]
        try:
            plan = PackPlan.build(rows, width, counts, self.pb.image_token_index, self.pb.num_query_tokens)
            return plan if self.pack_buckets is None else plan.bucketed(*self.pack_buckets)
        except PackPlanError as e:
            if e.row is None:
                raise DataError(f"batch of sample ids {[it['id'] for it in good][:8]}: {e}") from e
            raise DataError(f"sample id {good[e.row]['id']!r}: {e}") from e


MODEL_INPUTS = ("pixel_values", "image_features", "image_counts", "qformer_input_ids", "qformer_attention_mask",
                "input_ids", "attention_mask", "labels", "pack_plan")
TRAINING_ONLY = ("labels", "pack_plan")


def model_inputs(batch: dict, device=None, generation: bool = False, non_blocking: bool = False) -> dict:
    """The inputs of a collated batch that `SAM.forward` / `SAM.generate` take (not ``labels`` and
    ``pack_plan`` for generation), moved to `device` (`non_blocking`: copy asynchronously, for a
    batch in pinned memory; the pack plan's tensors move the same way)."""
    keys = [k for k in MODEL_INPUTS if k in batch and not (generation and k in TRAINING_ONLY)]
    return {k: batch[k].to(device, non_blocking=non_blocking) if device is not None else batch[k] for k in keys}
