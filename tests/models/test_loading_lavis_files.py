"""Loading the files LAVIS users hold: a trimmed InstructBLIP ``.pth`` + the unprefixed EVA ViT
``.pth`` + an HF LLaMA directory, runner checkpoints, files ``torch.load(weights_only=True)``
refuses, bad inputs; and LAVIS' ``ln_vision`` eps (1e-5). Tiny random models only."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _loading_helpers import (
    LAVIS_EXTRAS,
    NEW,
    assert_models_equal,
    assert_same_state,
    encode,
    randomize_trainable_,
    to_lavis,
)
from _tiny import VISION_HIDDEN, tiny_instructblip

from sam_fast import SAM, SAMConfig
from sam_fast.models.loading import from_instructblip, from_lavis_checkpoint


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


# ------------------------------------------------------------------------------------------------
# The files LAVIS users download: trimmed InstructBLIP .pth + eva_vit_g.pth + an HF Vicuna directory
# ------------------------------------------------------------------------------------------------
class NotAWeight:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self):
        self.lr = 1e-5


def lavis_parts(hf):
    """(trimmed InstructBLIP state dict, unprefixed EVA state dict, LLM state dict) in LAVIS' layout."""
    full = to_lavis(hf.state_dict())
    trimmed = {
        k: v for k, v in full.items() if k.startswith(("Qformer.", "query_tokens", "llm_proj.", "ln_vision."))
    }
    trimmed["Qformer.bert.embeddings.position_ids"] = LAVIS_EXTRAS["Qformer.bert.embeddings.position_ids"]
    eva = {k[len("visual_encoder.") :]: v for k, v in full.items() if k.startswith("visual_encoder.")}
    llm = {k[len("llm_model.") :]: v for k, v in full.items() if k.startswith("llm_model.")}
    assert len(trimmed) + len(eva) + len(llm) == len(full) + 1  # every tensor in exactly one file
    return trimmed, eva, llm


def save_llm_dir(hf, directory, llm_sd, vocab):
    """An HF LlamaForCausalLM directory (as Vicuna ships) holding the first `vocab` rows."""
    from transformers import LlamaForCausalLM

    text = hf.config.text_config.to_dict()
    text["vocab_size"] = vocab
    llm = LlamaForCausalLM(type(hf.config.text_config)(**text))
    sd = {k: (v[:vocab] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in llm_sd.items()}
    llm.load_state_dict(sd)
    llm.save_pretrained(str(directory))
    return directory


def sam_runner_checkpoint(path, trained: SAM):
    """The authors' SAM checkpoint layout: a LAVIS runner checkpoint (weights under 'model')."""
    model_sd = to_lavis(trained.trainable_state_dict())
    torch.save(
        {
            "model": model_sd,
            "optimizer": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}],
            },
            "config": {"run": {"lr_sched": "linear_warmup_cosine_lr", "init_lr": 2e-5}, "model": {"arch": "sam"}},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "_growth_tracker": 7},
            "epoch": 4,
        },
        str(path),
    )
    return path


@pytest.fixture
def trio(hf, tmp_path):
    """Files on disk: the trimmed InstructBLIP .pth, eva_vit_g.pth (unprefixed, plus an EVA final
    norm / head and a block past the configured depth, which LAVIS drops), and a Vicuna-like LLM
    directory one vocabulary row short (LAVIS adds [PAD])."""
    trimmed, eva, llm = lavis_parts(hf)
    g = torch.Generator().manual_seed(7)
    eva_file = dict(eva)
    for k in [k for k in eva if k.startswith("blocks.1.")]:  # a block past the configured depth
        eva_file["blocks.2." + k[len("blocks.1.") :]] = torch.randn(eva[k].shape, generator=g)
    eva_file["norm.weight"] = torch.ones(VISION_HIDDEN)
    eva_file["norm.bias"] = torch.zeros(VISION_HIDDEN)
    eva_file["head.weight"] = torch.randn(10, VISION_HIDDEN, generator=g)
    paths = {
        "trimmed": tmp_path / "instruct_blip_vicuna7b_trimmed.pth",
        "eva": tmp_path / "eva_vit_g.pth",
        "llm": tmp_path / "vicuna-7b-v1.1",
    }
    torch.save(trimmed, str(paths["trimmed"]))
    torch.save(eva_file, str(paths["eva"]))
    vocab = hf.config.text_config.vocab_size
    save_llm_dir(hf, paths["llm"], llm, vocab - 1)  # LAVIS adds [PAD] to Vicuna's vocabulary
    return paths


