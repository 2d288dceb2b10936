"""`sam-fast explain`: which contextual patches guided each image (paper Part B, Adaptive Adjustment).

For a sample of N images, Adaptive Adjustment scores every patch, ``s = Linear(D -> 1)(E)``, and the
merged map takes a softmax over the images **for each patch position j**. The PNG shows, over each
image, the weight ``softmax_m(s[m, j])`` of its patch j among all N images of the sample (the
released code's "shared" map; in the paper's leave-one-out mode image i's map uses the same scores
renormalised over the other images, so the picture reads the same way). Bright = this image's patch
dominates the merged map at that position; with ``guidance="mean"`` all weights are 1/N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sam_fast.data.images import open_image
from sam_fast.data.transforms import EvalTransform


@torch.no_grad()
def patch_weights(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, g, g] softmax-over-images weights of the N images of one sample (CLS token dropped)."""
    cfg = model.config
    if cfg.guidance == "none":
        raise ValueError("guidance='none': this model has no Adaptive Adjustment to explain")
    E = model.vision_model(pixel_values=pixel_values).last_hidden_state  # [N, P, D]
    N, P = E.shape[:2]
    w = model.adaptive_adjustment.weights(E, cfg.guidance).float()  # [N, P], softmax over the N images
    g = int(round((P - 1) ** 0.5))
    return w[:, 1:].reshape(N, g, g).cpu()


def overlay(img: Image.Image, weights: np.ndarray, size: int = 224, alpha: float = 0.55) -> Image.Image:
    """The image (size x size) with `weights` [g, g] in [0, 1] as a red heat map."""
    base = img.convert("RGB").resize((size, size), Image.BICUBIC)
    heat = Image.fromarray((np.clip(weights, 0, 1) * 255).astype(np.uint8), "L").resize((size, size), Image.NEAREST)
    red = Image.new("RGB", (size, size), (255, 0, 0))
    return Image.composite(red, base, heat.point(lambda v: int(v * alpha)))


def explain_sample(model, image_paths, output_png, tile: int = 224) -> torch.Tensor:
    """Write one PNG (images side by side, weights overlaid, labelled); returns the [N, g, g] weights."""
    tf = EvalTransform(model.config.vision_config.image_size)
    imgs = [open_image(p) for p in image_paths]  # upright, 16-bit / float scaled
    device = next(model.parameters()).device
    w = patch_weights(model, torch.stack([tf(im) for im in imgs]).to(device))
    N = len(imgs)
    canvas = Image.new("RGB", (tile * N, tile + 20), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(imgs):
        canvas.paste(overlay(im, w[i].numpy(), tile), (i * tile, 20))
        draw.text((i * tile + 4, 4), f"image#{i + 1}  mean w {float(w[i].mean()):.2f}", fill=(0, 0, 0))
    Path(output_png).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output_png)
    return w
