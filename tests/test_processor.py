"""SAMProcessor: the batch it builds is the one the data pipeline builds, the model takes it as is,
it round-trips through a folder (next to the model), and bad input fails in one line naming the sample; saved
settings beyond any real model's, or differing from the model's config.json beside them, fail in one line naming
the file and the key."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _host_reads import assert_same_plan
from _sam_helpers import tiny_sam
from PIL import Image

import sam_fast
from sam_fast import SAM, SAMImageProcessor, SAMProcessor
from sam_fast.data import Collator, EvalTransform, PromptBuilder, load_tokenizers, save_tokenizers, tiny_tokenizers

TEXTS = ["what do {image#1} and {image#2} have in common?", "describe the image"]
ANSWERS = ["two red circles", "a dog"]
KEYS = ("pixel_values", "image_counts", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (17 + 3 * i, 23 + i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_sam()


@pytest.fixture
def processor(model):
    return SAMProcessor.for_model(model, *tiny_tokenizers())


def _hand_batch(model, per_sample, texts, answers=None):
    """The batch as the data pipeline builds it: EvalTransform per image, PromptBuilder, Collator."""
    pb = PromptBuilder.for_model(model.config, *tiny_tokenizers())
    tf = EvalTransform(model.config.vision_config.image_size)
    items = [{"id": i, "pixel_values": torch.stack([tf(im) for im in imgs]), "instruction": t,
              "output": None if answers is None else answers[i]}
             for i, (imgs, t) in enumerate(zip(per_sample, texts, strict=True))]
    return Collator(pb, train=answers is not None)(items)


def _assert_same(batch, expected, keys):
    assert set(batch.keys()) == set(keys)
    for k in keys:
        if k == "pack_plan":
            assert_same_plan(batch[k], expected[k])
        else:
            assert torch.equal(batch[k], expected[k]), k


@pytest.mark.parametrize("with_answers", [False, True])
def test_equals_the_collator_path(model, processor, with_answers):
    imgs = _images(3)
    per_sample = [imgs[:2], imgs[2:]]
    answers = ANSWERS if with_answers else None
    batch = processor(images=per_sample, text=TEXTS, answers=answers)
    keys = KEYS + (("labels", "pack_plan") if with_answers else ())
    _assert_same(batch, _hand_batch(model, per_sample, TEXTS, answers), keys)
    # and what that path means, spelled out from the tokenizers
    _, ltok = tiny_tokenizers()
    Q, ph, eos = model.config.num_query_tokens, model.config.image_token_index, ltok.eos_token_id
    assert batch["image_counts"].tolist() == [2, 1]
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    row = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    text = ltok(TEXTS[1], add_special_tokens=False)["input_ids"]
    answer = ltok(ANSWERS[1], add_special_tokens=False)["input_ids"] + [eos] if with_answers else []
    assert row == [ph] * Q + [eos] + text + answer
    if with_answers:  # right-padded; labels are the answer + </s> only
        assert batch["attention_mask"][1, 0] == 1
        labels = batch["labels"][1]
        assert labels[labels != -100].tolist() == answer
    else:  # left-padded prompts for generation
        assert batch["attention_mask"][1, -1] == 1 and batch["attention_mask"][1, 0] == 0


def test_flat_list_is_one_image_per_sample_or_split_by_image_counts(model, processor):
    imgs = _images(3)
    flat = processor(images=imgs, text=["red", "blue", "dog"])
    assert flat["image_counts"].tolist() == [1, 1, 1]
    _assert_same(flat, _hand_batch(model, [[im] for im in imgs], ["red", "blue", "dog"]), KEYS)
    split = processor(images=imgs, text=TEXTS, image_counts=[2, 1])
    _assert_same(split, processor(images=[imgs[:2], imgs[2:]], text=TEXTS), KEYS)
    one = processor(images=imgs[0], text="red")  # one image, one text: a batch of one
    assert one["image_counts"].tolist() == [1] and one["input_ids"].shape[0] == 1


def test_arrays_and_tensors_read_as_the_same_image(processor):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (19, 25, 3), dtype=np.uint8)
    want = processor.image_processor([Image.fromarray(arr)])["pixel_values"]
    for image in (arr, arr.transpose(2, 0, 1).copy(), torch.from_numpy(arr), arr.astype(np.float32) / 255.0):
        got = processor(images=[image], text=["red"])["pixel_values"]
        assert torch.equal(got, want)
    grey = rng.integers(0, 256, (19, 25), dtype=np.uint8)
    assert torch.equal(processor(images=[grey], text=["red"])["pixel_values"],
                       processor(images=[Image.fromarray(grey).convert("RGB")], text=["red"])["pixel_values"])


def test_model_takes_the_processor_output_directly(model, processor):
    imgs = _images(3)
    per_sample = [imgs[:2], imgs[2:]]
    gen = processor(images=per_sample, text=TEXTS)
    out = model.generate(**gen, max_new_tokens=3, num_beams=1)
    hand = _hand_batch(model, per_sample, TEXTS)
    assert torch.equal(out, model.generate(**{k: hand[k] for k in KEYS}, max_new_tokens=3, num_beams=1))
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3
    answers = processor.batch_decode(out)
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)

    train = processor(images=per_sample, text=TEXTS, answers=ANSWERS)
    loss = model(**train).loss
    hand = _hand_batch(model, per_sample, TEXTS, ANSWERS)
    assert torch.equal(loss, model(**{k: hand[k] for k in (*KEYS, "labels")}).loss)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    model.zero_grad(set_to_none=True)


def test_batch_decode_stops_at_end_of_sequence(processor):
    _, ltok = tiny_tokenizers()
    ids = ltok("red dog", add_special_tokens=False)["input_ids"]
    seqs = torch.tensor([ids + [ltok.eos_token_id] + ids, ids + [ltok.eos_token_id] + [0] * len(ids)])
    assert processor.batch_decode(seqs) == ["red dog", "red dog"]
    assert processor.decode(seqs[0]) == "red dog"


def test_decode_takes_the_tokenizer_keywords(processor):
    # HF code (pipelines, examples) calls batch_decode(ids, skip_special_tokens=True, ...)
    _, ltok = tiny_tokenizers()
    ids = ltok("red dog", add_special_tokens=False)["input_ids"]
    seqs = torch.tensor([[ltok.bos_token_id, *ids, ltok.eos_token_id]])
    assert processor.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False) == ["red dog"]
    assert processor.decode(seqs[0], skip_special_tokens=True) == "red dog"
    assert processor.batch_decode(seqs, skip_special_tokens=False) == ["<s> red dog"]
    with pytest.raises(TypeError):
        processor.decode(seqs[0], 1, 2)


def test_auto_processor_of_a_sam_folder_is_a_sam_processor(model, processor, tmp_path):
    from transformers import AutoProcessor

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SAMProcessor
    imgs = _images(2)
    _assert_same(loaded(images=[imgs], text=TEXTS[:1]), processor(images=[imgs], text=TEXTS[:1]), KEYS)


def test_image_text_to_text_pipeline_answers_a_multi_image_prompt(model, processor, tmp_path):
    from transformers import pipeline

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert type(pipe.processor) is SAMProcessor
    imgs = _images(3)
    gen = dict(max_new_tokens=3, num_beams=1)
    want = processor.batch_decode(model.generate(**processor(images=[imgs[:2], imgs[2:]], text=TEXTS), **gen))
    # one prompt with its images as a flat list; a batch of two (the pipeline asks for padding=True)
    one = pipe(images=imgs[:2], text=TEXTS[0], generate_kwargs=gen, return_full_text=False)
    two = pipe(images=[imgs[:2], imgs[2:]], text=TEXTS, generate_kwargs=gen, return_full_text=False)
    assert [o["generated_text"] for o in one] == want[:1]
    assert [o[0]["generated_text"] if isinstance(o, list) else o["generated_text"] for o in two] == want


def test_a_single_text_takes_a_flat_image_list_as_its_images(model, processor):
    imgs = _images(2)
    _assert_same(processor(images=imgs, text=TEXTS[0]), processor(images=[imgs], text=[TEXTS[0]]), KEYS)
    _assert_same(processor(images=[imgs], text=TEXTS[:1], padding=True), processor(images=[imgs], text=TEXTS[:1]),
                 KEYS)
    with pytest.raises(TypeError, match="padding"):
        processor(images=[imgs], text=TEXTS[:1], padding="max_length")


def test_save_and_load_next_to_the_model(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "SAMProcessor" and saved["num_query_tokens"] == model.config.num_query_tokens
    loaded = SAMProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, SAMImageProcessor)
    assert loaded.image_processor.size == model.config.vision_config.image_size
    assert loaded.qformer_tokenizer.truncation_side == "left"
    imgs = _images(3)
    for answers in (None, ANSWERS):
        want = processor(images=[imgs[:2], imgs[2:]], text=TEXTS, answers=answers)
        got = loaded(images=[imgs[:2], imgs[2:]], text=TEXTS, answers=answers)
        _assert_same(got, want, tuple(want.keys()))
    # the same folder still loads as a model, and its tokenizers as the CLI reads them
    reloaded = SAM.from_pretrained(tmp_path)
    assert reloaded.config.num_query_tokens == model.config.num_query_tokens
    q, llm = load_tokenizers(tmp_path)
    assert llm("red dog")["input_ids"] == processor.tokenizer("red dog")["input_ids"]
    assert q("red dog")["input_ids"] == processor.qformer_tokenizer("red dog")["input_ids"]


def test_from_a_model_folder_without_a_processor(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    save_tokenizers(*tiny_tokenizers(), tmp_path)  # the layout `sam-fast train` writes
    loaded = SAMProcessor.from_pretrained(tmp_path)
    imgs = _images(2)
    per_sample = [imgs, imgs[:1]]  # TEXTS[0] refers to two images
    _assert_same(loaded(images=per_sample, text=TEXTS), processor(images=per_sample, text=TEXTS), KEYS)
    with pytest.raises(FileNotFoundError, match="no processor_config.json"):
        SAMProcessor.from_pretrained(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        SAMProcessor.from_pretrained(tmp_path / "missing")


def test_settings_override_on_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert SAMProcessor.from_pretrained(tmp_path, max_txt_len=5).max_txt_len == 5
    long = " ".join(["red"] * 20)
    ids = SAMProcessor.from_pretrained(tmp_path, max_txt_len=5)(images=_images(1), text=[long])["qformer_input_ids"]
    assert ids.shape == (1, 5)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(model):
    q, llm = tiny_tokenizers(llm_vocab_size=140)
    with pytest.raises(ValueError, match=r"LLM tokenizer has 135 tokens but the model's vocabulary has 128"):
        SAMProcessor.for_model(model, q, llm)


@pytest.mark.parametrize("call, message", [
    (lambda p, im: p(images=[[im[0]], [im[1]], [im[2]]], text=TEXTS),
     r"got 3 image lists but 2 texts: sample 2 has an image list but no text"),
    (lambda p, im: p(images=[[im[0]]], text=TEXTS), r"got 1 image lists but 2 texts: sample 1 has a text"),
    (lambda p, im: p(images=[[im[0]], []], text=TEXTS), r"images\[1\] is empty: sample 1 needs at least one image"),
    (lambda p, im: p(images=[[im[0]], ["x.jpg"]], text=TEXTS), r"images\[1\]\[0\] \(sample 1, image 0\) is a str"),
    (lambda p, im: p(images=[im[0], np.full((9, 9, 3), 2.0)], text=TEXTS),
     r"images\[1\]\[0\] .*values outside \[0, 1\]"),
    (lambda p, im: p(images=[im[0], np.zeros((2, 9, 9, 3), np.uint8)], text=TEXTS),
     r"images\[1\]\[0\] .*shape \(2, 9, 9, 3\)"),
    (lambda p, im: p(images=im[:2], text=TEXTS, answers=["a"]), r"got 1 answers for 2 texts: sample 1 has a text"),
    (lambda p, im: p(images=im[:2], text=["red", 3]), r"text\[1\] is a int, not a string"),
    (lambda p, im: p(images=im[:2], text=["red", "look at <image>"]), r"text\[1\]: 'instruction' contains"),
    (lambda p, im: p(images=im[:2], text=TEXTS, answers=["a", None]), r"answers\[1\] is a NoneType"),
    (lambda p, im: p(images=im, text=TEXTS, image_counts=[2, 2]), r"image_counts sum to 4 but 3 images"),
    (lambda p, im: p(images=im, text=TEXTS, image_counts=[3, 0]), r"image_counts\[1\] = 0"),
    (lambda p, im: p(images=im[:2], text=[]), r"text is empty"),
    (lambda p, im: p(text=TEXTS), r"needs both images and text"),
    (lambda p, im: p(images=im[:2], text=TEXTS, return_tensors="np"), r"torch tensors only"),
])
def test_bad_input_fails_in_one_line_naming_the_sample(processor, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(processor, _images(3))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, ref, has", [
    (["{image#5} what is it?", "red"], "{image#5}", "sample 0 has 1 image"),
    (["red", "{image#1} and {image#0}"], "{image#0}", "sample 1 has 1 image"),
    (["{image#1} {image#2} {image#3}", "red"], "{image#3}", "sample 0 has 2 images"),
])
def test_a_reference_to_an_image_the_sample_lacks_is_refused(processor, text, ref, has):
    """``{image#N}`` is text the LLM reads: {image#5} for a one-image sample was accepted and
    pointed the model at an image that is not there."""
    imgs = _images(3)
    per_sample = [imgs[:2], imgs[2:]] if "2 images" in has else [imgs[:1], imgs[1:2]]
    with pytest.raises(ValueError) as err:
        processor(images=per_sample, text=text)
    msg = str(err.value)
    assert "\n" not in msg and ref in msg and has in msg, msg
    assert processor(images=[imgs[:2], imgs[2:]], text=TEXTS)["image_counts"].tolist() == [2, 1]


@pytest.mark.parametrize("field", ["text", "answers"])
def test_a_lone_surrogate_is_refused_naming_the_sample_and_field(processor, field):
    """A lone surrogate is not Unicode text: the tokenizer died on it with a TypeError naming no
    sample."""
    texts, answers = ["red", "blue"], ["a", "b"]
    (texts if field == "text" else answers)[1] = "a dog \ud800 here"
    with pytest.raises(ValueError, match=rf"^{field}\[1\]: '(instruction|output)' holds a lone surrogate "
                                         rf"'\\ud800' at character 6") as err:
        processor(images=_images(2), text=texts, answers=answers)
    assert "\n" not in str(err.value)


def test_a_closed_image_is_named_by_sample_and_position(processor):
    """A closed PIL image failed in the image processor, named by its index in the flat list."""
    imgs = _images(3)
    imgs[2].close()
    with pytest.raises(ValueError, match=r"^images\[1\]\[0\] \(sample 1, image 0\) .*closed image") as err:
        processor(images=[imgs[:2], imgs[2:]], text=TEXTS)
    assert "\n" not in str(err.value)


def test_unknown_keyword_is_refused(processor):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['answer'\]"):
        processor(images=_images(1), text=["red"], answer=["a"])


def test_exported_from_the_package():
    assert sam_fast.SAMProcessor is SAMProcessor and "SAMProcessor" in sam_fast.__all__


def test_from_an_instructblip_folder(tmp_path):
    from _tiny import tiny_instructblip

    tiny_instructblip().save_pretrained(tmp_path)
    q, llm = tiny_tokenizers(qformer_vocab_size=100, llm_vocab_size=119)
    llm.save_pretrained(tmp_path)  # the HF InstructBLIP layout: LLM tokenizer at the top
    q.save_pretrained(tmp_path / "qformer_tokenizer")
    processor = SAMProcessor.from_pretrained(tmp_path)
    assert (processor.num_query_tokens, processor.image_token_index, processor.image_processor.size) == (4, 119, 28)
    batch = processor(images=[_images(2)], text=["red"])
    assert batch["input_ids"][0, :8].tolist() == [119] * 8
    out = SAM.from_instructblip(tmp_path).generate(**batch, max_new_tokens=2, num_beams=1)
    assert out.shape[0] == 1


# -- processor_config.json / config.json: sizes checked before a tokenizer loads or a batch is sized ------------------

def _saved(model, processor, d, edit=None):
    """`processor` saved next to `model` in `d`, processor_config.json changed by `edit(dict)`."""
    model.save_pretrained(d)
    processor.save_pretrained(d)
    if edit is not None:
        raw = json.loads((d / "processor_config.json").read_text())
        edit(raw)
        (d / "processor_config.json").write_text(json.dumps(raw))
    return d / "processor_config.json"


def _refused(call, file, pattern):
    from sam_fast.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        call()
    msg = str(exc.value)
    assert msg.startswith(f"{file}: ") and "\n" not in msg and len(msg) < 300, msg
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("edit, pattern", [
    (lambda p: p["image_processor"].update(size=100_000),  # a [T, 3, 1e5, 1e5] batch: 120 GB per image
     r"image_processor\.size = 100000: expected an integer in \[1, 4096\]"),
    (lambda p: p.update(num_query_tokens=1e8), r"num_query_tokens = 100000000\.0: expected an integer in \[1, 1024\]"),
    (lambda p: p.update(num_query_tokens=16), r"num_query_tokens = 16 differs from the model's 8 \(\S+config\.json\)"),
    (lambda p: p["image_processor"].update(size=56), r"image_processor\.size = 56 differs from the model's 28"),
    (lambda p: p.update(max_txt_len=-1), r"max_txt_len = -1: expected an integer in \[1, "),
    (lambda p: p.update(image_token_index="x" * 10**7), r"image_token_index = 'x{30,}\.\.\.x{30,}': expected an integer"),
    (lambda p: p.update(image_processor="size=28"), r"image_processor = 'size=28': expected an object"),
])
def test_saved_processor_settings_are_checked(model, processor, tmp_path, edit, pattern):
    file = _saved(model, processor, tmp_path, edit)
    _refused(lambda: SAMProcessor.from_pretrained(tmp_path), file, pattern)


@pytest.mark.parametrize("text, pattern", [
    ('{"processor_class": "SAMProcessor", "num_query_tokens"', r"not valid JSON \("),
    ('["SAMProcessor"]', r"holds a JSON list, not an object"),
])
def test_cut_or_nested_processor_config_is_refused(model, processor, tmp_path, text, pattern):
    file = _saved(model, processor, tmp_path)
    file.write_text(text)
    _refused(lambda: SAMProcessor.from_pretrained(tmp_path), file, pattern)


def test_processor_from_a_bad_model_config_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    save_tokenizers(*tiny_tokenizers(), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["qformer_config"]["num_attention_heads"] = 0  # torch: ZeroDivisionError
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _refused(lambda: SAMProcessor.from_pretrained(tmp_path), tmp_path / "config.json",
             r"qformer_config\.num_attention_heads = 0: expected an integer in \[1, ")


def test_processor_sizes_are_bounded_in_code_too(model):
    from sam_fast.config import ConfigError

    with pytest.raises(ConfigError, match=r"^SAMImageProcessor: size = 100000: expected an integer in \[1, 4096\]$"):
        SAMImageProcessor(size=100_000)
    with pytest.raises(ConfigError, match=r"^SAMProcessor: num_query_tokens = 100000000: expected an integer in \[1, "):
        SAMProcessor(SAMImageProcessor(size=28), *reversed(tiny_tokenizers()), num_query_tokens=10**8)


def test_empty_images_and_answers_are_refused_and_16_bit_arrays_scaled(processor):
    """A 0x0 image and an empty answer were accepted silently (the sample then trained on nothing but
    </s>); a uint16 array was refused although 16-bit files are scaled to 8 bits."""
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    with pytest.raises(ValueError, match=r"images\[0\]\[1\] \(sample 0, image 1\) has no pixels \(0x0\)"):
        processor(images=[[red, Image.new("RGB", (0, 0))]], text=["{image#1} {image#2} same?"])
    with pytest.raises(ValueError, match=r"answers\[1\]: 'output' is empty"):
        processor(images=[[red], [red]], text=["what?", "what?"], answers=["red", "  "])
    deep = np.full((40, 40, 3), 65535, dtype=np.uint16)
    deep[..., 1:] = 0
    a = processor(images=[[deep]], text=["what?"])["pixel_values"]
    b = processor(images=[[red]], text=["what?"])["pixel_values"]
    assert torch.equal(a, b)
