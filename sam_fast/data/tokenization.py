"""Tokenisation as the released code does it, and offline tokenizers for the tiny configuration.

`PromptBuilder` turns (instruction, number of images, answer) into the two token streams SAM needs:

- Q-former: the instruction, BERT-tokenised (``[CLS] ... [SEP]``), truncated on the **left** to
  ``max_txt_len`` (128) tokens, as LAVIS does (``truncation_side="left"``).
- LLM: ``num_query_tokens`` placeholders (``image_token_index``) per image, all images first, then
  ``</s>`` + instruction (LAVIS' Vicuna tokenizer uses ``</s>`` as its BOS), then answer + ``</s>``.
  Lengths as in the released code: ``</s>`` + instruction is cut on the left to ``max_txt_len``
  (128) tokens; answer + ``</s>`` is cut on the right to ``max_output_txt_len - 1`` (255) tokens (its
  tokenizer counts the BOS it then strips), so an over-long answer loses its ``</s>``, as there.
  Labels are -100 everywhere except the answer and its final ``</s>``
  (docs/model.md#tokenisation-and-the-prompt).

Real models bring their tokenizers as local files (an HF InstructBLIP directory has the LLaMA
tokenizer at its root and the BERT one in ``qformer_tokenizer/``); `load_tokenizers` reads them
with no network. The tiny configuration's vocabularies (120 Q-former ids, 128 LLM ids) are far too
small for real vocabularies, so `tiny_tokenizers` builds two small lower-cased WordPiece tokenizers
from a vocabulary generated here (letters, ``##`` letters, digits, punctuation, a few words): any
lower-case ASCII text tokenises (character by character where no word fits).
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass

import torch

QFORMER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLM_SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]  # ids 0..3: LLaMA's <unk>/<s>/</s>; tiny image_token_index 3
PUNCT = list(".,!?'\"#{}()-:;/=")
WORDS = ["a", "the", "of", "and", "in", "on", "with", "image", "images", "photo", "picture", "is", "are", "two", "three", "four", "all", "these", "what", "common", "describe", "group", "story", "red", "blue", "green", "yellow", "black", "white", "circle", "circles", "square", "squares", "stripe", "stripes", "dot", "dots", "sky", "tree", "dog", "cat", "car", "bird", "flower"]


def _vocab(specials: list[str], size: int) -> dict[str, int]:
    base = specials + list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    base += list(string.digits) + ["##" + d for d in string.digits] + PUNCT
    if len(base) > size:
        raise ValueError(f"a vocabulary of {size} ids cannot hold the {len(base)} base tokens")
    tokens = base + [w for w in WORDS if w not in base][: size - len(base)]
    return {t: i for i, t in enumerate(tokens)}


def _wordpiece(vocab: dict[str, int], unk: str):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def tiny_tokenizers(qformer_vocab_size: int = 120, llm_vocab_size: int = 128):
    """Offline (Q-former, LLM) tokenizers for `SAMConfig.tiny()`, as `PreTrainedTokenizerFast`s.

    The LLM tokenizer's ids 0-3 are ``<unk> <s> </s> <image>`` (pad = 0 = LLaMA's convention in
    the tiny config, eos = 2, image placeholder = 3); the Q-former's are BERT's specials.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    qv = _vocab(QFORMER_SPECIALS, qformer_vocab_size)
    q = _wordpiece(qv, "[UNK]")
    q.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                          special_tokens=[("[CLS]", qv["[CLS]"]), ("[SEP]", qv["[SEP]"])])
    qtok = PreTrainedTokenizerFast(tokenizer_object=q, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", truncation_side="left")
    lv = _vocab(LLM_SPECIALS, llm_vocab_size)
    ltok = PreTrainedTokenizerFast(tokenizer_object=_wordpiece(lv, "<unk>"), unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>", additional_special_tokens=["<image>"])
    return qtok, ltok


def load_tokenizers(directory: str | os.PathLike):
    """(Q-former, LLM) tokenizers from local files: ``DIR/qformer_tokenizer`` (or ``DIR/tokenizer/qformer``)
    and ``DIR`` (or ``DIR/tokenizer/llm``). Never downloads, never runs code from the folder
    (`sam_fast.data.paths.refuse_code_in`)."""
    from transformers import AutoTokenizer

    from sam_fast.data.paths import refuse_code_in

    directory = os.fspath(directory)
    refuse_code_in(directory)
    candidates = [
        (os.path.join(directory, "tokenizer", "qformer"), os.path.join(directory, "tokenizer", "llm")),
        (os.path.join(directory, "qformer_tokenizer"), directory),
    ]
    for qdir, ldir in candidates:
        if os.path.isdir(qdir) and os.path.isfile(os.path.join(ldir, "tokenizer_config.json")):
            q = AutoTokenizer.from_pretrained(qdir, local_files_only=True, trust_remote_code=False)
            q.truncation_side = "left"
            return q, AutoTokenizer.from_pretrained(ldir, local_files_only=True, trust_remote_code=False)
    raise FileNotFoundError(
        f"no tokenizers under {directory}: expected {candidates[0][0]} + {candidates[0][1]} (saved by sam-fast train) "
        f"or {candidates[1][0]} + tokenizer files in {directory} (an HF InstructBLIP directory)"
    )


def save_tokenizers(qformer_tokenizer, llm_tokenizer, directory: str | os.PathLike) -> None:
    """Write both tokenizers under ``DIR/tokenizer/{qformer,llm}`` (read back by `load_tokenizers`)."""
    qformer_tokenizer.save_pretrained(os.path.join(directory, "tokenizer", "qformer"))
    llm_tokenizer.save_pretrained(os.path.join(directory, "tokenizer", "llm"))


# how instructions refer to their images; the references stay text that the LLM reads
_IMAGE_REFERENCE = re.compile(r"\{\s*image\s*#\s*([+-]?\d+)\s*\}", re.IGNORECASE)
_SURROGATE = re.compile("[\ud800-\udfff]")


def image_reference_problem(instruction: str, n_images: int, who: str = "the sample") -> str | None:
    """Why `instruction` cannot go with `n_images` images, or None: it refers to an image the
    sample lacks (``{image#N}`` with N < 1 or N > n_images), which would point the model at an
    image that is not there. `who` names the sample in the message."""
    for m in _IMAGE_REFERENCE.finditer(instruction):
        digits = m.group(1).lstrip("+-")
        n = int(m.group(1)) if len(digits) <= 9 else None  # a 5000-digit number is out of range too
        if n is None or not 1 <= n <= n_images:
            ref = m.group(0) if len(m.group(0)) <= 40 else m.group(0)[:37] + "..."
            return (f"'instruction' refers to {ref} but {who} has {n_images} image{'' if n_images == 1 else 's'} "
                    f"({{image#1}} to {{image#{n_images}}})")
    return None


def surrogate_problem(name: str, text: str) -> str | None:
    """Why `text` (field `name`) is not Unicode text, or None: a lone surrogate (JSON's ``"\\ud800"``
    escape reads as one), which the tokenizers refuse with an error that names no sample."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return f"'{name}' holds a lone surrogate {m.group(0)!r} at character {m.start()} (not valid Unicode text)"


@dataclass
class EncodedSample:
    """Token ids of one sample: `prompt` (placeholders, </s>, instruction), `answer` (answer + </s>,
    empty at generation time) and the Q-former ids of the instruction."""

    qformer_ids: list[int]
    prompt: list[int]
    answer: list[int]


class PromptBuilder:
    """Prompts (placeholders, </s> + instruction, answer + </s>) for a model configuration and its two tokenizers."""

    def __init__(self, qformer_tokenizer, llm_tokenizer, num_query_tokens: int, image_token_index: int,
                 max_txt_len: int = 128, max_output_txt_len: int = 256, llm_vocab_size: int | None = None,
                 qformer_vocab_size: int | None = None):
        self.qtok, self.ltok = qformer_tokenizer, llm_tokenizer
        self.num_query_tokens, self.image_token_index = int(num_query_tokens), int(image_token_index)
        self.max_txt_len, self.max_output_txt_len = int(max_txt_len), int(max_output_txt_len)
        if self.ltok.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no eos_token (</s>)")
        self.eos_id = int(self.ltok.eos_token_id)
        pad = self.ltok.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.qformer_pad_id = int(self.qtok.pad_token_id if self.qtok.pad_token_id is not None else 0)
        specials = {"pad": self.pad_id, "eos (</s>)": self.eos_id, "bos": self.ltok.bos_token_id,
                    "unk": self.ltok.unk_token_id}
        for name, tid in specials.items():
            if tid is not None and int(tid) == self.image_token_index:
                raise ValueError(
                    f"image_token_index={self.image_token_index} equals the LLM tokenizer's {name} id: padded "
                    f"or special positions would be taken for image placeholders; use an id no real token has "
                    f"(e.g. the vocabulary size, {len(self.ltok)})")
        for name, tok, size in (("LLM", self.ltok, llm_vocab_size), ("Q-former", self.qtok, qformer_vocab_size)):
            if size is not None and len(tok) > size:
                raise ValueError(f"the {name} tokenizer has {len(tok)} tokens but the model's vocabulary has {size}")

    @classmethod
    def for_model(cls, config, qformer_tokenizer, llm_tokenizer, **kwargs) -> PromptBuilder:
        """A builder for a `SAMConfig` (checks that the tokenizers fit its vocabularies)."""
        return cls(qformer_tokenizer, llm_tokenizer, config.num_query_tokens, config.image_token_index,
                   llm_vocab_size=config.text_config.vocab_size,
                   qformer_vocab_size=config.qformer_config.vocab_size, **kwargs)

    def qformer_ids(self, instruction: str) -> list[int]:
        return self.qtok(instruction, truncation=True, max_length=self.max_txt_len)["input_ids"]

    def encode(self, instruction: str, n_images: int, answer: str | None = None,
               truncate: bool | None = None) -> EncodedSample:
        """Token ids of one sample. `truncate` (default: when an answer is given, i.e. training)
        cuts ``</s>`` + instruction on the left to `max_txt_len` tokens, as the released training
        code; at generation (no answer) the prompt reaches the LLM whole, as the released
        `generate` (only the Q-former text is cut, to `max_txt_len` on the left)."""
        if n_images < 1:
            raise ValueError(f"a sample needs at least one image, got {n_images}")
        problem = (surrogate_problem("instruction", instruction)
                   or (None if answer is None else surrogate_problem("output", answer))
                   or image_reference_problem(instruction, n_images))
        if problem:
            raise ValueError(problem)
        text = self.ltok(instruction, add_special_tokens=False)["input_ids"]
        if answer is not None if truncate is None else truncate:
            text = text[len(text) - min(len(text), self.max_txt_len - 1) :]  # </s> + text <= max_txt_len
        if self.image_token_index in text:
            raise ValueError(f"the instruction {instruction!r} tokenises to the image placeholder id "
                             f"{self.image_token_index}")
        prompt = [self.image_token_index] * (self.num_query_tokens * n_images) + [self.eos_id] + text
        ans = []
        if answer is not None:
            ans = (self.ltok(answer, add_special_tokens=False)["input_ids"] + [self.eos_id])[: self.max_output_txt_len - 1]
        return EncodedSample(self.qformer_ids(instruction), prompt, ans)

    def decode(self, ids, **kwargs) -> str:
        """Generated ids -> text (stops at the first </s>). `kwargs` go to the LLM tokenizer's
        ``decode``; ``skip_special_tokens`` defaults to True (the answer's text only)."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        kwargs.setdefault("skip_special_tokens", True)
        return self.ltok.decode(ids, **kwargs).strip()

    # -- batching ----------------------------------------------------------------------------
    def batch_text(self, encoded: list[EncodedSample], train: bool) -> dict[str, torch.Tensor]:
        """Pad a batch. Training: prompt + answer, right-padded, labels -100 outside the answer.
        Generation (`train=False`): prompts only, left-padded (the next token follows the prompt)."""
        qlen = max(len(e.qformer_ids) for e in encoded)
        qids = torch.full((len(encoded), qlen), self.qformer_pad_id, dtype=torch.long)
        qmask = torch.zeros_like(qids)
        for b, e in enumerate(encoded):
            qids[b, : len(e.qformer_ids)] = torch.tensor(e.qformer_ids)
            qmask[b, : len(e.qformer_ids)] = 1
        seqs = [e.prompt + e.answer if train else e.prompt for e in encoded]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        out = {"qformer_input_ids": qids, "qformer_attention_mask": qmask, "input_ids": ids, "attention_mask": mask}
        if train:
            labels = torch.full_like(ids, -100)
            for b, (e, s) in enumerate(zip(encoded, seqs, strict=True)):
                ids[b, : len(s)] = torch.tensor(s)
                mask[b, : len(s)] = 1
                labels[b, len(e.prompt) : len(s)] = torch.tensor(e.answer, dtype=torch.long)
            out["labels"] = labels
        else:
            for b, s in enumerate(seqs):
                ids[b, width - len(s) :] = torch.tensor(s)
                mask[b, width - len(s) :] = 1
        return out
