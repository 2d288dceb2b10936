"""The synthesis pipeline: source groups in, an ``annotations.json`` dataset folder out.

Sources: ``SOURCES/<object>/<image>`` - one folder per object with at least two images of it (different
poses or views); at least three folders. For sample k of object A (``samples_per_group`` per object), a
seeded draw picks two images of A and two other objects B and C (one image each); A's first image goes on
canvas 1 with B, its second on canvas 2 with C. Per sample, in order (a failed filter stops the sample
there, so no GPU time is spent on it after):

1. segmentation of the four source images (cached under ``OUT/.synthesis/masks`` by the sha256 of the
   file's bytes), ``mask_area`` filter;
2. compositing of the two canvases, ``placement`` (could not place) and ``object_cut`` filters;
3. a caption of A's first image;
4. one background description per canvas from the text writer (``background`` prompt), ``text`` filter;
5. inpainting of each canvas's background, ``object_changed`` filter;
6. the refined answer (``refine`` prompt; an ``Instruction:``/``Answer:`` reply sets both), ``text`` filter.

Output (``OUT``): ``annotations.json`` (``{"id", "img_list": [canvas 1, canvas 2], "instruction", "output"}``
per kept sample: the format `sam-fast train` reads), ``images/NNNNNN_{1,2}.png``, ``masks/NNNNNN_{1,2}.png``
(white = the inpainted background), ``manifest.jsonl`` (every sample, kept or dropped: sources, seeds,
models, placements, texts, every filter decision) and ``synthesis.json`` (the run's settings).
A rerun with the same settings continues where a killed run stopped; other settings are refused, as is a
non-empty folder that is not a synthesis run. Every sample records the sha256 of its source files: a source
whose bytes changed under the same name is segmented again and the finished samples made from it are redone
(their new manifest lines say so in ``replaces``), so the dataset never mixes old and new sources.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sam_fast.runlock import RunLock, RunLockedError
from sam_fast.synthesis.captioning import Captioner
from sam_fast.synthesis.compositing import Compositor
from sam_fast.synthesis.errors import SynthesisError
from sam_fast.synthesis.filters import (
    Decision,
    FilterConfig,
    mask_area,
    object_change,
    object_cut,
    text_quality,
)
from sam_fast.synthesis.inpainting import Inpainter
from sam_fast.synthesis.manifest import (
    FORMAT,
    MARKER,
    Manifest,
    atomic_save_image,
    atomic_write_json,
    check_output_folder,
    settings_differences,
)
from sam_fast.synthesis.segmentation import Segmenter
from sam_fast.synthesis.text import Prompts, TextWriter, load_prompts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STAGES = ("compose", "caption", "background", "inpaint", "refine", "write")


def _sources_of(s: "PlannedSample") -> tuple[str, ...]:
    """The four source images a planned sample reads."""
    return (*s.a_images, *(img for _, img in s.partners))


def derive_seed(*parts) -> int:
    """A 31-bit seed from any parts (stable across processes and Python versions)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass
class SourceGroup:
    """One object: its folder name and its image paths (relative to the sources folder, sorted)."""

    name: str
    images: list[str]

    @property
    def object_name(self) -> str:
        """The folder name as words (``teddy_bear`` -> ``teddy bear``), for the prompts."""
        return " ".join(re.split(r"[_\-\s]+", self.name)).strip()


@dataclass
class PlannedSample:
    """One sample of the plan: id, position, the object group, A's two images, B's and C's, the seed."""

    index: int
    id: str
    group: str
    object_name: str
    a_images: list[str]
    partners: list[tuple[str, str]]  # (group, image) for canvas 1 and canvas 2
    seed: int

    @property
    def stem(self) -> str:
        """The file-name stem of the sample's images and masks (its position in the plan)."""
        return f"{self.index:06d}"


