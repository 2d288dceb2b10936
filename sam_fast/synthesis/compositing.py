"""Stage 2, compositing: place segmented objects on one square canvas, deterministically from a seed.

`Compositor` is the replaceable interface; `RandomCompositor` is ours: each object (its mask's bounding
box cropped from its image) is scaled so its longer side is ``scale * canvas_size`` (scale drawn uniformly
from ``scale_range``) and placed at a uniformly drawn position; a position is redrawn (up to ``max_tries``
times) while the object's mask would cover more than ``max_overlap`` of the smaller of it and an object
already placed. Objects are pasted in order over a flat ``background``; the inpainting mask is everything
that is not an object (white = to be painted). ``max_outside`` > 0 lets up to that fraction of an object's
width/height leave the canvas (the "object cut by the canvas" filter then judges it).
All randomness comes from ``random.Random(seed)``: the same seed and inputs give the same canvas.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from sam_fast.synthesis.errors import SynthesisError


@dataclass
class Placement:
    """Where object `index` went: top-left (x, y) on the canvas (may be negative when cut), its pasted size
    (w, h), the scale drawn, its mask's pixel count at that size (`area`) and how many of those pixels are
    inside the canvas (`inside`) and visible in the end (`visible`, i.e. not covered by a later object)."""

    index: int
    x: int
    y: int
    w: int
    h: int
    scale: float
    area: int
    inside: int
    visible: int

    def to_dict(self) -> dict:
        """The placement as a JSON-ready dict (the manifest's record)."""
        return asdict(self)


@dataclass
class Composite:
    """A composed canvas: the RGB image, the inpainting mask (L, 255 = background to paint), one visible
    boolean mask per object ([S, S]) and the placements."""

    image: Image.Image
    inpaint_mask: Image.Image
    object_masks: list[np.ndarray]
    placements: list[Placement]


@runtime_checkable
class Compositor(Protocol):
    """Places (image, mask) objects on one canvas from a seed."""

    def compose(self, objects: list[tuple[Image.Image, np.ndarray]], seed: int) -> Composite: ...

    def describe(self) -> dict: ...


def _crop(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise SynthesisError("an object has an empty mask: nothing to place")
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return image.convert("RGB").crop(box), mask[box[1]:box[3], box[0]:box[2]]


class RandomCompositor:
    """Seeded placement of objects on a ``canvas_size`` square canvas (see the module docstring)."""

    def __init__(self, canvas_size: int = 512, scale_range: tuple[float, float] = (0.35, 0.6),
                 max_overlap: float = 0.05, max_tries: int = 100, background: tuple[int, int, int] = (127, 127, 127),
                 max_outside: float = 0.0):
        lo, hi = (float(v) for v in scale_range)
        if canvas_size < 8:
            raise SynthesisError(f"canvas size {canvas_size} is too small (at least 8 pixels)")
        if not 0 < lo <= hi <= 1:
            raise SynthesisError(f"scale range {scale_range} must satisfy 0 < low <= high <= 1")
        if not 0 <= max_overlap <= 1:
            raise SynthesisError(f"max_overlap {max_overlap} must be in [0, 1]")
        if not 0 <= max_outside < 1:
            raise SynthesisError(f"max_outside {max_outside} must be in [0, 1)")
        if max_tries < 1:
            raise SynthesisError(f"max_tries {max_tries} must be >= 1")
        self.canvas_size, self.scale_range, self.max_overlap = int(canvas_size), (lo, hi), float(max_overlap)
        self.max_tries, self.background, self.max_outside = int(max_tries), tuple(background), float(max_outside)

    def describe(self) -> dict:
        """What the manifest records about this stage."""
        return {"kind": "random", "canvas_size": self.canvas_size, "scale_range": list(self.scale_range),
                "max_overlap": self.max_overlap, "max_tries": self.max_tries, "background": list(self.background),
                "max_outside": self.max_outside}

    def compose(self, objects: list[tuple[Image.Image, np.ndarray]], seed: int) -> Composite:
        """Place `objects` in order; raises `SynthesisError` when one cannot be placed within the overlap limit."""
        S = self.canvas_size
        rng = random.Random(seed)
        canvas = np.empty((S, S, 3), dtype=np.uint8)
        canvas[:] = self.background
        owner = np.full((S, S), -1, dtype=np.int64)  # which object each canvas pixel shows
        full_masks: list[np.ndarray] = []  # each object's in-canvas mask before later objects cover it
        placements: list[Placement] = []
        for i, (image, mask) in enumerate(objects):
            crop, cmask = _crop(image, np.asarray(mask, dtype=bool))
            scale = rng.uniform(*self.scale_range)
            longest = max(1, round(scale * S))
            cw, ch = crop.size
            w, h = (longest, max(1, round(ch * longest / cw))) if cw >= ch else (max(1, round(cw * longest / ch)), longest)
            obj = np.asarray(crop.resize((w, h), Image.BICUBIC))
            omask = np.asarray(Image.fromarray(cmask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
            ox, oy = int(self.max_outside * w), int(self.max_outside * h)
            if w - 2 * ox > S or h - 2 * oy > S:
                raise SynthesisError(f"object {i} ({w}x{h} px at scale {scale:.3f}) does not fit the {S}x{S} canvas")
            for _ in range(self.max_tries):
                x, y = rng.randint(-ox, S - w + ox), rng.randint(-oy, S - h + oy)
                placed = np.zeros((S, S), dtype=bool)
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, S), min(y + h, S)
                placed[y0:y1, x0:x1] = omask[y0 - y:y1 - y, x0 - x:x1 - x]
                n = int(placed.sum())
                if all(_overlap(placed, n, other) <= self.max_overlap for other in full_masks):
                    break
            else:
                raise SynthesisError(f"object {i} could not be placed within max_overlap={self.max_overlap} in "
                                     f"{self.max_tries} tries (objects too large for the canvas?)")
            inside = placed[y0:y1, x0:x1]
            canvas[y0:y1, x0:x1][inside] = obj[y0 - y:y1 - y, x0 - x:x1 - x][inside]
            owner[placed] = i
            full_masks.append(placed)
            placements.append(Placement(i, x, y, w, h, round(scale, 6), int(omask.sum()), n, 0))
        object_masks = [owner == i for i in range(len(placements))]
        for p, m in zip(placements, object_masks, strict=True):
            p.visible = int(m.sum())
        inpaint = Image.fromarray(np.where(owner < 0, 255, 0).astype(np.uint8), mode="L")
        return Composite(Image.fromarray(canvas, mode="RGB"), inpaint, object_masks, placements)


def _overlap(a: np.ndarray, a_count: int, b: np.ndarray) -> float:
    """Shared pixels of masks a and b over the smaller mask's pixel count."""
    smaller = min(a_count, int(b.sum()))
    return 0.0 if smaller == 0 else float((a & b).sum()) / smaller
