"""HF conventions: Auto classes, gradient checkpointing, resize_token_embeddings, typed and
documented forward, unknown kwargs refused, HF Trainer with trainable-only checkpoints."""

from __future__ import annotations

import importlib.resources
import inspect
import json
import os
import re
import typing
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel

from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam
from sam_fast import SAM, SAMConfig
from sam_fast.models import TRAINABLE_MODULES

COUNTS = [2, 1]


def _batch(m, counts=COUNTS, seed=0):
    """Model inputs with labels: Q placeholders per image, right padding in the last sample."""
    feats, ids, mask = ragged_batch(m, counts, seed=seed)
    Q, B = m.config.num_query_tokens, len(counts)
    S = max(counts) * Q + 6
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(5, 100, (B, S), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for b, n in enumerate(counts):
        input_ids[b, : n * Q] = m.config.image_token_index
    input_ids[-1, S - 2:] = 0
    attention_mask[-1, S - 2:] = 0
    labels = input_ids.clone()
    labels[:, : S - 5] = -100
    labels[attention_mask == 0] = -100
    return dict(image_features=feats, image_counts=counts, qformer_input_ids=ids, qformer_attention_mask=mask,
                input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _trainable_grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


# -- Auto classes -------------------------------------------------------------------------------

def test_auto_classes_load_a_saved_sam(tmp_path):
    model = randomize_guidance(tiny_sam(), seed=3)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, SAMConfig) and config.model_type == "sam_fast"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is SAM
    want = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    auto = getattr(transformers, "AutoModelForImageTextToText", None)
    if auto is not None:
        assert type(auto.from_pretrained(tmp_path)) is SAM



def test_loading_never_turns_on_hub_kernels(tmp_path, monkeypatch):
    """transformers >= 5.25 defaults `use_kernels` to True: layers replaced by kernels fetched from
    the Hub at run time. Every way sam_fast loads a SAM asks for them off, and a caller may still
    ask for them by name."""
    tiny_sam().save_pretrained(tmp_path)
    seen = []
    real = transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append(kwargs.get("use_kernels", "absent"))
        kwargs.pop("use_kernels", None)  # transformers older than the switch take it too, default off
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    SAM.from_pretrained(tmp_path)
    AutoModel.from_pretrained(tmp_path)
    assert seen == [False, False]
    SAM.from_pretrained(tmp_path, use_kernels=True)
    assert seen[-1] is True

# -- gradient checkpointing ---------------------------------------------------------------------

def test_gradient_checkpointing_same_loss_and_grads():
    model = randomize_guidance(tiny_sam())
    batch = _batch(model)
    model.train()
    plain = {}
    for packing in (True, False):  # without checkpointing: the packed step and the padded HF call
        model.zero_grad(set_to_none=True)
        loss = model(**batch, packing=packing).loss
        loss.backward()
        plain[packing] = (loss.detach(), _trainable_grads(model))
    model.zero_grad(set_to_none=True)

    model.activation_checkpointing_enable() if hasattr(model, "activation_checkpointing_enable") \
        else model.gradient_checkpointing_enable()
    model.train()
    layers = model.language_model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not model.qformer.encoder.gradient_checkpointing  # the LLM's flag, not the backbone's
    calls = []
    hook = layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        loss_ckpt = model(**batch).loss
        loss_ckpt.backward()
    finally:
        hook.remove()
    assert len(calls) == 2  # the forward and its recomputation in the backward pass
    grads = _trainable_grads(model)
    for packing, tol in ((False, {}), (True, dict(rtol=1e-5, atol=1e-5))):
        loss_plain, grads_plain = plain[packing]
        torch.testing.assert_close(loss_ckpt.detach(), loss_plain, **tol)
        assert grads.keys() == grads_plain.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], grads_plain[name], **tol, msg=name)
    # the frozen LLM stays frozen and without dropout: only the flagged layers follow train()
    assert not model.language_model.model.layers[0].self_attn.training
    model.eval()
    assert not any(layer.training for layer in layers)


# -- resize_token_embeddings --------------------------------------------------------------------

