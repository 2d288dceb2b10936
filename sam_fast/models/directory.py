"""Loading a model from a directory (``--model DIR`` of generate / eval / explain / train), and the
built-in configurations.

`load_model_dir` accepts a training output directory (its newest intact checkpoint, or one named),
a checkpoint directory inside one, a full SAM directory (`save_pretrained`), a trainable-delta
directory, or an HF InstructBLIP directory; the tokenizers come from the same place. Only
safetensors, JSON and tokenizer files are read from a run directory: nothing in it is unpickled.
The run directory's layout is described in `sam_fast.train.outputs`; it is opened by
`sam_fast.models.run_dir` (shared with `SAM.from_pretrained`), its checkpoints read with
`sam_fast.models.checkpoint_files` (the file format): nothing here imports `sam_fast.train`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sam_fast.config import SAMConfig, read_config_file
from sam_fast.data import PromptBuilder, load_tokenizers, tiny_tokenizers
from sam_fast.models.run_dir import load_run, run_location
from sam_fast.models.sam import SAM

BUILTIN_CONFIGS = ("tiny",)


def build_builtin(name: str, seed: int = 0, **overrides) -> SAM:
    """A built-in configuration with random frozen weights (seeded). For ``tiny`` the query tokens are
    drawn N(0, 0.5): HF zero-initialises them, which would make every query of a random model equal."""
    if name != "tiny":
        raise ValueError(f"unknown built-in configuration {name!r}; known: {BUILTIN_CONFIGS}")
    torch.manual_seed(seed)
    model = SAM(SAMConfig.tiny(**overrides))
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.5)
    return model


def builtin_tokenizers(name: str):
    """(qformer_tokenizer, llm_tokenizer) of built-in configuration `name`."""
    if name != "tiny":
        raise ValueError(f"unknown built-in configuration {name!r}; known: {BUILTIN_CONFIGS}")
    return tiny_tokenizers()


def load_model_dir(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None, **load_kwargs):
    """(model, (qformer_tokenizer, llm_tokenizer), description) from any directory `--model` accepts."""
    path = Path(path)
    found = run_location(path)
    if found is not None:
        run, named = found
        model, what = load_run(SAM, run, checkpoint if checkpoint is not None else named, **load_kwargs)
        return model, load_tokenizers(run), what
    if (path / "config.json").is_file() or (path / "sam_delta.json").is_file():
        cfg = read_config_file(path / "config.json") if (path / "config.json").is_file() else {}
        if cfg.get("model_type") in (None, "sam_fast") or (path / "sam_delta.json").is_file():
            model = SAM.from_pretrained(path, **load_kwargs)
        else:
            model = SAM.from_instructblip(path, **load_kwargs)
        return model.eval(), load_tokenizers(path), str(path)
    raise FileNotFoundError(f"{path}: not a training output (run.json), a checkpoint, a SAM directory or an "
                            f"HF InstructBLIP directory (config.json)")


def prompt_builder(model: SAM, tokenizers) -> PromptBuilder:
    """The `PromptBuilder` of `model` with its (qformer_tokenizer, llm_tokenizer)."""
    return PromptBuilder.for_model(model.config, *tokenizers)
