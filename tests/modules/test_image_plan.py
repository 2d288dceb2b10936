"""`ImagePlan`: the host-built plan of a ragged batch (which image belongs to which sample, which
images get a W-stream, offsets); the W-stream's own rows are its schedule's (test_schedules.py)."""

import pytest
import torch

from sam_fast.modules import ImagePlan


def _l(t):
    return None if t is None else t.tolist()


def test_leave_one_out_plan_skips_one_image_samples():
    p = ImagePlan.build([3, 1, 2], "leave_one_out", "adaptive", "cpu")
    assert p.guided and p.counts == [3, 1, 2] and p.offsets == [0, 3, 4, 6] and p.num_images == 6
    assert _l(p.sample_of) == [0, 0, 0, 1, 2, 2] and p.image_samples == (0, 0, 0, 1, 2, 2)
    assert p.targets == (0, 1, 2, 4, 5)  # image 3 (the one-image sample) gets no W-stream


def test_shared_plan_guides_every_image():
    p = ImagePlan.build([3, 1, 2], "shared", "mean", "cpu")
    assert p.guided
    assert p.targets == (0, 1, 2, 3, 4, 5)  # every image, a one-image sample by itself


@pytest.mark.parametrize("counts, mode, guidance", [([1, 1], "leave_one_out", "adaptive"), ([2, 3], "shared", "none")])
def test_unguided_batches_have_no_w_stream(counts, mode, guidance):
    p = ImagePlan.build(counts, mode, guidance, "cpu")
    assert not p.guided and p.targets == ()
    assert _l(p.sample_of) == [b for b, n in enumerate(counts) for _ in range(n)]


def test_bad_counts_and_modes_are_named():
    with pytest.raises(ValueError, match=r"counts \[2, 0\]"):
        ImagePlan.build([2, 0], "shared", "adaptive", "cpu")
    with pytest.raises(ValueError, match="'both'"):
        ImagePlan.build([2], "both", "adaptive", "cpu")