def test_resize_token_embeddings_keeps_config_in_step(tmp_path):
    model = tiny_sam()
    old = model.config.text_config.vocab_size
    new = old + 8
    emb = model.resize_token_embeddings(new)
    assert emb.weight.shape[0] == new
    assert model.get_output_embeddings().weight.shape[0] == new
    assert model.config.text_config.vocab_size == new
    assert not emb.weight.requires_grad and not model.get_output_embeddings().weight.requires_grad
    assert sorted(n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad) == sorted(
        m for m in TRAINABLE_MODULES for _ in getattr(model, m).parameters())
    batch = _batch(model)
    batch["input_ids"][0, -1] = new - 1  # a new token id
    out = model(**batch, packing=False)
    assert out.logits.shape[-1] == new
    model.save_pretrained(tmp_path)
    assert SAM.from_pretrained(tmp_path).get_input_embeddings().weight.shape[0] == new


def test_resize_warns_when_the_placeholder_id_enters_the_vocabulary():
    model = tiny_sam(image_token_index=128)  # vocab 128: the placeholder id is outside it
    with pytest.warns(UserWarning, match="image_token_index=128"):
        model.resize_token_embeddings(132)


# -- typing and docs ----------------------------------------------------------------------------

def test_forward_is_documented_and_typed():
    doc = inspect.getdoc(SAM.forward)
    assert "Args:" in doc and "Returns:" in doc
    for name in inspect.signature(SAM.forward).parameters:
        if name not in ("self", "kwargs"):
            assert re.search(rf"^\s+{name}:", doc, re.M), f"forward's Args lacks {name}"
    hints = typing.get_type_hints(SAM.forward)
    assert "image_counts" in hints and "image_counts" in typing.get_type_hints(SAM.generate)
    assert importlib.resources.files("sam_fast").joinpath("py.typed").is_file()
    setup_py = (Path(__file__).parents[1] / "setup.py").read_text()
    assert re.search(r'package_data=\{[^}]*"sam_fast": \[[^\]]*"py\.typed"', setup_py)


# -- keyword arguments --------------------------------------------------------------------------

def test_misspelt_keyword_is_refused_with_its_name(tiny):
    batch = _batch(tiny)
    labels = batch.pop("labels")
    with pytest.raises(ValueError, match=r"'lables' \(did you mean 'labels'\?\)") as exc:
        tiny(**batch, lables=labels)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="inputs_embeds"):
        tiny(**batch, inputs_embeds=torch.zeros(1))


def test_llm_and_trainer_keywords_still_work(tiny):
    batch = _batch(tiny)
    out = tiny(**batch, packing=False, output_hidden_states=True)
    assert out.language_model_outputs.hidden_states is not None
    n = int((batch["labels"][:, 1:] != -100).sum())
    for packing in (True, False):
        base = tiny(**batch, packing=packing).loss
        scaled = tiny(**batch, packing=packing, num_items_in_batch=torch.tensor(2 * n)).loss
        torch.testing.assert_close(scaled, base / 2, rtol=1e-5, atol=1e-6)


# -- HF Trainer ---------------------------------------------------------------------------------

