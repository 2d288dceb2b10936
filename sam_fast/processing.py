"""`SAMProcessor`: images + instructions (+ answers) -> every input `SAM.forward` / `SAM.generate` take.

    >>> processor = SAMProcessor.from_pretrained("path/to/sam")            # doctest: +SKIP
    >>> inputs = processor(images=[[img_a, img_b], [img_c]], text=["What do {image#1} and {image#2} share?",
    ...                                                              "Describe {image#1}."])  # doctest: +SKIP
    >>> answers = processor.batch_decode(model.generate(**inputs))       # doctest: +SKIP

The processor is a thin front over the pieces the training and evaluation code use, so that a batch
built here is the batch `sam-fast train` / `sam-fast eval` would build from the same images and text:

- images: `SAMImageProcessor` = `sam_fast.data.transforms.EvalTransform` (bicubic resize to the
  vision tower's size, CLIP normalisation);
- text: `sam_fast.data.tokenization.PromptBuilder` (Q-former ids cut on the left to ``max_txt_len``;
  ``num_query_tokens`` image placeholders per image, ``</s>`` + instruction, answer + ``</s>``);
- batching: `sam_fast.data.dataset.Collator` (images sample-major, ``image_counts``; right-padded with
  labels when answers are given, left-padded prompts for generation otherwise).

A SAM folder can hold the model and its processor side by side: ``model.save_pretrained(d)`` writes
``config.json``, the weights and ``generation_config.json``; ``processor.save_pretrained(d)`` writes
``processor_config.json``, the LLM tokenizer's files at the top and the Q-former tokenizer under
``qformer_tokenizer/`` (the layout of an HF InstructBLIP folder, which `load_tokenizers` reads too).
`SAMProcessor.from_pretrained` reads such a folder, and also builds a processor from a SAM or HF
InstructBLIP folder that has no SAM ``processor_config.json`` (from its ``config.json`` and
tokenizers). Nothing is downloaded.
"""

from __future__ import annotations

import inspect
import numbers
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin

from sam_fast._text import bounded_repr
from sam_fast.config import (
    MAX_IMAGE_SIZE,
    MAX_QUERY_TOKENS,
    MAX_VOCAB,
    ConfigError,
    check_config_dict,
    read_config_file,
)
from sam_fast.data.dataset import EMPTY_OUTPUT, Collator, DataError, model_inputs, text_problem
from sam_fast.data.paths import refuse_code_in
from sam_fast.data.tokenization import PromptBuilder, image_reference_problem, load_tokenizers
from sam_fast.data.transforms import EvalTransform

PROCESSOR_FILE = "processor_config.json"
QFORMER_SUBFOLDER = "qformer_tokenizer"

MAX_TEXT_TOKENS = 1 << 20  # max_txt_len / max_output_txt_len (released: 128 / 256)
# (low, high, null allowed) of the processor's settings: a saved file is checked before anything is built
_SETTINGS = {"num_query_tokens": (1, MAX_QUERY_TOKENS, False), "image_token_index": (0, MAX_VOCAB, False),
             "max_txt_len": (1, MAX_TEXT_TOKENS, False), "max_output_txt_len": (1, MAX_TEXT_TOKENS, False),
             "llm_vocab_size": (1, MAX_VOCAB, True), "qformer_vocab_size": (1, MAX_VOCAB, True)}


