"""explain: softmax-over-images weights per patch, and the PNG overlay."""

import pytest
import torch
from PIL import Image

from sam_fast import SAM, SAMConfig
from sam_fast.data.synthetic import write_group_captions
from sam_fast.eval.explain import explain_sample, patch_weights


def test_weights_sum_to_one_over_images_and_png(tmp_path):
    torch.manual_seed(0)
    model = SAM(SAMConfig.tiny()).eval()
    with torch.no_grad():
        model.adaptive_adjustment.weight.normal_(0, 1.0)
    pix = torch.randn(3, 3, 28, 28)
    w = patch_weights(model, pix)
    assert w.shape == (3, 2, 2)
    torch.testing.assert_close(w.sum(0), torch.ones(2, 2))
    E = model.vision_model(pixel_values=pix).last_hidden_state
    want = torch.softmax(model.adaptive_adjustment(E).squeeze(-1), 0)[:, 1:].reshape(3, 2, 2)
    torch.testing.assert_close(w, want.detach())
    data = write_group_captions(tmp_path / "ds", n_samples=1, size=40, seed=0, max_images=1)
    imgs = [data / "images" / "0000_0.png"] * 2
    out = tmp_path / "x.png"
    explain_sample(model, imgs, out, tile=64)
    assert Image.open(out).size == (128, 84)
    with pytest.raises(ValueError, match="no Adaptive Adjustment"):
        patch_weights(SAM(SAMConfig.tiny(guidance="none")), pix)