def discover_sources(root: str | Path) -> list[SourceGroup]:
    """The object folders of `root` (sorted), each with its images; `SynthesisError` naming the folder when
    one has fewer than two images, or when there are fewer than three objects."""
    root = Path(root)
    if not root.is_dir():
        raise SynthesisError(f"--sources {root}: no such folder")
    groups = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = sorted(p.relative_to(root).as_posix() for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if len(imgs) < 2:
            raise SynthesisError(f"source folder {d} has {len(imgs)} image(s); each object needs at least 2 "
                                 f"(two views of it), with suffix {'/'.join(IMAGE_SUFFIXES)}")
        groups.append(SourceGroup(d.name, imgs))
    if len(groups) < 3:
        raise SynthesisError(f"--sources {root}: {len(groups)} object folder(s); at least 3 are needed "
                             f"(an object A and two others, B and C)")
    return groups


def plan_samples(groups: list[SourceGroup], samples_per_group: int, seed: int) -> list[PlannedSample]:
    """The run's samples, in order: a pure function of the groups, `samples_per_group` and `seed`."""
    if samples_per_group < 1:
        raise SynthesisError(f"samples_per_group {samples_per_group} must be >= 1")
    plan = []
    for g in groups:
        others = [o for o in groups if o.name != g.name]
        for k in range(samples_per_group):
            sid = f"{g.name}-{k}"
            s = derive_seed(seed, sid)
            rng = random.Random(s)
            a = rng.sample(g.images, 2)
            b, c = rng.sample(others, 2)
            partners = [(b.name, rng.choice(b.images)), (c.name, rng.choice(c.images))]
            plan.append(PlannedSample(len(plan), sid, g.name, g.object_name, a, partners, s))
    return plan


def parse_refined(text: str) -> tuple[str | None, str]:
    """(instruction or None, answer) from a refinement reply: ``Instruction: ...`` / ``Answer: ...`` lines when
    present, else (None, the whole reply)."""
    m = re.search(r"(?is)^\s*(?:instruction|question)\s*:\s*(.+?)\s*^\s*answer\s*:\s*(.+)\Z", text, re.M)
    if m:
        return " ".join(m.group(1).split()), m.group(2).strip()
    m = re.match(r"(?is)^\s*answer\s*:\s*(.+)\Z", text)
    return None, (m.group(1) if m else text).strip()


@dataclass
class SynthesisResult:
    """What a `Synthesizer.run` did: planned samples, those done by earlier runs, kept and dropped now and
    in all, and the annotations file."""

    planned: int
    resumed: int
    kept: int
    dropped: int
    kept_total: int
    dropped_total: int
    annotations: Path
    drop_reasons: dict[str, int] = field(default_factory=dict)
    redone: int = 0  # finished samples made again because a source file's bytes changed


class _Dropped(Exception):
    def __init__(self, decisions: list[Decision]):
        self.decisions = decisions



def _sample_seeds(s: PlannedSample) -> dict:
    """The seeds of one sample's stages, derived from its seed (the manifest records them)."""
    return {"sample": s.seed, "compose": [derive_seed(s.seed, "compose", j) for j in (1, 2)],
            "background": [derive_seed(s.seed, "background", j) for j in (1, 2)],
            "inpaint": [derive_seed(s.seed, "inpaint", j) for j in (1, 2)],
            "instruction": derive_seed(s.seed, "instruction"), "refine": derive_seed(s.seed, "refine")}

class Synthesizer:
    """The pipeline over replaceable stages (see the module docstring).

    Args:
        segmenter, compositor, inpainter, captioner, writer: the stage components.
        prompts: the text prompts (default: the file shipped with the package).
        filters: filter thresholds.
        samples_per_group: samples per object folder.
        seed: the run's seed (every sample's draws derive from it and the sample id).
        flush_every: rewrite annotations.json after this many new samples (and at the end).
    """

    def __init__(self, segmenter: Segmenter, compositor: Compositor, inpainter: Inpainter, captioner: Captioner,
                 writer: TextWriter, prompts: Prompts | None = None, filters: FilterConfig | None = None,
                 samples_per_group: int = 1, seed: int = 0, flush_every: int = 50):
        self.segmenter, self.compositor, self.inpainter = segmenter, compositor, inpainter
        self.captioner, self.writer = captioner, writer
        self.prompts = prompts if prompts is not None else load_prompts()
        self.filters = (filters or FilterConfig()).validate()
        if samples_per_group < 1:
            raise SynthesisError(f"samples_per_group {samples_per_group} must be >= 1")
        self.samples_per_group, self.seed, self.flush_every = int(samples_per_group), int(seed), max(1, flush_every)

    def models(self) -> dict:
        """Each stage's description (model names, settings) as recorded in the manifest."""
        return {"segmentation": self.segmenter.describe(), "compositing": self.compositor.describe(),
                "inpainting": self.inpainter.describe(), "captioning": self.captioner.describe(),
                "text": self.writer.describe()}

    def settings(self, sources: Path, groups: list[SourceGroup]) -> dict:
        """Everything that decides the samples; a resumed run must match it."""
        return {"sources": {"root": str(sources.resolve()), "groups": {g.name: g.images for g in groups}},
                "seed": self.seed, "samples_per_group": self.samples_per_group, "filters": self.filters.to_dict(),
                "prompts": self.prompts.to_dict(), "models": self.models()}

    # -- the run ----------------------------------------------------------------------------
    def run(self, sources: str | Path, output: str | Path, limit: int | None = None,
            progress: bool = True) -> SynthesisResult:
        """Synthesise (or continue synthesising) the dataset of `sources` into `output`.

        Args:
            sources: the folder of object folders.
            output: the dataset folder (new, empty, or an earlier run with the same settings).
            limit: only the first `limit` samples of the plan (a later run with a larger limit continues).
            progress: tqdm bars per stage.
        """
        sources, out = Path(sources), Path(output)
        groups = discover_sources(sources)
        settings = self.settings(sources, groups)
        marker = check_output_folder(out)
        if marker is not None:
            diffs = settings_differences(marker.get("settings", {}), settings)
            if diffs:
                raise SynthesisError(f"{out / MARKER}: the run in {out} was made with other settings "
                                     f"({', '.join(diffs[:8])}); rerun with its settings or choose a new --output")
        out.mkdir(parents=True, exist_ok=True)
        if marker is None:
            atomic_write_json(out / MARKER, {"format": FORMAT, "settings": settings})
        try:
            lock = RunLock(out).acquire()
        except RunLockedError as e:
            raise SynthesisError(str(e)) from None
        try:
            return self._run_locked(sources, out, groups, limit, progress)
        finally:
            lock.release()

    def _run_locked(self, sources: Path, out: Path, groups, limit, progress) -> SynthesisResult:
        from tqdm.auto import tqdm

        for sub in ("images", "masks", ".synthesis/masks"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        plan = plan_samples(groups, self.samples_per_group, self.seed)
        if limit is not None:
            if limit < 1:
                raise SynthesisError(f"limit {limit} must be >= 1")
            plan = plan[:limit]
        manifest = Manifest(out)
        digests: dict[str, str] = {}  # this run's sha256 of each source file read
        stale = {s.id: why for s in plan if s.id in manifest
                 for why in [self._changed_source(sources, manifest.entries[s.id], digests)] if why}
        pending = [s for s in plan if s.id not in manifest or s.id in stale]
        resumed = len(plan) - len(pending)
        needed = sorted({p for s in pending for p in _sources_of(s)})
        self._segment_all(sources, out, needed, digests, progress)
        bars = {name: tqdm(total=len(pending), desc=f"{name:<10}", position=i, leave=True, disable=not progress,
                           dynamic_ncols=True) for i, name in enumerate(STAGES)}
        kept = dropped = since_flush = 0
        reasons: dict[str, int] = {}
        try:
            for sample in pending:
                entry = self._sample(sources, out, sample, bars)
                if sample.id in stale:
                    entry["replaces"] = stale[sample.id]
                manifest.append(entry, replace=sample.id in stale)
                if entry["status"] == "kept":
                    kept += 1
                else:
                    dropped += 1
                    reasons[entry["dropped_by"]] = reasons.get(entry["dropped_by"], 0) + 1
                bars["write"].update(1)
                bars["write"].set_postfix(kept=kept, dropped=dropped)
                since_flush += 1
                if since_flush >= self.flush_every:
                    self._write_annotations(out, plan, manifest)
                    since_flush = 0
        finally:
            for b in bars.values():
                b.close()
            self._write_annotations(out, plan, manifest)
        kept_total = sum(1 for s in plan if manifest.entries[s.id]["status"] == "kept")
        return SynthesisResult(len(plan), resumed, kept, dropped, kept_total, len(plan) - kept_total,
                               out / "annotations.json", reasons, len(stale))

    def _write_annotations(self, out: Path, plan: list[PlannedSample], manifest: Manifest) -> None:
        records = [manifest.entries[s.id]["record"] for s in plan
                   if s.id in manifest and manifest.entries[s.id]["status"] == "kept"]
        # every kept sample of the manifest, also those past a smaller --limit of this run
        planned = {s.id for s in plan}
        records += [e["record"] for sid, e in manifest.entries.items() if sid not in planned and e["status"] == "kept"]
        atomic_write_json(out / "annotations.json", records)

    # -- stages -------------------------------------------------------------------------------
    @staticmethod
    def _mask_path(out: Path, digest: str) -> Path:
        # by content, not by name: a source replaced under the same name gets its own mask
        return out / ".synthesis" / "masks" / (digest[:32] + ".png")

    @staticmethod
    def _read(sources: Path, rel: str) -> bytes:
        try:
            return (sources / rel).read_bytes()
        except OSError as e:
            raise SynthesisError(f"source image {sources / rel} cannot be read ({type(e).__name__}: {e})") from None

    @staticmethod
    def _decode(sources: Path, rel: str, data: bytes) -> Image.Image:
        from sam_fast.data.images import open_image

        try:
            return open_image(io.BytesIO(data))
        except Exception as e:  # PIL raises many types for unreadable files
            raise SynthesisError(f"source image {sources / rel} cannot be read ({type(e).__name__}: {e})") from None

    def _digest(self, sources: Path, rel: str, digests: dict[str, str]) -> str:
        """sha256 of the source file's bytes, read once per run."""
        if rel not in digests:
            digests[rel] = hashlib.sha256(self._read(sources, rel)).hexdigest()
        return digests[rel]

    def _changed_source(self, sources: Path, entry: dict, digests: dict[str, str]) -> str | None:
        """Why a finished sample must be made again (a source's bytes differ from those it was made
        from), or None. Samples of runs that recorded no digests are kept: nothing to compare."""
        for rel, old in sorted((entry.get("source_sha256") or {}).items()):
            new = self._digest(sources, rel, digests) if (sources / rel).is_file() else None
            if new != old:
                now = new[:12] if new else "missing"
                return f"source {rel} changed since the sample was made (sha256 {old[:12]} -> {now})"
        return None

    def _segment_all(self, sources: Path, out: Path, rels: list[str], digests: dict[str, str],
                     progress: bool) -> None:
        from tqdm.auto import tqdm

        todo = [r for r in rels if not self._mask_path(out, self._digest(sources, r, digests)).is_file()]
        for rel in tqdm(todo, desc="segment   ", disable=not progress, dynamic_ncols=True):
            data = self._read(sources, rel)
            self._segment(sources, out, rel, data, self._decode(sources, rel, data))

    def _segment(self, sources: Path, out: Path, rel: str, data: bytes, img: Image.Image) -> np.ndarray:
        """The mask of source `rel` whose bytes are `data`, computed and cached under their sha256."""
        mask = np.asarray(self.segmenter.segment(img), dtype=bool)
        if mask.shape != (img.height, img.width):
            raise SynthesisError(f"segmenter returned a {mask.shape} mask for {sources / rel} "
                                 f"({img.height}x{img.width})")
        path = self._mask_path(out, hashlib.sha256(data).hexdigest())
        atomic_save_image(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), path)
        return mask

    def _source(self, sources: Path, out: Path, rel: str) -> tuple[Image.Image, np.ndarray, str]:
        """(image, mask, sha256) of one source from one read of its bytes, so that the image, its mask
        and the digest recorded always agree (a file replaced during the run is segmented here)."""
        data = self._read(sources, rel)
        digest = hashlib.sha256(data).hexdigest()
        img = self._decode(sources, rel, data)
        path = self._mask_path(out, digest)
        if not path.is_file():
            return img, self._segment(sources, out, rel, data, img), digest
        with Image.open(path) as m:
            return img, np.asarray(m.convert("L")) > 127, digest

    def _sample(self, sources: Path, out: Path, s: PlannedSample, bars) -> dict:
        seeds = _sample_seeds(s)
        entry = {"id": s.id, "index": s.index, "group": s.group,
                 "sources": {"A": s.a_images, "B": s.partners[0][1], "C": s.partners[1][1]},
                 "seeds": seeds, "models": self.models()}
        decisions: list[Decision] = []

        def check(d: Decision) -> None:
            decisions.append(d)
            if not d.passed:
                raise _Dropped(decisions)

        try:
            loaded, composites = self._compose(sources, out, s, entry, seeds, check)
            bars["compose"].update(1)
            caption = self.captioner.caption(loaded[s.a_images[0]][0])
            entry["caption"] = caption
            bars["caption"].update(1)
            backgrounds = self._backgrounds(s, caption, seeds, check)
            entry["backgrounds"] = backgrounds
            bars["background"].update(1)
            finals = self._inpaint(s, composites, backgrounds, seeds, check)
            bars["inpaint"].update(1)
            instruction, answer = self._refine(s, caption, seeds, entry, check)
            bars["refine"].update(1)
        except _Dropped as d:
            failed = d.decisions[-1]
            entry.update(status="dropped", dropped_by=failed.name, reason=failed.reason,
                         decisions=[x.to_dict() for x in d.decisions])
            return entry
        img_list = []
        for j, (img, comp) in enumerate(zip(finals, composites, strict=True), 1):
            rel = f"images/{s.stem}_{j}.png"
            atomic_save_image(img, out / rel)
            atomic_save_image(comp.inpaint_mask, out / f"masks/{s.stem}_{j}.png")
            img_list.append(rel)
        entry.update(status="kept", decisions=[x.to_dict() for x in decisions],
                     masks=[f"masks/{s.stem}_{j}.png" for j in (1, 2)],
                     record={"id": s.id, "img_list": img_list, "instruction": instruction, "output": answer})
        return entry

    def _compose(self, sources: Path, out: Path, s: PlannedSample, entry: dict, seeds: dict, check):
        """Stage 1: the four source images (A1, B, A2, C) with their masks, checked, and the two
        composite canvases (A1 + B, A2 + C) with their placements, checked: (loaded, composites)."""
        rels = [s.a_images[0], s.partners[0][1], s.a_images[1], s.partners[1][1]]
        names = ["A1", "B", "A2", "C"]
        loaded = {}
        for rel, name in zip(rels, names, strict=True):
            loaded[rel] = self._source(sources, out, rel)
            entry.setdefault("source_sha256", {})[rel] = loaded[rel][2]
            check(mask_area(loaded[rel][1], f"source {name} ({rel})", self.filters))
        composites = []
        for j in range(2):
            objs = [loaded[rels[2 * j]][:2], loaded[rels[2 * j + 1]][:2]]
            try:
                comp = self.compositor.compose(objs, seeds["compose"][j])
            except SynthesisError as e:
                check(Decision("placement", f"canvas {j + 1}", False, None, "placeable", f"canvas {j + 1}: {e}"))
            composites.append(comp)
        entry["placements"] = [[p.to_dict() for p in c.placements] for c in composites]
        for j, comp in enumerate(composites):
            for p in comp.placements:
                check(object_cut(p.area, p.visible, f"canvas {j + 1} object {p.index}", self.filters))
        return loaded, composites

    def _backgrounds(self, s: PlannedSample, caption: str, seeds: dict, check) -> list[str]:
        """Stage 3: one background description per canvas, checked."""
        backgrounds = []
        for j in range(2):
            text = self.writer.complete(self.prompts.background.format(object=s.object_name, caption=caption),
                                        seeds["background"][j])
            backgrounds.append(text)
            check(text_quality("background", text, self.filters))
        return backgrounds

    def _inpaint(self, s: PlannedSample, composites: list, backgrounds: list[str], seeds: dict, check) -> list:
        """Stage 4: each canvas inpainted with its background, its objects checked unchanged."""
        finals = []
        for j, comp in enumerate(composites):
            img = self.inpainter.inpaint(comp.image, comp.inpaint_mask, backgrounds[j], seeds["inpaint"][j])
            if img.size != comp.image.size:
                raise SynthesisError(f"sample {s.id!r}: the inpainter returned a {img.size} image for a "
                                     f"{comp.image.size} canvas")
            for p, m in zip(comp.placements, comp.object_masks, strict=True):
                check(object_change(comp.image, img, m, f"canvas {j + 1} object {p.index}", self.filters))
            finals.append(img)
        return finals

    def _refine(self, s: PlannedSample, caption: str, seeds: dict, entry: dict, check) -> tuple[str, str]:
        """Stage 5: the instruction drawn from the templates, refined with its answer by the
        writer, both checked: (instruction, answer)."""
        rng = random.Random(seeds["instruction"])
        instruction = rng.choice(self.prompts.instructions).format(images="{image#1} {image#2}")
        reply = self.writer.complete(self.prompts.refine.format(object=s.object_name, caption=caption,
                                                                instruction=instruction), seeds["refine"])
        entry["refined"] = reply
        asked, answer = parse_refined(reply)
        if asked:
            instruction = asked if "{image#1}" in asked else f"{{image#1}} {{image#2}} {asked}"
        check(text_quality("instruction", instruction, self.filters))
        check(text_quality("answer", answer, self.filters))
        return instruction, answer
