"""The ``sam-fast`` command line.

    sam-fast train    --config tiny|FILE --data DIR --output OUT [--resume] [...]   train SAM's 4.3M parameters
    sam-fast generate --model DIR --images a.jpg b.jpg --prompt "..."             answer one multi-image prompt
    sam-fast eval     --model DIR --data DIR --output OUT                         pred.json + metrics.json
    sam-fast cache-features --model M --data DIR --output CACHE                   frozen ViT outputs, once
    sam-fast explain  --model DIR (--images a b ... | --data DIR) --output OUT    Adaptive Adjustment weights as PNGs
    sam-fast bench    [-k EXPR] [--json FILE] [--plan] [--update-docs]           the pytest-benchmark suite (bench/)
    sam-fast demo     [--steps N] [--batch B] [--seed S]                          the tiny SAM end to end on a CPU
    sam-fast synthesize --sources DIR --output DIR --inpaint-model SD --caption-model M (--text-model LM | --text-url URL)
                                                                                  MmLINK-style training data
    sam-fast env                                                                  versions, devices, extension, op backends
    sam-fast export   RUN OUT                                                     a run as a standalone SAM folder
    sam-fast init     tiny OUT [--seed S]                                         a tiny random SAM folder (model + processor)
    sam-fast convert  llava|vist|hf-disk SRC [--images DIR] --output OUT          other data formats -> annotations.json

Options come from built-in defaults, then a config file (`--config FILE`, JSON or YAML), then the
command line: the command line wins. `--config tiny` selects the built-in tiny configuration.
Data parallel training: ``torchrun --nproc_per_node N -m sam_fast.cli train ...`` (add ``--fsdp`` to
shard the frozen LLM over the processes); data parallel evaluation: ``torchrun ... -m sam_fast.cli eval ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sam_fast.config import CONTEXT_MODES, GUIDANCE_MODES

if TYPE_CHECKING:
    from sam_fast.train.trainer import TrainConfig

# train options that the command line can override: flag -> (TrainConfig field, type, help)
TRAIN_FLAGS = {
    "batch_size": (int, "samples per micro-batch per process (paper: 20 in all)"),
    "max_steps": (int, "optimiser steps"),
    "save_every": (int, "checkpoint every N steps (and at the end)"),
    "keep_last": (int, "keep only the newest K checkpoints"),
    "seed": (int, "seed of the data order, augmentations and (built-in configs) the random backbone"),
    "lr": (float, "peak learning rate (paper: 2e-5)"),
    "warmup_steps": (int, "linear warm-up steps (paper: 240)"),
    "weight_decay": (float, "AdamW weight decay on >= 2-D weights (paper: 0.05)"),
    "grad_accum": (int, "micro-batches per optimiser step"),
    "clip_grad_norm": (float, "gradient-norm clipping (0 disables)"),
    "amp": (str, "mixed precision (fp16 with a grad scaler)"),
    "dtype": (str, "dtype of the frozen ViT, Q-former and LLM weights (default fp32); the trainable modules, "
                   "their optimiser state and the checkpoints stay fp32, and bf16/fp16 run the forward under "
                   "autocast in that dtype (--amp, if given, must name the same)"),
    "log_every": (int, "write a log.jsonl record every N steps"),
    "num_workers": (int, "data loader processes reading, augmenting and collating batches ahead of the step "
                         "(0, the default: in the training process); any number gives the same run"),
    "prefetch_factor": (int, "micro-batches each loader process prepares ahead (default 2)"),
    "cpu_threads": (int, "intra-op threads while training on a CPU (default 1: the step's small products gain "
                         "nothing from more, and spinning threads slow a busy machine down; 0: torch's default)"),
    "eval_every": (int, "every N optimiser steps and at the last, checkpoint, generate on --eval-data (lavis, the "
                        "model's generation settings) and log ROUGE_L/CIDEr/Bleu_4 to log.jsonl, --report-to and "
                        "OUTPUT/eval_history.json (a resumed run appends to it)"),
    "eval_data": (str, "held-out annotations.json folder for --eval-every (every image checked before the first "
                       "step)"),
    "eval_limit": (int, "evaluate only the first K samples of --eval-data"),
    "eval_max_new_tokens": (int, "new tokens per answer in those evaluations (default: the model's generation "
                                 "config, the paper's 255)"),
}
AMP_CHOICES = ("none", "bf16", "fp16")
DTYPE_CHOICES = ("bf16", "fp16", "fp32")
FLAG_CHOICES = {"amp": AMP_CHOICES, "dtype": DTYPE_CHOICES}
REPORT_TO_CHOICES = ("tensorboard", "wandb")
PERFORMANCE_DOC = "docs/performance.md"  # where `sam-fast bench --update-docs` writes the Speed table
# train options a config file may hold besides TRAIN_FLAGS (and the other TrainConfig fields)
TRAIN_FILE_KEYS = ("model", "data", "output", "features", "skip_bad", "context_mode", "guidance", "interaction_layers",
                   "fsdp", "no_packing", "model_overrides", "report_to")
MODEL_HELP = ("the model: a training output (sam-fast train --output), one of its checkpoints, a SAM directory or an "
              "HF InstructBLIP directory")


def _load_config_file(spec: str | None) -> dict:
    if spec is None or spec == "tiny":
        return {"model": "tiny"} if spec == "tiny" else {}
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"sam-fast: --config {spec!r} is neither 'tiny' nor an existing JSON/YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except UnicodeDecodeError as e:
        raise SystemExit(f"sam-fast: --config {spec} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise SystemExit(f"sam-fast: --config {spec} is nested too deeply to be an options file") from None
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: one line, no traceback
        what = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        msg = " ".join(str(e).split())
        raise SystemExit(f"sam-fast: --config {spec} is not valid {what}: {msg[:300]}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"sam-fast: {spec} must hold a mapping of options, got {type(data).__name__}")
    overrides = data.get("model_overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise SystemExit(f"sam-fast: {spec}: model_overrides must be a mapping of SAMConfig fields, "
                         f"got {type(overrides).__name__} {overrides!r:.80}")
    return data


def _merge(args: argparse.Namespace, file_opts: dict, keys) -> dict:
    """File options overridden by explicitly given command-line options."""
    out = dict(file_opts)
    for k in keys:
        v = getattr(args, k, None)
        if v is not None and v is not False:
            out[k] = v
    return out


def _positive(kind: type, what: str, rule: str):
    """An argparse type: `kind(text)` that is > 0 and finite, else a one-line usage error."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (v > 0 and v != float("inf")):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _positive(int, "an integer", "a positive integer (>= 1)")
_positive_float = _positive(float, "a number", "a finite number > 0")


OUTSIDE_HELP = ("read img_list paths that leave the dataset folder (absolute paths, '..', symlinks to elsewhere); "
                "refused by default")


def _batch_size_or_auto(text: str):
    """argparse type: ``auto`` or a positive integer."""
    return "auto" if text == "auto" else _positive_int(text)


