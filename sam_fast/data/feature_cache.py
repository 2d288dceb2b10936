"""A cache of the frozen vision model's outputs E [P, D] per image (`sam-fast cache-features`).

The ViT is frozen and, in the paper's setting, the biggest per-image cost before the LLM; caching
its outputs once lets training and evaluation feed ``image_features`` instead of pixels.

Two kinds of cache:

- ``views=1`` (default): one view per image with the **eval** transform (resize, no augmentation),
  for evaluation, or for training without RandomResizedCrop/flip. Stored as ``[P, D]`` per image.
- ``views=V > 1``: V augmented views per image with the **train** transform (RandomResizedCrop
  scale 0.5-1 + horizontal flip, `sam_fast.data.transforms.TrainTransform`). View v of an image
  draws its randomness from `view_generator(seed, image key, v)`, a generator seeded by a stable
  hash of the three, so a view does not depend on the batch size or the order of the images.
  Stored as ``[V, P, D]`` per image. Training from it (`CachedFeatureDataset(..., train=True)`)
  picks, for image j of sample s in epoch e, view `view_index(seed, s's id, e, j, V)`: each image
  of a sample picks its own view (a sample with N images sees up to V**N combinations), and a
  resumed run picks the same views as an uninterrupted one. Evaluation refuses such a cache.

Features are stored in float16 by default (0.72 MB per view of a [257, 1408] ViT-g output); they
are the output of the ViT's final LayerNorm, so their range fits float16. A value that does not
fit is refused (`CacheDtypeError`, naming the image) instead of being written as inf. Reading
upcasts them to the vision model's dtype.

Layout of a cache directory::

    manifest.json            format, vision-model fingerprint, transform key and parameters, views, seed,
                             P, D, dtype, sizes (`cache_size`), and per image (path relative to the
                             dataset): shard, size and mtime of the file
    shard-00000.safetensors  features keyed by image index (memory-mapped when read)

A cache is refused (`StaleCacheError`, naming what differs) when the vision model's fingerprint
(config, weights and the final LayerNorm's eps), the transform, or an image file (size or mtime) does not match, or an image is
missing from it.

The cache's own files are not trusted either (`BrokenCacheError`, a `StaleCacheError`, one line naming the cache
folder, the file and the key): only regular files inside the cache folder are opened (a FIFO, a device, a folder or a
link leading outside is refused before it is read, so it cannot block a run), the manifest must be a JSON object of
the expected structure, and every shard's safetensors header (read without loading a tensor) must hold each key the
manifest lists for it with the manifest's dtype and shape (``[P, D]`` or ``[V, P, D]``) and all its bytes.

Building writes the new cache into a fresh hidden directory beside the target and renames it into
place. An existing target is replaced only when it is a sam_fast cache (its manifest.json has this
format and it holds nothing but the manifest and shards) or an empty directory; anything else (a
dataset folder, a file, a symlink, a folder with other files) is refused with `CacheOutputError`
and left untouched. The hidden directory's name carries the building process (pid and a hash of the
host): a build killed where it could not clean up (SIGKILL, a lost node) leaves it behind, and the
next build beside it removes it once that process is gone from this host. Before writing, the
build estimates the cache's size (images x views x P x D x the dtype's bytes) and refuses, naming
both figures, when the file system has less room (`CacheSpaceError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import torch

from sam_fast._text import bounded_repr
from sam_fast.data.dataset import AnnotationDataset, DataError, load_records
from sam_fast.data.images import open_image
from sam_fast.data.transforms import EvalTransform, TrainTransform

FORMAT = "sam_fast.feature_cache/1"

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}
"""Names accepted for the on-disk dtype (`build_feature_cache(dtype=...)`, ``--dtype``)."""


class StaleCacheError(RuntimeError):
    """The cache does not match the model, the transform or the images."""


class CacheOutputError(RuntimeError):
    """The output path exists and is not a sam_fast feature cache, so it is not replaced."""


class CacheDtypeError(ValueError):
    """A feature does not fit the cache's dtype (e.g. beyond float16's range) or is not finite."""


class BrokenCacheError(StaleCacheError):
    """A file of the cache is not what the manifest says (damaged, replaced, or not a regular file in the folder).
    A `StaleCacheError`, so whoever handles a stale cache handles a broken one: the remedy is the same rebuild."""


def _stable_int(*parts) -> int:
    """A 63-bit integer from a sha256 of `parts` (JSON): the same in every process and Python version."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def view_generator(seed: int, key: str, view: int) -> torch.Generator:
    """The generator of augmented view `view` of the image with cache key `key` (`cache_key`): seeded by a
    stable hash of (seed, key, view). ``TrainTransform(size)(image, view_generator(seed, key, view))`` gives
    the pixels whose vision-model output a ``views > 1`` cache stores for that view."""
    return torch.Generator().manual_seed(_stable_int("view", int(seed), str(key), int(view)))