def expected_trio_model(hf, trained: SAM | None = None) -> SAM:
    """What the trio must load to, built independently: the HF model, the grown vocabulary row set
    to the mean of the other rows, LAVIS' ln_vision eps, the trained tensors when given."""
    ref = from_instructblip(SAM, hf, copy=True, post_layernorm_eps=1e-5, context_mode="shared")
    with torch.no_grad():
        for w in (ref.language_model.model.embed_tokens.weight, ref.language_model.lm_head.weight):
            w[-1] = w[:-1].mean(0)
        if trained is not None:
            for k, v in trained.trainable_state_dict().items():
                ref.state_dict()[k].copy_(v)
    return ref


def test_lavis_trio_plus_sam_runner_checkpoint_in_one_call(hf, trio, tmp_path):
    trained = randomize_trainable_(from_instructblip(SAM, hf, context_mode="shared", copy=True), seed=13)
    sam_pth = sam_runner_checkpoint(tmp_path / "sam_checkpoint.pth", trained)
    config = SAMConfig.from_instructblip_config(hf.config, context_mode="shared")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to warn about
        model, report = SAM.from_lavis_checkpoint(
            sam_pth, config, base=[trio["trimmed"], trio["eva"], trio["llm"]], return_report=True
        )
    expected = expected_trio_model(hf, trained)
    assert_models_equal(model, expected)  # tensor for tensor
    assert model.config.context_mode == "shared"
    assert model.vision_model.post_layernorm.eps == 1e-5 and model.config.post_layernorm_eps == 1e-5
    assert report.missing == [] and report.unexpected == [] and report.initialized == []
    assert sorted(report.ignored) == sorted(
        ["Qformer.bert.embeddings.position_ids", "norm.weight", "norm.bias", "head.weight"]
        + [k for k in torch.load(str(trio["eva"]), weights_only=True) if k.startswith("blocks.2.")]
    )
    assert len(report.resized) == 2 and all("vicuna-7b-v1.1" in r for r in report.resized)
    assert {r.split(" ")[0] for r in report.resized} == {
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    }
    for name in ("sam_checkpoint.pth", "instruct_blip_vicuna7b_trimmed.pth", "eva_vit_g.pth", "vicuna-7b-v1.1"):
        assert name in report.source
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(model.trainable_state_dict())
    assert torch.equal(encode(model), encode(expected))
    model.save_pretrained(str(tmp_path / "saved"))  # the LAVIS eps survives a save
    again = SAM.from_pretrained(str(tmp_path / "saved"))
    assert again.vision_model.post_layernorm.eps == 1e-5
    assert torch.equal(encode(again), encode(expected))

    # the trimmed InstructBLIP .pth as the loaded file, the rest as base (no SAM checkpoint):
    # a plain InstructBLIP, new modules initialised per the spec
    ib, rep = from_lavis_checkpoint(
        SAM, trio["trimmed"], SAMConfig.from_instructblip_config(hf.config), base=[trio["eva"], trio["llm"]],
        return_report=True,
    )
    assert ib.config.context_mode == "leave_one_out"
    assert rep.initialized == sorted(k for k in ib.state_dict() if k.startswith(NEW))
    assert_same_state(ib.state_dict(), expected_trio_model(hf).state_dict(), keys=[
        k for k in ib.state_dict() if not k.startswith(NEW)
    ])


