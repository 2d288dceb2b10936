"""Reading image files as the model sees them: 8-bit RGB, upright.

PIL's ``convert("RGB")`` alone gets some files wrong: 16-bit greyscale (mode ``I;16``, e.g. 16-bit
PNG or TIFF) is clipped to 255 (an almost white picture), 32-bit float images (mode ``F``, e.g. float
TIFF) with values in [0, 1] become black, and a JPEG whose EXIF orientation says "rotated" is
returned as stored, sideways. `to_rgb` and `open_image` fix these:

- 16-bit and 32-bit integer greyscale (``I;16*``, ``I``): values in 0..65535 are scaled to 0..255
  (``round(v / 257)``; outside values are clipped);
- float greyscale (``F``): an image whose values lie in [0, 1] is scaled by 255, any other is read
  as 0..255 values and clipped; NaN or infinite pixels are refused (`ValueError`);
- every other mode: PIL's conversion (palette, alpha dropped, CMYK, ...);
- `open_image` applies the EXIF orientation first (`PIL.ImageOps.exif_transpose`).

`check_image` decodes a file once, cheaply (JPEGs at reduced DCT scale), so that a file that only
fails when decoded (a truncated JPEG passes PIL's ``verify``) is caught when a dataset is opened.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of `img`, scaling high-bit-depth and float pixel values (module docstring).

    Raises:
        ValueError: a float image holds NaN or infinite values.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _INT16_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"float image with {bad} NaN or infinite pixel value(s)")
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image (EXIF orientation applied, bit depth scaled).

    Raises whatever PIL raises for an unreadable file (`OSError`, `ValueError`, ...); callers name
    the sample and the file.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def check_image(path: str | os.PathLike) -> None:
    """Decode `path` once (a JPEG at 1/8 scale, which still reads every byte) and raise if it cannot be."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, (1, 1))
        im.load()
        if im.mode == "F":
            to_rgb(im)  # refuses NaN / infinite pixels now rather than at training time
