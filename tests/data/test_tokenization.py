"""Tokenisation: Q-former left truncation, prompt layout, labels, padding sides, offline tokenizers."""

import pytest

from sam_fast import SAMConfig
from sam_fast.data import PromptBuilder, load_tokenizers, save_tokenizers, tiny_tokenizers


@pytest.fixture(scope="module")
def pb():
    q, llm = tiny_tokenizers()
    return PromptBuilder.for_model(SAMConfig.tiny(), q, llm)


def test_tiny_tokenizers_fit_tiny_config(pb):
    cfg = SAMConfig.tiny()
    assert len(pb.qtok) == cfg.qformer_config.vocab_size and len(pb.ltok) == cfg.text_config.vocab_size
    assert pb.ltok.convert_tokens_to_ids("<image>") == cfg.image_token_index
    assert pb.eos_id == cfg.text_config.eos_token_id and pb.pad_id == cfg.text_config.pad_token_id
    ids = pb.ltok("a group of red circles, 12 dots.", add_special_tokens=False)["input_ids"]
    assert pb.ltok.unk_token_id not in ids
    assert pb.ltok.decode(ids) == "a group of red circles, 12 dots."


def test_qformer_truncates_on_the_left(pb):
    long = " ".join(f"w{i}" for i in range(200)) + " the end"
    ids = pb.qformer_ids(long)
    assert len(ids) == 128 and ids[0] == pb.qtok.cls_token_id and ids[-1] == pb.qtok.sep_token_id
    assert pb.qtok.decode(ids[1:-1]).endswith("w199 the end")  # the tail survives
    short = pb.qformer_ids("{image#1} what?")
    assert pb.qtok.convert_ids_to_tokens(short) == ["[CLS]", "{", "image", "#", "1", "}", "what", "?", "[SEP]"]


def test_prompt_layout_and_labels(pb):
    Q, img = pb.num_query_tokens, pb.image_token_index
    e = pb.encode("what is common?", 3, "red circles")
    text = pb.ltok("what is common?", add_special_tokens=False)["input_ids"]
    ans = pb.ltok("red circles", add_special_tokens=False)["input_ids"]
    assert e.prompt == [img] * (3 * Q) + [pb.eos_id] + text  # placeholders first, then </s> + instruction
    assert e.answer == ans + [pb.eos_id]
    e1 = pb.encode("x", 1, "a b")
    batch = pb.batch_text([e, e1], train=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for b, s in enumerate((e, e1)):
        n = len(s.prompt) + len(s.answer)
        assert ids[b, :n].tolist() == s.prompt + s.answer and mask[b].sum() == n  # right padding
        assert (ids[b, n:] == pb.pad_id).all()
        want = [-100] * len(s.prompt) + s.answer + [-100] * (ids.shape[1] - n)
        assert labels[b].tolist() == want
    assert (ids == img).sum(1).tolist() == [3 * Q, Q]


def test_generation_batch_is_left_padded(pb):
    e, e1 = pb.encode("what is common?", 2), pb.encode("x", 1)
    batch = pb.batch_text([e, e1], train=False)
    assert "labels" not in batch
    w = batch["input_ids"].shape[1]
    assert batch["input_ids"][1, w - len(e1.prompt):].tolist() == e1.prompt
    assert batch["attention_mask"][1].tolist() == [0] * (w - len(e1.prompt)) + [1] * len(e1.prompt)
    assert batch["qformer_attention_mask"].sum(1).tolist() == [len(e.qformer_ids), len(e1.qformer_ids)]


def test_answer_truncation_and_decode(pb):
    small = PromptBuilder(pb.qtok, pb.ltok, 8, 3, max_txt_len=4, max_output_txt_len=4)
    e = small.encode("a b c d e f", 1, "a b c d e")
    ids = pb.ltok("a b c d e f", add_special_tokens=False)["input_ids"]
    assert e.prompt == [3] * 8 + [pb.eos_id] + ids[-3:]  # </s> + instruction cut on the left to 4 tokens
    assert e.answer == ids[:3]  # answer + </s> cut on the right to 4 - 1 (the released code's BOS slot)
    assert small.encode("x", 1, "a b").answer == ids[:2] + [pb.eos_id]
    assert small.decode(pb.ltok("red dots", add_special_tokens=False)["input_ids"] + [pb.eos_id, 40, 41]) == "red dots"


def test_refusals(pb):
    with pytest.raises(ValueError, match="image placeholder"):
        pb.encode("look <image> here", 1)
    with pytest.raises(ValueError, match="at least one image"):
        pb.encode("x", 0)
    q, llm = tiny_tokenizers(qformer_vocab_size=200, llm_vocab_size=128)
    with pytest.raises(ValueError, match=r"Q-former tokenizer has \d+ tokens but the model.s vocabulary has 120"):
        PromptBuilder.for_model(SAMConfig.tiny(), q, llm)


def test_references_to_missing_images_and_lone_surrogates_are_refused(pb):
    """Every path that builds prompts (training and evaluation batches, the processor, generate)
    goes through `encode`: {image#3} for two images, {image#0} and a lone surrogate are refused
    there, not passed to the LLM or to the tokenizer (which died with a TypeError)."""
    assert len(pb.encode("{image#1} and {image#2} in common?", 2).prompt) > 0
    with pytest.raises(ValueError, match=r"refers to \{image#3\} but the sample has 2 images"):
        pb.encode("{image#1} {image#3} in common?", 2)
    with pytest.raises(ValueError, match=r"refers to \{image#0\} but the sample has 1 image"):
        pb.encode("{image#0} what?", 1)
    with pytest.raises(ValueError, match=r"'instruction' holds a lone surrogate '\\udc80' at character 3"):
        pb.encode("red\udc80", 1)
    with pytest.raises(ValueError, match=r"'output' holds a lone surrogate '\\ud800' at character 0"):
        pb.encode("red", 1, "\ud800")


def test_save_and_load_offline(pb, tmp_path):
    save_tokenizers(pb.qtok, pb.ltok, tmp_path)
    q, llm = load_tokenizers(tmp_path)
    text = "{image#2} describe the group."
    assert q(text)["input_ids"] == pb.qtok(text)["input_ids"] and q.truncation_side == "left"
    assert llm(text, add_special_tokens=False)["input_ids"] == pb.ltok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(FileNotFoundError, match="no tokenizers"):
        load_tokenizers(tmp_path / "nope")