def view_index(seed: int, sample_id, epoch: int, image: int, views: int) -> int:
    """Which of `views` cached views image number `image` (0-based position in the sample's ``img_list``) of
    the sample with id `sample_id` uses in `epoch`: a stable hash of (seed, id, epoch, image) modulo `views`."""
    if views < 1:
        raise ValueError(f"views={views} must be >= 1")
    if not isinstance(sample_id, (int, str)) or isinstance(sample_id, bool):
        raise ValueError(f"sample id {sample_id!r} must be an int or a str")
    return _stable_int("pick", int(seed), sample_id, int(epoch), int(image)) % views


def train_transform_params(size: int) -> dict:
    """The parameters of the train transform a ``views > 1`` cache uses (recorded in its manifest)."""
    tf = TrainTransform(size)
    return {"kind": "train", "size": tf.size, "scale": list(tf.scale), "ratio": list(tf.ratio), "flip_p": tf.flip_p,
            "interpolation": "bicubic", "normalize": "clip"}


def eval_transform_params(size: int) -> dict:
    """The parameters of the eval transform a ``views=1`` cache uses (recorded in its manifest)."""
    return {"kind": "eval", "size": int(size), "interpolation": "bicubic", "normalize": "clip"}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} (or the matching torch dtype)")


_CACHE_ENTRY = re.compile(r"shard-\d{5}\.safetensors|manifest\.json")
_REBUILD = "rebuild it with sam-fast cache-features"


def _shard_name(sid: int) -> str:
    return f"shard-{sid:05d}.safetensors"


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "of an unknown kind"


def _cache_file(cache_dir: Path, name: str) -> Path:
    """The real path of file `name` of the cache, when it is a regular file inside the cache folder (after
    following links); `BrokenCacheError` otherwise. Only stat is called: a FIFO is refused without being opened,
    which would block until someone writes to it."""
    if Path(name).name != name or name in (".", ".."):
        raise BrokenCacheError(f"{cache_dir}: {bounded_repr(name)} is not a file name inside the cache folder; "
                               f"{_REBUILD}")
    folder = os.path.realpath(cache_dir)
    real = os.path.realpath(cache_dir / name)
    if os.path.commonpath([folder, real]) != folder:  # a resolved path: at most PATH_MAX, printed whole
        raise BrokenCacheError(f"{cache_dir}: {name} leads to {real}, outside the cache folder; {_REBUILD}")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise BrokenCacheError(f"{cache_dir}: {name} cannot be read ({e.strerror}); {_REBUILD}") from None
    if not stat.S_ISREG(mode):
        raise BrokenCacheError(f"{cache_dir}: {name} is {_file_kind(mode)}, not a regular file; {_REBUILD}")
    return Path(real)


