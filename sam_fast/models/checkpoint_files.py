"""Reading training checkpoints: the file format, so that loading a model from a run directory
(`sam_fast.models.directory`) needs nothing from the trainer. Writing them, and the trainer's resume
state, live in `sam_fast.train.checkpoint`, which imports the names below.

Layout under ``OUTPUT/checkpoints``::

    step-00000100/trainable.safetensors      the four trainable modules' tensors (keys as in state_dict())
    step-00000100/trainer_state.safetensors  the tensors of the resume state (optimiser moments, RNG states)
    step-00000100/trainer_state.json         the rest of it (step, data position, schedule, scaler, options),
                                             the sha256 and size of both safetensors files, and a sha256 of
                                             its own content
    latest                                   name of the newest complete checkpoint

Only safetensors and JSON are read: nothing is unpickled. Every checksum is checked before a tensor is
used: a truncated or bit-flipped file raises `CheckpointError` naming the file, and `load_latest` then
falls back to the previous intact checkpoint. Checkpoints of older sam_fast versions (a pickled
``trainer_state.pt``) are never unpickled: their trainable tensors still load (`load_trainable`), their
resume state is refused (`LegacyCheckpointError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
STATE_TENSORS_FILE = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # older versions: pickled; never loaded
STATE_FORMAT = "sam_fast.trainer_state"
STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
RELISTS = 5  # listings of a run's checkpoints tried while a training process keeps replacing them


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, altered or of a refused format; the message names it."""


class LegacyCheckpointError(CheckpointError):
    """A checkpoint whose resume state is pickled (older sam_fast): refused, since unpickling runs code."""


def notice(msg: str) -> None:
    """Print a one-line ``sam_fast: ...`` notice to stderr (a damaged checkpoint that is skipped)."""
    print(f"sam_fast: {msg}", file=sys.stderr, flush=True)