def test_lavis_pth_as_single_base(hf, tmp_path):
    """`base="x.pth"` (a full LAVIS InstructBLIP checkpoint) used to fail with 'is not a directory'."""
    full = to_lavis(hf.state_dict())
    full.update(LAVIS_EXTRAS)
    base_pth = tmp_path / "instruct_blip_full.pth"
    torch.save({"model": full, "epoch": 1}, str(base_pth))
    trained = from_instructblip(SAM, hf, context_mode="shared", post_layernorm_eps=1e-5, copy=True)
    randomize_trainable_(trained, seed=17)  # copy=True: the module-scoped hf stays untouched
    sam_pth = sam_runner_checkpoint(tmp_path / "sam.pth", trained)
    model = SAM.from_lavis_checkpoint(sam_pth, base=str(base_pth), config=hf.config)  # InstructBlipConfig
    assert model.config.context_mode == "shared"
    assert_models_equal(model, trained)
    assert torch.equal(encode(model), encode(trained))


def test_mixed_dtype_files_load_as_float32(hf, trio, tmp_path):
    """eva_vit_g.pth is stored in float16 while the Q-former file is float32: one dtype results."""
    eva = torch.load(str(trio["eva"]), weights_only=True)
    torch.save({k: v.half() for k, v in eva.items()}, str(trio["eva"]))
    config = SAMConfig.from_instructblip_config(hf.config)
    model = from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["eva"], trio["llm"]])
    assert {v.dtype for v in model.state_dict().values() if v.is_floating_point()} == {torch.float32}
    want = hf.vision_model.embeddings.patch_embedding.weight.half().float()
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight, want)
    half = from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["eva"], trio["llm"]], dtype=torch.float16)
    assert half.qformer.embeddings.word_embeddings.weight.dtype == torch.float16
    assert half.query_tokens.dtype == torch.float32  # kept in float32 as HF does


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the file
# ------------------------------------------------------------------------------------------------
def test_file_needing_more_than_weights_only(hf, trio, tmp_path):
    trained = from_instructblip(SAM, hf)
    for legacy in (False, True):
        path = tmp_path / f"sam_omegaconf_{legacy}.pth"
        torch.save(
            {"model": to_lavis(trained.trainable_state_dict()), "config": NotAWeight(), "epoch": 1},
            str(path),
            _use_new_zipfile_serialization=not legacy,
        )
        with pytest.raises(ValueError) as info:
            from_lavis_checkpoint(SAM, path, base=hf)
        msg = str(info.value)
        assert str(path) in msg and "NotAWeight" in msg and "weights_only=True" in msg, msg
        assert "re-save" in msg and "\n" not in msg
    # the same file as a base, and as the .bin of an HF directory
    with pytest.raises(ValueError, match=r"sam_omegaconf_False\.pth.*NotAWeight"):
        from_lavis_checkpoint(SAM, trio["trimmed"], base=[tmp_path / "sam_omegaconf_False.pth", hf])
    bin_dir = tmp_path / "bin_dir"
    bin_dir.mkdir()
    hf.config.save_pretrained(str(bin_dir))
    torch.save({"w": torch.zeros(1), "extra": NotAWeight()}, str(bin_dir / "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*NotAWeight"):
        from_instructblip(SAM, bin_dir)


@pytest.mark.parametrize(
    "content, match",
    [
        (lambda p: torch.save([torch.ones(2)], str(p)), r"holds a list, not a state dict"),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), r"not a PyTorch checkpoint"),
        (lambda p: p.write_text("not weights\n"), r"not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b""), r"not a PyTorch checkpoint"),
        (lambda p: torch.save({"epoch": 3, "lr": 0.1}, str(p)), r"not a state dict.*epoch"),
        (lambda p: torch.save({"model": [1, 2], "epoch": 3}, str(p)), r"'model' entry.*holds a list"),
        (lambda p: torch.save({}, str(p)), r"holds no tensors"),
    ],
    ids=["list", "random-bytes", "text", "empty", "no-tensors", "model-not-dict", "empty-dict"],
)
def test_pth_that_is_not_a_checkpoint(hf, tmp_path, content, match):
    bad = tmp_path / "bad.pth"
    content(bad)
    with pytest.raises(ValueError, match=match) as info:
        from_lavis_checkpoint(SAM, bad, base=hf)
    assert str(bad) in str(info.value)
    good = tmp_path / "good.pth"
    torch.save({"llm_proj.bias": hf.language_projection.bias.detach()}, str(good))
    with pytest.raises(ValueError, match=match) as info:  # as a base
        from_lavis_checkpoint(SAM, good, base=[hf, bad])
    assert str(bad) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        from_lavis_checkpoint(SAM, good, base=[hf, tmp_path / "nowhere.pth"])


