"""Training output directories (loading a model from one, ``--model DIR``: `sam_fast.models.directory`).

``OUTPUT/`` after `sam-fast train`::

    run.json        where the frozen base comes from, the SAM config overrides, the data, the training
                    options (updated on resume, with the previous values under "history")
    .lock           while a process trains into it: {"pid", "host", "started"} (`RunLock`)
    base/           the initial model (only for built-in configurations such as ``tiny``, whose random
                    frozen weights exist nowhere else; real runs reference the base directory instead)
    tokenizer/      qformer/ and llm/ tokenizers (local files)
    log.jsonl       one record per step
    checkpoints/    trainable tensors + resume state (sam_fast.train.checkpoint)

`sam_fast.models.directory.load_model_dir` (also importable from here) loads a model from such a
directory, a checkpoint inside it, or a SAM / delta / HF InstructBLIP directory, without importing
the trainer.

One process at a time writes a run directory: `RunLock` creates ``.lock`` exclusively; a lock whose
process is gone (same host, pid not running) is stale and taken over, any other is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path


from sam_fast.data import save_tokenizers
from sam_fast.models import SAM
from sam_fast.models.directory import (  # noqa: F401  (loading moved there; these names stay importable here)
    BUILTIN_CONFIGS,
    build_builtin,
    builtin_tokenizers,
    load_model_dir,
    prompt_builder,
)
from sam_fast.train import checkpoint as ckpt
LOCK_FILE = ".lock"
# settings a resumed run must share with the run it continues (the rest may change, e.g. max_steps)
MODEL_KEYS = ("context_mode", "guidance")


def _notice(msg: str) -> None:
    print(f"sam_fast: {msg}", file=sys.stderr, flush=True)


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock (or it cannot be told to be stale)."""


def _pid_alive(pid) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """Exclusive use of a run directory by this process (``with RunLock(out): ...`` or acquire/release).

    ``OUT/.lock`` is created with O_EXCL and holds {"pid", "host", "started"}. A lock left by a process
    that no longer runs on this host is stale: it is replaced (said in one line). A live one, or one
    from another host (whose process cannot be checked), raises `RunLockedError` naming holder and file."""

    def __init__(self, output: str | os.PathLike, notice=_notice):
        self.out = Path(output)
        self.path = self.out / LOCK_FILE
        self.notice = notice
        self.info = None

    def _read(self):
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        """Take the lock; returns self."""
        self.out.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage
                    time.sleep(0.2)
                    holder = self._read()
                    if holder is None:
                        raise RunLockedError(f"{self.path}: unreadable lock file; if no process trains into "
                                             f"{self.out}, delete it") from None
                if holder.get("host") == info["host"] and not _pid_alive(holder.get("pid")):
                    self._take_over(holder)
                    continue
                raise RunLockedError(
                    f"{self.out} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')}; if that process is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
            self.info = info
            return self
        raise RunLockedError(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _take_over(self, holder: dict) -> None:
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:  # another process removed it first
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder:  # a fresh lock taken meanwhile by another process: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            self.notice(f"{self.out}: removed a stale lock of pid {holder.get('pid')} on {holder.get('host')} "
                        "(no longer running)")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if self.info is not None and self._read() == self.info:
            self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def existing_run(output: str | os.PathLike) -> list[str]:
    """What of a training run `output` already holds (run.json, log.jsonl, checkpoints/); empty if none."""
    out = Path(output)
    found = [n for n in ("run.json", "log.jsonl") if (out / n).is_file()]
    if ckpt.step_dirs(out / "checkpoints") or (out / "checkpoints" / "latest").is_file():
        found.append("checkpoints/")
    return found


def clear_run(output: str | os.PathLike) -> None:
    """Remove the files of a training run from `output` (run.json, base/, tokenizer/, log.jsonl, checkpoints'
    step directories): only what `sam-fast train` writes; anything else in the directory is kept."""
    out = Path(output)
    has_run_json = (out / "run.json").is_file()
    root = out / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if (p.name == "latest" or p.name.startswith((".tmp-", ".old-"))
                    or (p.name.startswith("step-") and p.is_dir())):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not any(root.iterdir()):
            root.rmdir()
    for name in ("log.jsonl", "log.jsonl.tmp", ".run.json.tmp"):
        (out / name).unlink(missing_ok=True)
    if has_run_json:  # base/ and tokenizer/ are the run's own when run.json says this is a run directory
        for name in ("base", "tokenizer"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        (out / "run.json").unlink()


def model_settings(model: SAM, overrides: dict | None = None) -> dict:
    """The SAM settings a run is tied to (guidance, context mode, and any other overridden field), as JSON."""
    keys = dict.fromkeys([*MODEL_KEYS, *(overrides or {})])
    return json.loads(json.dumps({k: getattr(model.config, k, None) for k in keys}, default=str))


def resume_differences(output: str | os.PathLike, base: dict, data: dict, model: dict, seed: int) -> list[str]:
    """Settings of this invocation that differ from the run in `output` (its run.json), as
    ``"name: old -> new"``; empty when they match or there is no run.json."""
    run_file = Path(output) / "run.json"
    if not run_file.is_file():
        return []
    return run_differences(json.loads(run_file.read_text()), base, data, model, seed)


def run_differences(run: dict, base: dict, data: dict, model: dict, seed: int) -> list[str]:
    """Settings of this invocation that differ from those `run` records (run.json's, or a checkpoint's
    ``{"base", "data", "model", "train"}``), as ``"name: old -> new"``; what `run` lacks is not compared."""
    diffs = []
    old_base, new_base = run.get("base") or {}, base
    for k in ("kind", "name", "path") if old_base else ():
        if old_base.get(k) != new_base.get(k):
            diffs.append(f"model: {old_base.get('name') or old_base.get('path')} -> "
                         f"{new_base.get('name') or new_base.get('path')}")
            break
    if "seed" in (run.get("train") or {}) and run["train"]["seed"] != seed:
        diffs.append(f"seed: {run['train']['seed']} -> {seed}")
    for k, v in (run.get("data") or {}).items():
        if data.get(k) != v:
            diffs.append(f"{'data' if k == 'path' else k}: {v} -> {data.get(k)}")
    old_model = dict(run.get("model") or {k: v for k, v in old_base.get("overrides", {}).items()})
    for k in dict.fromkeys([*old_model, *model]):
        if k in old_model and k in model and old_model[k] != model[k]:
            diffs.append(f"{k}: {old_model[k]} -> {model[k]}")
    return diffs


def _write_run_json(out: Path, run: dict) -> None:
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, out / "run.json")


def prepare_run_dir(output: str | os.PathLike, model: SAM, tokenizers, base: dict, train_config: dict,
                    data: dict | None = None, model_config: dict | None = None) -> None:
    """Write run.json (base, data, model settings, training options), base/ (built-in bases only) and
    tokenizer/ once. A resumed run keeps base/ and tokenizer/; changed training options (e.g. max_steps)
    replace those in run.json, the previous values going to its "history" list."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
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
        return
    if base["kind"] == "builtin":
        model.save_pretrained(out / "base")
    save_tokenizers(*tokenizers, out)
    run = {"base": base, "train": train_config}
    if data is not None:
        run["data"] = data
    if model_config is not None:
        run["model"] = model_config
    _write_run_json(out, run)
