"""A cache of the frozen vision model's outputs E [P, D] per image (`sam-fast cache-features`).

The ViT is frozen and, in the paper's setting, the biggest per-image cost before the LLM; caching
its outputs once lets training and evaluation feed ``image_features`` instead of pixels. Cached
features are computed with the **eval** transform (resize, no augmentation), so training from a
cache trains without RandomResizedCrop/flip.

Layout of a cache directory::

    manifest.json            format, vision-model fingerprint, transform key, P, D, dtype, and per image
                             (path relative to the dataset): shard, size and mtime of the file
    shard-00000.safetensors  features keyed by image index (memory-mapped when read)

A cache is refused (`StaleCacheError`, naming what differs) when the vision model's fingerprint
(config, weights and the final LayerNorm's eps), the transform, or an image file (size or mtime) does not match, or an image is
missing from it.

Building writes the new cache into a fresh hidden directory beside the target and renames it into
place. An existing target is replaced only when it is a sam_fast cache (its manifest.json has this
format and it holds nothing but the manifest and shards) or an empty directory; anything else (a
dataset folder, a file, a symlink, a folder with other files) is refused with `CacheOutputError`
and left untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from sam_fast.data.dataset import AnnotationDataset, DataError, load_records
from sam_fast.data.images import open_image
from sam_fast.data.transforms import EvalTransform

FORMAT = "sam_fast.feature_cache/1"


class StaleCacheError(RuntimeError):
    """The cache does not match the model, the transform or the images."""


class CacheOutputError(RuntimeError):
    """The output path exists and is not a sam_fast feature cache, so it is not replaced."""


_CACHE_ENTRY = re.compile(r"shard-\d{5}\.safetensors|manifest\.json")


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
    try:
        fmt = json.loads((cache_dir / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        raise CacheOutputError(f"{cache_dir} exists and is not a sam_fast feature cache (no manifest.json of format "
                               f"{FORMAT!r}); not replacing it: {hint}")
    other = [e for e in entries if not _CACHE_ENTRY.fullmatch(e)]
    if other:
        raise CacheOutputError(f"{cache_dir} is a feature cache but also holds {other[0]!r}"
                               f"{f' and {len(other) - 1} other file(s)' if len(other) > 1 else ''}; not replacing "
                               f"it: {hint}")


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
                        allow_outside_paths: bool = False) -> dict:
    """Run the frozen vision model over every image of `data_dir` once and write the cache to `cache_dir`
    (replacing only an earlier cache there, see the module docstring); returns the manifest.

    Raises:
        CacheOutputError: `cache_dir` exists and is not a sam_fast feature cache.
        DataError: bad data (unless `skip_bad`).
    """
    if batch_size < 1 or shard_images < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_images ({shard_images}) must be >= 1")
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    check_replaceable(cache_dir)  # before any work
    records, skipped = load_records(data_dir, skip_bad=skip_bad, require_output=False,
                                    allow_outside_paths=allow_outside_paths)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache gets a normal directory's mode
    try:
        manifest = _write_cache(model, data_dir, records, tmp, batch_size, dtype, shard_images, progress)
        _replace_dir(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_cache(model, data_dir: Path, records, tmp: Path, batch_size: int, dtype, shard_images: int,
                 progress: bool) -> dict:
    from safetensors.torch import save_file

    files = {cache_key(data_dir, p): p for r in records for p in r.images}
    paths = sorted(files)
    tf = EvalTransform(model.config.vision_config.image_size)
    device = next(model.vision_model.parameters()).device
    images, shard, P, D = {}, {}, None, None
    starts = range(0, len(paths), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="cache-features", unit="batch")
    for s in starts:
        chunk = paths[s : s + batch_size]
        pix = []
        for rel in chunk:
            try:
                pix.append(tf(open_image(files[rel])))
            except Exception as e:
                raise DataError(f"{files[rel]}: could not be decoded ({type(e).__name__}: {e})") from e
        E = model.vision_model(pixel_values=torch.stack(pix).to(device)).last_hidden_state
        P, D = E.shape[1], E.shape[2]
        for rel, e in zip(chunk, E, strict=True):
            idx = len(images)
            sid = idx // shard_images
            shard[str(idx)] = e.to("cpu", dtype).contiguous()
            images[rel] = {"shard": sid, "key": str(idx), **_file_stamp(files[rel])}
            if len(shard) == shard_images:
                save_file(shard, str(tmp / f"shard-{sid:05d}.safetensors"))
                shard = {}
    if shard:
        save_file(shard, str(tmp / f"shard-{(len(images) - 1) // shard_images:05d}.safetensors"))
    manifest = {"format": FORMAT, "vision_fingerprint": vision_fingerprint(model), "transform": tf.key(),
                "P": P, "D": D, "dtype": str(dtype).replace("torch.", ""), "images": images}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


class FeatureCache:
    """Read side of a cache; `check` refuses a stale one."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise StaleCacheError(f"{self.dir}: no manifest.json (not a feature cache; build one with "
                                  f"`sam-fast cache-features`)")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise StaleCacheError(f"{mf}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self._shards = {}

    def check(self, model, data_dir, records) -> None:
        m = self.manifest
        fp = vision_fingerprint(model)
        if m["vision_fingerprint"] != fp:
            raise StaleCacheError(f"{self.dir}: built with another vision model (fingerprint "
                                  f"{m['vision_fingerprint']} != {fp}); rebuild it with sam-fast cache-features")
        want_tf = EvalTransform(model.config.vision_config.image_size).key()
        if m["transform"] != want_tf:
            raise StaleCacheError(f"{self.dir}: built with transform {m['transform']!r}, the model needs {want_tf!r}")
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

    def get(self, rel: str) -> torch.Tensor:
        from safetensors import safe_open

        entry = self.manifest["images"][rel]
        sid = entry["shard"]
        if sid not in self._shards:
            self._shards[sid] = safe_open(str(self.dir / f"shard-{sid:05d}.safetensors"), framework="pt")
        return self._shards[sid].get_tensor(entry["key"])


class CachedFeatureDataset(AnnotationDataset):
    """`AnnotationDataset` whose items carry ``image_features`` [N, P, D] (float32) from a checked cache."""

    def __init__(self, root, cache_dir, model, skip_bad: bool = False, seed: int = 0, require_output: bool = True,
                 allow_outside_paths: bool = False):
        super().__init__(root, EvalTransform(model.config.vision_config.image_size), skip_bad=skip_bad, seed=seed,
                         require_output=require_output, verify_images=False, allow_outside_paths=allow_outside_paths)
        self.cache = FeatureCache(cache_dir)
        self.cache.check(model, self.root, self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        feats = torch.stack([self.cache.get(cache_key(self.root, p)) for p in rec.images]).float()
        return {"id": rec.id, "image_features": feats, "instruction": rec.instruction, "output": rec.output}
