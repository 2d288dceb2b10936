"""Stage 1, segmentation: one boolean object mask per source image.

`Segmenter` is the replaceable interface (anything with ``segment(image) -> mask`` and ``describe()``).
Two implementations:

- `SamSegmenter`: transformers' Segment Anything (`SamModel` + `SamProcessor`, loaded from a local
  directory only), prompted with one point at the image centre (``prompt="center"``) or with the box of
  the salient pixels (``prompt="saliency"``: pixels far from the border colour); of the three masks it
  returns, the one with the highest predicted IoU is kept.
- `ThresholdSegmenter`: the cheap fallback for clean-background sources (product shots, icons): pixels whose
  colour is farther than a threshold from the border colour, then the largest 4-connected component.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from sam_fast.synthesis.errors import SynthesisError, load_local


@runtime_checkable
class Segmenter(Protocol):
    """Turns an RGB image into a boolean [H, W] mask of its main object."""

    def segment(self, image: Image.Image) -> np.ndarray: ...

    def describe(self) -> dict: ...


def border_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the one-pixel border of an [H, W, 3] array (the background of a clean shot)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def foreground(rgb: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose Euclidean RGB distance from the border colour exceeds `threshold` (0-441)."""
    diff = rgb.astype(np.float32) - border_colour(rgb)
    return np.sqrt((diff * diff).sum(-1)) > threshold


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False when the mask is empty).

    Runs of True pixels are found per row and joined with the overlapping runs of the row above
    (union-find), so the cost grows with the number of runs, not of pixels."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    parent: list[int] = []
    runs: list[tuple[int, int, int]] = []  # (row, start, end exclusive)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []
    for r in range(mask.shape[0]):
        row = mask[r].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row, [0]))))
        cur = []
        for s, e in zip(edges[::2], edges[1::2], strict=True):
            idx = len(runs)
            runs.append((r, int(s), int(e)))
            parent.append(idx)
            for j in prev:
                _, ps, pe = runs[j]
                if ps < e and s < pe:  # columns overlap: 4-connected
                    a, b = find(idx), find(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
            cur.append(idx)
        prev = cur
    sizes: dict[int, int] = {}
    for i, (_, s, e) in enumerate(runs):
        root = find(i)
        sizes[root] = sizes.get(root, 0) + e - s
    best = min(sizes, key=lambda k: (-sizes[k], k))  # ties: the first run met (top-left)
    out = np.zeros_like(mask)
    for i, (r, s, e) in enumerate(runs):
        if find(i) == best:
            out[r, s:e] = True
    return out


def saliency_box(rgb: np.ndarray, threshold: float = 30.0) -> list[float]:
    """[x0, y0, x1, y1] around the pixels that differ from the border colour (the whole image if none do)."""
    fg = foreground(rgb, threshold)
    h, w = fg.shape
    if not fg.any():
        return [0.0, 0.0, float(w - 1), float(h - 1)]
    ys, xs = np.nonzero(fg)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


class ThresholdSegmenter:
    """Threshold against the border colour + largest connected component (clean-background sources).

    Args:
        threshold: Euclidean RGB distance from the border colour above which a pixel is the object.
    """

    def __init__(self, threshold: float = 30.0):
        if not 0 <= threshold < 442:
            raise SynthesisError(f"threshold segmenter: threshold {threshold} must be in [0, 442)")
        self.threshold = float(threshold)

    def segment(self, image: Image.Image) -> np.ndarray:
        """Boolean [H, W] mask of the largest region whose colour differs from the border's."""
        rgb = np.asarray(image.convert("RGB"))
        return largest_component(foreground(rgb, self.threshold))

    def describe(self) -> dict:
        """What the manifest records about this stage."""
        return {"kind": "threshold", "threshold": self.threshold}


class SamSegmenter:
    """Segment Anything through transformers (`SamModel` + `SamProcessor`).

    Args:
        model: a `transformers.SamModel`.
        processor: its `transformers.SamProcessor`.
        prompt: ``"center"`` (one foreground point at the image centre) or ``"saliency"`` (the box of the
            pixels that differ from the border colour by more than `saliency_threshold`).
        name: the model name recorded in the manifest.
    """

    PROMPTS = ("center", "saliency")

    def __init__(self, model, processor, prompt: str = "center", name: str = "sam",
                 saliency_threshold: float = 30.0):
        if prompt not in self.PROMPTS:
            raise SynthesisError(f"SAM segmenter: prompt {prompt!r} is not one of {self.PROMPTS}")
        self.model, self.processor, self.prompt, self.name = model.eval(), processor, prompt, name
        self.saliency_threshold = float(saliency_threshold)

    @classmethod
    def from_pretrained(cls, path, prompt: str = "center", device=None, dtype=None) -> SamSegmenter:
        """Load `SamModel`/`SamProcessor` from a local directory (never downloads)."""
        from transformers import SamModel, SamProcessor

        processor, model = load_local("--sam-model", path, "a Segment Anything model", lambda: (
            SamProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False),
            SamModel.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=dtype,
                                     use_kernels=False)))
        if device is not None:
            model.to(device)
        return cls(model, processor, prompt, name=str(path))

    def segment(self, image: Image.Image) -> np.ndarray:
        """Boolean [H, W] mask: of SAM's three masks for the prompt, the one with the highest predicted IoU."""
        import torch

        image = image.convert("RGB")
        w, h = image.size
        if self.prompt == "center":
            kw = {"input_points": [[[w / 2.0, h / 2.0]]]}
        else:
            kw = {"input_boxes": [[saliency_box(np.asarray(image), self.saliency_threshold)]]}
        inputs = self.processor(images=image, return_tensors="pt", **kw)
        param = next(self.model.parameters())
        model_inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                        for k, v in inputs.items() if k in ("pixel_values", "input_points", "input_boxes",
                                                              "input_labels")}
        with torch.no_grad():
            out = self.model(**model_inputs, multimask_output=True)
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])[0]  # [prompts, 3, H, W]
        best = int(out.iou_scores[0, 0].float().argmax())
        return masks[0, best].numpy().astype(bool)

    def describe(self) -> dict:
        """What the manifest records about this stage."""
        return {"kind": "sam", "model": self.name, "prompt": self.prompt}