def _read_bytes(path: Path, offset: int = 0, size: int = -1) -> bytes:
    """`size` bytes (-1: all) from `offset` of the regular file `path`. Opened non-blocking and checked again
    after opening, so a file swapped for a FIFO since `_cache_file` is refused rather than waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BrokenCacheError(f"{path.parent}: {path.name} cannot be read ({e.strerror}); {_REBUILD}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BrokenCacheError(f"{path.parent}: {path.name} is {_file_kind(mode)}, not a regular file; "
                                   f"{_REBUILD}")
        f.seek(offset)
        return f.read(size)


def _json_object(data: bytes, where: str):
    """The JSON object (dict) in `data`; `BrokenCacheError` naming `where` for anything else."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise BrokenCacheError(f"{where}: nested too deeply to be a feature-cache file; {_REBUILD}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a cut or overwritten file
        raise BrokenCacheError(f"{where}: not valid JSON ({' '.join(str(e).split())[:120]}); {_REBUILD}") from None
    if not isinstance(value, dict):
        raise BrokenCacheError(f"{where}: holds a JSON {type(value).__name__}, not an object; {_REBUILD}")
    return value


def read_manifest(cache_dir) -> dict:
    """The manifest of the cache in `cache_dir`, read only when it is a regular file in the folder and holds a JSON
    object; `BrokenCacheError` otherwise. Its fields are not checked here (`FeatureCache` does)."""
    cache_dir = Path(cache_dir)
    path = _cache_file(cache_dir, "manifest.json")
    return _json_object(_read_bytes(path), f"{cache_dir}: manifest.json")


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_manifest(m: dict, where: str) -> None:
    """`BrokenCacheError` naming the first field of manifest `m` whose type or range is not what `FeatureCache`
    reads: reading it would otherwise fail with a traceback, or index a file by a value from the manifest."""
    def bad(key: str, value, want: str):
        return BrokenCacheError(f"{where}: {key} = {bounded_repr(value)}, expected {want}; {_REBUILD}")

    for key in ("vision_fingerprint", "transform", "dtype"):
        if not isinstance(m.get(key), str):
            raise bad(key, m.get(key), "a string")
    if m["dtype"] not in DTYPES:
        raise bad("dtype", m["dtype"], f"one of {sorted(DTYPES)}")
    if "transform_params" in m and not isinstance(m["transform_params"], dict):
        raise bad("transform_params", m["transform_params"], "an object")
    if not _is_int(m.get("views", 1), 1):
        raise bad("views", m.get("views"), "an integer >= 1")
    if m.get("seed") is not None and not _is_int(m["seed"], -(2**63)):
        raise bad("seed", m["seed"], "an integer or null")
    images = m.get("images")
    if not isinstance(images, dict):
        raise bad("images", images, "an object of image path -> entry")
    for key in ("P", "D"):
        if not (_is_int(m.get(key), 1) or (m.get(key) is None and not images)):
            raise bad(key, m.get(key), "an integer >= 1")
    for rel, entry in images.items():
        name = f"images[{bounded_repr(rel)}]"
        if not isinstance(entry, dict):
            raise bad(name, entry, "an object with shard, key, size and mtime_ns")
        for field, ok, want in (("shard", _is_int, "a shard number >= 0"), ("key", lambda v: isinstance(v, str),
                                "a string"), ("size", _is_int, "an integer >= 0"),
                                ("mtime_ns", lambda v: _is_int(v, -(2**63)), "an integer")):
            if not ok(entry.get(field)):
                raise bad(f"{name}.{field}", entry.get(field), want)


