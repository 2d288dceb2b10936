"""Image transforms of the paper's recipe (PIL + torch; no torchvision).

- train: RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic) + horizontal flip
  (p = 0.5) + CLIP normalisation;
- eval: resize to size x size (bicubic, aspect not kept) + CLIP normalisation.

(docs/model.md#training-recipe)

The crop follows torchvision's RandomResizedCrop sampling (10 tries, then a centre crop clamped to
the ratio range). Randomness comes from an explicit `torch.Generator`, so a sample's augmentation
is a function of (seed, epoch, index): resumed and data-parallel runs see the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from sam_fast.data.images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [3, H, W] in [0, 1] (RGB; 16-bit and float images scaled, see `to_rgb`)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation of a [3, H, W] tensor in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


class EvalTransform:
    """Resize to size x size (bicubic) then CLIP-normalise: PIL image -> [3, size, size]."""

    name = "eval"

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = to_rgb(img)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return normalize(to_tensor(img))

    def key(self) -> str:
        """Identifies the transform (feature caches are keyed by it)."""
        return f"eval-bicubic-{self.size}-clip"


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop, torchvision's RandomResizedCrop.get_params algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height  # fallback: centre crop, aspect clamped to the range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip + CLIP normalisation."""

    name = "train"

    def __init__(self, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5):
        self.size, self.scale, self.ratio, self.flip_p = int(size), tuple(scale), tuple(ratio), float(flip_p)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            generator = torch.default_generator
        img = to_rgb(img)
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, generator)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if float(torch.rand(1, generator=generator)) < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(img))

    def key(self) -> str:
        return f"train-rrc{self.scale[0]}-{self.scale[1]}-flip{self.flip_p}-bicubic-{self.size}-clip"


def build_transform(kind: str, size: int):
    """`"train"` or `"eval"` transform for images of `size` pixels."""
    if kind == "train":
        return TrainTransform(size)
    if kind == "eval":
        return EvalTransform(size)
    raise ValueError(f"transform kind {kind!r} is not 'train' or 'eval'")
