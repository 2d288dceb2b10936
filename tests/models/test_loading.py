"""Loading / saving: HF InstructBLIP (dir, sharded dir, in memory), LAVIS and released-SAM
checkpoints through the key map, own save_pretrained, trainable deltas. Tiny random models only."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import pytest
import torch
from _loading_helpers import (
    LAVIS_EXTRAS,
    NEW,
    assert_models_equal,
    assert_same_state,
    batch,
    encode,
    randomize_trainable_,
    save_lavis,
    to_lavis,
)
from _tiny import VISION_HIDDEN, tiny_instructblip

from sam_fast import SAM, SAMConfig
from sam_fast.models import loading
from sam_fast.models.loading import (
    IGNORED_LAVIS_KEYS,
    LoadReport,
    from_instructblip,
    from_lavis_checkpoint,
    is_ignored_lavis_key,
    lavis_to_sam_state_dict,
    load_trainable_delta,
    read_state_dict,
    save_trainable_delta,
)

TRAINABLE = NEW + ("language_projection.",)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    return tiny_instructblip(seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_instructblip")
    hf.save_pretrained(str(d))
    return d


# ------------------------------------------------------------------------------------------------
# HF InstructBLIP
# ------------------------------------------------------------------------------------------------
def test_from_in_memory_instructblip(hf):
    model, report = from_instructblip(SAM, hf, return_report=True)
    assert isinstance(model, SAM) and isinstance(model.config, SAMConfig)
    hsd, sd = hf.state_dict(), model.state_dict()
    assert sorted(set(sd) - set(hsd)) == sorted(k for k in sd if k.startswith(NEW))
    assert_same_state(sd, hsd)
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert report.initialized == sorted(k for k in sd if k.startswith(NEW))
    # new modules per spec: guidance zero, adaptive adjustment random (finite, non-zero) weight
    for name in ("guidance_in", "guidance_out"):
        assert all(torch.count_nonzero(p) == 0 for p in getattr(model, name).parameters())
    w = model.adaptive_adjustment.weight
    assert torch.isfinite(w).all() and torch.count_nonzero(w) > 0
    assert w.dtype == model.language_projection.weight.dtype
    # frozen per spec, buffers (non-persistent, not in any checkpoint) as a fresh model's, eval
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith(TRAINABLE)
    }
    assert not any(p.is_meta for p in model.parameters())
    fresh = SAM(model.config)
    assert_same_state(dict(model.named_buffers()), dict(fresh.named_buffers()))
    assert not model.training
    # default copy=False shares storage with the source; copy=True does not
    assert (
        model.qformer.embeddings.word_embeddings.weight.data_ptr()
        == hf.qformer.embeddings.word_embeddings.weight.data_ptr()
    )
    copied = from_instructblip(SAM, hf, copy=True)
    assert (
        copied.qformer.embeddings.word_embeddings.weight.data_ptr()
        != hf.qformer.embeddings.word_embeddings.weight.data_ptr()
    )
    assert_same_state(copied.state_dict(), hsd)


def test_untrained_sam_equals_instructblip_single_images(hf):
    """Loaded weights reach the forward: with one image per sample SAM's tokens are InstructBLIP's."""
    model = from_instructblip(SAM, hf)
    pixels, counts, ids, mask = batch((1, 1))
    with torch.no_grad():
        ours = model.encode_images(
            pixel_values=pixels, image_counts=counts, qformer_input_ids=ids, qformer_attention_mask=mask
        )
        ref = hf.get_image_features(pixel_values=pixels, qformer_input_ids=ids, qformer_attention_mask=mask)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_from_instructblip_dir(hf, tmp_path, shard):
    kw = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(str(tmp_path), **kw)
    if shard is not None:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    from_dir = from_instructblip(SAM, tmp_path)
    from_mem = from_instructblip(SAM, hf)
    assert_same_state(from_dir.state_dict(), hf.state_dict())
    with torch.no_grad():  # new modules are the only free part: give both the same values
        for k, v in from_mem.state_dict().items():
            if k.startswith(NEW):
                from_dir.state_dict()[k].copy_(v)
    assert_models_equal(from_dir, from_mem)
    randomize_trainable_(from_dir), randomize_trainable_(from_mem)  # make guidance act
    assert torch.equal(encode(from_dir), encode(from_mem))


def test_from_pytorch_bin_dir(hf, hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(hf.state_dict(), str(tmp_path / "pytorch_model.bin"))
    model = from_instructblip(SAM, tmp_path)
    assert_same_state(model.state_dict(), hf.state_dict())


def test_tied_embeddings(tmp_path):
    hf = tiny_instructblip(seed=3, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path))  # HF writes the tied lm_head once
    model = from_instructblip(SAM, tmp_path)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    assert_same_state(model.state_dict(), hf.state_dict())


def test_config_overrides_and_dtype(hf, hf_dir):
    model = from_instructblip(SAM, hf_dir, context_mode="shared", guidance="mean", interaction_layers=(2, 3))
    assert (model.config.context_mode, model.config.guidance, model.config.interaction_layers) == (
        "shared",
        "mean",
        (2, 3),
    )
    assert model.config.qformer_config.encoder_hidden_size == VISION_HIDDEN
    half = from_instructblip(SAM, hf_dir, dtype=torch.float16)
    for k, v in half.state_dict().items():
        if v.is_floating_point():
            want = torch.float32 if k == "query_tokens" else torch.float16  # SAM._keep_in_fp32_modules
            assert v.dtype == want, k
    assert torch.equal(
        half.qformer.embeddings.word_embeddings.weight, hf.qformer.embeddings.word_embeddings.weight.half()
    )
    bf = from_instructblip(SAM, hf, dtype=torch.bfloat16)
    assert bf.query_tokens.dtype == torch.bfloat16 and bf.guidance_in.weight.dtype == torch.bfloat16


def test_hf_unexpected_missing_and_mismatched_keys(hf, hf_dir, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())

    extra = dict(sd, **{"qformer.encoder.layer.0.bogus.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"qformer\.encoder\.layer\.0\.bogus\.weight"):
        from_instructblip(SAM, tmp_path)
    with pytest.warns(UserWarning, match="bogus"):
        model, report = from_instructblip(SAM, tmp_path, strict=False, return_report=True)
    assert report.unexpected == ["qformer.encoder.layer.0.bogus.weight"]

    # legacy buffers older transformers saved: reported as ignored, not an error
    legacy = dict(
        sd,
        **{
            "qformer.embeddings.position_ids": torch.arange(64)[None],
            "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6),
        },
    )
    save_file(legacy, str(tmp_path / "model.safetensors"))
    _, report = from_instructblip(SAM, tmp_path, return_report=True)
    assert sorted(report.ignored) == sorted(
        ["qformer.embeddings.position_ids", "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    )

    missing = {k: v for k, v in sd.items() if k != "vision_model.post_layernorm.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys.*vision_model\.post_layernorm\.weight"):
        from_instructblip(SAM, tmp_path)
    with pytest.raises(ValueError, match=r"vision_model\.post_layernorm\.weight"):
        from_instructblip(SAM, tmp_path, strict=False)  # a missing tensor can never be filled in

    bad = dict(sd, **{"language_projection.bias": torch.zeros(7)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch.*language_projection\.bias"):
        from_instructblip(SAM, tmp_path)


def test_missing_weights_file_named(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_instructblip(SAM, tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.*not a directory"):
        from_instructblip(SAM, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_instructblip(SAM, tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# Own save_pretrained / from_pretrained
# ------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(hf, tmp_path):
    model = randomize_trainable_(from_instructblip(SAM, hf, context_mode="shared", interaction_layers=(3, 4)))
    model.save_pretrained(str(tmp_path))
    again = SAM.from_pretrained(str(tmp_path))
    assert again.config.context_mode == "shared" and tuple(again.config.interaction_layers) == (3, 4)
    assert_models_equal(again, model)
    assert torch.equal(encode(again), encode(model))
    # a SAM directory also loads through from_instructblip (keeps its own new modules)
    via_loader, report = from_instructblip(SAM, tmp_path, return_report=True)
    assert report.initialized == []
    assert_models_equal(via_loader, model)


# ------------------------------------------------------------------------------------------------
# LAVIS / released-SAM checkpoints
# ------------------------------------------------------------------------------------------------
def test_key_map_inverts_the_test_inverse(hf):
    sam = from_instructblip(SAM, hf)
    randomize_trainable_(sam)
    ours = sam.state_dict()
    lavis = to_lavis(ours)
    lavis.update(LAVIS_EXTRAS)
    assert "visual_encoder.blocks.1.attn.q_bias" in lavis and "visual_encoder.blocks.1.attn.qkv.bias" not in lavis
    mapped, unmapped = lavis_to_sam_state_dict(lavis)
    assert sorted(unmapped) == sorted(LAVIS_EXTRAS)
    assert all(is_ignored_lavis_key(k) for k in unmapped)
    assert sorted(mapped) == sorted(ours)
    assert_same_state(mapped, ours)  # includes qkv.bias = cat[q_bias, 0, v_bias]
    # tensors are renamed, not copied (except the merged qkv bias)
    assert (
        mapped["qformer.embeddings.word_embeddings.weight"] is lavis["Qformer.bert.embeddings.word_embeddings.weight"]
    )
    # DDP prefix stripped
    mapped2, unmapped2 = lavis_to_sam_state_dict({"module." + k: v for k, v in lavis.items()})
    assert sorted(mapped2) == sorted(mapped) and sorted(unmapped2) == sorted(unmapped)


def test_key_map_reports_unknown_and_half_pairs():
    sd = {
        "visual_encoder.blocks.0.attn.q_bias": torch.zeros(4),  # no v_bias
        "Qformer.bert.encoder.layer.0.attention.self.bogus.weight": torch.zeros(1),
        "t5_proj.weight": torch.zeros(1),
        "llm_proj.weight": torch.zeros(2, 2),
    }
    mapped, unmapped = lavis_to_sam_state_dict(sd)
    assert list(mapped) == ["language_projection.weight"]
    assert unmapped == sorted(k for k in sd if k != "llm_proj.weight")
    assert not any(is_ignored_lavis_key(k) for k in unmapped)
    assert IGNORED_LAVIS_KEYS and all(isinstance(v, str) and v for v in IGNORED_LAVIS_KEYS.values())


def test_full_lavis_instructblip_checkpoint(hf, tmp_path):
    lavis = to_lavis(hf.state_dict())
    lavis.update(LAVIS_EXTRAS)
    path = save_lavis(tmp_path / "instruct_blip.pth", lavis)
    config = SAMConfig.from_instructblip_config(hf.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain InstructBLIP checkpoint: no context-mode warning
        model, report = from_lavis_checkpoint(SAM, path, config, return_report=True)
    assert isinstance(report, LoadReport)
    assert model.config.context_mode == "leave_one_out"
    assert sorted(report.ignored) == sorted(LAVIS_EXTRAS)
    assert report.unexpected == [] and report.missing == []
    assert report.initialized == sorted(k for k in model.state_dict() if k.startswith(NEW))
    assert_same_state(model.state_dict(), hf.state_dict())
    # LAVIS' ln_vision eps (1e-5), not the HF vision config's (1e-6)
    assert model.config.post_layernorm_eps == 1e-5 and model.vision_model.post_layernorm.eps == 1e-5
    ref = from_instructblip(SAM, hf, post_layernorm_eps=1e-5)
    hf_eps = from_instructblip(SAM, hf)
    assert hf_eps.vision_model.post_layernorm.eps == 1e-6
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            if k.startswith(NEW):
                model.state_dict()[k].copy_(v)
                hf_eps.state_dict()[k].copy_(v)
    assert torch.equal(encode(model), encode(ref))
    assert not torch.equal(encode(model), encode(hf_eps))  # the eps reaches the tokens
    # the same through SAM's classmethod, with base= supplying the config
    via_cls = SAM.from_lavis_checkpoint(path, base=hf)
    assert_same_state(via_cls.state_dict(), hf.state_dict())


def test_released_sam_checkpoint_trainable_only(hf, hf_dir, tmp_path):
    trained = randomize_trainable_(
        from_instructblip(SAM, hf, context_mode="shared", post_layernorm_eps=1e-5), seed=11
    )  # the LAVIS model: ln_vision eps 1e-5
    ckpt = to_lavis(trained.trainable_state_dict())
    assert set(ckpt) == {
        "attn.weight",
        "attn.bias",
        "llm_proj.weight",
        "llm_proj.bias",
        "Qformer.bert.encoder.one_2_muliple.0.weight",
        "Qformer.bert.encoder.one_2_muliple.0.bias",
        "Qformer.bert.encoder.multiple_2_one.0.weight",
        "Qformer.bert.encoder.multiple_2_one.0.bias",
    }
    path = save_lavis(tmp_path / "sam.pth", ckpt)

    model, report = from_lavis_checkpoint(SAM, path, base=hf_dir, return_report=True)
    assert model.config.context_mode == "shared"  # implied by the SAM keys
    assert report.initialized == [] and report.missing == [] and report.unexpected == []
    assert_models_equal(model, trained)
    assert torch.equal(encode(model), encode(trained))

    # asking for another mode: warned and overridden
    with pytest.warns(UserWarning, match="shared"):
        m2 = from_lavis_checkpoint(SAM, path, base=hf, context_mode="leave_one_out")
    assert m2.config.context_mode == "shared"
    with pytest.warns(UserWarning, match="shared"):
        m3 = from_lavis_checkpoint(SAM, path, SAMConfig.from_instructblip_config(hf.config), base=hf)
    assert m3.config.context_mode == "shared"
    assert_models_equal(m3, trained)

    # without a base the frozen modules are missing: named, with the file read
    with pytest.raises(ValueError, match=r"no source supplies the vision encoder .*Q-former.*the LLM .*sam\.pth"):
        from_lavis_checkpoint(SAM, path, SAMConfig.from_instructblip_config(hf.config, context_mode="shared"))
    with pytest.raises(ValueError, match="pass config="):
        from_lavis_checkpoint(SAM, path)


def test_lavis_unknown_key_is_an_error(hf, tmp_path):
    lavis = to_lavis(hf.state_dict())
    lavis["Qformer.bert.encoder.layer.1.crossattention.self.bogus"] = torch.zeros(3)
    path = save_lavis(tmp_path / "x.pth", lavis)
    config = SAMConfig.from_instructblip_config(hf.config)
    with pytest.raises(ValueError, match=r"Qformer\.bert\.encoder\.layer\.1\.crossattention\.self\.bogus"):
        from_lavis_checkpoint(SAM, path, config)
    with pytest.warns(UserWarning, match="bogus"):
        model, report = from_lavis_checkpoint(SAM, path, config, strict=False, return_report=True)
    assert report.unexpected == ["Qformer.bert.encoder.layer.1.crossattention.self.bogus"]
    assert_same_state(model.state_dict(), hf.state_dict())


def test_lavis_missing_key_is_reported(hf, tmp_path):
    lavis = to_lavis(hf.state_dict())
    del lavis["visual_encoder.blocks.1.attn.v_bias"]  # q_bias alone cannot be mapped
    path = save_lavis(tmp_path / "x.pth", lavis)
    config = SAMConfig.from_instructblip_config(hf.config)
    with pytest.raises(ValueError, match=r"visual_encoder\.blocks\.1\.attn\.q_bias"):
        from_lavis_checkpoint(SAM, path, config)
    del lavis["visual_encoder.blocks.1.attn.q_bias"]
    save_lavis(path, lavis)
    with pytest.raises(ValueError, match=r"missing keys.*vision_model\.encoder\.layers\.1\.self_attn\.qkv\.bias"):
        from_lavis_checkpoint(SAM, path, config)


# ------------------------------------------------------------------------------------------------
# Trainable deltas
# ------------------------------------------------------------------------------------------------
def test_trainable_delta_round_trip(hf, hf_dir, tmp_path):
    model = randomize_trainable_(from_instructblip(SAM, hf_dir, guidance="mean"), seed=21)
    out = tmp_path / "delta"
    save_trainable_delta(model, out, str(hf_dir))
    info = json.loads((out / "sam_delta.json").read_text())
    assert info["base"] == str(hf_dir)
    assert info["keys"] == sorted(model.trainable_state_dict())
    from safetensors import safe_open

    with safe_open(str(out / "sam_delta.safetensors"), "pt") as f:
        assert sorted(f.keys()) == info["keys"]
    assert (out / "config.json").is_file()
    assert loading.is_trainable_delta_dir(out) and not loading.is_trainable_delta_dir(hf_dir)

    again = load_trainable_delta(SAM, out)
    assert again.config.guidance == "mean"
    assert_models_equal(again, model)
    assert torch.equal(encode(again), encode(model))
    # SAM's classmethod, an explicit in-memory base, and the model method
    assert_models_equal(SAM.from_trainable_delta(str(out), base=hf), model)
    model.save_trainable_delta(tmp_path / "delta2", str(hf_dir))
    assert_models_equal(load_trainable_delta(SAM, tmp_path / "delta2"), model)
    via_hf_api = SAM.from_pretrained(str(tmp_path / "delta2"))  # delta detected by from_pretrained
    assert_models_equal(via_hf_api, model)
    # AutoModel.from_pretrained adds subfolder="" since transformers 5.25
    assert_models_equal(SAM.from_pretrained(str(tmp_path / "delta2"), subfolder=""), model)
    assert {n for n, p in via_hf_api.named_parameters() if p.requires_grad} == set(model.trainable_state_dict())


def test_trainable_delta_relative_base_and_errors(hf, tmp_path):
    base = tmp_path / "base"
    hf.save_pretrained(str(base))
    model = randomize_trainable_(from_instructblip(SAM, base), seed=4)
    delta = tmp_path / "runs" / "delta"
    save_trainable_delta(model, delta, os.path.join("..", "..", "base"))  # relative to the delta dir
    assert_models_equal(load_trainable_delta(SAM, delta), model)
    # a delta on top of a SAM directory, and a delta directory as a base for another delta
    sam_dir = tmp_path / "sam"
    model.save_pretrained(str(sam_dir))
    save_trainable_delta(model, tmp_path / "d2", str(sam_dir))
    assert_models_equal(load_trainable_delta(SAM, tmp_path / "d2"), model)
    save_trainable_delta(model, tmp_path / "d3", str(delta))
    assert_models_equal(load_trainable_delta(SAM, tmp_path / "d3"), model)

    save_trainable_delta(model, tmp_path / "lost", str(tmp_path / "does_not_exist"))
    with pytest.raises(FileNotFoundError, match=r"does_not_exist.*sam_delta\.json"):
        load_trainable_delta(SAM, tmp_path / "lost")
    with pytest.raises(FileNotFoundError, match=r"sam_delta\.json"):
        load_trainable_delta(SAM, base)  # not a delta directory
    with pytest.raises(ValueError, match="base_reference"):
        save_trainable_delta(model, tmp_path / "bad", "")


def test_read_state_dict_sharded_matches(hf, tmp_path):
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    sd = read_state_dict(tmp_path)
    assert_same_state(sd, hf.state_dict())
    half = read_state_dict(tmp_path, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------
# config.json: sizes and types checked before anything is built, in one line naming file, key, value
# ------------------------------------------------------------------------------------------------
def _edit_config(d, keys, value):
    """Set the (dotted) `keys` of d/config.json to `value`."""
    raw = json.loads((d / "config.json").read_text())
    *parents, last = keys.split(".")
    node = raw
    for k in parents:
        node = node[k]
    node[last] = value
    (d / "config.json").write_text(json.dumps(raw))


def _refused_config(call, file, pattern):
    from sam_fast.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        call()
    msg = str(exc.value)
    assert msg.startswith(f"{file}: ") and "\n" not in msg and len(msg) < 300, msg
    assert re.search(pattern, msg), msg


BAD_CONFIGS = [
    ("vision_config.num_hidden_layers", 1_000_000,
     r"vision_config\.num_hidden_layers = 1000000: expected an integer in \[1, 1024\]"),
    ("text_config.hidden_size", 10**9, r"text_config\.hidden_size = 1000000000: expected an integer in \[1, 65536\]"),
    ("qformer_config.intermediate_size", -64, r"qformer_config\.intermediate_size = -64: expected an integer in \[1, "),
    ("text_config.num_attention_heads", 0, r"text_config\.num_attention_heads = 0: expected an integer in \[1, "),
    ("vision_config.num_attention_heads", 5,
     r"vision_config\.num_attention_heads = 5 does not divide vision_config\.hidden_size = 48"),
    ("text_config.num_key_value_heads", 3, r"text_config\.num_key_value_heads = 3 does not divide "
                                           r"text_config\.num_attention_heads = 4"),
    ("torch_dtype", "float7", r"torch_dtype = 'float7': expected null or one of \('float16'"),
    ("text_config.dtype", "float7", r"text_config\.dtype = 'float7': expected null"),
    ("num_query_tokens", 1e8, r"num_query_tokens = 100000000\.0: expected an integer in \[1, 1024\]"),
    ("num_query_tokens", 2048, r"num_query_tokens = 2048: expected an integer in \[1, 1024\]"),
    ("vision_config", 5, r"vision_config = 5: expected an object"),
    ("vision_config.image_size", 30, r"vision_config\.patch_size = 14 does not divide vision_config\.image_size = 30"),
    ("vision_config.image_size", 8190, r"vision_config\.image_size = 8190: expected an integer in \[1, 4096\]"),
    ("text_config.vocab_size", 10**8, r"text_config\.vocab_size = 100000000: expected an integer in \[1, 10000000\]"),
    ("qformer_config.max_position_embeddings", "512", r"qformer_config\.max_position_embeddings = '512': expected"),
    ("text_config.rms_norm_eps", -1e-6, r"text_config\.rms_norm_eps = -1e-06: expected a number between 0 and 1"),
    ("text_config.model_type", "x" * 10**7, r"text_config\.model_type = 'x{30,}\.\.\.x{30,}': not a model type"),
]


@pytest.mark.parametrize("keys, value, pattern", BAD_CONFIGS, ids=[f"{k}={str(v)[:12]}" for k, v, _ in BAD_CONFIGS])
def test_config_json_out_of_bounds_is_refused_before_building(tmp_path, keys, value, pattern):
    SAMConfig.tiny().save_pretrained(tmp_path)
    SAMConfig.from_pretrained(tmp_path)  # as saved: fine
    _edit_config(tmp_path, keys, value)
    _refused_config(lambda: SAMConfig.from_pretrained(tmp_path), tmp_path / "config.json", pattern)


def test_bad_config_json_is_refused_on_every_loading_path(hf_dir, tmp_path):
    """A SAM folder (`SAM.from_pretrained`, `load_model_dir` as the CLI loads it), an HF InstructBLIP folder
    (`from_instructblip`), a trainable delta and an HF LLM folder: the file's error, not torch's."""
    from safetensors.torch import save_file

    from sam_fast.models.directory import load_model_dir

    model = SAM(SAMConfig.tiny())
    sam_dir = tmp_path / "sam"
    model.save_pretrained(str(sam_dir))
    _edit_config(sam_dir, "vision_config.hidden_size", -48)
    pattern = r"vision_config\.hidden_size = -48: expected an integer"
    _refused_config(lambda: SAM.from_pretrained(sam_dir), sam_dir / "config.json", pattern)
    _refused_config(lambda: load_model_dir(sam_dir), sam_dir / "config.json", pattern)

    ib = tmp_path / "instructblip"
    shutil.copytree(hf_dir, ib)
    _edit_config(ib, "text_config.num_attention_heads", 0)  # torch: ZeroDivisionError
    _refused_config(lambda: SAM.from_instructblip(ib), ib / "config.json", r"text_config\.num_attention_heads = 0")
    _refused_config(lambda: load_model_dir(ib), ib / "config.json", r"text_config\.num_attention_heads = 0")

    save_trainable_delta(SAM(SAMConfig.tiny()), tmp_path / "delta", str(hf_dir))
    _edit_config(tmp_path / "delta", "torch_dtype", "float7")  # torch: AttributeError
    _refused_config(lambda: load_trainable_delta(SAM, tmp_path / "delta"), tmp_path / "delta" / "config.json",
                    r": torch_dtype = 'float7': expected null")

    llm = tmp_path / "vicuna"  # an HF LLM folder: its config.json is the text config itself
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 10**6,
                                                 "num_attention_heads": 4}))
    save_file({"model.norm.weight": torch.ones(64)}, str(llm / "model.safetensors"))
    _refused_config(lambda: from_lavis_checkpoint(SAM, llm, SAMConfig.tiny()), llm / "config.json",
                    r": num_hidden_layers = 1000000: expected an integer in \[1, 1024\]")


@pytest.mark.parametrize("text, pattern", [
    ('{"model_type": "sam_fast", "vision_config": {"hidden_size": 4', r"not valid JSON \("),
    ("[1, 2]", r"holds a JSON list, not an object"),
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
])
def test_cut_or_nested_config_json_is_refused(tmp_path, text, pattern):
    (tmp_path / "config.json").write_text(text)
    _refused_config(lambda: SAMConfig.from_pretrained(tmp_path), tmp_path / "config.json", pattern)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A `sam-fast train --config tiny` output with checkpoints at steps 1 and 2."""
    from sam_fast.cli import main
    from sam_fast.data.synthetic import write_group_captions

    root = tmp_path_factory.mktemp("run")
    data = write_group_captions(root / "data", n_samples=4, size=40, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", "tiny", "--data", str(data), "--output", str(root / "run"), "--batch-size",
                     "2", "--max-steps", "2", "--save-every", "1", "--lr", "3e-2", "--warmup-steps", "1",
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_from_pretrained_opens_a_training_output(tiny_run):
    """`SAM.from_pretrained(RUN)` is the run's base with its newest checkpoint, the model
    `load_model_dir(RUN)` gives; a checkpoint directory inside the run gives that checkpoint."""
    from safetensors.torch import load_file

    from sam_fast.models.directory import load_model_dir

    expected, _, what = load_model_dir(tiny_run)
    assert what.endswith("at step 2 (step-00000002)")
    newest = load_file(tiny_run / "checkpoints" / "step-00000002" / "trainable.safetensors")
    first = load_file(tiny_run / "checkpoints" / "step-00000001" / "trainable.safetensors")
    assert any(not torch.equal(newest[k], first[k]) for k in newest)
    for got in (SAM.from_pretrained(tiny_run), SAM.from_pretrained(str(tiny_run))):
        assert isinstance(got, SAM) and not got.training
        assert sorted(got.state_dict()) == sorted(expected.state_dict())
        assert_same_state(got.state_dict(), expected.state_dict())
        for k, v in got.trainable_state_dict().items():
            assert torch.equal(v, newest[k]), k
    at_first = SAM.from_pretrained(tiny_run / "checkpoints" / "step-00000001").trainable_state_dict()
    assert sorted(at_first) == sorted(first)
    for k, v in at_first.items():
        assert torch.equal(v, first[k]), k


def test_a_checkpoint_outside_its_run_is_one_line(tiny_run, tmp_path):
    alone = shutil.copytree(tiny_run / "checkpoints" / "step-00000002", tmp_path / "alone" / "step-00000002")
    with pytest.raises(FileNotFoundError, match=r"step-00000002: no run\.json in .*base model is unknown"):
        SAM.from_pretrained(alone)