# safetensors' dtype names of the dtypes a cache may hold
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _shard_header(cache_dir: Path, sid: int) -> tuple[Path, dict, int]:
    """(real path, tensor entries of the safetensors header, bytes of tensor data in the file) of shard `sid`,
    read without loading a tensor (the format: an 8-byte little-endian header length, a JSON header, the data)."""
    name = _shard_name(sid)
    path = _cache_file(cache_dir, name)
    where = f"{cache_dir}: {name}"
    size = path.stat().st_size
    head = _read_bytes(path, 0, 8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or n > size - 8:
        raise BrokenCacheError(f"{where}: truncated ({size} bytes, less than its safetensors header"
                               f"{'' if n is None else f' of {n} bytes'}); {_REBUILD}")
    header = _json_object(_read_bytes(path, 8, n), f"{where} (safetensors header)")
    header.pop("__metadata__", None)
    return path, header, size - 8 - n


def _check_tensor(where: str, key: str, info, dtype: torch.dtype, shape: list[int], data_bytes: int) -> None:
    """`BrokenCacheError` unless header entry `info` of tensor `key` is `dtype` of `shape`, with all of its bytes
    in the file."""
    if not isinstance(info, dict):
        raise BrokenCacheError(f"{where}: no tensor {bounded_repr(key)} in the shard, which the manifest lists; "
                               f"{_REBUILD}")
    want = _SAFETENSORS_DTYPES[dtype]
    if info.get("dtype") != want:
        raise BrokenCacheError(f"{where}: tensor {bounded_repr(key)} is {bounded_repr(info.get('dtype'))}, the "
                               f"manifest says {str(dtype).removeprefix('torch.')} ({want}); {_REBUILD}")
    if info.get("shape") != shape:
        raise BrokenCacheError(f"{where}: tensor {bounded_repr(key)} has shape {bounded_repr(info.get('shape'))}, "
                               f"the manifest says {shape}; {_REBUILD}")
    offsets = info.get("data_offsets")
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and offsets[1] - offsets[0] == nbytes):
        raise BrokenCacheError(f"{where}: tensor {bounded_repr(key)} has data_offsets {bounded_repr(offsets)}, "
                               f"not {nbytes} bytes; {_REBUILD}")
    if offsets[1] > data_bytes:
        raise BrokenCacheError(f"{where}: truncated: tensor {bounded_repr(key)} ends at byte {offsets[1]} of the "
                               f"data, the file holds {data_bytes}; {_REBUILD}")


def check_replaceable(cache_dir) -> None:
    """Raise `CacheOutputError` unless `cache_dir` is absent, an empty directory, or a sam_fast feature
    cache (manifest.json of this format, nothing but the manifest and its shards)."""
    cache_dir = Path(cache_dir)
    if not os.path.lexists(cache_dir):
        return
    hint = "choose another output directory, or remove it yourself"
    if cache_dir.is_symlink() or not cache_dir.is_dir():
        raise CacheOutputError(f"{cache_dir} exists and is not a directory (or is a symlink); not replacing it: "
                               f"{hint}")
    entries = sorted(p.name for p in cache_dir.iterdir())
    if not entries:
        return
    try:  # a FIFO, a link out of the folder or a damaged manifest: not (provably) a cache, so not replaced
        fmt = read_manifest(cache_dir).get("format")
    except (OSError, StaleCacheError):
        fmt = None
    if fmt != FORMAT:
        raise CacheOutputError(f"{cache_dir} exists and is not a sam_fast feature cache (no manifest.json of format "
                               f"{FORMAT!r}); not replacing it: {hint}")
    other = [e for e in entries if not _CACHE_ENTRY.fullmatch(e)]
    if other:
        raise CacheOutputError(f"{cache_dir} is a feature cache but also holds {other[0]!r}"
                               f"{f' and {len(other) - 1} other file(s)' if len(other) > 1 else ''}; not replacing "
                               f"it: {hint}")


class CacheSpaceError(CacheOutputError):
    """The file system holding the cache has less free space than the cache will take."""


_TMP_NAME = re.compile(r"\.(?P<cache>.+)\.tmp-(?P<pid>\d+)@(?P<host>[0-9a-f]{8})-[^/]*")


