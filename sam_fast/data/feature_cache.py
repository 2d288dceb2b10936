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
(config + weights), the transform, or an image file (size or mtime) does not match, or an image is
missing from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from sam_fast.data.dataset import AnnotationDataset, DataError, load_records
from sam_fast.data.transforms import EvalTransform

FORMAT = "sam_fast.feature_cache/1"


class StaleCacheError(RuntimeError):
    """The cache does not match the model, the transform or the images."""


def vision_fingerprint(model) -> str:
    """sha256 over the vision config's shape fields and every vision-model tensor (name, shape, dtype, bytes)."""
    vc = model.config.vision_config
    shape = {k: getattr(vc, k, None) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "intermediate_size", "layer_norm_eps")}
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
                        shard_images: int = 4096, skip_bad: bool = False, progress: bool = False) -> dict:
    """Run the frozen vision model over every image of `data_dir` once; returns the manifest."""
    from safetensors.torch import save_file

    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    records, skipped = load_records(data_dir, skip_bad=skip_bad, require_output=False)
    paths = sorted({p.relative_to(data_dir).as_posix() for r in records for p in r.images})
    tf = EvalTransform(model.config.vision_config.image_size)
    device = next(model.vision_model.parameters()).device
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
                with Image.open(data_dir / rel) as im:
                    pix.append(tf(im.convert("RGB")))
            except Exception as e:
                raise DataError(f"{data_dir / rel}: could not be decoded ({type(e).__name__}: {e})") from e
        E = model.vision_model(pixel_values=torch.stack(pix).to(device)).last_hidden_state
        P, D = E.shape[1], E.shape[2]
        for rel, e in zip(chunk, E, strict=True):
            idx = len(images)
            sid = idx // shard_images
            shard[str(idx)] = e.to("cpu", dtype).contiguous()
            images[rel] = {"shard": sid, "key": str(idx), **_file_stamp(data_dir / rel)}
            if len(shard) == shard_images:
                save_file(shard, str(tmp / f"shard-{sid:05d}.safetensors"))
                shard = {}
    if shard:
        save_file(shard, str(tmp / f"shard-{(len(images) - 1) // shard_images:05d}.safetensors"))
    manifest = {"format": FORMAT, "vision_fingerprint": vision_fingerprint(model), "transform": tf.key(),
                "P": P, "D": D, "dtype": str(dtype).replace("torch.", ""), "images": images}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
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
                rel = p.relative_to(data_dir).as_posix()
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

    def __init__(self, root, cache_dir, model, skip_bad: bool = False, seed: int = 0, require_output: bool = True):
        super().__init__(root, EvalTransform(model.config.vision_config.image_size), skip_bad=skip_bad, seed=seed,
                         require_output=require_output, verify_images=False)
        self.cache = FeatureCache(cache_dir)
        self.cache.check(model, self.root, self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        feats = torch.stack([self.cache.get(p.relative_to(self.root).as_posix()) for p in rec.images]).float()
        return {"id": rec.id, "image_features": feats, "instruction": rec.instruction, "output": rec.output}