def _gen_kwargs(args) -> dict:
    kw = {"generation_mode": getattr(args, "generation_mode", None) or "lavis"}
    for k in ("num_beams", "max_new_tokens", "repetition_penalty", "length_penalty"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return kw


# -- commands ---------------------------------------------------------------------------------
def _cmd_env(args: argparse.Namespace) -> int:
    from sam_fast import env

    print(env.report())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sam_fast import demo

    kwargs = {k: getattr(args, k) for k in ("steps", "batch", "seed") if getattr(args, k) is not None}
    demo.main(**kwargs)
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    """Write a built-in model with random weights, its tokenizers and its processor into one folder:
    what `SAM.from_pretrained`, `SAMProcessor.from_pretrained`, the Auto classes and ``--model`` read,
    so that the examples run without the 7B weights. Written beside OUT and renamed into place, so
    OUT is never left half written; a non-empty OUT is refused, nothing in it is touched."""
    import shutil
    import tempfile

    from sam_fast import SAMProcessor
    from sam_fast.models.directory import build_builtin, builtin_tokenizers

    out = Path(args.output)
    if out.exists() and not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        what = "a folder that is not empty" if out.is_dir() else "not a folder"
        raise SystemExit(f"sam-fast init: {out} is {what}; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = build_builtin(args.config, seed=args.seed)
        model.save_pretrained(tmp)
        # the processor writes the LLM tokenizer at the top and the Q-former's in qformer_tokenizer/
        SAMProcessor.for_model(model, *builtin_tokenizers(args.config)).save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); fails, keeping what appeared there since, if not
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{args.config} SAM ({sum(p.numel() for p in model.parameters()):,} parameters, random weights), its "
          f"tokenizers and processor -> {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    """Convert SRC (a LLaVA or VIST JSON file, a saved HF dataset) into an annotations.json folder."""
    from sam_fast.data import DataError
    from sam_fast.data import formats

    common = {"overwrite": args.overwrite, "skip_missing": args.skip_missing, "skip_bad": args.skip_bad,
              "progress": not args.no_progress}
    try:
        if args.format == "hf-disk":
            if args.images is not None or args.no_copy:
                raise SystemExit("sam-fast convert: hf-disk writes the dataset's own images; --images and --no-copy "
                                 "are for llava and vist")
            ds = formats.load_hf_disk(args.src, args.split)
            columns = {f"{c}_column": getattr(args, f"{c}_column") for c in ("image", "instruction", "output", "id")}
            report = formats.convert_hf(ds, args.output, source=args.src, **columns, **common)
        elif args.format == "llava":
            report = formats.convert_llava(args.src, args.output, args.images, turns=args.turns,
                                           copy_images=not args.no_copy, **common)
        else:
            report = formats.convert_vist(args.src, args.output, args.images, instruction=args.instruction,
                                          text_field=args.text_field, copy_images=not args.no_copy, **common)
    except DataError as e:
        raise SystemExit(f"sam-fast convert: {e}") from None
    print(report.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    locks: list = []  # the run directory's lock, once taken; released however training ends
    try:
        return _cmd_train_locked(args, locks)
    finally:
        for lock in locks:
            lock.release()


@dataclasses.dataclass
class _TrainPlan:
    """What `sam-fast train` resolved from the config file and the command line, checked."""

    model_src: str
    data_dir: str
    output: str
    features: str | None
    skip_bad: bool
    overrides: dict  # SAMConfig fields of the model to build or load
    tcfg: TrainConfig  # validated


def _cmd_train_locked(args: argparse.Namespace, locks: list) -> int:
    import torch

    from sam_fast.train import init_from_env

    plan = _train_plan(args)
    dist = init_from_env(args.device)
    _check_fsdp(plan, dist)
    _claim_run_dir(args, plan, dist, locks)
    model, tokenizers, base = _train_model(plan, dist)
    torch.manual_seed(plan.tcfg.seed)
    ds = _train_dataset(args, plan, model)
    eval_ds = _eval_dataset(args, plan, model)
    data_info = {"path": str(Path(plan.data_dir).resolve()),
                 "features": str(Path(plan.features).resolve()) if plan.features else None}
    run_info = {"base": base, "data": data_info, "model": _model_info(plan, model)}
    if _check_before_writing(args, plan, dist, run_info, len(ds)):
        return 0  # resumed at max_steps: nothing to train, nothing written
    _prepare_run(args, plan, dist, model, tokenizers, run_info)
    trainer = _make_trainer(plan, dist, model, tokenizers, ds, run_info, eval_ds)
    return _run_trainer(args, plan, dist, trainer, ds)


def _train_options(args: argparse.Namespace, train_config: type) -> dict:
    """The config file's options overridden by the command line's; unknown keys and a missing
    --data/--output are one-line errors."""
    file_opts = _load_config_file(args.config)
    known = {f.name for f in dataclasses.fields(train_config)} - {"output_dir", "progress"} | set(TRAIN_FILE_KEYS)
    unknown = sorted((k for k in file_opts if k not in known and k != "config"), key=str)
    if unknown:
        raise SystemExit(f"sam-fast train: --config {args.config}: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    opts = _merge(args, file_opts,
                  ["model", "data", "output", "features", "skip_bad", "context_mode", "guidance", "fsdp",
                   "no_packing", "report_to", *TRAIN_FLAGS])
    for k in ("data", "output"):
        if not opts.get(k):
            raise SystemExit(f"sam-fast train: --{k} is required (or `{k}` in the config file)")
    return opts


def _train_plan(args: argparse.Namespace) -> _TrainPlan:
    """Resolve and check every train option before anything is built or written."""
    from sam_fast.train import TrainConfig, outputs

    opts = _train_options(args, TrainConfig)
    model_src = opts.pop("model", None)
    if not model_src:
        raise SystemExit("sam-fast train: --model is required (or `model` in the config file): the pretrained "
                         "InstructBLIP or SAM directory to train from, or a training output; --model tiny (or "
                         "--config tiny) trains the built-in tiny model with random weights")
    data_dir, output, skip_bad = opts.pop("data"), opts.pop("output"), bool(opts.pop("skip_bad", False))
    features = opts.pop("features", None)
    overrides = _train_model_overrides(opts)
    opts.pop("config", None)
    if isinstance(opts.get("report_to"), str):  # report_to: tensorboard
        opts["report_to"] = [opts["report_to"]]
    opts.setdefault("dtype", "fp32")  # recorded in run.json: a resume must name the same
    if opts.get("eval_data"):  # recorded in run.json: a resume from another folder reads the same data
        opts["eval_data"] = str(Path(opts["eval_data"]).resolve())
    try:
        tcfg = TrainConfig.from_dict({**opts, "output_dir": str(output), "progress": not args.no_progress})
        tcfg.validate()  # before anything is built or written
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sam-fast train: {e}") from None
    if args.resume and args.overwrite:
        raise SystemExit("sam-fast train: give either --resume (continue the run in --output) or --overwrite "
                         "(replace it), not both")
    if model_src not in outputs.BUILTIN_CONFIGS and not Path(model_src).exists():  # before OUTPUT is touched
        raise SystemExit(f"sam-fast train: --model {model_src}: no such directory (give an HF InstructBLIP or SAM "
                         "directory, a training output or one of its checkpoints, or tiny)")
    return _TrainPlan(model_src, data_dir, output, features, skip_bad, overrides, tcfg)


def _train_model_overrides(opts: dict) -> dict:
    """Pop the SAMConfig overrides (--context-mode, --guidance, model_overrides, --no-packing) from `opts`."""
    overrides = {k: opts.pop(k) for k in ("context_mode", "guidance", "interaction_layers") if k in opts}
    overrides.update(opts.pop("model_overrides", {}) or {})
    bad = _unknown_model_overrides(overrides)
    if bad:
        raise SystemExit(f"sam-fast train: unknown model override(s) {', '.join(map(repr, bad))} (model_overrides "
                         "takes SAMConfig fields, e.g. context_mode, guidance, interaction_layers, packed_loss)")
    if opts.pop("no_packing", False):
        overrides["packed_loss"] = False
    return overrides


def _check_fsdp(plan: _TrainPlan, dist) -> None:
    if plan.tcfg.fsdp and not dist.enabled:
        raise SystemExit("sam-fast train: --fsdp shards the LLM over several processes, but this is a single "
                         "process: launch with `torchrun --nproc_per_node N -m sam_fast.cli train ... --fsdp` "
                         "(N >= 2), or drop --fsdp (and `fsdp` from the config file)")


def _claim_run_dir(args: argparse.Namespace, plan: _TrainPlan, dist, locks: list) -> None:
    """Lock OUTPUT (main process); refuse a folder that is not empty and holds no sam_fast run, a run already
    there unless --resume or --overwrite, and --resume with no run to resume."""
    from sam_fast.train import outputs

    _check_run_dir(args, plan)  # before the lock creates OUTPUT
    if dist.is_main:  # one process at a time per run directory
        try:
            locks.append(outputs.RunLock(plan.output).acquire())
        except outputs.RunLockedError as e:
            raise SystemExit(f"sam-fast train: {e}") from None
        _check_run_dir(args, plan)  # again, now that no other process can change it


def _check_run_dir(args: argparse.Namespace, plan: _TrainPlan) -> None:
    from sam_fast.train import outputs

    if Path(plan.output).exists() and not Path(plan.output).is_dir():
        raise SystemExit(f"sam-fast train: --output {plan.output} is a file, not a folder: choose an empty or new folder")
    existing = outputs.existing_run(plan.output)
    if existing:
        if not args.resume and not args.overwrite:
            raise SystemExit(f"sam-fast train: {plan.output} already holds a training run ({', '.join(existing)}): "
                             "pass --resume to continue it or --overwrite to replace it, or choose another --output")
        return
    if args.resume:
        raise SystemExit(f"sam-fast train: --resume: {plan.output} holds no checkpoint (no training run to resume): "
                         "drop --resume to start a new run")
    other = outputs.foreign_entries(plan.output)
    if other:
        raise SystemExit(f"sam-fast train: --output {plan.output} is not empty and holds no sam_fast training run "
                         f"({outputs.describe(other)}); the run would write run.json, base/, tokenizer/, log.jsonl "
                         "and checkpoints/ there: choose an empty or new folder")


def _train_model(plan: _TrainPlan, dist):
    """(model on the process's device, its frozen weights in --dtype, tokenizers, the run's `base` record)."""
    from sam_fast.models.precision import cast_frozen
    from sam_fast.train import outputs

    if plan.model_src in outputs.BUILTIN_CONFIGS:
        try:  # model_overrides are checked by SAMConfig (sizes, types) before anything is built
            model = outputs.build_builtin(plan.model_src, plan.tcfg.seed, **plan.overrides)
        except ValueError as e:
            raise SystemExit(f"sam-fast train: model_overrides: {' '.join(str(e).split())[:300]}") from None
        tokenizers = outputs.builtin_tokenizers(plan.model_src)
        base = {"kind": "builtin", "name": plan.model_src, "seed": plan.tcfg.seed, "overrides": plan.overrides}
    else:
        model, tokenizers, _ = _load_model("train", plan.model_src)
        base = {"kind": "pretrained", "path": str(Path(plan.model_src).resolve()), "overrides": plan.overrides}
    cast_frozen(model, plan.tcfg.dtype)  # before the move: the device gets the smaller copy
    model.to(dist.device)
    return model, tokenizers, base


def _train_dataset(args: argparse.Namespace, plan: _TrainPlan, model):
    """The training samples: cached features (--features) or images with the train transform."""
    from sam_fast.data import AnnotationDataset, DataError, TrainTransform

    try:
        if plan.features:
            from sam_fast.data.feature_cache import CachedFeatureDataset, StaleCacheError

            try:
                return CachedFeatureDataset(plan.data_dir, plan.features, model, skip_bad=plan.skip_bad,
                                            seed=plan.tcfg.seed, allow_outside_paths=args.allow_outside_paths,
                                            train=True)
            except StaleCacheError as e:
                raise SystemExit(f"sam-fast train: {e}") from None
        return AnnotationDataset(plan.data_dir, TrainTransform(model.config.vision_config.image_size),
                                 skip_bad=plan.skip_bad, seed=plan.tcfg.seed,
                                 allow_outside_paths=args.allow_outside_paths)
    except DataError as e:
        raise SystemExit(f"sam-fast train: {e}") from None


def _eval_dataset(args: argparse.Namespace, plan: _TrainPlan, model):
    """The --eval-data samples of --eval-every (None without), opened now: a bad record or image is one line
    naming the file before anything is written or trained."""
    if not plan.tcfg.eval_every:
        return None
    from sam_fast.data import DataError
    from sam_fast.train.validation import open_eval_dataset

    try:
        return open_eval_dataset(plan.tcfg.eval_data, model, plan.tcfg.eval_limit,
                                 allow_outside_paths=args.allow_outside_paths)
    except DataError as e:
        raise SystemExit(f"sam-fast train: --eval-data: {e}") from None


def _model_info(plan: _TrainPlan, model) -> dict:
    """The model settings the run is tied to (run.json's "model")."""
    from sam_fast.train import outputs

    return outputs.model_settings(model, plan.overrides)


def _check_before_writing(args: argparse.Namespace, plan: _TrainPlan, dist, run_info: dict, n_samples: int) -> bool:
    """Everything that would stop the run, checked before OUTPUT is written to (a refusal leaves it as it
    was): the global batch against the data, and under --resume `_check_resume`. True when there is
    nothing to train."""
    from sam_fast.train import trainer

    try:
        trainer.check_batch_fits(plan.tcfg, dist.world_size, n_samples)
    except ValueError as e:
        raise SystemExit(f"sam-fast train: {e}") from None
    return bool(args.resume) and _check_resume(plan, dist, run_info)


def _check_resume(plan: _TrainPlan, dist, run_info: dict) -> bool:
    """Refuse --resume with other settings than run.json's or the checkpoint's own record (which also
    holds when run.json is missing), another global batch, or a checkpoint past --max-steps. True, said
    in one line, when the run already is at --max-steps."""
    from sam_fast.train import outputs, trainer

    has_run_json = (Path(plan.output) / "run.json").is_file()
    hint = (f"resume with the run's settings, start a new run from its weights (--model {plan.output} --output "
            "NEW_DIR), or replace it (--overwrite)" if has_run_json
            else "resume with the run's settings, or start a new run in another --output")
    try:
        diffs = outputs.resume_differences(plan.output, run_info["base"], run_info["data"], run_info["model"],
                                           plan.tcfg.seed, plan.tcfg.dtype)
    except outputs.RunDirectoryError as e:
        raise SystemExit(f"sam-fast train: --resume: {e}") from None
    if diffs:
        raise SystemExit(f"sam-fast train: --resume with settings that differ from "
                         f"{Path(plan.output) / 'run.json'} ({'; '.join(diffs)}): {hint}")
    try:
        point = trainer.resume_point(plan.tcfg, dist.world_size, run_info)
    except trainer.ResumeSettingsError as e:
        raise SystemExit(f"sam-fast train: --resume with settings that differ from {e.path} ({'; '.join(e.diffs)}): "
                         f"{hint}") from None
    except ValueError as e:  # CheckpointError included
        raise SystemExit(f"sam-fast train: --resume: {e}") from None
    if point is None or point[1] < plan.tcfg.max_steps:
        return False
    if dist.is_main:
        print(f"sam-fast train: {plan.output} is already at step {point[1]} = --max-steps {plan.tcfg.max_steps} "
              f"({point[0].name}): nothing to train; raise --max-steps to continue it", file=sys.stderr)
    return True


def _prepare_run(args: argparse.Namespace, plan: _TrainPlan, dist, model, tokenizers, run_info: dict) -> None:
    """(main process) write run.json, base/, tokenizer/ (after `_check_before_writing`); under --overwrite
    first remove the previous run's own files, naming those kept."""
    from sam_fast.train import outputs

    if not dist.is_main:
        return
    try:
        kept = outputs.prepare_run_dir(plan.output, model, tokenizers, run_info["base"], plan.tcfg.to_dict(),
                                       data=run_info["data"], model_config=run_info["model"],
                                       overwrite=args.overwrite)
    except outputs.RunDirectoryError as e:
        raise SystemExit(f"sam-fast train: {'--overwrite: ' if args.overwrite else ''}{e}") from None
    if kept:
        print(f"sam-fast train: --overwrite kept {len(kept)} file(s) in {plan.output} that the run did not write: "
              f"{outputs.describe(kept)}", file=sys.stderr)


def _make_trainer(plan: _TrainPlan, dist, model, tokenizers, ds, run_info: dict, eval_ds=None):
    """The `Trainer`; under --fsdp the main process prints how the LLM was sharded."""
    from sam_fast.train import Trainer, outputs

    try:
        trainer = Trainer(model, ds, outputs.prompt_builder(model, tokenizers), plan.tcfg, dist, run_info=run_info,
                          eval_dataset=eval_ds)
    except ValueError as e:
        raise SystemExit(f"sam-fast train: {e}") from None
    if trainer.fsdp is not None:
        from sam_fast.train.distributed import gather_objects

        held = gather_objects(trainer.fsdp["llm_local_parameters"], dist)
        if dist.is_main:
            f = trainer.fsdp
            print(f"fsdp: language_model sharded over {f['world_size']} processes; LLM parameters held per rank "
                  f"{held} of {f['llm_parameters']} (replicated: {', '.join(f['replicated'])})", flush=True)
    return trainer


def _run_trainer(args: argparse.Namespace, plan: _TrainPlan, dist, trainer, ds) -> int:
    """Train; a non-finite loss, an interruption or a damaged checkpoint becomes the exit status / one line."""
    from sam_fast.train import CheckpointError, NonFiniteLossError, RunDirectoryError, TrainingInterrupted

    try:
        res = trainer.train(resume=args.resume)
    except NonFiniteLossError as e:
        print(f"sam-fast train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: the step finished and was checkpointed
        if dist.is_main:
            print(f"sam-fast train: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second signal: no checkpoint of the step in progress
        if dist.is_main:
            from sam_fast.train.checkpoint import latest_checkpoint

            print(f"sam-fast train: interrupted; not saved since the newest checkpoint "
                  f"{latest_checkpoint(Path(plan.output) / 'checkpoints')}", file=sys.stderr)
        return 130
    except (CheckpointError, RunDirectoryError) as e:
        raise SystemExit(f"sam-fast train: {e}") from None
    if dist.is_main:
        _print_train_result(res, trainer, ds)
    return 0


def _print_train_result(res, trainer, ds) -> None:
    first = res.losses[0] if res.losses else float("nan")
    print(f"trained to step {res.step} in {res.seconds:.1f} s; loss {first:.4f} -> "
          f"{res.losses[-1] if res.losses else float('nan'):.4f}; checkpoint {res.checkpoint}")
    if res.skipped:
        print(f"{ds.skipped.summary()}" + (f"; {trainer.collator.dropped} undecodable item(s) dropped"
                                          if trainer.collator.dropped else ""))
    if res.evals:
        m = res.evals[-1]["metrics"]
        print(f"eval at step {res.evals[-1]['step']} ({m['num_samples']} samples): ROUGE_L {m['ROUGE_L']:.2f}  "
              f"CIDEr {m['CIDEr']:.2f}  Bleu_4 {m['Bleu_4']:.2f}; {len(res.evals)} evaluation(s) this run -> "
              f"{trainer.validation.path}")


def _unknown_model_overrides(overrides: dict) -> list[str]:
    """Keys of `overrides` that are no SAMConfig field (a typo would otherwise be stored and ignored)."""
    import inspect

    from sam_fast import SAMConfig

    cfg = SAMConfig.tiny()
    params = set(inspect.signature(SAMConfig.__init__).parameters)
    return sorted((k for k in overrides if not isinstance(k, str) or (k not in params and not hasattr(cfg, k))),
                  key=str)


def _load_model(cmd: str, model_dir, dtype: str | None = None):
    """`load_model_dir(model_dir)` with its frozen weights cast to `dtype` (`cast_frozen`; None: as
    loaded), a damaged checkpoint (`CheckpointError`), a missing or unrecognised directory, a damaged
    weight or JSON file, or another loading error turned into one line ``sam-fast CMD: ...``."""
    from sam_fast.models.directory import load_model_dir
    from sam_fast.models.precision import cast_frozen

    try:
        model, tokenizers, what = load_model_dir(model_dir)
    except RecursionError:
        raise SystemExit(f"sam-fast {cmd}: --model {model_dir}: a JSON file in it is nested too deeply to be a "
                         "config (damaged?)") from None
    except Exception as e:  # CheckpointError is a ValueError; FileNotFoundError an OSError; safetensors' and
        # transformers' errors for damaged weight files (SafetensorError, RuntimeError) name no folder
        msg = " ".join(str(e).split())[:400] or type(e).__name__
        if not isinstance(e, (ValueError, OSError)):
            msg = f"cannot load it ({type(e).__name__}: {msg})"
        if str(model_dir) not in msg:
            msg = f"--model {model_dir}: {msg}"
        raise SystemExit(f"sam-fast {cmd}: {msg}") from None
    if dtype is not None:
        cast_frozen(model, dtype)
    return model, tokenizers, what


def _cmd_generate(args: argparse.Namespace) -> int:
    from sam_fast.data import DataError
    from sam_fast.eval import answer
    from sam_fast.models.directory import prompt_builder
    from sam_fast.models.generation import GenerationSettingError
    from sam_fast.models.precision import autocast

    model, tokenizers, _ = _load_model("generate", args.model, args.dtype)
    if args.device:
        model.to(args.device)
    for p in args.images:
        if not Path(p).is_file():
            raise SystemExit(f"sam-fast generate: image {p} does not exist")
    try:
        with autocast(model):
            text = answer(model, prompt_builder(model, tokenizers), args.images, args.prompt, **_gen_kwargs(args))
    except (DataError, GenerationSettingError) as e:  # an unreadable image, a prompt holding <image>, a setting
        # refused (the model folder's generation_config.json max_length shorter than the prompt in "hf" mode)
        raise SystemExit(f"sam-fast generate: {str(e).removeprefix('generate: ')}") from None
    print(text)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import os

    from sam_fast.data import DataError
    from sam_fast.data.feature_cache import StaleCacheError
    from sam_fast.distributed import DistInfo, init_from_env
    from sam_fast.eval import evaluate
    from sam_fast.models.directory import prompt_builder
    from sam_fast.models.generation import GenerationSettingError
    from sam_fast.models.precision import autocast

    dist = None
    if args.device or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one share of the samples per rank
        dist = init_from_env(args.device)
    model, tokenizers, what = _load_model("eval", args.model, args.dtype)
    if dist is not None:
        model.to(dist.device)
    batch_size = args.batch_size
    if batch_size == "auto":
        from sam_fast.eval.runner import eval_batch_size

        gen = model.generation_config
        batch_size, why = eval_batch_size(model.config, args.num_beams or gen.num_beams or 1,
                                          args.max_new_tokens or gen.max_new_tokens or 256,
                                          next(model.parameters()).device,
                                          next(model.language_model.parameters()).element_size())
        print(f"batch size: {why}")
    try:
        with autocast(model):
            m = evaluate(model, args.data, prompt_builder(model, tokenizers), args.output,
                         batch_size=batch_size, skip_bad=args.skip_bad, progress=not args.no_progress,
                         limit=args.limit, features=args.features, dist=dist,
                         allow_outside_paths=args.allow_outside_paths, model_name=str(args.model),
                         **_gen_kwargs(args))
    except (DataError, StaleCacheError, GenerationSettingError) as e:
        raise SystemExit(f"sam-fast eval: {e}") from None
    if not (dist or DistInfo()).is_main:
        return 0
    print(f"model {what}; {m['num_samples']} samples"
          + (f" ({m['skipped']} bad sample(s) skipped)" if m["skipped"] else "")
          + (f"; generated on {len(m['samples_per_rank'])} processes: {m['samples_per_rank']} samples"
             if "samples_per_rank" in m else ""))
    print(f"ROUGE_L {m['ROUGE_L']:.2f}  CIDEr {m['CIDEr']:.2f}  Bleu_4 {m['Bleu_4']:.2f}  -> {args.output}/metrics.json")
    return 0


def _cmd_cache_features(args: argparse.Namespace) -> int:
    from sam_fast.data import DataError
    from sam_fast.data.feature_cache import (
        CacheDtypeError,
        CacheOutputError,
        build_feature_cache,
        check_replaceable,
        size_summary,
    )
    from sam_fast.models import directory

    try:
        check_replaceable(args.output)  # before the model loads
    except CacheOutputError as e:
        raise SystemExit(f"sam-fast cache-features: {e}") from None
    if args.model in directory.BUILTIN_CONFIGS:
        model = directory.build_builtin(args.model, args.seed)
    else:
        model, _, _ = _load_model("cache-features", args.model)
    if args.device:
        model.to(args.device)
    try:
        m = build_feature_cache(model.eval(), args.data, args.output, batch_size=args.batch_size,
                                dtype=args.dtype, skip_bad=args.skip_bad, views=args.views, seed=args.seed,
                                progress=not args.no_progress, allow_outside_paths=args.allow_outside_paths)
    except (DataError, CacheOutputError, CacheDtypeError) as e:
        raise SystemExit(f"sam-fast cache-features: {e}") from None
    what = "eval-transform view" if m["views"] == 1 else f"augmented views (seed {m['seed']})"
    print(f"cached {len(m['images'])} images x {m['views']} {what} as [{m['P']}, {m['D']}] {m['dtype']} features in "
          f"{args.output} (vision model {m['vision_fingerprint']}, transform {m['transform']})")
    print(f"size: {size_summary(m['size'])}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sam_fast.data import DataError, load_records
    from sam_fast.data.paths import UniqueNames
    from sam_fast.eval.explain import explain_sample

    if (args.images is None) == (args.data is None):
        raise SystemExit("sam-fast explain: give either --images or --data")
    model, _, what = _load_model("explain", args.model)
    out = Path(args.output)
    if args.images:
        png = out if out.suffix == ".png" else out / "explain.png"
        jobs = [(png, args.images)]
    else:
        try:
            records, _ = load_records(args.data, require_output=False, allow_outside_paths=args.allow_outside_paths)
        except DataError as e:
            raise SystemExit(f"sam-fast explain: {e}") from None
        names = UniqueNames()  # ids are data: one safe file-name component each, never two samples on one file
        jobs = [(out / names.name(r.id, "sample_", ".png"), r.images) for r in records[: args.limit]]
    for png, images in jobs:
        explain_sample(model, images, png, tile=args.tile)
        print(png)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    if args.plan:  # analytic, no source tree needed
        from sam_fast.bench_plan import plan_table

        print(plan_table())
        return 0
    repo = Path(__file__).resolve().parent.parent
    bench = repo / "bench"
    if not bench.is_dir():
        raise SystemExit("sam-fast bench: the benchmarks live in the source tree (bench/), which an installed wheel "
                         "does not have; run it from a checkout installed with `pip install -e .`")
    if args.json is None:  # as `make bench`: bench/results/<device>-<date>.json
        import datetime

        sys.path.insert(0, str(bench))
        from benchutil import device_name

        args.json = str(bench / "results" / f"{device_name().replace(' ', '_')}-{datetime.date.today()}.json")
    # one pytest per benchmark file, merged into one JSON (a file's memory state moves another's ratios)
    cmd = [sys.executable, str(bench / "run.py"), f"--json={args.json}"]
    if args.k:
        cmd += ["-k", args.k]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    print(" ".join(cmd))
    rc = subprocess.call(cmd, cwd=repo)
    if rc == 0:  # markdown table and PNG plots beside the JSON; the docs' Speed block only on request
        doc = ["--doc", str(repo / PERFORMANCE_DOC)] if args.update_docs else []
        rc = subprocess.call([sys.executable, str(bench / "report.py"), args.json, *doc], cwd=repo)
    if rc == 0:
        where = Path(args.json).resolve().parent
        print(f"sam-fast bench: results in {where} ({Path(args.json).name}, its .md table and PNG plots)"
              + (f"; {PERFORMANCE_DOC}'s Speed table updated" if args.update_docs else
                 f"; {PERFORMANCE_DOC} untouched (--update-docs rewrites its Speed table)"))
    return rc


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from sam_fast.synthesis import SynthesisError

    if (args.text_model is None) == (args.text_url is None):
        raise SystemExit("sam-fast synthesize: give one text writer: --text-model DIR (a local causal LM) or "
                         "--text-url URL (an OpenAI-compatible endpoint, with --text-api-model)")
    if args.segmenter == "sam" and not args.sam_model:
        raise SystemExit("sam-fast synthesize: --segmenter sam needs --sam-model DIR (a local Segment Anything "
                         "model), or use --segmenter threshold for clean-background sources")
    try:
        synth = _build_synthesizer(args)
        res = synth.run(args.sources, args.output, limit=args.limit, progress=not args.no_progress)
    except SynthesisError as e:
        raise SystemExit(f"sam-fast synthesize: {e}") from None
    except KeyboardInterrupt as e:
        print(f"sam-fast synthesize: interrupted; the finished samples are in {args.output} (manifest.jsonl, "
              f"annotations.json): rerun the same command to continue", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    why = ", ".join(f"{k} {v}" for k, v in sorted(res.drop_reasons.items()))
    redone = f", {res.redone} made again: a source image changed" if res.redone else ""
    print(f"synthesized {res.kept + res.dropped} sample(s) ({res.resumed} done before{redone}): kept {res.kept}, "
          f"dropped {res.dropped}{f' ({why})' if why else ''}; {res.kept_total} of {res.planned} in {res.annotations}")
    return 0


def _build_synthesizer(args: argparse.Namespace):
    """The `Synthesizer` of the synthesize options: filters, compositor, prompts, then the models
    (segmenter, inpainter, captioner, text writer) in that order; a bad one raises SynthesisError."""
    import torch

    from sam_fast.synthesis import (
        DiffusersInpainter,
        FilterConfig,
        RandomCompositor,
        SAMCaptioner,
        SamSegmenter,
        Synthesizer,
        ThresholdSegmenter,
        load_prompts,
    )

    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    filters = FilterConfig(min_mask_area=args.min_mask_area, max_mask_area=args.max_mask_area,
                           min_visible=args.min_visible, max_object_change=args.max_object_change,
                           max_repetition=args.max_repetition).validate()
    compositor = RandomCompositor(args.canvas_size, tuple(args.scale_range), args.max_overlap,
                                  max_outside=args.max_outside)
    prompts = load_prompts(args.prompts)
    segmenter = (SamSegmenter.from_pretrained(args.sam_model, args.sam_prompt, device=device)
                 if args.segmenter == "sam" else ThresholdSegmenter(args.threshold))
    inpainter = DiffusersInpainter.from_pretrained(args.inpaint_model, device=device, dtype=dtype,
                                                   steps=args.inpaint_steps, guidance_scale=args.guidance_scale)
    gen = {"generation_mode": "lavis", "num_beams": args.caption_beams, "max_new_tokens": args.caption_max_tokens}
    captioner = SAMCaptioner.from_pretrained(args.caption_model, device=device, dtype=dtype,
                                             prompt=args.caption_prompt, generate_kwargs=gen)
    writer = _text_writer(args, device, dtype)
    return Synthesizer(segmenter, compositor, inpainter, captioner, writer, prompts=prompts, filters=filters,
                       samples_per_group=args.samples_per_group, seed=args.seed)


def _text_writer(args: argparse.Namespace, device: str, dtype):
    """A local causal LM (--text-model) or an OpenAI-compatible endpoint (--text-url)."""
    from sam_fast.synthesis import OpenAITextWriter, TransformersTextWriter

    if args.text_model:
        return TransformersTextWriter.from_pretrained(args.text_model, device=device, dtype=dtype,
                                                      max_new_tokens=args.text_max_tokens,
                                                      do_sample=args.text_temperature > 0,
                                                      temperature=args.text_temperature or 1.0)
    return OpenAITextWriter(args.text_url, args.text_api_model, api_key_env=args.text_api_key_env,
                            max_tokens=args.text_max_tokens, temperature=args.text_temperature)


# -- parser -----------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise SystemExit(f"sam-fast export: {out} exists and is not an empty folder; export writes only into a new "
                         "or empty one")
    model, tokenizers, what = _load_model("export", args.run)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-export-{os.getpid()}-{out.name}"
    try:
        _write_standalone(model, tokenizers, staging)
        if out.is_dir():
            out.rmdir()  # still empty (checked above); refused, and nothing moved, if something came in since
        staging.rename(out)
    except OSError as e:
        raise SystemExit(f"sam-fast export: cannot write {out}: {e.strerror or e}") from None
    finally:
        if staging.exists():  # written aside so that OUT is either complete or untouched
            shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {what} to {out}: SAM.from_pretrained, SAMProcessor.from_pretrained and "
          f"`sam-fast generate --model {out}` read it")
    return 0


def _write_standalone(model, tokenizers, directory: Path) -> None:
    """The model (all its weights, config, generation config) and its processor (both tokenizers) in one folder."""
    from sam_fast.processing import SAMProcessor

    model.save_pretrained(directory)
    SAMProcessor.for_model(model, *tokenizers).save_pretrained(directory)


def _add_export_command(sub) -> None:
    """`sam-fast export`: its arguments and help."""
    p = sub.add_parser(
        "export",
        help="write a training output as a standalone SAM folder",
        description="Load RUN as --model does (a training output at its newest intact checkpoint, one of its "
        "checkpoints, a SAM or HF InstructBLIP directory) and write OUT: all weights (model.save_pretrained) and "
        "the processor with both tokenizers, which SAM.from_pretrained, SAMProcessor.from_pretrained and "
        "`sam-fast generate --model OUT` read without the run. OUT must be new or empty.",
    )
    p.add_argument("run", metavar="RUN", help=MODEL_HELP)
    p.add_argument("output", metavar="OUT", help="the folder to write (new or empty)")
    p.set_defaults(func=_cmd_export)


DTYPE_HELP = ("dtype of the frozen ViT, Q-former and LLM weights (default: as they load; fp32 for built-in models "
              "and training outputs); the trainable modules stay fp32 and bf16/fp16 generate under autocast")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the paper's: 5 beams, 255 new tokens, repetition penalty 1.5)")
    g.add_argument("--generation-mode", choices=("lavis", "hf"), default="lavis",
                   help="lavis (default): the released SAM code's decoder, reproducing its answers token for "
                        "token (transformers 4.33 beam search as LAVIS called it); hf: transformers' own generate")
    g.add_argument("--num-beams", type=_positive_int)
    g.add_argument("--max-new-tokens", type=_positive_int)
    g.add_argument("--repetition-penalty", type=_positive_float)
    g.add_argument("--length-penalty", type=float)


def _add_train_command(sub) -> None:
    """`sam-fast train`: its options and help."""
    p = sub.add_parser(
        "train",
        help="train SAM's four trainable modules (AdamW, warm-up + cosine, AMP, checkpoints, resume)",
        description="Train on an annotations.json folder with the paper's recipe (AdamW, warm-up + cosine, AMP). OUTPUT receives "
        "run.json, tokenizer/, log.jsonl (one record per step) and checkpoints/ (trainable tensors + resume "
        "state, the newest --keep-last kept). A config file (JSON/YAML) may hold any option below by its "
        "long name with underscores (e.g. batch_size: 20), plus model (tiny or a directory), "
        "model_overrides (SAMConfig fields) and data/output; flags override the file. Under torchrun each "
        "process takes --batch-size samples per micro-batch.",
    )
    p.add_argument("--config", help="'tiny' (built-in tiny model, random frozen backbone) or a JSON/YAML file")
    p.add_argument("--model", help="base model (required; or `model` in the config file): an HF InstructBLIP "
                   "directory, a SAM directory, a training output, or 'tiny' (the built-in tiny model, random weights)")
    p.add_argument("--data", help="dataset folder with annotations.json")
    p.add_argument("--output", help="output directory")
    p.add_argument("--features", help="feature cache of --data (sam-fast cache-features): train on cached ViT "
                   "outputs (eval transform, so no crop/flip augmentation)")
    _add_run_dir_flags(p)
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip bad samples (missing/corrupt images, malformed records) and report how many")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--context-mode", choices=list(CONTEXT_MODES), help="SAMConfig.context_mode")
    p.add_argument("--guidance", choices=list(GUIDANCE_MODES), help="SAMConfig.guidance")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    _add_train_step_flags(p)
    p.set_defaults(func=_cmd_train)


def _add_run_dir_flags(p: argparse.ArgumentParser) -> None:
    """train's --resume / --overwrite: what happens to a run already in OUTPUT."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT "
                   "(the losses then equal those of an uninterrupted run); refused, before anything is written, "
                   "when --data, --seed, --dtype, --model, --context-mode, --guidance or the global batch differ from "
                   "the run's run.json or checkpoint, when the checkpoint is past --max-steps, or when OUTPUT holds no run")
    p.add_argument("--overwrite", action="store_true", help="replace the training run already in OUTPUT, removing "
                   "only the files it wrote (run.json, log.jsonl, eval_history.json, checkpoints, the base/ and "
                   "tokenizer/ files "
                   "run.json lists); other files are kept and named. Without --resume or --overwrite an existing "
                   "run is refused, and a non-empty OUTPUT that holds no run always is. One process at a time "
                   "trains into OUTPUT (OUTPUT/.lock; a lock whose process is gone is taken over)")


def _add_train_step_flags(p: argparse.ArgumentParser) -> None:
    """train's --no-packing, --fsdp, --report-to and the TRAIN_FLAGS (batch size, steps, optimiser...)."""
    p.add_argument("--no-packing", action="store_true", default=None,
                   help="run the LLM on the padded batch with full logits (default: the batch's real tokens "
                   "packed into one sequence, loss without logits: same loss and gradients, faster)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the frozen LLM over the processes with FSDP2 (its parameter "
                   "memory per GPU / N; the input embeddings and the trainable modules stay replicated)")
    p.add_argument("--report-to", nargs="+", choices=REPORT_TO_CHOICES, metavar="{tensorboard,wandb}",
                   help="log the step records to TensorBoard (OUTPUT/tensorboard) and/or Weights & Biases (needs "
                   "wandb installed; set WANDB_MODE=offline to keep it local) besides OUTPUT/log.jsonl")
    for name, (typ, hlp) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=hlp,
                       **({"choices": FLAG_CHOICES[name]} if name in FLAG_CHOICES else {}))


def _add_generate_command(sub) -> None:
    """`sam-fast generate`: its options and help."""
    p = sub.add_parser(
        "generate",
        help="answer one prompt about one or more images",
        description="Load --model (a training output, a checkpoint, a SAM or HF InstructBLIP directory) and "
        "generate an answer for the images, in order, and the prompt (instruction).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--images", nargs="+", required=True, help="image files, in order")
    p.add_argument("--prompt", required=True, help='instruction, e.g. "{image#1} {image#2} what is common?"')
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    _add_generation_flags(p)
    p.set_defaults(func=_cmd_generate)


def _add_eval_command(sub) -> None:
    """`sam-fast eval`: its options and help."""
    p = sub.add_parser(
        "eval",
        help="generate for a test set and score it like the SAM paper (ROUGE_L, CIDEr, Bleu_4)",
        description="Writes OUTPUT/pred.json (sample_id, pred_response, gt_response), OUTPUT/metrics.json "
        "(ROUGE_L, CIDEr, Bleu_4, x100, as the SAM authors' scorer computes them) and OUTPUT/eval_score.json. "
        "Under torchrun (torchrun --nproc_per_node N -m sam_fast.cli eval ...) each process generates for every "
        "N-th sample with a whole copy of the model and rank 0 writes the files, the same as one process would.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="test folder with annotations.json")
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=_batch_size_or_auto, default="auto",
                   help="samples per generate() call (per process); auto (default): 8 on a CPU, on a GPU as many "
                   "as keep a decoding step memory-bound (up to 200 rows of samples x beams) and fit its free memory")
    p.add_argument("--limit", type=_positive_int, help="only the first N samples")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: under torchrun cuda:LOCAL_RANK if available, "
                   "else cpu; in one process where the model loads)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--features", help="feature cache of --data (sam-fast cache-features) to read instead of images")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--no-progress", action="store_true")
    _add_generation_flags(p)
    p.set_defaults(func=_cmd_eval)


def _add_cache_features_command(sub) -> None:
    """`sam-fast cache-features`: its options and help."""
    p = sub.add_parser(
        "cache-features",
        help="run the frozen vision model once over a dataset and store its outputs",
        description="Store the vision model's [P, D] output for every image of --data (eval transform) in "
        "safetensors shards with a manifest (model fingerprint, transform, file sizes/mtimes). train/eval "
        "--features CACHE then skip the ViT; a cache that no longer matches the model or the images is refused. "
        "--views V > 1 stores V augmented views per image instead (train transform: RandomResizedCrop + flip, "
        "drawn from (--seed, image, view)); training picks one view per image per epoch (train only).",
    )
    p.add_argument("--model", required=True, help="'tiny' (with --seed, as in train --config tiny) or a model directory")
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True, help="cache directory (an existing one is replaced only when it is a "
                   "sam_fast feature cache or empty; anything else is refused)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in model's random weights "
                   "and of the augmented views (--views > 1)")
    p.add_argument("--views", type=_positive_int, default=1, help="1 (default): one eval-transform view per image; "
                   "V > 1: V augmented (train-transform) views per image, V times the disk space")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--dtype", choices=["float16", "fp16", "bfloat16", "bf16", "float32", "fp32"], default="float16",
                   help="on-disk dtype (default float16: 2 bytes per value)")
    p.add_argument("--device")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_cache_features)