def _check_int(where: str, key: str, value, low: int, high: int, nullable: bool = False) -> None:
    """`ConfigError` naming `where`, `key` and (a bounded repr of) `value` unless it is an integer in [low, high]."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ConfigError(f"{where}: {key} = {bounded_repr(value)}: expected an integer in [{low}, {high}]")


def _check_settings(settings: dict, where: str) -> None:
    for key, (low, high, nullable) in _SETTINGS.items():
        if key in settings:
            _check_int(where, key, settings[key], low, high, nullable)


def as_pil_image(image) -> Image.Image:
    """A PIL image from a PIL image, a numpy array or a torch tensor.

    Arrays: ``[H, W]`` (grey), ``[H, W, C]`` or ``[C, H, W]`` with C in (1, 3, 4) (RGBA loses its
    alpha); dtype uint8 (0..255), uint16 (0..65535, scaled to 8 bits as 16-bit files are) or floating
    point with values in [0, 1].

    Raises:
        ValueError: any other type, shape, dtype or value range, or a PIL image that cannot be
            loaded (closed, truncated); the message says which.
    """
    if isinstance(image, Image.Image):
        try:  # a closed (or truncated) image fails here, where the caller names it, not in a batch transform
            image.load()
        except (ValueError, OSError) as e:
            raise ValueError(f"cannot be read ({type(e).__name__}: {e})") from e
        if 0 in image.size:
            raise ValueError(f"has no pixels ({image.size[0]}x{image.size[1]})")
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"is a {type(image).__name__}, not a PIL image, numpy array or torch tensor")
    arr = image
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # channels first -> last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise ValueError(f"is an array of shape {tuple(image.shape)}; expected [H, W], [H, W, C] or [C, H, W] "
                         f"with C in (1, 3, 4)")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"is a {arr.dtype} array with values outside [0, 1] (or NaN): floating-point images "
                             f"must lie in [0, 1]; pass uint8 for 0..255 values")
        arr = np.rint(arr * 255.0).astype(np.uint8)
    elif arr.dtype == np.uint16:  # 16-bit pixels scaled to 8 bits, as 16-bit image files are
        arr = np.rint(arr / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"is a {arr.dtype} array; expected uint8 (0..255), uint16 (0..65535) or floating point "
                         "in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(arr))


class SAMImageProcessor(ImageProcessingMixin):
    """Images -> ``pixel_values`` [T, 3, size, size] float32: `EvalTransform` (bicubic resize to
    size x size, CLIP normalisation), images in the order given.

    Args:
        size: the vision tower's input size in pixels (``config.vision_config.image_size``: 224 for
            InstructBLIP-Vicuna-7B).
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 224, **kwargs):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        _check_int(type(self).__name__, "size", size, 1, MAX_IMAGE_SIZE)  # pixels: 100000 would need 120 GB
        self.size = int(size)

    def __call__(self, images, **kwargs) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors: str | None = "pt") -> BatchFeature:
        """A flat list of images (PIL, arrays or tensors, see `as_pil_image`) -> BatchFeature with
        ``pixel_values`` [T, 3, size, size] (float32 torch tensor).

        Raises:
            ValueError: naming ``images[k]`` for an image that cannot be read.
        """
        _check_return_tensors(return_tensors)
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        transform = EvalTransform(self.size)
        pixels = []
        for k, image in enumerate(images):
            try:
                pixels.append(transform(as_pil_image(image)))
            except ValueError as e:
                raise ValueError(f"images[{k}] {e}") from e
        if not pixels:
            raise ValueError("no images given")
        return BatchFeature({"pixel_values": torch.stack(pixels)})


def _check_return_tensors(return_tensors) -> None:
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors={return_tensors!r}: SAMProcessor returns torch tensors only ('pt')")


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor))


def _check_call_options(kwargs: dict, return_tensors) -> None:
    """`SAMProcessor.__call__`'s keyword options: padding=True / "longest" only (what HF pipelines
    pass: batches are always padded), no unknown keyword, torch tensors."""
    if kwargs.get("padding", True) in (True, "longest"):  # what HF pipelines pass: batches are always padded
        kwargs.pop("padding", None)
    if kwargs:
        raise TypeError(f"SAMProcessor got unexpected keyword argument(s) {sorted(kwargs)}; it takes images, "
                        f"text, answers, image_counts, return_tensors and padding=True")
    _check_return_tensors(return_tensors)


def _pil_images(per_sample: list[list], texts: list[str]) -> list:
    """Every image as PIL, sample-major, once each instruction's image references are checked
    against its image count."""
    flat = []
    for i, imgs in enumerate(per_sample):
        for j, image in enumerate(imgs):
            try:
                flat.append(as_pil_image(image))
            except ValueError as e:
                raise ValueError(f"images[{i}][{j}] (sample {i}, image {j}) {e}") from e
    for i, (imgs, instruction) in enumerate(zip(per_sample, texts, strict=True)):
        problem = image_reference_problem(instruction, len(imgs), f"sample {i}")
        if problem:
            raise ValueError(f"text[{i}]: {problem}")
    return flat


