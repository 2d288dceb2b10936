"""Training output directories, and loading a model from one (``--model DIR``).

``OUTPUT/`` after `sam-fast train`::

    run.json        where the frozen base comes from, the SAM config overrides, the training options
    base/           the initial model (only for built-in configurations such as ``tiny``, whose random
                    frozen weights exist nowhere else; real runs reference the base directory instead)
    tokenizer/      qformer/ and llm/ tokenizers (local files)
    log.jsonl       one record per step
    checkpoints/    trainable tensors + resume state (sam_fast.train.checkpoint)

`load_model_dir` accepts such a directory (newest checkpoint, or one named), a checkpoint directory
inside it, a full SAM directory (`save_pretrained`), a trainable-delta directory, or an HF
InstructBLIP directory; tokenizers come from the same place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sam_fast import SAM, SAMConfig
from sam_fast.data import PromptBuilder, load_tokenizers, save_tokenizers, tiny_tokenizers
from sam_fast.train import checkpoint as ckpt

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
    if name != "tiny":
        raise ValueError(f"unknown built-in configuration {name!r}; known: {BUILTIN_CONFIGS}")
    return tiny_tokenizers()


def prepare_run_dir(output: str | os.PathLike, model: SAM, tokenizers, base: dict, train_config: dict) -> None:
    """Write run.json, base/ (built-in bases only) and tokenizer/ once; a resumed run keeps them."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.is_file():
        return
    if base["kind"] == "builtin":
        model.save_pretrained(out / "base")
    save_tokenizers(*tokenizers, out)
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps({"base": base, "train": train_config}, indent=1))
    os.replace(tmp, run_file)


def _from_base(run_dir: Path, base: dict, **load_kwargs) -> SAM:
    if base["kind"] == "builtin":
        return SAM.from_pretrained(run_dir / "base", **load_kwargs)
    path = base["path"]
    overrides = base.get("overrides", {})
    if Path(path, "config.json").is_file() and json.loads(Path(path, "config.json").read_text()).get(
            "model_type") == "sam_fast":
        return SAM.from_pretrained(path, **load_kwargs)
    return SAM.from_instructblip(path, **overrides, **load_kwargs)


def load_model_dir(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None, **load_kwargs):
    """(model, (qformer_tokenizer, llm_tokenizer), description) from any directory `--model` accepts."""
    path = Path(path)
    if (path / ckpt.TRAINABLE_FILE).is_file() and (path / ckpt.STATE_FILE).is_file():
        checkpoint, path = path, path.parent.parent  # a checkpoint inside a run directory
    if (path / "run.json").is_file():
        run = json.loads((path / "run.json").read_text())
        model = _from_base(path, run["base"], **load_kwargs)
        ck = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(path / "checkpoints")
        what = f"{path} (base only: no checkpoint yet)"
        if ck is not None:
            trainable, state = ckpt.load_checkpoint(ck)
            ckpt.load_trainable_into(model, trainable)
            what = f"{path} at step {state['step']} ({ck.name})"
        return model.eval(), load_tokenizers(path), what
    if (path / "config.json").is_file() or (path / "sam_delta.json").is_file():
        cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if cfg.get("model_type") in (None, "sam_fast") or (path / "sam_delta.json").is_file():
            model = SAM.from_pretrained(path, **load_kwargs)
        else:
            model = SAM.from_instructblip(path, **load_kwargs)
        return model.eval(), load_tokenizers(path), str(path)
    raise FileNotFoundError(f"{path}: not a training output (run.json), a checkpoint, a SAM directory or an "
                            f"HF InstructBLIP directory (config.json)")


def prompt_builder(model: SAM, tokenizers) -> PromptBuilder:
    return PromptBuilder.for_model(model.config, *tokenizers)