def canonical_json(body: dict) -> bytes:
    """The bytes trainer_state.json's own sha256 is taken over (sorted keys, no spaces)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- finding checkpoints ---------------------------------------------------------------------------
def is_legacy(path: Path) -> bool:
    """A checkpoint directory of an older sam_fast (pickled trainer_state.pt, no trainer_state.json)."""
    return (path / LEGACY_STATE_FILE).is_file() and not (path / STATE_FILE).is_file()


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds every file of a checkpoint (contents not checked), of this or an older format."""
    path = Path(path)
    if not (path / TRAINABLE_FILE).is_file():
        return False
    return ((path / STATE_FILE).is_file() and (path / STATE_TENSORS_FILE).is_file()) or is_legacy(path)


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (all files present; contents not checked), oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and is_checkpoint_dir(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def candidates(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, the one `latest` names first, then newest to oldest."""
    dirs = [p for _, p in reversed(step_dirs(ckpt_root))]
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        named = [p for p in dirs if p.name == name]
        dirs = named + [p for p in dirs if p.name != name]
    return dirs


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`latest` if it names one, else the highest step)."""
    cands = candidates(Path(ckpt_root))
    return cands[0] if cands else None


# -- reading one checkpoint ------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, its own checksum verified; `LegacyCheckpointError` for an
    older, pickled state (not read)."""
    file = path / STATE_FILE
    if is_legacy(path):
        raise LegacyCheckpointError(
            f"{path / LEGACY_STATE_FILE}: resume state of an older sam_fast version, pickled, and not loaded "
            "because unpickling a file can run code; its trained weights (trainable.safetensors) still load for "
            "eval/generate, and `sam-fast train --model RUN_DIR --output NEW_DIR` starts a new run from them")
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable or truncated ({type(e).__name__}: {str(e)[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: nested too deeply to be a trainer state (damaged)") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{file}: not a sam_fast trainer state (format {fmt!r})")
    if data.get("version") != STATE_VERSION:
        raise CheckpointError(f"{file}: trainer state version {data.get('version')!r}; this sam_fast reads "
                              f"{STATE_VERSION}")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if hashlib.sha256(canonical_json(body)).hexdigest() != data.get("sha256"):
        raise CheckpointError(f"{file}: checksum mismatch (the file was altered or damaged)")
    _check_manifest(path, data)
    return data


MAX_STEP = 10**12  # far beyond any real run; a larger step is a damaged or forged state


def _check_manifest(path: Path, data: dict) -> None:
    """The fields of trainer_state.json that readers index, with their types and ranges; the step must
    be the one the directory is named after."""
    file = path / STATE_FILE
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{file}: step {str(step)[:40]!r} is not an integer in [0, {MAX_STEP}]")
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{file}: records step {step} but the directory is {path.name}")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
            for v in files.values()):
        raise CheckpointError(f"{file}: 'files' is not a table of sha256 and sizes")
    state = data.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: 'state' is not a mapping")
    if "step" in state and state["step"] != step:  # the resume state's own copy (plain JSON)
        raise CheckpointError(f"{file}: the resume state's step {str(state['step'])[:40]!r} differs from the "
                              f"checkpoint's step {step}")


def verify_file(path: Path, name: str, manifest: dict) -> None:
    """Check file `name` of checkpoint `path` against the size and sha256 its manifest records."""
    file = path / name
    want = manifest["files"].get(name)
    if want is None:
        raise CheckpointError(f"{path / STATE_FILE}: has no checksum for {name}")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, {want['bytes']} expected (truncated or damaged)")
    if file_sha256(file) != want["sha256"]:
        raise CheckpointError(f"{file}: sha256 mismatch (the file was altered or damaged)")


def load_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors `file`; an unreadable one raises `CheckpointError` naming it."""
    try:
        return load_file(str(file), device=device)
    except Exception as e:  # safetensors' errors do not name the file
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None


def load_trainable(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, torch.Tensor], int]:
    """(trainable tensors, step) of one checkpoint directory, checksums verified. Reads no resume state,
    so checkpoints of older versions (pickled trainer_state.pt) load too, without that file."""
    path = Path(path)
    m = STEP_DIR.match(path.name)
    if is_legacy(path):
        tensors = load_tensors(path / TRAINABLE_FILE, str(map_location))
        if not m:
            raise CheckpointError(f"{path}: an older-format checkpoint must keep its step-NNNNNNNN directory name")
        return tensors, int(m.group(1))
    manifest = read_manifest(path)
    verify_file(path, TRAINABLE_FILE, manifest)
    return load_tensors(path / TRAINABLE_FILE, str(map_location)), int(manifest["step"])


def _identity(path: Path):
    """(device, inode) of a checkpoint directory, None once it is gone: a trainer that prunes or re-saves a
    checkpoint while it is read removes or replaces the directory, which a damaged file does not."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _vanished(path: Path, before) -> bool:
    """Whether checkpoint `path` was removed or replaced since `before` (`_identity`) rather than damaged."""
    return before is None or _identity(path) != before or not is_checkpoint_dir(path)


def load_latest(ckpt_root: str | os.PathLike, loader: Callable, notice: Callable[[str], None] = notice):
    """(path, *loader(path)) of the newest intact checkpoint under `ckpt_root`, or None when there is none.

    A damaged checkpoint is reported in one line (`notice`) and the previous one is tried; an older-format
    one raises `LegacyCheckpointError` (resume state refused) unless `loader` does not read that state
    (`load_trainable` does not). A checkpoint that disappears or is replaced while it is read (a training
    process pruning down to --keep-last, or re-saving a step) is not damage: the directory is listed again."""
    ckpt_root = Path(ckpt_root)
    damaged: dict[Path, str] = {}
    for _ in range(RELISTS):
        found, vanished = _load_first_intact([p for p in candidates(ckpt_root) if p not in damaged], loader,
                                             notice, damaged)
        if found is not None:
            return found
        if not vanished:
            break
    else:
        raise CheckpointError(f"{ckpt_root}: checkpoints kept disappearing while being read ({RELISTS} times; a "
                              "training process is replacing them): try again")
    if damaged:
        raise CheckpointError(f"{ckpt_root}: no intact checkpoint ({len(damaged)} damaged: "
                              f"{'; '.join(damaged.values())})")
    return None


def _load_first_intact(cands: list[Path], loader: Callable, notice: Callable[[str], None], damaged: dict):
    """((path, *loader(path)) of the first of `cands` that loads, or None; whether one vanished while it was
    read, which stops the search: the caller lists the directory again). Damaged ones are reported and
    added to `damaged`."""
    for i, path in enumerate(cands):
        before = _identity(path)
        try:
            loaded = loader(path)
        except LegacyCheckpointError:
            raise
        except (CheckpointError, OSError) as e:
            if _vanished(path, before):
                return None, True
            if not isinstance(e, CheckpointError):
                raise
            damaged[path] = str(e)
            later = f"falling back to {cands[i + 1].name}" if i + 1 < len(cands) else "no older checkpoint"
            notice(f"checkpoint {path.name} is damaged: {e}; {later}")
            continue
        return (path, *loaded), False
    return None, False


def check_trainable(model, trainable: dict[str, torch.Tensor], where: str | os.PathLike = "checkpoint") -> None:
    """Raise `CheckpointError` naming `where` (the file) unless `trainable` holds exactly the model's
    trainable tensors: the same keys and shapes, floating point (cast to the model's dtype on load),
    finite."""
    own = model.trainable_state_dict()
    missing, extra = sorted(set(own) - set(trainable)), sorted(set(trainable) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where}: does not match the model's trainable tensors: missing {missing[:5]}, "
                              f"unexpected {[k[:80] for k in extra[:5]]}{' ...' if len(extra) > 5 else ''}")
    for k, v in trainable.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: tensor {k} is {str(v.dtype).replace('torch.', '')}, not floating point")
        if not bool(torch.isfinite(v).all()):  # sam_fast never writes one (save_checkpoint refuses them)
            raise CheckpointError(f"{where}: tensor {k} holds NaN or infinite values")


def load_trainable_into(model, trainable: dict[str, torch.Tensor], where: str | os.PathLike = "checkpoint") -> None:
    """Copy checkpoint tensors into the model (`check_trainable` first: nothing is copied from a
    checkpoint that does not match)."""
    check_trainable(model, trainable, where)
    own = model.trainable_state_dict()
    with torch.no_grad():
        for k, v in trainable.items():
            own[k].copy_(v)


def trainable_loader(model, map_location="cpu") -> Callable:
    """A `load_latest` loader of (trainable tensors, step) that also checks them against `model`, so a
    checkpoint that does not fit it counts as damaged and the previous one is tried."""
    def load(path: Path):
        tensors, step = load_trainable(path, map_location)
        check_trainable(model, tensors, Path(path) / TRAINABLE_FILE)
        return tensors, step

    return load
