"""Training output directories, and loading a model from one (``--model DIR``).

``OUTPUT/`` after `sam-fast train`::

    run.json        where the frozen base comes from, the SAM config overrides, the data, the training
                    options (updated on resume, with the previous values under "history")
    .lock           while a process trains into it: {"pid", "host", "started"} (`RunLock`)
    base/           the initial model (only for built-in configurations such as ``tiny``, whose random
                    frozen weights exist nowhere else; real runs reference the base directory instead)
    tokenizer/      qformer/ and llm/ tokenizers (local files)
    log.jsonl       one record per step
    checkpoints/    trainable tensors + resume state (sam_fast.train.checkpoint)

`load_model_dir` accepts such a directory (newest checkpoint, or one named), a checkpoint directory
inside it, a full SAM directory (`save_pretrained`), a trainable-delta directory, or an HF
InstructBLIP directory; tokenizers come from the same place. Only safetensors, JSON and tokenizer
files are read from a run directory: nothing in it is unpickled.

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

import torch

from sam_fast import SAM, SAMConfig
from sam_fast.data import PromptBuilder, load_tokenizers, save_tokenizers, tiny_tokenizers
from sam_fast.train import checkpoint as ckpt

BUILTIN_CONFIGS = ("tiny",)
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
    run = json.loads(run_file.read_text())
    diffs = []
    old_base, new_base = run.get("base", {}), base
    for k in ("kind", "name", "path"):
        if old_base.get(k) != new_base.get(k):
            diffs.append(f"model: {old_base.get('name') or old_base.get('path')} -> "
                         f"{new_base.get('name') or new_base.get('path')}")
            break
    if "seed" in run.get("train", {}) and run["train"]["seed"] != seed:
        diffs.append(f"seed: {run['train']['seed']} -> {seed}")
    for k, v in (run.get("data") or {}).items():
        if data.get(k) != v:
            diffs.append(f"{'data' if k == 'path' else k}: {v} -> {data.get(k)}")
    old_model = dict(run.get("model") or {k: v for k, v in old_base.get("overrides", {}).items()})
    for k in dict.fromkeys([*old_model, *model]):
        if k in old_model and k in model and old_model[k] != model[k]:
            diffs.append(f"{k}: {old_model[k]} -> {model[k]}")
    return diffs


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
    if ckpt.is_checkpoint_dir(path):
        checkpoint, path = path, path.parent.parent  # a checkpoint inside a run directory
    if (path / "run.json").is_file():
        run = json.loads((path / "run.json").read_text())
        model = _from_base(path, run["base"], **load_kwargs)
        what = f"{path} (base only: no checkpoint yet)"
        if checkpoint is not None:  # exactly this one: a damaged file raises CheckpointError naming it
            ck = Path(checkpoint)
            trainable, step = ckpt.load_trainable(ck)
        else:  # the newest intact one (a damaged one is reported and skipped)
            found = ckpt.load_latest(path / "checkpoints", loader=ckpt.load_trainable)
            ck, trainable, step = found if found is not None else (None, None, None)
        if ck is not None:
            ckpt.load_trainable_into(model, trainable)
            what = f"{path} at step {step} ({ck.name})"
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
