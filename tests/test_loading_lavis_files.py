"""Loading the files LAVIS users hold: a trimmed InstructBLIP ``.pth`` + the unprefixed EVA ViT
``.pth`` + an HF LLaMA directory, runner checkpoints, files ``torch.load(weights_only=True)``
refuses, bad inputs; and LAVIS' ``ln_vision`` eps (1e-5). Tiny random models only."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_instructblip

from sam_fast import SAM, SAMConfig


@pytest.fixture(scope="module")
def hf():
    return tiny_instructblip(seed=0)


# ------------------------------------------------------------------------------------------------
# post_layernorm eps (LAVIS ln_vision 1e-5, HF vision config 1e-6)
# ------------------------------------------------------------------------------------------------
def test_post_layernorm_eps_config_field_round_trips(hf, tmp_path):
    base = SAMConfig.from_instructblip_config(hf.config)
    assert base.post_layernorm_eps is None
    assert SAM(base).vision_model.post_layernorm.eps == hf.config.vision_config.layer_norm_eps == 1e-6

    cfg = SAMConfig.from_instructblip_config(hf.config, post_layernorm_eps=1e-5)
    model = SAM(cfg)
    assert model.vision_model.post_layernorm.eps == 1e-5
    assert all(layer.layer_norm1.eps == 1e-6 for layer in model.vision_model.encoder.layers)  # EVA blocks keep 1e-6
    model.save_pretrained(str(tmp_path))
    again = SAM.from_pretrained(str(tmp_path))
    assert again.config.post_layernorm_eps == 1e-5
    assert again.vision_model.post_layernorm.eps == 1e-5
    assert SAMConfig.from_pretrained(str(tmp_path)).post_layernorm_eps == 1e-5

    with pytest.raises(ValueError, match=r"post_layernorm_eps=-1"):
        SAMConfig.from_instructblip_config(hf.config, post_layernorm_eps=-1)