class SAMProcessor(ProcessorMixin):
    """Images + instructions (+ answers) -> the inputs of `SAM.forward` / `SAM.generate`, as a BatchFeature.

    Holds an image processor (`SAMImageProcessor`), the LLM tokenizer (``tokenizer``) and the
    Q-former tokenizer (``qformer_tokenizer``; its ``truncation_side`` is set to ``"left"``, as the
    released code cuts the Q-former text). Build one with `for_model` (a model or its config plus the
    two tokenizers) or `from_pretrained` (a folder).

    Args:
        image_processor: a `SAMImageProcessor` (its ``size`` = the vision tower's image size).
        tokenizer: the LLM (LLaMA / Vicuna) tokenizer.
        qformer_tokenizer: the Q-former (BERT) tokenizer.
        num_query_tokens: Q, the visual tokens per image (``config.num_query_tokens``: 32 at full size).
        image_token_index: the placeholder id filled by visual tokens (``config.image_token_index``).
        max_txt_len: instruction length limit in tokens (Q-former text; LLM instruction in training).
        max_output_txt_len: answer length limit in tokens (answer + ``</s>`` keeps at most this - 1).
        llm_vocab_size, qformer_vocab_size: the model's vocabulary sizes, checked against the
            tokenizers when given (`for_model` gives them).

    Raises:
        ValueError: the placeholder id equals a special token of the LLM tokenizer, or a tokenizer
            is larger than the model's vocabulary.
    """

    def __init__(self, image_processor, tokenizer, qformer_tokenizer, num_query_tokens: int = 32,
                 image_token_index: int = 32001, max_txt_len: int = 128, max_output_txt_len: int = 256,
                 llm_vocab_size: int | None = None, qformer_vocab_size: int | None = None, **kwargs):
        _check_settings(dict(num_query_tokens=num_query_tokens, image_token_index=image_token_index,
                             max_txt_len=max_txt_len, max_output_txt_len=max_output_txt_len,
                             llm_vocab_size=llm_vocab_size, qformer_vocab_size=qformer_vocab_size), type(self).__name__)
        qformer_tokenizer.truncation_side = "left"
        self.num_query_tokens, self.image_token_index = int(num_query_tokens), int(image_token_index)
        self.max_txt_len, self.max_output_txt_len = int(max_txt_len), int(max_output_txt_len)
        self.llm_vocab_size = None if llm_vocab_size is None else int(llm_vocab_size)
        self.qformer_vocab_size = None if qformer_vocab_size is None else int(qformer_vocab_size)
        super().__init__(image_processor, tokenizer, qformer_tokenizer, **kwargs)
        self._prompt_builder(check_vocab=True)  # refuses a bad placeholder id or too-large tokenizers now

    def _prompt_builder(self, check_vocab: bool = False) -> PromptBuilder:
        # built per call (cheap) so that the processor's state stays its saved settings
        sizes = dict(llm_vocab_size=self.llm_vocab_size, qformer_vocab_size=self.qformer_vocab_size) \
            if check_vocab else {}
        return PromptBuilder(self.qformer_tokenizer, self.tokenizer, self.num_query_tokens, self.image_token_index,
                             max_txt_len=self.max_txt_len, max_output_txt_len=self.max_output_txt_len, **sizes)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model_or_config, qformer_tokenizer, llm_tokenizer, **kwargs) -> SAMProcessor:
        """A processor for a `SAM` (or its `SAMConfig`) and its (Q-former, LLM) tokenizers, in the
        order `sam_fast.data.load_tokenizers` returns them; `kwargs` override ``max_txt_len`` /
        ``max_output_txt_len``."""
        config = getattr(model_or_config, "config", model_or_config)
        return cls(SAMImageProcessor(size=config.vision_config.image_size), llm_tokenizer, qformer_tokenizer,
                   num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_index,
                   llm_vocab_size=config.text_config.vocab_size,
                   qformer_vocab_size=config.qformer_config.vocab_size, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SAMProcessor:
        """Load from a local folder (never downloads).

        - A folder written by `save_pretrained` (``processor_config.json`` of a SAMProcessor).
        - Otherwise a SAM folder (``model.save_pretrained``) or an HF InstructBLIP folder: the
          settings come from its ``config.json``, the tokenizers from the folder
          (`sam_fast.data.load_tokenizers`).

        `kwargs` override saved settings (``max_txt_len``, ...); tokenizer-loading keyword arguments
        are passed to `AutoTokenizer.from_pretrained`.

        Raises:
            FileNotFoundError: not a folder, or neither a processor nor a model config in it.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a folder (SAMProcessor.from_pretrained reads local folders only)")
        refuse_code_in(path)
        settings = [p for p in inspect.signature(cls.__init__).parameters if p not in (
            "self", "image_processor", "tokenizer", "qformer_tokenizer", "kwargs")]
        overrides = {k: kwargs.pop(k) for k in settings if k in kwargs}
        saved, file = {}, os.path.join(path, PROCESSOR_FILE)
        if os.path.lexists(file):
            saved = read_config_file(file)  # a JSON object from a regular file, or a one-line ConfigError
        if saved.get("processor_class") == cls.__name__:
            kwargs.setdefault("local_files_only", True)
            if kwargs.setdefault("trust_remote_code", False):
                raise ValueError("SAMProcessor.from_pretrained: trust_remote_code=True is refused (sam_fast never "
                                 "loads code from a folder)")
            image_settings = saved.get("image_processor", {})
            if not isinstance(image_settings, dict):
                raise ConfigError(f"{file}: image_processor = {bounded_repr(image_settings)}: expected an object")
            init = {k: saved[k] for k in settings if k in saved}
            _check_settings(init, file)  # before a tokenizer loads or a batch is sized from them
            if "size" in image_settings:
                _check_int(file, "image_processor.size", image_settings["size"], 1, MAX_IMAGE_SIZE)
            _check_against_model(path, file, {**init, **overrides}, image_settings.get("size"))
            image_processor = SAMImageProcessor(**image_settings)
            llm_tok = AutoTokenizer.from_pretrained(path, **kwargs)
            q_tok = AutoTokenizer.from_pretrained(os.path.join(path, QFORMER_SUBFOLDER), **kwargs)
            return cls(image_processor, llm_tok, q_tok, **{**init, **overrides})
        return cls.for_model(_config_of_folder(path), *load_tokenizers(path), **overrides)

    # -- calling -----------------------------------------------------------------------------
    def __call__(self, images=None, text=None, answers=None, image_counts=None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        """Build a batch.

        Args:
            images: per sample, a list of its images (``[[a, b], [c]]``: sample 0 has two images);
                a flat list is one image per sample (or split by `image_counts`), one image a
                batch of one. Images: PIL, numpy arrays or torch tensors (see `as_pil_image`).
            text: the instructions, one string per sample (a string: a batch of one). Refer to
                images as ``{image#1}``, ``{image#2}``, ...; the placeholders are inserted here.
            answers: optional target answers, one per sample: the batch is then a training batch
                (right-padded, with ``labels``); without them it is a generation batch (prompts
                left-padded).
            image_counts: optional images per sample when `images` is a flat list (default: one
                per sample; with `text` a single string, all of them belong to that one sample).
            return_tensors: ``"pt"`` (or None): torch tensors.
            padding: True or ``"longest"`` only (what HF pipelines pass): batches are always padded
                to their longest sample.

        Returns:
            BatchFeature with (B samples, T = sum of image counts, S / L token widths)
            ``pixel_values`` [T, 3, size, size] float32 (sample-major), ``image_counts`` [B] long,
            ``qformer_input_ids`` / ``qformer_attention_mask`` [B, L] long, ``input_ids`` /
            ``attention_mask`` [B, S] long (``num_query_tokens`` x image count placeholders first), and
            with answers ``labels`` [B, S] long (-100 except the answer and its ``</s>``) and
            ``pack_plan`` (the `sam_fast.data.PackPlan` of the packed training step: the forward then
            reads nothing back from the device). Pass it as ``model(**batch)`` /
            ``model.generate(**batch)``; ``batch.to(device)`` moves its tensors (the forward moves
            the plan's to the batch's device).

        Raises:
            ValueError: one line naming the sample index (or image index) of bad input: counts of
                image lists, texts and answers that differ, a sample without images, a non-string
                text, an unreadable (or closed) image, an instruction holding ``<image>`` text or
                referring to an image its sample lacks (``{image#2}`` with one image), an over-long
                text, a text holding a lone surrogate.
            TypeError: an unknown keyword argument.
        """
        _check_call_options(kwargs, return_tensors)
        per_sample, texts, outs = self._samples(images, text, answers, image_counts)
        flat = _pil_images(per_sample, texts)
        pixels = self.image_processor(flat)["pixel_values"]
        items, start = [], 0
        for i, (imgs, instruction, answer) in enumerate(zip(per_sample, texts, outs, strict=True)):
            items.append({"id": i, "pixel_values": pixels[start : start + len(imgs)], "instruction": instruction,
                          "output": answer})
            start += len(imgs)
        try:
            batch = Collator(self._prompt_builder(), train=answers is not None)(items)
        except DataError as e:  # "sample id 3: ..." -> the sample's index
            raise ValueError(str(e).replace("sample id ", "sample ", 1)) from e
        return BatchFeature(model_inputs(batch))

    def _samples(self, images, text, answers, image_counts) -> tuple[list[list], list[str], list]:
        """(images per sample, instructions, answers or Nones) of a `__call__`, their counts and
        texts checked."""
        if images is None or text is None:
            raise ValueError("SAMProcessor needs both images and text (one instruction per sample)")
        texts = _as_list(text, "text")
        if not texts:
            raise ValueError("text is empty: a batch needs at least one sample")
        if isinstance(text, str) and image_counts is None and isinstance(images, (list, tuple)) and images \
                and all(_is_image(x) for x in images):
            images = [images]  # one instruction: a flat list holds its images (as HF multi-image processors read it)
        per_sample = self._split_images(images, image_counts)
        if len(per_sample) != len(texts):
            first = min(len(per_sample), len(texts))
            has, lacks = ("an image list", "text") if len(per_sample) > len(texts) else ("a text", "image list")
            raise ValueError(f"got {len(per_sample)} image lists but {len(texts)} texts: sample {first} has {has} "
                             f"but no {lacks} (one image list and one text per sample)")
        outs = [None] * len(texts)
        if answers is not None:
            outs = _as_list(answers, "answers")
            if len(outs) != len(texts):
                first = min(len(outs), len(texts))
                raise ValueError(f"got {len(outs)} answers for {len(texts)} texts: sample {first} has "
                                 f"{'a text but no answer' if len(outs) < len(texts) else 'an answer but no text'}")
        for name, values in (("text", texts), ("answers", outs if answers is not None else [])):
            for i, value in enumerate(values):
                if not isinstance(value, str):
                    raise ValueError(f"{name}[{i}] is a {type(value).__name__}, not a string")
                problem = text_problem("instruction" if name == "text" else "output", value)
                if name == "answers" and not problem and not value.strip():
                    problem = EMPTY_OUTPUT
                if problem:
                    raise ValueError(f"{name}[{i}]: {problem}")
        return per_sample, texts, outs

    @staticmethod
    def _split_images(images, image_counts) -> list[list]:
        """Images per sample (see `__call__`)."""
        if _is_image(images):
            images = [images]
        if isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list (per sample: a list of images, or one image), "
                             f"got {type(images).__name__}")
        if image_counts is not None:
            if isinstance(image_counts, torch.Tensor):
                image_counts = image_counts.tolist()
            counts = list(image_counts)
            for i, c in enumerate(counts):
                if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
                    raise ValueError(f"image_counts[{i}] = {c!r}: every sample needs a positive integer count")
            if not all(_is_image(x) for x in images):
                raise ValueError("image_counts splits a flat list of images; got nested image lists")
            if sum(counts) != len(images):
                raise ValueError(f"image_counts sum to {sum(counts)} but {len(images)} images were given")
            starts = np.cumsum([0, *counts]).tolist()
            return [list(images[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        out = []
        for i, entry in enumerate(images):
            if _is_image(entry):
                out.append([entry])
            elif isinstance(entry, (list, tuple)):
                if not entry:
                    raise ValueError(f"images[{i}] is empty: sample {i} needs at least one image")
                out.append(list(entry))
            else:
                raise ValueError(f"images[{i}] is a {type(entry).__name__}, not an image or a list of images")
        return out

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, ids, **kwargs) -> str:
        """Generated ids [S] of one sample -> its answer (up to the first ``</s>``, specials dropped).

        Keyword arguments are the LLM tokenizer's (``skip_special_tokens``, default True here;
        ``clean_up_tokenization_spaces``, ...), so code written for HF processors runs unchanged."""
        return self._prompt_builder().decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids, **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """`SAM.generate`'s output [B, S_new] -> B answers (see `decode`, which gets `kwargs`)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        pb = self._prompt_builder()
        return [pb.decode(ids, **kwargs) for ids in sequences]

    @property
    def model_input_names(self) -> list[str]:
        """The keys a call returns (``labels`` and ``pack_plan`` only with answers)."""
        return ["pixel_values", "image_counts", "qformer_input_ids", "qformer_attention_mask", "input_ids",
                "attention_mask", "labels", "pack_plan"]


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    return list(value)


def _model_config_file(path: str) -> tuple[str, dict] | None:
    """(file, checked effective sizes) of a SAM or HF InstructBLIP config.json in folder `path`; None when the
    folder has none (a processor saved on its own, or next to something else)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return None
    raw = read_config_file(cfg_file)
    if raw.get("model_type") not in ("sam_fast", "instructblip") and "vision_config" not in raw:
        return None
    return cfg_file, check_config_dict(raw, cfg_file)


def _check_against_model(path: str, file: str, settings: dict, size) -> None:
    """`ConfigError` when the saved processor's query tokens or image size differ from the model's config.json
    beside it: its batches would hold another number of placeholders per image (or other pixels) than the model
    fills, found only after building them (1e8 query tokens: a batch of gigabytes)."""
    found = _model_config_file(path)
    if found is None:
        return
    cfg_file, model = found
    for key, ours, theirs in (("num_query_tokens", settings.get("num_query_tokens"), model[""]["num_query_tokens"]),
                              ("image_processor.size", size, model["vision_config"].get("image_size"))):
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(f"{file}: {key} = {bounded_repr(ours)} differs from the model's {theirs} ({cfg_file})")


def _config_of_folder(path: str):
    """The SAMConfig of a SAM or HF InstructBLIP folder (its config.json)."""
    from transformers import InstructBlipConfig

    from sam_fast.config import SAMConfig

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no {PROCESSOR_FILE} of a SAMProcessor and no config.json (a SAM or HF "
                                f"InstructBLIP folder) to build one from")
    raw = read_config_file(cfg_file)
    check_config_dict(raw, cfg_file)  # before InstructBlipConfig builds anything from it
    model_type = raw.get("model_type")
    if model_type == SAMConfig.model_type:
        return SAMConfig.from_pretrained(path)
    return SAMConfig.from_instructblip_config(InstructBlipConfig.from_pretrained(path))


def _register_auto_processor() -> None:
    """`AutoProcessor.from_pretrained` of a SAM folder (``model_type: sam_fast``) gives a `SAMProcessor`
    rather than the bare LLM tokenizer it would find there: pipelines and HF examples build their
    inputs through it."""
    from transformers import AutoProcessor

    from sam_fast.config import SAMConfig

    AutoProcessor.register(SAMConfig, SAMProcessor, exist_ok=True)


_register_auto_processor()