class _Samples(torch.utils.data.Dataset):
    """Per-sample model inputs (one or two images each) for the collate function below."""

    def __init__(self, model, n=4):
        self.items = []
        for i in range(n):
            b = _batch(model, counts=[1 + i % 2], seed=i)
            self.items.append({k: (v[0] if k not in ("image_features", "image_counts") else v) for k, v in b.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(items):
    S = max(it["input_ids"].shape[0] for it in items)

    def pad(t, value):
        return torch.cat([t, t.new_full((S - t.shape[0],), value)])

    return {
        "image_features": torch.cat([it["image_features"] for it in items]),
        "image_counts": torch.tensor([it["image_counts"][0] for it in items]),
        "qformer_input_ids": torch.stack([it["qformer_input_ids"] for it in items]),
        "qformer_attention_mask": torch.stack([it["qformer_attention_mask"] for it in items]),
        "input_ids": torch.stack([pad(it["input_ids"], 0) for it in items]),
        "attention_mask": torch.stack([pad(it["attention_mask"], 0) for it in items]),
        "labels": torch.stack([pad(it["labels"], -100) for it in items]),
        "ids": [str(i) for i in range(len(items))],  # bookkeeping, as sam_fast's Collator adds
    }


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=0.05,
                save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_sam_trainer_checkpoints_hold_only_the_trainable_delta(tmp_path):
    pytest.importorskip("accelerate")
    from sam_fast.train.hf import SAMTrainer

    base_dir = tmp_path / "base"
    randomize_guidance(tiny_sam(), seed=1).save_pretrained(base_dir)
    model = SAM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SAMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Samples(model),
                         data_collator=_collate)
    trainer.train()

    ckpt = tmp_path / "run" / "checkpoint-2"
    files = sorted(os.listdir(ckpt))
    assert {"config.json", "sam_delta.json", "sam_delta.safetensors"} <= set(files)
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files
    info = json.loads((ckpt / "sam_delta.json").read_text())
    assert sorted(info["keys"]) == sorted(model.trainable_state_dict())
    assert Path(info["base"]) == base_dir
    trainable_bytes = sum(v.numel() * v.element_size() for v in model.trainable_state_dict().values())
    assert (ckpt / "sam_delta.safetensors").stat().st_size < trainable_bytes + 4096

    trained = model.state_dict()
    changed = [k for k in model.trainable_state_dict() if not torch.equal(trained[k], before[k])]
    assert changed, "two optimizer steps changed no trainable tensor"
    frozen = [k for k in trained if k not in model.trainable_state_dict()]
    assert all(torch.equal(trained[k], before[k]) for k in frozen)

    loads = (SAM.from_pretrained(ckpt), SAM.from_pretrained(ckpt, base=base_dir), AutoModel.from_pretrained(ckpt))
    for loaded in loads:
        got = loaded.state_dict()
        assert sorted(got) == sorted(trained)
        for k in trained:
            torch.testing.assert_close(got[k], trained[k], msg=k)

    # resume into a fresh model: the delta's tensors are loaded into it
    fresh = SAM.from_pretrained(base_dir)
    resumed = SAMTrainer(model=fresh, args=_args(tmp_path / "run"), train_dataset=_Samples(fresh),
                         data_collator=_collate)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for k, v in fresh.trainable_state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)


def test_sam_trainer_needs_a_base_directory(tmp_path):
    pytest.importorskip("accelerate")
    from sam_fast.train.hf import SAMTrainer

    model = tiny_sam()
    with pytest.raises(ValueError, match="base_reference"):
        SAMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Samples(model), data_collator=_collate)


def test_sam_trainer_checkpoint_loads_from_another_directory(tmp_path, monkeypatch):
    """A model loaded by a relative path: its checkpoint records the base as an absolute path, so it
    loads from another working directory and after being copied elsewhere."""
    pytest.importorskip("accelerate")
    import shutil

    from sam_fast.train.hf import SAMTrainer

    randomize_guidance(tiny_sam(), seed=1).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = SAM.from_pretrained("base")
    trainer = SAMTrainer(model=model, args=_args("run"), train_dataset=_Samples(model), data_collator=_collate)
    trainer.train()
    trained = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    info = json.loads((tmp_path / "run" / "checkpoint-2" / "sam_delta.json").read_text())
    assert info["base"] == str(tmp_path.resolve() / "base")

    (tmp_path / "elsewhere").mkdir()
    copied = shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "elsewhere" / "kept")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for where in (copied, tmp_path / "run" / "checkpoint-2"):
        got = SAM.from_pretrained(where).trainable_state_dict()
        assert sorted(got) == sorted(trained)
        for k, v in trained.items():
            torch.testing.assert_close(got[k], v, msg=k)


def test_sam_trainer_refuses_a_base_reference_that_is_no_directory(tmp_path):
    pytest.importorskip("accelerate")
    from sam_fast.train.hf import SAMTrainer

    model = tiny_sam()
    with pytest.raises(ValueError, match=r"base_reference '.*nowhere' is not a directory"):
        SAMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Samples(model), data_collator=_collate,
                   base_reference=tmp_path / "nowhere")


