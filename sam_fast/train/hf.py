"""Training SAM with HF `transformers.Trainer`: `SAMTrainer`, whose checkpoints hold only the
trainable parameters.

A plain `Trainer` saves the whole model at every checkpoint (about 16 GB at the full size in
float16, of which 17 MB are trained). `SAMTrainer` writes each checkpoint (and `save_model`'s
output) as a trainable delta instead: ``config.json``, ``sam_delta.safetensors`` (the four
trainable modules only) and ``sam_delta.json`` naming the base directory the frozen weights are
read back from. `SAM.from_pretrained(checkpoint)` (or ``AutoModel.from_pretrained``) loads it over
that base, ``base=`` overrides it; ``trainer.train(resume_from_checkpoint=...)`` and
``load_best_model_at_end`` read it back into the model being trained. Optimizer, scheduler and
RNG states are saved as by `Trainer` (the optimizer only holds the trainable parameters).

    >>> from transformers import TrainingArguments
    >>> from sam_fast.train.hf import SAMTrainer
    >>> model = SAM.from_instructblip("instructblip-vicuna-7b")                # doctest: +SKIP
    >>> trainer = SAMTrainer(model=model, args=TrainingArguments("out", max_steps=1000, report_to=[]),
    ...                      train_dataset=dataset, data_collator=collator)   # doctest: +SKIP
    >>> trainer.train()                                                       # doctest: +SKIP
    >>> SAM.from_pretrained("out/checkpoint-1000")                            # doctest: +SKIP

Single process or DDP (the model is not sharded). Needs the ``accelerate`` package, as `Trainer`
does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from sam_fast._text import bounded_repr
from sam_fast.models.loading import DELTA_WEIGHTS_NAME, is_trainable_delta_dir

__all__ = ["SAMTrainer", "BOOKKEEPING_KEYS", "load_trainable_tensors"]

# Keys of `sam_fast.data.dataset.Collator` batches that are not model inputs (sample ids, reference
# answers); dropped before the forward when `remove_unused_columns=False` leaves them in.
BOOKKEEPING_KEYS = ("ids", "outputs")


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP / DataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def _refuse_peft(model) -> None:
    """PEFT (LoRA) adapters live outside SAM's trainable modules, so a trainable-only checkpoint would
    silently drop them (and their renamed layers would not load back): refuse such a model."""
    for name, module in model.named_modules():
        if type(module).__module__.split(".", 1)[0] == "peft":
            raise ValueError(
                f"SAMTrainer: the model holds PEFT modules ({type(module).__name__} at {bounded_repr(name or '<root>')}); "
                "its checkpoints keep only SAM's trainable modules and would lose the adapters: train a PEFT model "
                "with transformers.Trainer (which saves the adapters), or merge them first (merge_and_unload())"
            )


def _refuse_untracked_trainable(model) -> None:
    """A parameter that trains but is not in the trainable delta would be lost at every save."""
    kept = set(model.trainable_state_dict())
    lost = [n for n, p in model.named_parameters() if p.requires_grad and n not in kept]
    if lost:
        raise ValueError(
            f"SAMTrainer: {len(lost)} parameter(s) require grad outside SAM's trainable modules "
            f"({bounded_repr(lost[:3])}{' ...' if len(lost) > 3 else ''}) and would be missing from its checkpoints: "
            "call model.freeze_backbone(), or train with transformers.Trainer"
        )


class SAMTrainer(Trainer):
    """`transformers.Trainer` for `sam_fast.SAM` that saves trainable-only checkpoints.

    Args:
        *args, **kwargs: as `Trainer` (``model`` must be a `SAM`).
        base_reference: the directory the frozen weights are read back from when a saved
            checkpoint is loaded (an HF InstructBLIP, SAM or delta directory), recorded in each
            checkpoint's ``sam_delta.json`` as an absolute path (so a checkpoint loads from any
            working directory, and after being copied elsewhere). Default: the directory the model
            was loaded from (``model.name_or_path``).

    Raises:
        ValueError: the model is not a SAM, holds PEFT (LoRA) modules or parameters that train
            outside SAM's trainable modules (a trainable-only checkpoint would lose them), no base
            directory is known, or the Trainer shards the model (FSDP / DeepSpeed: a
            trainable-only save is not supported there).
    """

    def __init__(self, *args, base_reference: str | os.PathLike | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        _refuse_peft(self.model)  # first: a PeftModel forwards SAM's methods, so the checks below pass it
        model = _unwrap(self.model)
        if not hasattr(model, "save_trainable_delta") or not hasattr(model, "trainable_state_dict"):
            raise ValueError(f"SAMTrainer: model must be a sam_fast.SAM, got {type(model).__name__}")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("SAMTrainer: FSDP / DeepSpeed shard the model; trainable-only checkpoints need an "
                             "unsharded model (use Trainer and save_only_model, or sam-fast train)")
        if base_reference is None:
            name = getattr(model, "name_or_path", "") or ""
            if not (name and os.path.isdir(name)):
                raise ValueError(
                    "SAMTrainer: base_reference= is needed (the directory a checkpoint's frozen weights are read "
                    f"back from); the model was not loaded from a directory (name_or_path={name!r})"
                )
            base_reference = name
        if not os.path.isdir(base_reference):
            raise ValueError(f"SAMTrainer: base_reference {bounded_repr(os.fspath(base_reference))} is not a directory "
                             "(the checkpoints' frozen weights are read back from it)")
        # absolute: a checkpoint must load from any working directory and after being copied elsewhere
        self.base_reference = str(Path(base_reference).resolve())
        _refuse_untracked_trainable(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss` without the Collator's bookkeeping keys (`BOOKKEEPING_KEYS`)."""
        inputs = {k: v for k, v in inputs.items() if k not in BOOKKEEPING_KEYS}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the trainable delta (plus processor and training arguments) into `output_dir`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if state_dict is not None:
            raise ValueError("SAMTrainer: a gathered state_dict was passed to _save (sharded training); "
                             "trainable-only checkpoints need an unsharded model")
        _refuse_untracked_trainable(_unwrap(self.model))  # unfrozen after __init__: refuse, do not drop it
        os.makedirs(output_dir, exist_ok=True)
        _unwrap(self.model).save_trainable_delta(output_dir, self.base_reference)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: a trainable-delta checkpoint loads its tensors into the model being trained."""
        if not is_trainable_delta_dir(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainable_tensors(_unwrap(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and is_trainable_delta_dir(best):
            load_trainable_tensors(_unwrap(self.model), best)
            return
        super()._load_best_model()


def load_trainable_tensors(model, directory) -> None:
    """Copy the tensors of the trainable delta in `directory` into `model` (a SAM) in place.

    Raises:
        ValueError: naming the file when its tensors are not exactly the model's trainable ones
            or a shape differs.
    """
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(directory), DELTA_WEIGHTS_NAME)
    delta = load_file(path)
    own = model.trainable_state_dict()
    if sorted(delta) != sorted(own):
        missing, extra = sorted(set(own) - set(delta)), sorted(set(delta) - set(own))
        raise ValueError(f"{path}: tensors differ from the model's trainable ones (missing {missing}, extra {extra})")
    bad = [k for k in own if tuple(delta[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {[(k, tuple(delta[k].shape), tuple(own[k].shape)) for k in bad]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(delta[k].to(device=v.device, dtype=v.dtype))
