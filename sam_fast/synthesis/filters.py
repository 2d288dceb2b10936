"""Stage 6, quality filters: every check returns a `Decision` (name, passed, measured value, limit, reason)
that the manifest records, so each dropped sample says why.

- ``mask_area``: a source mask covers less than ``min_mask_area`` or more than ``max_mask_area`` of its
  image (segmentation failed: nothing found, or the background taken for the object);
- ``object_cut``: less than ``min_visible`` of an object's pasted mask is inside the canvas and uncovered;
- ``object_changed``: inpainting changed the object's pixels: mean absolute difference (0-1 scale, over the
  object's visible mask) above ``max_object_change``;
- ``text``: the instruction or answer is empty, malformed for the dataset, or repetitive (the share of
  repeated word bigrams - words for texts under 3 words - above ``max_repetition``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from sam_fast.synthesis.errors import SynthesisError


@dataclass
class FilterConfig:
    """Thresholds of the quality filters (see the module docstring)."""

    min_mask_area: float = 0.02
    max_mask_area: float = 0.9
    min_visible: float = 0.9
    max_object_change: float = 0.15
    max_repetition: float = 0.5
    min_answer_words: int = 1

    def validate(self) -> FilterConfig:
        """Raise `SynthesisError` naming the first threshold out of range."""
        for name in ("min_mask_area", "max_mask_area", "min_visible", "max_object_change", "max_repetition"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise SynthesisError(f"filter {name}={v} must be in [0, 1]")
        if self.min_mask_area > self.max_mask_area:
            raise SynthesisError(f"filter min_mask_area={self.min_mask_area} is above max_mask_area={self.max_mask_area}")
        if self.min_answer_words < 1:
            raise SynthesisError(f"filter min_answer_words={self.min_answer_words} must be >= 1")
        return self

    def to_dict(self) -> dict:
        """The thresholds as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Decision:
    """One filter's verdict on one item (``subject``: e.g. ``"source A1"``, ``"canvas 2 object 0"``)."""

    name: str
    subject: str
    passed: bool
    value: float | None
    limit: str
    reason: str = ""

    def to_dict(self) -> dict:
        """The decision as a JSON-ready dict (the manifest's record)."""
        return asdict(self)


def mask_area(mask: np.ndarray, subject: str, cfg: FilterConfig) -> Decision:
    """The mask's share of its image must lie in [min_mask_area, max_mask_area]."""
    frac = float(np.asarray(mask, dtype=bool).mean())
    ok = cfg.min_mask_area <= frac <= cfg.max_mask_area
    return Decision("mask_area", subject, ok, round(frac, 6), f"[{cfg.min_mask_area}, {cfg.max_mask_area}]",
                    "" if ok else f"{subject}: mask covers {frac:.4f} of the image, outside "
                                  f"[{cfg.min_mask_area}, {cfg.max_mask_area}]")


def object_cut(area: int, visible: int, subject: str, cfg: FilterConfig) -> Decision:
    """At least `min_visible` of an object's pasted mask (`area` pixels) must be visible on the canvas."""
    frac = visible / area if area else 0.0
    ok = frac >= cfg.min_visible
    return Decision("object_cut", subject, ok, round(frac, 6), f">= {cfg.min_visible}",
                    "" if ok else f"{subject}: only {frac:.4f} of the object is visible on the canvas "
                                  f"(minimum {cfg.min_visible})")


def object_change(before: Image.Image, after: Image.Image, mask: np.ndarray, subject: str,
                  cfg: FilterConfig) -> Decision:
    """Mean absolute pixel difference (0-1) inside `mask` between the composite and the inpainted canvas."""
    m = np.asarray(mask, dtype=bool)
    if before.size != after.size:
        raise SynthesisError(f"{subject}: inpainted canvas is {after.size}, the composite {before.size}")
    if not m.any():
        change = 1.0  # the object vanished from the canvas
    else:
        a = np.asarray(before.convert("RGB"), dtype=np.float32)[m]
        b = np.asarray(after.convert("RGB"), dtype=np.float32)[m]
        change = float(np.abs(a - b).mean() / 255.0)
    ok = change <= cfg.max_object_change
    return Decision("object_changed", subject, ok, round(change, 6), f"<= {cfg.max_object_change}",
                    "" if ok else f"{subject}: inpainting changed the object's pixels by {change:.4f} "
                                  f"(maximum {cfg.max_object_change})")


def repetition(text: str) -> float:
    """Share of repeated items among the text's word bigrams (words when it has fewer than 3): 0 = none."""
    words = text.lower().split()
    items = list(zip(words, words[1:], strict=False)) if len(words) >= 3 else words
    return 0.0 if not items else 1.0 - len(set(items)) / len(items)


def text_quality(name: str, text: str, cfg: FilterConfig, images: int = 2) -> Decision:
    """`name` ("instruction" or "answer") must be non-empty, accepted by the dataset reader (an instruction
    refers only to the sample's `images` images: a synthesized sample has two) and not repetitive."""
    from sam_fast.data.dataset import text_problem
    from sam_fast.data.tokenization import image_reference_problem

    words = text.split()
    if name == "answer" and len(words) < cfg.min_answer_words:
        return Decision("text", name, False, float(len(words)), f">= {cfg.min_answer_words} words",
                        f"{name} is empty" if not words else f"{name} has {len(words)} word(s), under "
                                                            f"{cfg.min_answer_words}")
    if not words:
        return Decision("text", name, False, 0.0, "non-empty", f"{name} is empty")
    problem = text_problem("instruction" if name == "instruction" else "output", text)
    if problem is None and name == "instruction":
        problem = image_reference_problem(text, images)
    if problem:
        return Decision("text", name, False, None, "readable by the dataset", f"{name}: {problem}")
    rep = repetition(text.replace("{image#", " {image#"))
    ok = rep <= cfg.max_repetition
    return Decision("text", name, ok, round(rep, 6), f"repetition <= {cfg.max_repetition}",
                    "" if ok else f"{name} is repetitive (repetition {rep:.3f}, maximum {cfg.max_repetition})")