def _add_explain_command(sub) -> None:
    """`sam-fast explain`: its options and help."""
    p = sub.add_parser(
        "explain",
        help="PNGs of the Adaptive Adjustment weights: which contextual patches guided each image",
        description="For each sample, overlay on its images the per-patch softmax (over the sample's images) "
        "of the Adaptive Adjustment scores: red = this image's patch dominates the merged contextual map there.",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", help="one sample's images, in order")
    p.add_argument("--data", help="or a dataset folder: one PNG per sample, OUTPUT/sample_<id>.png (characters of an "
                   "id other than A-Z a-z 0-9 . _ - become _ and a short hash of the id is added)")
    p.add_argument("--output", required=True, help="a .png file (--images) or a directory")
    p.add_argument("--limit", type=_positive_int, help="only the first N samples of --data")
    p.add_argument("--tile", type=_positive_int, default=224, help="pixels per image in the PNG")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.set_defaults(func=_cmd_explain)


def _add_bench_command(sub) -> None:
    """`sam-fast bench`: its options and help."""
    p = sub.add_parser(
        "bench",
        help="time the ops, encode_images, a training step and generation (pytest-benchmark, bench/)",
        description="Runs the pytest-benchmark suite of a source checkout (same as `make bench`); results go "
        "to --json (stamped with device, versions and commit).",
    )
    p.add_argument("-k", help="pytest -k expression selecting benchmarks (e.g. context_reweight)")
    p.add_argument("--plan", action="store_true",
                   help="print the FLOPs of one training step by part (ViT, Q/W-former, LLM forward, LLM backward) "
                   "for the vicuna-7b config and the benchmarks' 'scaled' config side by side, then exit")
    p.add_argument("--json", help="benchmark JSON output (default: bench/results/<device>-<date>.json); a "
                   "markdown table and PNG plots are written beside it")
    p.add_argument("--update-docs", "--update-readme", dest="update_docs", action="store_true",
                   help=f"also rewrite {PERFORMANCE_DOC}'s Speed table from this run (default: left alone; "
                   "--update-readme is the former name)")
    p.set_defaults(func=_cmd_bench)


def _add_env_command(sub) -> None:
    """`sam-fast env`: its options and help."""
    p = sub.add_parser(
        "env",
        help="print versions, devices, the compiled extension and each op's backend",
        description="Print Python/torch/transformers/triton versions, CUDA devices, whether the "
        "compiled extension sam_fast._C loaded (and why not), and for each op the backend the "
        "dispatcher picks and why the others were refused. Same as `python -m sam_fast.env`.",
    )
    p.set_defaults(func=_cmd_env)


def _add_demo_command(sub) -> None:
    """`sam-fast demo`: its options and help."""
    p = sub.add_parser(
        "demo",
        help="train, generate and evaluate a tiny random SAM end to end on a CPU (no downloads)",
        description="Build the tiny SAM with random frozen weights, write a small multi-image captioning "
        "dataset, train, generate, evaluate, and print the env report (sam_fast.demo). "
        "Options left out keep the demo's defaults.",
    )
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch", type=int, help="samples per training batch")
    p.add_argument("--seed", type=int, help="random seed")
    p.set_defaults(func=_cmd_demo)


def _add_init_command(sub) -> None:
    """`sam-fast init`: its options and help."""
    from sam_fast.models.directory import BUILTIN_CONFIGS

    p = sub.add_parser(
        "init",
        help="write a tiny random SAM folder (model, tokenizers, processor) to try the examples without weights",
        description="Write a built-in configuration with random weights into OUTPUT: config.json, the weights, "
        "generation_config.json, the LLM tokenizer, qformer_tokenizer/ and processor_config.json. "
        "SAM.from_pretrained, SAMProcessor.from_pretrained, AutoModel/AutoProcessor and --model read it. "
        "OUTPUT must be new or empty.",
    )
    p.add_argument("config", choices=BUILTIN_CONFIGS, help="built-in configuration")
    p.add_argument("output", help="folder to write (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_cmd_init)


def _add_convert_command(sub) -> None:
    """`sam-fast convert`: its arguments and help."""
    from sam_fast.data.formats import FORMATS, VIST_INSTRUCTION

    p = sub.add_parser(
        "convert",
        help="turn LLaVA or VIST JSON, or a saved HF dataset, into an annotations.json dataset folder",
        description="Write OUT/annotations.json and OUT/images/ from SRC. llava: a LLaVA-style conversation "
        "file (.json list or .jsonl; 'image' one path or a list), each <image> in the human turns numbered into "
        "{image#1}, {image#2}, ... (a record whose <image> count differs from its images is refused); vist: a "
        "VIST story-in-sequence file, one sample per story (its photos in worker order, its sentences joined); "
        "hf-disk: a folder written by datasets' save_to_disk, which needs the datasets package (not installed "
        "with sam_fast; from Python, sam_fast.data.formats.convert_hf takes any dataset with len() and "
        "ds[i] -> dict). An existing OUT/annotations.json is refused unless --overwrite; image files already in "
        "OUT are never replaced. A record that cannot be converted stops the conversion with one line naming it.",
    )
    p.add_argument("format", choices=FORMATS, metavar="FORMAT", help="llava, vist or hf-disk")
    p.add_argument("src", metavar="SRC", help="the source file (llava, vist) or saved dataset folder (hf-disk)")
    p.add_argument("--images", metavar="DIR", help="the folder image paths (llava) or <photo_flickr_id>.jpg "
                   "files (vist) are in (default: SRC's folder)")
    p.add_argument("--output", required=True, metavar="OUT", help="the dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/annotations.json")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip records whose image files do not exist, and report how many")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip every record that cannot be converted (missing images included), and report them")
    p.add_argument("--no-copy", action="store_true", help="reference the images where they lie (they must be "
                   "inside OUT) instead of copying them to OUT/images/")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g = p.add_argument_group("llava")
    g.add_argument("--turns", choices=("first", "all"), default="first", help="first (default): one sample per "
                   "record, its first exchange (later ones are counted, not converted); all: one sample per "
                   "exchange, ids <id>#2, <id>#3, ..., earlier dialogue before the question as text")
    g = p.add_argument_group("vist")
    g.add_argument("--instruction", default=VIST_INSTRUCTION, help="every story's instruction: {images} becomes "
                   "{image#1} {image#2} ..., {n} the number of images (default: %(default)r)")
    g.add_argument("--text-field", choices=("text", "original_text"), default="text",
                   help="the sentences to join into the story (default: text)")
    g = p.add_argument_group("hf-disk")
    g.add_argument("--split", help="the split of a saved DatasetDict")
    g.add_argument("--image-column", help="default: images or image")
    g.add_argument("--instruction-column", help="default: instruction or question")
    g.add_argument("--output-column", help="default: output or answer")
    g.add_argument("--id-column", help="default: id when present, else the row number")
    p.set_defaults(func=_cmd_convert)


def _add_synthesize_command(sub) -> None:
    """`sam-fast synthesize`: its options and help."""
    p = sub.add_parser(
        "synthesize",
        help="MmLINK-style training data: object image groups -> an annotations.json dataset",
        description="For each object folder of --sources (>= 2 images of the object; >= 3 folders), segment the "
        "object, place two views of it with two other objects on two canvases, inpaint the backgrounds from "
        "written descriptions, caption the object and refine the caption into an instruction/answer pair; "
        "filter failures (reasons in OUTPUT/manifest.jsonl). OUTPUT gets annotations.json (what `sam-fast "
        "train --data` reads), images/, masks/, manifest.jsonl and synthesis.json. Rerunning the same command "
        "continues a stopped run; a non-empty folder that is not a synthesis run is refused. Models are read "
        "from local directories only.",
    )
    p.add_argument("--sources", required=True, help="folder of object folders, each with >= 2 images")
    p.add_argument("--output", required=True, help="dataset folder (new, empty, or a stopped run to continue)")
    p.add_argument("--samples-per-group", type=_positive_int, default=1, help="samples per object folder")
    p.add_argument("--limit", type=_positive_int, help="only the first N samples of the plan")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (sources, placements, inpainting, text)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the inpainting, captioning and local text models")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    _add_segmentation_flags(p)
    _add_compositing_flags(p)
    _add_synthesis_model_flags(p)
    _add_filter_flags(p)
    p.set_defaults(func=_cmd_synthesize)


def _add_segmentation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("segmentation")
    g.add_argument("--segmenter", choices=["sam", "threshold"], default="sam", help="sam: Segment Anything "
                   "(--sam-model); threshold: border-colour threshold + largest component (clean backgrounds)")
    g.add_argument("--sam-model", help="local transformers SamModel directory (e.g. a copy of facebook/sam-vit-huge)")
    g.add_argument("--sam-prompt", choices=["center", "saliency"], default="center",
                   help="center: a point at the image centre; saliency: the box of pixels unlike the border")
    g.add_argument("--threshold", type=float, default=30.0, help="threshold segmenter: RGB distance from the border colour")


def _add_compositing_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compositing")
    g.add_argument("--canvas-size", type=_positive_int, default=512, help="canvas side in pixels (multiple of 8)")
    g.add_argument("--scale-range", type=_positive_float, nargs=2, default=[0.35, 0.6], metavar=("LOW", "HIGH"),
                   help="an object's longer side as a fraction of the canvas")
    g.add_argument("--max-overlap", type=float, default=0.05, help="largest share of the smaller object covered")
    g.add_argument("--max-outside", type=float, default=0.0, help="share of an object's size allowed off the canvas")


def _add_synthesis_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inpainting, captioning, text")
    g.add_argument("--inpaint-model", required=True, help="local diffusers Stable Diffusion inpainting directory")
    g.add_argument("--inpaint-steps", type=_positive_int, default=50)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--caption-model", required=True, help="HF InstructBLIP directory (loaded as SAM with zero "
                   "guidance), SAM directory or training output")
    g.add_argument("--caption-prompt", default="{image#1} Describe the main object in this image in detail.")
    g.add_argument("--caption-beams", type=_positive_int, default=5)
    g.add_argument("--caption-max-tokens", type=_positive_int, default=64)
    g.add_argument("--text-model", help="local transformers causal LM directory")
    g.add_argument("--text-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    g.add_argument("--text-api-model", help="model name sent to --text-url")
    g.add_argument("--text-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--text-max-tokens", type=_positive_int, default=160)
    g.add_argument("--text-temperature", type=float, default=0.7, help="0: greedy (local model)")
    g.add_argument("--prompts", help="prompts JSON file (default: the one shipped in sam_fast/synthesis/)")


def _add_filter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters")
    g.add_argument("--min-mask-area", type=float, default=0.02)
    g.add_argument("--max-mask-area", type=float, default=0.9)
    g.add_argument("--min-visible", type=float, default=0.9, help="least visible share of a placed object")
    g.add_argument("--max-object-change", type=float, default=0.15,
                   help="largest mean absolute change (0-1) of an object's pixels by inpainting")
    g.add_argument("--max-repetition", type=float, default=0.5, help="largest share of repeated word bigrams")


def build_parser() -> argparse.ArgumentParser:
    """The `sam-fast` parser: one subcommand per `_add_*_command`, each dispatching to its `_cmd_*`."""
    parser = argparse.ArgumentParser(
        prog="sam-fast",
        description="sam_fast: a fast SAM (InstructBLIP + W-former guidance). "
        "Run `sam-fast COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  sam-fast train --config tiny --data DS --output runs/tiny --max-steps 200 --lr 3e-3\n"
        "  sam-fast train --config tiny --data DS --output runs/tiny --max-steps 400 --resume\n"
        "  sam-fast eval --model runs/tiny --data TESTSET --output runs/tiny/eval\n"
        "  sam-fast generate --model runs/tiny --images a.png b.png --prompt 'what is common?'\n"
        "  sam-fast convert llava llava.json --images imgs/ --output DS   (also: vist, hf-disk)\n"
        "  torchrun --nproc_per_node 2 -m sam_fast.cli train --config run.yaml\n"
        "  torchrun --nproc_per_node 4 -m sam_fast.cli train --config run.yaml --fsdp   (LLM sharded over 4 GPUs)\n"
        "  torchrun --nproc_per_node 4 -m sam_fast.cli eval --model runs/x --data TESTSET --output runs/x/eval",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_command(sub)
    _add_generate_command(sub)
    _add_eval_command(sub)
    _add_cache_features_command(sub)
    _add_explain_command(sub)
    _add_bench_command(sub)
    _add_env_command(sub)
    _add_demo_command(sub)
    _add_synthesize_command(sub)
    _add_export_command(sub)
    _add_init_command(sub)
    _add_convert_command(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that the same cleanup runs."""


@contextlib.contextmanager
def _terminate_like_interrupt():
    """While a command runs, SIGTERM (a scheduler's stop, ``kill``) raises `_Terminated` as SIGINT
    raises KeyboardInterrupt, so that every command's cleanup runs: build folders removed, locks
    released, finished work written. Left alone where SIGTERM already has a handler (and in threads);
    the trainer installs its own (it finishes and checkpoints the step)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise _Terminated

    old = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


_FULL = {28: "no space left on the device", 122: "the disk quota is exceeded"}  # ENOSPC, EDQUOT


def _disk_full(exc: BaseException) -> str | None:
    """One line for an error that is a full disk or quota (an OSError, or a library's error around
    one: safetensors, torch.save), naming the file when known; None for any other error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return _FULL[exc.errno] + (f" writing {exc.filename}" if exc.filename else "")
        text = str(exc)
        for code, what in _FULL.items():
            if os.strerror(code) in text or f"code: {code}," in text:
                return what
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one ``sam-fast`` command in this process and return its exit code (usage errors and
    refusals raise SystemExit). Under torchrun the ranks leave the process group together at the
    end; `run` (the installed command) then ends the process."""
    args = build_parser().parse_args(argv)
    import torch.distributed as torch_dist

    from sam_fast import distributed

    was_initialized = torch_dist.is_available() and torch_dist.is_initialized()
    ok = False
    try:
        with _terminate_like_interrupt():
            rc = args.func(args)
        ok = True
        return rc
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM: each command's cleanup has run on the way here
        name = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
        print(f"sam-fast {args.command}: stopped by {name} before it finished", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        raise SystemExit(f"sam-fast {args.command}: {full}; free space (or choose another output) and run the "
                         "command again") from None
    finally:
        if not was_initialized:  # a group this command joined (torchrun): leave it before exiting
            distributed.leave_process_group(together=ok)


def run() -> None:
    """The ``sam-fast`` command and ``python -m sam_fast.cli`` (what torchrun starts): `main`, then
    exit. A process that was in a torchrun group ends through `sam_fast.distributed.exit_process`
    (FSDP's gloo threads outlive the group and can abort a normal interpreter exit)."""
    import traceback

    from sam_fast import distributed

    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        if not distributed.left_process_group():
            raise
        traceback.print_exc()
        code = 1
    if distributed.left_process_group():
        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