class _LoraLinear(torch.nn.Module):
    """The structure PEFT's LoRA injects in place of an nn.Linear (peft.tuners.lora.layer.Linear: the
    original layer as ``base_layer``, per-adapter ``lora_A`` / ``lora_B``), for when peft is not installed."""

    def __init__(self, base_layer, r=2):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base_layer.in_features, r, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(r, base_layer.out_features, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


_LoraLinear.__module__ = "peft.tuners.lora.layer"
_LoraLinear.__name__ = _LoraLinear.__qualname__ = "Linear"


def _lora_tiny(tmp_path):
    """A tiny SAM saved to tmp_path/base and reloaded, with LoRA on the first LLM layer's q_proj
    (through peft when it is installed, else the same structure by hand)."""
    tiny_sam().save_pretrained(tmp_path / "base")
    model = SAM.from_pretrained(tmp_path / "base")
    try:
        import peft
    except ImportError:
        attn = model.language_model.model.layers[0].self_attn
        attn.q_proj = _LoraLinear(attn.q_proj)
        return model
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))


def test_sam_trainer_refuses_peft_adapters_it_would_not_save(tmp_path):
    """SAMTrainer's checkpoints hold SAM's trainable modules only: LoRA adapters would be lost, and
    their renamed layers would not load back, so a PEFT model is refused naming what to do."""
    pytest.importorskip("accelerate")
    from sam_fast.train.hf import SAMTrainer

    model = _lora_tiny(tmp_path)
    with pytest.raises(ValueError, match=r"PEFT modules \(Linear at .*q_proj.*transformers\.Trainer.*merge_and_unload"):
        SAMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Samples(model), data_collator=_collate)


def test_sam_trainer_refuses_parameters_training_outside_its_checkpoints(tmp_path):
    """A parameter unfrozen outside SAM's trainable modules would be missing from every checkpoint:
    refused when the trainer is built, and at save time when it is unfrozen later."""
    pytest.importorskip("accelerate")
    from sam_fast.train.hf import SAMTrainer

    randomize_guidance(tiny_sam(), seed=1).save_pretrained(tmp_path / "base")
    model = SAM.from_pretrained(tmp_path / "base")
    head = model.language_model.lm_head.weight
    head.requires_grad_(True)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) require grad .*lm_head\.weight.*freeze_backbone"):
        SAMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Samples(model), data_collator=_collate)
    head.requires_grad_(False)
    trainer = SAMTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Samples(model),
                         data_collator=_collate)
    head.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "sam_delta.safetensors").exists()


def test_sam_trainer_takes_the_collator_batches_with_their_pack_plan(tmp_path):
    """HF Trainer moves the Collator's batches with their `PackPlan` (rebuilt as a mapping by
    ``_prepare_inputs``); its loss step reads nothing back from the device and equals the model's
    own; a training step runs end to end through the DataLoader."""
    pytest.importorskip("accelerate")
    from _host_reads import HostReads

    from sam_fast.data import Collator, PackPlan, PromptBuilder, model_inputs, tiny_tokenizers
    from sam_fast.train.hf import SAMTrainer

    model = randomize_guidance(tiny_sam())
    vc = model.config.vision_config
    P, g = (vc.image_size // vc.patch_size) ** 2 + 1, torch.Generator().manual_seed(0)
    data = [{"id": i, "image_features": torch.randn(1 + i % 3, P, vc.hidden_size, generator=g),
             "instruction": "what is in {image#1}?" + " and more" * i, "output": "a thing" * (i + 1)} for i in range(4)]
    collator = Collator(PromptBuilder.for_model(model.config, *tiny_tokenizers()))
    trainer = SAMTrainer(model=model, args=_args(tmp_path / "run", max_steps=1, save_strategy="no"), train_dataset=data,
                         data_collator=collator, base_reference=str(tmp_path))
    batch = collator(data)
    inputs = trainer._prepare_inputs(batch)
    assert isinstance(inputs["pack_plan"], PackPlan)
    with HostReads() as reads:
        loss = trainer.compute_loss(model, inputs)
    assert reads.total == 0, reads.report()
    assert torch.equal(loss, model(**model_inputs(batch)).loss)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())
