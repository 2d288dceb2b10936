"""`sam-fast explain`: which contextual patches guided each image (paper Part B, Adaptive Adjustment).

For a sample of N images, Adaptive Adjustment scores every patch, ``s = Linear(D -> 1)(E)``, and a
merged map takes a softmax over images **for each patch position j**. The PNG shows, over each
image m, the weight its patch j really has in the merged maps the model builds:

- ``context_mode="shared"`` (the released code): one map per sample, softmax over all N images:
  ``softmax_m(s[m, j])``;
- ``context_mode="leave_one_out"`` (the paper): image i's map is a softmax over the other N - 1
  images, so image m enters N - 1 maps; the picture shows its mean weight over them (for N = 2 every
  map is the other image alone: weight 1 everywhere). A one-image sample has no contextual map: 0.

With ``guidance="mean"`` the softmax is replaced by equal weights. The picture says which it shows.
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
    """[N, g, g] the weight of each patch of the N images of one sample in the merged maps the
    model builds for its context mode (see the module docstring; CLS token dropped)."""
    cfg = model.config
    if cfg.guidance == "none":
        raise ValueError("guidance='none': this model has no Adaptive Adjustment to explain")
    E = model.vision_model(pixel_values=pixel_values).last_hidden_state  # [N, P, D]
    N, P = E.shape[:2]
    if cfg.context_mode == "shared":
        w = model.adaptive_adjustment.weights(E, cfg.guidance).float()  # [N, P], softmax over the N images
    else:
        w = _leave_one_out_weights(model.adaptive_adjustment, E, cfg.guidance)
    g = int(round((P - 1) ** 0.5))
    return w[:, 1:].reshape(N, g, g).cpu()


def _leave_one_out_weights(adaptive_adjustment, E: torch.Tensor, guidance: str) -> torch.Tensor:
    """[N, P] each image's mean weight over the N - 1 merged maps it enters (image i's map: a
    softmax over the images other than i); zeros for a single image, which enters no map."""
    N, P = E.shape[:2]
    total = torch.zeros(N, P, dtype=torch.float32, device=E.device)
    if N == 1:
        return total
    for i in range(N):
        others = [m for m in range(N) if m != i]
        total[others] += adaptive_adjustment.weights(E[others], guidance).float()
    return total / (N - 1)


def caption(config, n_images: int) -> str:
    """One short line saying which weights the picture shows."""
    how = "equal weights" if config.guidance == "mean" else "softmax"
    if config.context_mode == "shared":
        return f"shared map: {how} over all {n_images}"
    if n_images == 1:
        return "leave-one-out: one image, no context (0)"
    return f"leave-one-out: mean {how} weight in {n_images - 1} maps"


def overlay(img: Image.Image, weights: np.ndarray, size: int = 224, alpha: float = 0.55) -> Image.Image:
    """The image (size x size) with `weights` [g, g] in [0, 1] as a red heat map."""
    base = img.convert("RGB").resize((size, size), Image.BICUBIC)
    heat = Image.fromarray((np.clip(weights, 0, 1) * 255).astype(np.uint8), "L").resize((size, size), Image.NEAREST)
    red = Image.new("RGB", (size, size), (255, 0, 0))
    return Image.composite(red, base, heat.point(lambda v: int(v * alpha)))


def explain_sample(model, image_paths, output_png, tile: int = 224) -> torch.Tensor:
    """Write one PNG (images side by side, weights overlaid, labelled, a caption saying which weights
    they are); returns the [N, g, g] weights."""
    tf = EvalTransform(model.config.vision_config.image_size)
    imgs = [open_image(p) for p in image_paths]  # upright, 16-bit / float scaled
    device = next(model.parameters()).device
    w = patch_weights(model, torch.stack([tf(im) for im in imgs]).to(device))
    N = len(imgs)
    canvas = Image.new("RGB", (tile * N, tile + 36), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(imgs):
        canvas.paste(overlay(im, w[i].numpy(), tile), (i * tile, 20))
        draw.text((i * tile + 4, 4), f"image#{i + 1}  mean w {float(w[i].mean()):.2f}", fill=(0, 0, 0))
    draw.text((4, tile + 22), caption(model.config, N), fill=(0, 0, 0))
    Path(output_png).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output_png)
    return w
