"""Training output directories (loading a model from one, ``--model DIR``: `sam_fast.models.directory`).

``OUTPUT/`` after `sam-fast train`::

    run.json        where the frozen base comes from, the SAM config overrides, the data, the training
                    options (updated on resume, with the previous values under "history")
    .lock           while a process trains into it: {"pid", "host", "started"} (`RunLock`)
    base/           the initial model (only for built-in configurations such as ``tiny``, whose random
                    frozen weights exist nowhere else; real runs reference the base directory instead)
    tokenizer/      qformer/ and llm/ tokenizers (local files)
    log.jsonl       one record per step (and one per evaluation)
    eval_history.json  with --eval-every: every evaluation during training, {step, metrics, samples}
                    (sam_fast.train.validation); a resumed run appends to it
    checkpoints/    trainable tensors + resume state (sam_fast.train.checkpoint)

`sam_fast.models.directory.load_model_dir` (also importable from here) loads a model from such a
directory, a checkpoint inside it, or a SAM / delta / HF InstructBLIP directory, without importing
the trainer.

One process at a time writes a run directory: `RunLock` (`sam_fast.runlock`, shared with synthesis runs;
importable from here) creates ``.lock`` exclusively; a lock whose process is gone (same host, pid not
running) is stale and taken over, any other is refused.

Nothing of the user's is written over or deleted. A new run goes only into an empty folder
(`foreign_entries`); base/ and tokenizer/ are written aside first (``.tmp-run-PID/``) and moved in only
where no file exists, and run.json records each file written there with its size and sha256
("files"). ``--overwrite`` (`clear_run`) removes only what the run can show it wrote: those recorded
files while unchanged, and the files of the layout above (run.json, log.jsonl, the checkpoints' own
files, eval_history.json, TensorBoard event files); anything else, e.g. a note or a file put into base/, is kept and named.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath


from sam_fast.data import save_tokenizers
from sam_fast.models import SAM
from sam_fast.models.checkpoint_files import file_sha256
from sam_fast.models.directory import (  # noqa: F401  (loading moved there; these names stay importable here)
    BUILTIN_CONFIGS,
    build_builtin,
    builtin_tokenizers,
    load_model_dir,
    prompt_builder,
)
from sam_fast.runlock import LOCK_FILE, RunLock, RunLockedError  # noqa: F401  (moved there; importable here)
from sam_fast.train import checkpoint as ckpt

RUN_FORMAT = "sam_fast.run"  # run.json's "format"
STAGING = ".tmp-run-"  # OUTPUT/.tmp-run-PID: base/ and tokenizer/ being written, moved into place when complete
_CKPT_DIR = re.compile(r"^(step-\d+|\.(tmp|old)-step-\d+-\d+)$")  # a checkpoint, being written or replaced
_CKPT_POINTER = re.compile(r"^(latest|\.tmp-latest-\d+)$")
_CKPT_FILES = (ckpt.TRAINABLE_FILE, ckpt.STATE_FILE, ckpt.STATE_TENSORS_FILE, ckpt.LEGACY_STATE_FILE)
# besides run.json: files at fixed places, known as the run's own by their place (the "files" of run.json record
# those whose names transformers picks, in base/ and tokenizer/)
_RUN_FILES = ("log.jsonl", "log.jsonl.tmp", ".run.json.tmp", "eval_history.json", ".eval_history.json.tmp")
# settings a resumed run must share with the run it continues (the rest may change, e.g. max_steps)
MODEL_KEYS = ("context_mode", "guidance")


class RunDirectoryError(ValueError):
    """The output directory holds something this call would overwrite or delete, or nothing it can resume."""


def run_record(output: str | os.PathLike) -> dict | None:
    """run.json of the training run in `output` when it is one sam_fast wrote (this or an older version),
    else None (missing, unreadable, or someone else's file of that name)."""
    try:
        run = json.loads((Path(output) / "run.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested past the parser
        return None
    if not isinstance(run, dict):
        return None
    if run.get("format") == RUN_FORMAT or (isinstance(run.get("base"), dict) and "kind" in run["base"]
                                           and isinstance(run.get("train"), dict)):
        return run
    return None


def existing_run(output: str | os.PathLike) -> list[str]:
    """What of a training run `output` already holds (run.json, log.jsonl, checkpoints/); empty if none.
    A log.jsonl or run.json alone that sam_fast did not write does not make a run."""
    out = Path(output)
    has_record = run_record(out) is not None
    has_ckpts = bool(ckpt.step_dirs(out / "checkpoints")) or (out / "checkpoints" / "latest").is_file()
    has_log = (has_record or has_ckpts) and (out / "log.jsonl").is_file()
    return [name for name, there in (("run.json", has_record), ("log.jsonl", has_log), ("checkpoints/", has_ckpts))
            if there]


def _transient(name: str) -> bool:
    """Top-level entries of a run's own that do not make a folder a run: the lock, a stale lock being
    replaced, base/ and tokenizer/ being written."""
    return name == LOCK_FILE or name.startswith((f"{LOCK_FILE}.stale-", STAGING))


def foreign_entries(output: str | os.PathLike) -> list[str]:
    """The entries of `output` (``name/`` for folders, sorted) when it exists, is not empty and holds no
    sam_fast training run: a folder a new run must not write into. Empty otherwise."""
    out = Path(output)
    if not out.is_dir() or existing_run(out):
        return []
    return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in out.iterdir()
                  if not _transient(p.name))


def describe(names: list[str], limit: int = 4) -> str:
    """The first `limit` of `names` (each cut to 60 characters), and how many more."""
    shown = [n if len(n) <= 60 else n[:57] + "..." for n in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _in_layout(rel: PurePosixPath, record: dict | None) -> bool:
    """Whether `rel` is a file the run writes at a fixed place: run.json, log.jsonl, eval_history.json (and
    their temporary files), a checkpoint's own files and pointer, TensorBoard's event files, base/ and tokenizer/ being
    written aside."""
    parts = rel.parts
    if parts[0].startswith(STAGING):
        return True
    if len(parts) == 1:  # only a run.json of this format proves that it and the log are the run's own (an older
        # one, or someone's file that merely looks like one, proves nothing)
        ours = record is not None and record.get("format") == RUN_FORMAT
        return ours and (parts[0] in _RUN_FILES or parts[0] == "run.json")
    if parts[0] == "checkpoints":
        return ((len(parts) == 2 and bool(_CKPT_POINTER.match(parts[1])))
                or (len(parts) == 3 and bool(_CKPT_DIR.match(parts[1])) and parts[2] in _CKPT_FILES))
    return parts[0] == "tensorboard" and len(parts) == 2 and parts[1].startswith("events.out.tfevents.")


def _recorded_unchanged(out: Path, rel: PurePosixPath, record: dict | None) -> bool:
    """Whether run.json records writing `rel` (base/, tokenizer/) and the file still has that size and sha256."""
    want = ((record or {}).get("files") or {}).get(rel.as_posix())
    if not isinstance(want, dict):
        return False
    path = out / rel
    return path.stat().st_size == want.get("bytes") and file_sha256(path) == want.get("sha256")


def clear_plan(output: str | os.PathLike) -> tuple[list[PurePosixPath], list[PurePosixPath]]:
    """(files of the run in `output` that it can show it wrote, every other file), as paths relative to
    `output`, sorted. Symbolic links are never the run's; the lock is neither (it stays while held)."""
    out = Path(output)
    if not existing_run(out):
        return [], []
    record = run_record(out)
    own, other = [], []
    for dirpath, dirnames, filenames in os.walk(out):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        mine_now = f"{STAGING}{os.getpid()}" if dirpath == str(out) else None  # being written by this process
        dirnames[:] = sorted(d for d in dirnames if d not in links and d != mine_now)
        for name in sorted(filenames + links):
            rel = PurePosixPath(Path(dirpath, name).relative_to(out).as_posix())
            if rel.as_posix() == LOCK_FILE or rel.name.startswith(f"{LOCK_FILE}.stale-"):
                continue
            is_file = not os.path.islink(out / rel)
            mine = is_file and (_in_layout(rel, record) or _recorded_unchanged(out, rel, record))
            (own if mine else other).append(rel)
    return sorted(own), sorted(other)


def clear_run(output: str | os.PathLike) -> list[str]:
    """Remove the files of the training run in `output` that it can show it wrote (`clear_plan`), and the
    folders that this empties; returns the files kept (relative paths): anything else, e.g. the user's
    notes or a file put into base/."""
    out = Path(output)
    own, other = clear_plan(out)
    emptied = set()
    for rel in own:
        (out / rel).unlink(missing_ok=True)
        emptied.update(out / parent for parent in rel.parents if parent != PurePosixPath("."))
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return [r.as_posix() for r in other]


def model_settings(model: SAM, overrides: dict | None = None) -> dict:
    """The SAM settings a run is tied to (guidance, context mode, and any other overridden field), as JSON."""
    keys = dict.fromkeys([*MODEL_KEYS, *(overrides or {})])
    return json.loads(json.dumps({k: getattr(model.config, k, None) for k in keys}, default=str))


def resume_differences(output: str | os.PathLike, base: dict, data: dict, model: dict, seed: int,
                       dtype: str | None = None) -> list[str]:
    """Settings of this invocation that differ from the run in `output` (its run.json), as
    ``"name: old -> new"``; empty when they match or there is no run.json."""
    run_file = Path(output) / "run.json"
    if not run_file.is_file():
        return []
    run = run_record(output)
    if run is None:
        raise RunDirectoryError(f"{run_file}: damaged or not written by sam_fast (unreadable, truncated or nested "
                                "past the JSON parser): move it aside, and --resume checks the checkpoints' own "
                                "record instead")
    return run_differences(run, base, data, model, seed, dtype)


def run_differences(run: dict, base: dict, data: dict, model: dict, seed: int, dtype: str | None = None) -> list[str]:
    """Settings of this invocation that differ from those `run` records (run.json's, or a checkpoint's
    ``{"base", "data", "model", "train"}``), as ``"name: old -> new"``; what `run` lacks is not compared.
    The frozen weights' `dtype` is one: the same moments on other weights would be another run."""
    diffs = []
    old_base, new_base = run.get("base") or {}, base
    for k in ("kind", "name", "path") if old_base else ():
        if old_base.get(k) != new_base.get(k):
            diffs.append(f"model: {old_base.get('name') or old_base.get('path')} -> "
                         f"{new_base.get('name') or new_base.get('path')}")
            break
    if "seed" in (run.get("train") or {}) and run["train"]["seed"] != seed:
        diffs.append(f"seed: {run['train']['seed']} -> {seed}")
    old_dtype = (run.get("train") or {}).get("dtype")
    if old_dtype is not None and dtype is not None and old_dtype != dtype:
        diffs.append(f"dtype: {old_dtype} -> {dtype}")
    for k, v in (run.get("data") or {}).items():
        if data.get(k) != v:
            diffs.append(f"{'data' if k == 'path' else k}: {v} -> {data.get(k)}")
    old_model = dict(run.get("model") or {k: v for k, v in old_base.get("overrides", {}).items()})
    for k in dict.fromkeys([*old_model, *model]):
        if k in old_model and k in model and old_model[k] != model[k]:
            diffs.append(f"{k}: {old_model[k]} -> {model[k]}")
    return diffs


def prepare_run_dir(output: str | os.PathLike, model: SAM, tokenizers, base: dict, train_config: dict,
                    data: dict | None = None, model_config: dict | None = None, overwrite: bool = False) -> list[str]:
    """Write run.json (base, data, model settings, training options, the files written), base/ (built-in
    bases only) and tokenizer/ once. A resumed run keeps base/ and tokenizer/; changed training options
    (e.g. max_steps) replace those in run.json, the previous values going to its "history" list.

    `overwrite` replaces the run in `output` (`clear_run`) and returns the files kept. Raises
    `RunDirectoryError`, before anything in `output` is removed or written over, when a file is where the
    new run writes and is not one the run can show it wrote (`clear_plan`)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(out)
    if not overwrite and record is not None:
        _record_resume(out, record, train_config)
        return []
    run = {"format": RUN_FORMAT, "base": base, "train": train_config,
           **({"data": data} if data is not None else {}), **({"model": model_config} if model_config is not None else {})}
    for stale in out.glob(f"{STAGING}*"):  # left by a killed process; this one holds the lock
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f"{STAGING}{os.getpid()}"
    try:
        staged = _write_aside(staging, model, tokenizers, base)
        _refuse_blocked(out, staged, overwrite)
        kept = clear_run(out) if overwrite else []
        run["files"] = {rel.as_posix(): _file_record(staging / rel) for rel in staged}
        _write_run_json(out, run)  # first: whatever lands below is then recorded as the run's own
        for rel in staged:
            _move_in(staging / rel, out, rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return kept


def _write_aside(staging: Path, model: SAM, tokenizers, base: dict) -> list[PurePosixPath]:
    """Write base/ (built-in bases) and tokenizer/ under `staging`; their files, relative to it: the names
    transformers picks are known only once written, and must be checked before anything lands in OUTPUT."""
    if base["kind"] == "builtin":
        model.save_pretrained(staging / "base")
    save_tokenizers(*tokenizers, staging)
    return sorted(PurePosixPath(f.relative_to(staging).as_posix()) for f in staging.rglob("*") if f.is_file())


def _record_resume(out: Path, run: dict, train_config: dict) -> None:
    """run.json of a resumed run: the new training options, the changed ones' previous values in "history"."""
    old = run.get("train", {})
    changed = {k: old.get(k) for k in train_config if k not in ("output_dir", "progress")
               and json.dumps(old.get(k)) != json.dumps(train_config[k])}
    if changed or old != train_config:
        if changed:
            latest = ckpt.latest_checkpoint(out / "checkpoints")
            at = int(latest.name.split("-")[1]) if latest is not None else 0
            run.setdefault("history", []).append({"resumed_at_step": at, "train": changed})
        run["train"] = train_config
        _write_run_json(out, run)


def _blocks(rel: PurePosixPath, new: set[PurePosixPath]) -> bool:
    """Whether a file (or link) `rel` that stays in a run directory is in the way of the new run: at a path it
    writes, or above one, or inside a checkpoint directory (which the run replaces and prunes whole)."""
    if rel in new or any(rel in n.parents for n in new):
        return True
    parts = rel.parts
    if parts[0] in ("checkpoints", "tensorboard") and len(parts) == 1:  # a link or file where the run writes a folder
        return True
    if parts[0] != "checkpoints" or len(parts) < 2:
        return False
    return bool(_CKPT_POINTER.match(parts[1])) or (len(parts) > 2 and bool(_CKPT_DIR.match(parts[1])))


def _refuse_blocked(out: Path, staged: list[PurePosixPath], overwrite: bool) -> None:
    """`RunDirectoryError` naming the files in `out` the new run would write over: with `overwrite` those
    `clear_run` keeps, otherwise any at run.json or the paths of base/ and tokenizer/ (`staged`)."""
    # the log and the evaluations' history: the new run starts them afresh
    new = {PurePosixPath("run.json"), PurePosixPath("log.jsonl"), PurePosixPath("eval_history.json"), *staged}
    if overwrite and existing_run(out):
        blocked = [r for r in clear_plan(out)[1] if _blocks(r, new)]
    else:
        blocked = _in_the_way(out, new)
    if not blocked:
        return
    record = run_record(out)
    why = (" (its run.json lists no files written: an older sam_fast wrote it)"
           if record is not None and "files" not in record else "")
    names = describe([r.as_posix() for r in blocked])
    raise RunDirectoryError(
        f"{out} holds file(s) where the new run writes that are not the run's own ({names}: put there, or changed "
        f"since the run wrote them{why}): nothing was removed or written; move them away or choose another --output")


def _in_the_way(out: Path, new: set[PurePosixPath]) -> list[PurePosixPath]:
    """What exists in `out` at a path of `new`, and links or files where a folder of one is needed."""
    found = set()
    for rel in new:
        if os.path.lexists(out / rel):
            found.add(rel)
        for parent in rel.parents[:-1]:  # base, base/sub, ... (not `out` itself)
            folder = out / parent
            if os.path.islink(folder) or (os.path.lexists(folder) and not folder.is_dir()):
                found.add(parent)
    return sorted(found)


def _move_in(src: Path, out: Path, rel: PurePosixPath) -> None:
    """Move the written file `src` to ``out/rel``, never over an existing file nor through a link."""
    target = out / rel
    for parent in reversed(rel.parents[:-1]):  # base, base/sub, ...: real folders inside `out`
        folder = out / parent
        if os.path.islink(folder) or (os.path.lexists(folder) and not folder.is_dir()):
            raise RunDirectoryError(f"{folder} is a link or a file where the run writes a folder; not writing into it")
        folder.mkdir(exist_ok=True)
    if os.path.lexists(target):
        raise RunDirectoryError(f"{target} appeared while the run was written; not writing over it")
    os.rename(src, target)


def _write_run_json(out: Path, run: dict) -> None:
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, out / "run.json")
