"""A small group-captioning dataset drawn with PIL, for tests and the demo (no downloads).

Each sample shows 1-4 pictures of the same kind of object (a colour and a shape, drawn at random
sizes and places over a random light background); the caption names what the group has in common,
e.g. "a group of red circles". Written in the `annotations.json` format that `sam-fast train` reads (see the README).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 200, 20)}
SHAPES = ("circles", "squares", "stripes")


def draw(color: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLORS[color])
    if shape == "stripes":
        w = max(2, size // rng.randint(6, 10))
        for x in range(rng.randint(0, w), size, 2 * w):
            d.rectangle([x, 0, x + w - 1, size], fill=fill)
    else:
        for _ in range(rng.randint(1, 3)):
            r = rng.randint(size // 6, size // 3)
            cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
            box = [cx - r, cy - r, cx + r, cy + r]
            (d.ellipse if shape == "circles" else d.rectangle)(box, fill=fill)
    return img


def write_group_captions(root, n_samples: int = 24, size: int = 64, seed: int = 0, max_images: int = 4,
                         fmt: str = "png") -> Path:
    """Write ``ROOT/annotations.json`` and ``ROOT/images/*`` ; returns ROOT."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n_samples):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        n = rng.randint(1, max_images)
        paths = []
        for j in range(n):
            rel = f"images/{i:04d}_{j}.{fmt}"
            draw(color, shape, size, rng).save(root / rel)
            paths.append(rel)
        marks = " ".join(f"{{image#{j + 1}}}" for j in range(n))
        records.append({"id": i, "img_list": paths, "instruction": f"{marks} what is common in these images?",
                        "output": f"a group of {color} {shape}"})
    (root / "annotations.json").write_text(json.dumps(records, indent=1))
    return root