def _host_tag() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _build_dir(cache_dir: Path) -> Path:
    """A fresh hidden directory beside `cache_dir` named after this process (`remove_dead_builds`)."""
    tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}.tmp-{os.getpid()}@{_host_tag()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache gets a normal directory's mode
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_builds(cache_dir) -> list[Path]:
    """Remove the hidden build directories of `cache_dir` left by killed builds on this host (their
    process has exited); returns what was removed. Builds of live processes or other hosts stay."""
    cache_dir = Path(cache_dir)
    if not cache_dir.parent.is_dir():
        return []
    removed = []
    for entry in sorted(cache_dir.parent.iterdir()):
        m = _TMP_NAME.fullmatch(entry.name)
        if m and m["cache"] == cache_dir.name and m["host"] == _host_tag() and not _alive(int(m["pid"])) \
                and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_space(cache_dir, images: int, views: int, P: int, D: int, dtype) -> int:
    """The estimated bytes of a cache of `images` x `views` features [P, D] in `dtype` (plus its
    manifest); raise `CacheSpaceError` when the file system of `cache_dir` has less free space."""
    cache_dir = Path(cache_dir)
    need = images * views * P * D * _dtype(dtype).itemsize + 512 * images + (1 << 20)
    where = cache_dir.parent if cache_dir.parent.exists() else Path(os.path.abspath(cache_dir)).anchor
    free = shutil.disk_usage(where).free
    if need > free:
        raise CacheSpaceError(f"{cache_dir}: the cache needs about {_bytes(need)} ({images} images x {views} view(s) "
                              f"x [{P}, {D}] {str(_dtype(dtype)).replace('torch.', '')}) but its file system has "
                              f"{_bytes(free)} free; free space, use fewer --views or --dtype bfloat16/float16, or "
                              "choose another --output")
    return need


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing a (checked) cache there."""
    check_replaceable(target)  # again: it may have changed while the features were computed
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / "cache")  # two renames; were we killed between them, the old cache is in `old`
    os.replace(new, target)
    shutil.rmtree(old)


def cache_key(data_dir: Path, path: Path) -> str:
    """The manifest key of an image: its path relative to the dataset folder (absolute when it is outside)."""
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).as_posix()


def vision_fingerprint(model) -> str:
    """sha256 over the vision config's shape fields, every vision-model tensor (name, shape, dtype, bytes) and
    the final LayerNorm's eps (``vision_model.post_layernorm.eps``) where it differs from the config's
    ``layer_norm_eps`` (LAVIS' ln_vision uses 1e-5, HF 1e-6); when they are equal the fingerprint is the one
    earlier versions wrote, so their caches stay valid."""
    vc = model.config.vision_config
    shape = {k: getattr(vc, k, None) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "intermediate_size", "layer_norm_eps")}
    post_ln = getattr(model.vision_model, "post_layernorm", None)
    post_eps = getattr(post_ln, "eps", None)
    if post_eps is not None and post_eps != shape["layer_norm_eps"]:
        shape["post_layernorm_eps"] = float(post_eps)
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    for name, t in sorted(model.vision_model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@torch.no_grad()
def build_feature_cache(model, data_dir, cache_dir, batch_size: int = 16, dtype=torch.float16,
                        shard_images: int = 4096, skip_bad: bool = False, progress: bool = False,
                        allow_outside_paths: bool = False, views: int = 1, seed: int = 0) -> dict:
    """Run the frozen vision model over every image of `data_dir` and write the cache to `cache_dir`
    (replacing only an earlier cache there, see the module docstring); returns the manifest, whose
    ``size`` (`cache_size`) also holds ``total_bytes``, the whole cache on disk.

    Args:
        batch_size: images (views) per vision-model call.
        dtype: on-disk dtype: torch.float16 (default), torch.bfloat16, torch.float32 or a name in `DTYPES`.
        shard_images: images per safetensors shard.
        views: 1: the eval transform, one view per image; V > 1: V train-transform views per image.
        seed: augmentation seed of the views (`view_generator`); recorded, unused when ``views=1``.

    Raises:
        CacheOutputError: `cache_dir` exists and is not a sam_fast feature cache.
        CacheSpaceError: the cache would not fit in the free space of its file system.
        CacheDtypeError: a feature does not fit `dtype` (use float32 or bfloat16) or is not finite.
        DataError: bad data (unless `skip_bad`).
    """
    if batch_size < 1 or shard_images < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_images ({shard_images}) must be >= 1")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views={views!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    dtype = _dtype(dtype)
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    check_replaceable(cache_dir)  # before any work
    records, skipped = load_records(data_dir, skip_bad=skip_bad, require_output=False,
                                    allow_outside_paths=allow_outside_paths)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(cache_dir)
    vc = model.config.vision_config
    n_images = len({cache_key(data_dir, p) for r in records for p in r.images})
    check_space(cache_dir, n_images, views, (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size, dtype)
    tmp = _build_dir(cache_dir)
    try:
        manifest = _write_cache(model, data_dir, records, tmp, batch_size, dtype, shard_images, progress, views,
                                seed)
        _replace_dir(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["size"] = cache_size(cache_dir)
    return manifest


def cache_size(cache_dir) -> dict:
    """The size report of a cache, from its manifest and the files on disk: ``images``, ``views``,
    ``bytes_per_view`` (P x D x the dtype's bytes), ``bytes_per_image`` (views x that), ``feature_bytes``
    (images x that), ``shard_bytes`` (the shard files) and ``total_bytes`` (every file of the cache)."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    views = int(m.get("views", 1))
    per_view = int(m["P"] or 0) * int(m["D"] or 0) * _dtype(m["dtype"]).itemsize
    files = [p for p in cache_dir.iterdir() if p.is_file()]
    return {"images": len(m["images"]), "views": views, "bytes_per_view": per_view, "bytes_per_image": views * per_view,
            "feature_bytes": len(m["images"]) * views * per_view,
            "shard_bytes": sum(p.stat().st_size for p in files if p.name.startswith("shard-")),
            "total_bytes": sum(p.stat().st_size for p in files)}


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def size_summary(size: dict) -> str:
    """One line of a `cache_size` report: per view, per image and in total (decimal units)."""
    per_image, per_view = _bytes(size["bytes_per_image"]), _bytes(size["bytes_per_view"])
    return (f"{per_image} per image ({size['views']} view(s) x {per_view}), "
            f"{_bytes(size['total_bytes'])} in total for {size['images']} images ({size['total_bytes']} bytes on disk)")


def _to_disk(e: torch.Tensor, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """`e` [.., P, D] as `dtype` on the CPU; `CacheDtypeError` naming `path` when a value does not fit."""
    out = e.to("cpu", dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        if not bool(torch.isfinite(e).all()):
            raise CacheDtypeError(f"{path}: the vision model's output holds NaN or inf; not cached")
        raise CacheDtypeError(f"{path}: a feature reaches {float(e.abs().max()):.4g}, beyond the range of "
                              f"{str(dtype).replace('torch.', '')} ({torch.finfo(dtype).max:.4g}); build the cache "
                              f"with --dtype float32 or bfloat16")
    return out


def _write_cache(model, data_dir: Path, records, tmp: Path, batch_size: int, dtype, shard_images: int,
                 progress: bool, views: int, seed: int) -> dict:
    from safetensors.torch import save_file

    files = {cache_key(data_dir, p): p for r in records for p in r.images}
    paths = sorted(files)
    size = model.config.vision_config.image_size
    if views == 1:
        tf, params = EvalTransform(size), eval_transform_params(size)
    else:
        tf, params = TrainTransform(size), train_transform_params(size)
    device = next(model.vision_model.parameters()).device
    images, shard, P, D = {}, {}, None, None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths) * views, desc="cache-features", unit="view" if views > 1 else "image")
    per_call = max(1, batch_size // views)  # images per vision-model call (their views: up to batch_size)
    try:
        for s in range(0, len(paths), per_call):
            chunk = paths[s : s + per_call]
            pix = []
            for rel in chunk:
                try:
                    img = open_image(files[rel])
                    if views == 1:
                        pix.append(tf(img))
                    else:
                        pix += [tf(img, view_generator(seed, rel, v)) for v in range(views)]
                except Exception as e:
                    raise DataError(f"{files[rel]}: could not be decoded ({type(e).__name__}: {e})") from e
            x = torch.stack(pix)
            E = torch.cat([model.vision_model(pixel_values=x[i : i + batch_size].to(device)).last_hidden_state
                           for i in range(0, len(x), batch_size)])
            P, D = E.shape[1], E.shape[2]
            E = E.view(len(chunk), views, P, D) if views > 1 else E
            for rel, e in zip(chunk, E, strict=True):
                idx = len(images)
                sid = idx // shard_images
                shard[str(idx)] = _to_disk(e, dtype, files[rel])
                images[rel] = {"shard": sid, "key": str(idx), **_file_stamp(files[rel])}
                if len(shard) == shard_images:
                    save_file(shard, str(tmp / f"shard-{sid:05d}.safetensors"))
                    shard = {}
            if bar is not None:
                bar.update(len(chunk) * views)
    finally:
        if bar is not None:
            bar.close()
    if shard:
        save_file(shard, str(tmp / f"shard-{(len(images) - 1) // shard_images:05d}.safetensors"))
    manifest = {"format": FORMAT, "vision_fingerprint": vision_fingerprint(model), "transform": tf.key(),
                "transform_params": params, "views": views, "seed": seed if views > 1 else None,
                "P": P, "D": D, "dtype": str(dtype).replace("torch.", ""), "images": images}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class FeatureCache:
    """Read side of a cache; `check` refuses a stale one."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        mf = self.dir / "manifest.json"
        if not os.path.lexists(mf):
            raise StaleCacheError(f"{self.dir}: no manifest.json (not a feature cache; build one with "
                                  f"`sam-fast cache-features`)")
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("format") != FORMAT:
            raise StaleCacheError(f"{mf}: format {bounded_repr(self.manifest.get('format'))}, expected {FORMAT!r}")
        _check_manifest(self.manifest, f"{self.dir}: manifest.json")
        self._paths = self._check_shards()
        self._shards = {}

    def _check_shards(self) -> dict[int, Path]:
        """The real path of every shard the manifest names, after checking each one's header against the manifest
        (`BrokenCacheError` naming the shard, the key and what differs): a damaged or replaced shard is refused when
        the cache opens, not at some step of a run, and never read as features of another dtype or shape."""
        m = self.manifest
        dtype = DTYPES[m["dtype"]]
        shape = [m["P"], m["D"]] if self.views == 1 else [self.views, m["P"], m["D"]]
        by_shard: dict[int, list[tuple[str, str]]] = {}
        for rel, entry in m["images"].items():
            by_shard.setdefault(entry["shard"], []).append((rel, entry["key"]))
        paths = {}
        for sid, entries in sorted(by_shard.items()):
            path, header, data_bytes = _shard_header(self.dir, sid)
            for rel, key in entries:
                where = f"{self.dir}: {_shard_name(sid)} (image {bounded_repr(rel)})"
                _check_tensor(where, key, header.get(key), dtype, shape, data_bytes)
            paths[sid] = path
        return paths

    @property
    def views(self) -> int:
        """Views per image: 1 (eval transform; also every cache written before views existed) or V > 1."""
        return int(self.manifest.get("views", 1))

    def check(self, model, data_dir, records) -> None:
        """Raise `StaleCacheError` (naming what differs) unless the cache matches the model's vision model and
        transform and holds every image of `records` unchanged."""
        m = self.manifest
        fp = vision_fingerprint(model)
        if m["vision_fingerprint"] != fp:
            raise StaleCacheError(f"{self.dir}: built with another vision model (fingerprint "
                                  f"{m['vision_fingerprint']} != {fp}); rebuild it with sam-fast cache-features")
        size = model.config.vision_config.image_size
        if self.views == 1:
            want_tf, want_params = EvalTransform(size).key(), eval_transform_params(size)
        else:
            want_tf, want_params = TrainTransform(size).key(), train_transform_params(size)
        if m["transform"] != want_tf:
            raise StaleCacheError(f"{self.dir}: built with transform {m['transform']!r}, the model needs {want_tf!r}")
        if "transform_params" in m and m["transform_params"] != want_params:
            raise StaleCacheError(f"{self.dir}: built with transform parameters {m['transform_params']}, this version "
                                  f"uses {want_params}; rebuild it with sam-fast cache-features")
        data_dir = Path(data_dir)
        for r in records:
            for p in r.images:
                rel = cache_key(data_dir, p)
                entry = m["images"].get(rel)
                if entry is None:
                    raise StaleCacheError(f"{self.dir}: image {rel} (sample id {r.id!r}) is not in the cache")
                if _file_stamp(p) != {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:
                    raise StaleCacheError(f"{self.dir}: image {rel} (sample id {r.id!r}) changed since the cache "
                                          f"was built")

    def get(self, rel: str, view: int | None = None) -> torch.Tensor:
        """The stored features of image `rel` (its `cache_key`): [P, D] of a ``views=1`` cache; of a ``views > 1``
        cache view `view` [P, D], or all views [V, P, D] when `view` is None. Only the asked view is read."""
        from safetensors import safe_open

        entry = self.manifest["images"][rel]
        sid = entry["shard"]
        if sid not in self._shards:
            self._shards[sid] = safe_open(str(self._paths[sid]), framework="pt")
        if self.views == 1 or view is None:
            return self._shards[sid].get_tensor(entry["key"])
        if not 0 <= view < self.views:
            raise IndexError(f"{self.dir}: view {view} of image {rel}: the cache has views 0..{self.views - 1}")
        return self._shards[sid].get_slice(entry["key"])[view]


class CachedFeatureDataset(AnnotationDataset):
    """`AnnotationDataset` whose items carry ``image_features`` [N, P, D] from a checked cache, in the vision
    model's dtype (float32 for a float32 model; cached float16/bfloat16 values are upcast).

    Args:
        root, skip_bad, require_output, allow_outside_paths: as `AnnotationDataset`.
        cache_dir: the cache (`build_feature_cache`) of `root`'s images.
        model: the SAM model the features are for (checked against the cache's fingerprint).
        seed: the training seed; with an augmented cache it picks the views (`view_index`).
        train: accept an augmented (``views > 1``) cache. Item `i` in epoch ``set_epoch(e)`` then carries, for
            its image j, view ``view_index(seed, id, e, j, V)``. Without `train` such a cache is refused
            (`StaleCacheError`): evaluation reads the eval-transform (``views=1``) features.
    """

    def __init__(self, root, cache_dir, model, skip_bad: bool = False, seed: int = 0, require_output: bool = True,
                 allow_outside_paths: bool = False, train: bool = False):
        super().__init__(root, EvalTransform(model.config.vision_config.image_size), skip_bad=skip_bad, seed=seed,
                         require_output=require_output, verify_images=False, allow_outside_paths=allow_outside_paths)
        self.cache = FeatureCache(cache_dir)
        self.views = self.cache.views
        if self.views > 1 and not train:
            raise StaleCacheError(f"{self.cache.dir}: holds {self.views} augmented (train-transform) views per image, "
                                  f"for training; evaluation needs a --views 1 (eval transform) cache")
        self.cache.check(model, self.root, self.records)
        self.feature_dtype = next(model.vision_model.parameters()).dtype

    def view_indices(self, index: int, epoch: int | None = None) -> list[int]:
        """The view of each image of sample `index` in `epoch` (default: the current one); all 0 for ``views=1``."""
        rec = self.records[index]
        e = self.epoch if epoch is None else int(epoch)
        return [view_index(self.seed, rec.id, e, j, self.views) for j in range(len(rec.images))]

    def __getitem__(self, index: int):
        rec = self.records[index]
        if self.views == 1:
            feats = [self.cache.get(cache_key(self.root, p)) for p in rec.images]
        else:
            feats = [self.cache.get(cache_key(self.root, p), v)
                     for p, v in zip(rec.images, self.view_indices(index), strict=True)]
        feats = torch.stack(feats).to(self.feature_dtype)
        return {"id": rec.id, "image_features": feats, "instruction": rec.instruction, "output": rec.output}
