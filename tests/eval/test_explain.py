"""explain: the weights each patch really has in the model's merged maps, and the PNG overlay."""

import pytest
import torch
from PIL import Image

from sam_fast import SAM, SAMConfig
from sam_fast.data.synthetic import write_group_captions
from sam_fast.eval.explain import caption, explain_sample, patch_weights


def _model(**overrides) -> SAM:
    torch.manual_seed(0)
    model = SAM(SAMConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        model.adaptive_adjustment.weight.normal_(0, 1.0)
    return model


def _scores(model, pix) -> torch.Tensor:
    E = model.vision_model(pixel_values=pix).last_hidden_state
    return model.adaptive_adjustment(E).squeeze(-1).detach()  # [N, P]


def test_shared_weights_sum_to_one_over_images_and_png(tmp_path):
    model = _model(context_mode="shared")
    pix = torch.randn(3, 3, 28, 28)
    w = patch_weights(model, pix)
    assert w.shape == (3, 2, 2)
    torch.testing.assert_close(w.sum(0), torch.ones(2, 2))
    want = torch.softmax(_scores(model, pix), 0)[:, 1:].reshape(3, 2, 2)
    torch.testing.assert_close(w, want)
    data = write_group_captions(tmp_path / "ds", n_samples=1, size=40, seed=0, max_images=1)
    imgs = [data / "images" / "0000_0.png"] * 2
    out = tmp_path / "x.png"
    explain_sample(model, imgs, out, tile=64)
    assert Image.open(out).size == (128, 100)
    with pytest.raises(ValueError, match="no Adaptive Adjustment"):
        patch_weights(SAM(SAMConfig.tiny(guidance="none")), pix)


def test_leave_one_out_two_images_weigh_one_everywhere():
    # each image's merged map is the other image alone: its weight there is 1, not the 0.5 of a
    # softmax over both
    w = patch_weights(_model(context_mode="leave_one_out"), torch.randn(2, 3, 28, 28))
    torch.testing.assert_close(w, torch.ones(2, 2, 2))


def test_leave_one_out_three_images_mean_over_the_maps_they_enter():
    model = _model(context_mode="leave_one_out")
    pix = torch.randn(3, 3, 28, 28)
    s = _scores(model, pix)[:, 1:].double()  # [3, 4]
    e = s.exp()
    # image m enters the maps of the two other images i; in map i its weight is e_m / (sum - e_i)
    want = torch.stack([sum(e[m] / (e.sum(0) - e[i]) for i in range(3) if i != m) / 2 for m in range(3)])
    torch.testing.assert_close(patch_weights(model, pix).double(), want.reshape(3, 2, 2), rtol=1e-5, atol=1e-6)


def test_leave_one_out_single_image_has_no_context_and_captions_say_which():
    model = _model(context_mode="leave_one_out")
    assert torch.equal(patch_weights(model, torch.randn(1, 3, 28, 28)), torch.zeros(1, 2, 2))
    assert "no context" in caption(model.config, 1)
    assert caption(model.config, 3) == "leave-one-out: mean softmax weight in 2 maps"
    assert caption(_model(context_mode="shared", guidance="mean").config, 2) == "shared map: equal weights over all 2"
