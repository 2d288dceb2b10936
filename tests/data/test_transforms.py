"""The paper's transforms: CLIP numbers, bicubic resizing, RandomResizedCrop ranges, flips, determinism."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sam_fast.data import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, sample_generator
from sam_fast.data.transforms import normalize, random_resized_crop_box, to_tensor


def _img(arr) -> Image.Image:
    return Image.fromarray(np.asarray(arr, dtype=np.uint8), "RGB")


def test_clip_normalisation_numbers():
    x = EvalTransform(4)(_img(np.broadcast_to([255, 0, 128], (4, 4, 3))))
    want = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1], (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2]]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((4, 4), want[c]), rtol=0, atol=1e-6)
    assert want[0] == pytest.approx(1.9303, abs=1e-4) and want[1] == pytest.approx(-1.7521, abs=1e-4)


def test_eval_transform_identity_size_and_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (28, 28, 3))
    x = EvalTransform(28)(_img(arr))  # already the right size: no resampling
    torch.testing.assert_close(x, normalize(torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1) / 255))
    big = _img(rng.integers(0, 256, (50, 90, 3)))  # aspect not kept, PIL bicubic
    y = EvalTransform(28)(big)
    torch.testing.assert_close(y, normalize(to_tensor(big.resize((28, 28), Image.BICUBIC))))
    const = EvalTransform(28)(_img(np.broadcast_to([10, 200, 90], (61, 37, 3))))
    assert torch.allclose(const, const[:, :1, :1].expand_as(const), atol=1e-6)  # bicubic keeps constants


def test_random_resized_crop_ranges():
    g = torch.Generator().manual_seed(0)
    W, H = 200, 150
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(W, H, (0.5, 1.0), (3 / 4, 4 / 3), g)
        assert left >= 0 and left + w <= W and top >= 0 and top + h <= H
        areas.append(w * h / (W * H))
        ratios.append(w / h)
    assert min(areas) >= 0.5 - 0.02 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    assert 0.6 < np.mean(areas) < 0.75  # uniform in [0.5, 1], less the large crops that do not fit 4:3


def test_crop_fallback_is_centre_crop():
    g = torch.Generator().manual_seed(0)
    # 10:1 aspect: no random crop fits the ratio range -> centre crop clamped to ratio 4/3
    assert random_resized_crop_box(1000, 100, (0.9, 1.0), (3 / 4, 4 / 3), g) == (433, 0, 133, 100)


def test_train_transform_flip_and_full_crop():
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16] = [255, 0, 0]
    arr[:, 16:] = [0, 0, 255]
    img = _img(arr)
    no_aug = TrainTransform(32, scale=(1, 1), ratio=(1, 1), flip_p=0.0)(img, torch.Generator().manual_seed(1))
    torch.testing.assert_close(no_aug, EvalTransform(32)(img))
    flipped = TrainTransform(32, scale=(1, 1), ratio=(1, 1), flip_p=1.0)(img, torch.Generator().manual_seed(1))
    torch.testing.assert_close(flipped, no_aug.flip(-1))
    flips = [TrainTransform(32)(img, torch.Generator().manual_seed(s))[2, 16, 0] > 0 for s in range(400)]
    assert sum(map(bool, flips)) == pytest.approx(200, abs=40)  # p = 0.5 (blue on the left after a flip)


def test_train_transform_is_a_function_of_seed_epoch_index():
    img = _img(np.random.default_rng(1).integers(0, 256, (40, 60, 3)))
    t = TrainTransform(28)
    a = t(img, sample_generator(0, 1, 5))
    torch.testing.assert_close(a, t(img, sample_generator(0, 1, 5)))
    assert not torch.equal(a, t(img, sample_generator(0, 2, 5)))
    assert a.shape == (3, 28, 28) and math.isfinite(float(a.sum()))
