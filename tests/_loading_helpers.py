"""Helpers of the loading tests (tests/models/test_loading*.py): state-dict comparison, a ragged
pixel batch, trainable-weight randomisation, and an independent inverse of the LAVIS key map."""

from __future__ import annotations

import torch

from sam_fast import SAM

NEW = ("adaptive_adjustment.", "guidance_in.", "guidance_out.")  # SAM's modules InstructBLIP lacks


def assert_same_state(a: dict, b: dict, keys=None):
    keys = sorted(b) if keys is None else sorted(keys)
    for k in keys:
        assert k in a, f"{k} missing"
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_models_equal(m1: SAM, m2: SAM):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert sorted(s1) == sorted(s2)
    assert_same_state(s1, s2)
    b1, b2 = dict(m1.named_buffers()), dict(m2.named_buffers())
    assert sorted(b1) == sorted(b2)
    assert_same_state(b1, b2)


def batch(counts=(3, 1, 2), seed=1, text_len=6):
    g = torch.Generator().manual_seed(seed)
    T = sum(counts)
    pixels = torch.randn(T, 3, 28, 28, generator=g)
    ids = torch.randint(5, 100, (len(counts), text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return pixels, list(counts), ids, mask


@torch.no_grad()
def encode(model: SAM, counts=(3, 1, 2)):
    pixels, counts, ids, mask = batch(counts)
    return model.encode_images(
        pixel_values=pixels, image_counts=counts, qformer_input_ids=ids, qformer_attention_mask=mask
    )


def randomize_trainable_(model: SAM, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.trainable_state_dict().values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
    return model


# An independent inverse of the key map: our (HF) names -> LAVIS names, written as plain string
# edits so that it does not share code or tables with sam_fast.models.loading.
def to_lavis(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k == "query_tokens":
            out[k] = v
        elif k.startswith("vision_model."):
            r = k[len("vision_model.") :]
            if r == "embeddings.class_embedding":
                out["visual_encoder.cls_token"] = v
            elif r == "embeddings.position_embedding":
                out["visual_encoder.pos_embed"] = v
            elif r.startswith("embeddings.patch_embedding."):
                out["visual_encoder.patch_embed.proj." + r.split(".")[-1]] = v
            elif r.startswith("post_layernorm."):
                out["ln_vision." + r.split(".")[-1]] = v
            else:
                _, _, i, *rest = r.split(".")  # encoder.layers.i.<rest>
                rest = ".".join(rest)
                pre = f"visual_encoder.blocks.{i}."
                if rest == "self_attn.qkv.bias":
                    d = v.shape[0] // 3
                    assert torch.count_nonzero(v[d : 2 * d]) == 0
                    out[pre + "attn.q_bias"] = v[:d].clone()
                    out[pre + "attn.v_bias"] = v[2 * d :].clone()
                else:
                    rest = (
                        rest.replace("self_attn.qkv", "attn.qkv")
                        .replace("self_attn.projection", "attn.proj")
                        .replace("layer_norm1", "norm1")
                        .replace("layer_norm2", "norm2")
                    )
                    out[pre + rest] = v
        elif k.startswith("qformer."):
            r = k[len("qformer.") :]
            r = r.replace("embeddings.layernorm", "embeddings.LayerNorm")
            r = r.replace("attention.attention.", "attention.self.")  # also crossattention.attention.
            out["Qformer.bert." + r] = v
        elif k.startswith("language_projection."):
            out["llm_proj." + k.split(".", 1)[1]] = v
        elif k.startswith("language_model."):
            out["llm_model." + k.split(".", 1)[1]] = v
        elif k.startswith("guidance_in."):
            out["Qformer.bert.encoder.one_2_muliple.0." + k.split(".", 1)[1]] = v
        elif k.startswith("guidance_out."):
            out["Qformer.bert.encoder.multiple_2_one.0." + k.split(".", 1)[1]] = v
        elif k.startswith("adaptive_adjustment."):
            out["attn." + k.split(".", 1)[1]] = v
        else:
            raise AssertionError(f"test inverse has no rule for {k}")
    return out


LAVIS_EXTRAS = {  # keys a real LAVIS state dict carries that we drop on purpose
    "Qformer.bert.embeddings.position_ids": torch.arange(64).unsqueeze(0),
    "llm_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6),
    "Qformer.cls.predictions.bias": torch.zeros(100),
}


def save_lavis(path, sd):
    torch.save({"model": sd, "epoch": 3}, str(path))
    return path