def test_base_missing_a_component(hf, trio):
    config = SAMConfig.from_instructblip_config(hf.config)
    with pytest.raises(ValueError) as info:
        from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["llm"]])
    msg = str(info.value)
    assert "no source supplies the vision encoder" in msg and "eva_vit_g.pth" in msg
    assert str(trio["trimmed"]) in msg and str(trio["llm"]) in msg
    assert "Q-former" not in msg and "LLM (" not in msg  # only what is absent is named
    with pytest.raises(ValueError, match=r"no source supplies the LLM"):
        from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["eva"]])
    with pytest.raises(ValueError, match=r"pass config=.*instructblip_vicuna7b"):  # no source has a config
        from_lavis_checkpoint(SAM, trio["trimmed"], base=[trio["eva"], trio["llm"]])
    with pytest.raises(ValueError, match=r"vicuna-7b-v1\.1: from_lavis_checkpoint takes a LAVIS \.pth file"):
        from_lavis_checkpoint(SAM, trio["llm"], config, base=[trio["eva"]])
    with pytest.raises(ValueError, match=r"base=\[\]"):
        from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[])


def test_unknown_keys_and_mismatched_llm_named_by_file(hf, trio, tmp_path):
    config = SAMConfig.from_instructblip_config(hf.config)
    eva = torch.load(str(trio["eva"]), weights_only=True)
    eva["blocks.0.attn.bogus"] = torch.zeros(2)
    torch.save(eva, str(trio["eva"]))
    with pytest.raises(ValueError, match=r"unknown keys in .*eva_vit_g\.pth.*: blocks\.0\.attn\.bogus$"):
        from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["eva"], trio["llm"]])
    with pytest.warns(UserWarning, match="bogus"):
        _, report = from_lavis_checkpoint(
            SAM, trio["trimmed"], config, base=[trio["eva"], trio["llm"]], strict=False, return_report=True
        )
    assert report.unexpected == ["blocks.0.attn.bogus"]
    del eva["blocks.0.attn.bogus"]
    torch.save(eva, str(trio["eva"]))

    other = dict(hf.config.text_config.to_dict(), rms_norm_eps=1e-5)
    (tmp_path / "llm2").mkdir()
    (tmp_path / "llm2" / "config.json").write_text(json.dumps(other))
    (tmp_path / "llm2" / "model.safetensors").write_bytes((trio["llm"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"llm2: this LLM does not match config\.text_config: rms_norm_eps=1e-05"):
        from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["eva"], tmp_path / "llm2"])

    from safetensors.torch import load_file, save_file

    sd = load_file(str(trio["llm"] / "model.safetensors"))
    sd["model.layers.0.bogus.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "llm2" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "llm2" / "config.json").write_text((trio["llm"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"unexpected keys .*in \S*llm2: language_model\.model\.layers\.0\.bogus"):
        from_lavis_checkpoint(SAM, trio["trimmed"], config, base=[trio["eva"], tmp_path / "llm2"])
