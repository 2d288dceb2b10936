"""Feature cache: features equal the vision model's; stale caches (model, image, missing) are refused;
damaged or replaced cache files (FIFOs, links out of the folder, truncated or other shards, cut or malformed
manifests) are refused in one line when the cache opens; training from the cache runs."""

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch

from sam_fast import SAM, SAMConfig
from sam_fast.data import AnnotationDataset, Collator, EvalTransform, PromptBuilder, model_inputs, tiny_tokenizers
from sam_fast.data.feature_cache import BrokenCacheError, CachedFeatureDataset, StaleCacheError, build_feature_cache
from sam_fast.data.synthetic import write_group_captions


@pytest.fixture
def setup(tmp_path):
    data = write_group_captions(tmp_path / "ds", n_samples=5, size=40, seed=2)
    torch.manual_seed(0)
    model = SAM(SAMConfig.tiny()).eval()
    build_feature_cache(model, data, tmp_path / "cache", batch_size=3, dtype=torch.float32, shard_images=4)
    return model, data, tmp_path / "cache"


def test_cached_features_equal_the_vision_model(setup):
    model, data, cache = setup
    cds = CachedFeatureDataset(data, cache, model)
    pds = AnnotationDataset(data, EvalTransform(28))
    assert len(list(cache.glob("shard-*.safetensors"))) >= 2
    for i in range(len(pds)):
        with torch.no_grad():
            want = model.vision_model(pixel_values=pds[i]["pixel_values"]).last_hidden_state
        torch.testing.assert_close(cds[i]["image_features"], want, rtol=1e-5, atol=1e-5)
    pb = PromptBuilder.for_model(model.config, *tiny_tokenizers())
    fb, pbatch = Collator(pb)([cds[i] for i in range(5)]), Collator(pb)([pds[i] for i in range(5)])
    with torch.no_grad():
        a, b = model(**model_inputs(fb)).loss, model(**model_inputs(pbatch)).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stale_caches_are_refused(setup):
    model, data, cache = setup
    torch.manual_seed(1)
    other = SAM(SAMConfig.tiny())
    with pytest.raises(StaleCacheError, match="another vision model"):
        CachedFeatureDataset(data, cache, other)
    img = data / "images" / "0001_0.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleCacheError, match=r"0001_0.png \(sample id 1\) changed"):
        CachedFeatureDataset(data, cache, model)
    with pytest.raises(StaleCacheError, match="no manifest.json"):
        CachedFeatureDataset(data, data, model)


def _tree(d):
    return sorted((p.relative_to(d).as_posix(), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))


def test_output_that_is_not_a_cache_is_never_replaced(setup, tmp_path):
    from sam_fast.data.feature_cache import CacheOutputError

    model, data, cache = setup
    before = _tree(data)
    with pytest.raises(CacheOutputError, match="is not a sam_fast feature cache.*not replacing it"):
        build_feature_cache(model, data, data)  # the dataset folder itself
    assert _tree(data) == before
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(CacheOutputError, match="not a directory"):
        build_feature_cache(model, data, f)
    assert f.read_text() == "mine"
    (cache / "notes.txt").write_text("mine")  # a real cache, but someone keeps a file in it
    with pytest.raises(CacheOutputError, match="also holds 'notes.txt'"):
        build_feature_cache(model, data, cache)
    assert (cache / "notes.txt").read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(CacheOutputError, match="symlink"):
        build_feature_cache(model, data, link)
    assert _tree(data) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_an_earlier_cache_or_empty_dir_is_replaced_atomically(setup, tmp_path):
    model, data, cache = setup
    old_manifest = (cache / "manifest.json").read_text()
    torch.manual_seed(5)
    other = SAM(SAMConfig.tiny()).eval()
    build_feature_cache(other, data, cache, dtype=torch.float32)
    assert (cache / "manifest.json").read_text() != old_manifest
    CachedFeatureDataset(data, cache, other)  # the new cache is complete and matches its model
    empty = tmp_path / "empty"
    empty.mkdir()
    build_feature_cache(model, data, empty, dtype=torch.float32)
    CachedFeatureDataset(data, empty, model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_the_old_cache_and_no_temporaries(setup, tmp_path):
    model, data, cache = setup
    before = _tree(cache)
    (data / "images" / "0003_0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(Exception, match="0003_0.png"):
        build_feature_cache(model, data, cache)
    assert _tree(cache) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cache_is_refused_for_another_post_layernorm_eps(setup):
    """A cache built with HF's final-LayerNorm eps (the vision config's, 1e-6) is not reused for the same
    weights with LAVIS' ln_vision eps (1e-5), and vice versa; an eps equal to the config's keeps it valid."""
    model, data, cache = setup
    lavis = SAM(SAMConfig.tiny(post_layernorm_eps=1e-5)).eval()
    lavis.load_state_dict(model.state_dict())
    assert lavis.vision_model.post_layernorm.eps == 1e-5 != model.vision_model.post_layernorm.eps
    with pytest.raises(StaleCacheError, match="another vision model.*rebuild it"):
        CachedFeatureDataset(data, cache, lavis)
    same = SAM(SAMConfig.tiny(post_layernorm_eps=model.config.vision_config.layer_norm_eps)).eval()
    same.load_state_dict(model.state_dict())
    CachedFeatureDataset(data, cache, same)  # the same computation: the existing cache stays valid
    # and the other direction: a cache built with the LAVIS eps is refused for the HF-eps model
    build_feature_cache(lavis, data, cache, batch_size=3, dtype=torch.float32)
    CachedFeatureDataset(data, cache, lavis)
    with pytest.raises(StaleCacheError, match="another vision model"):
        CachedFeatureDataset(data, cache, model)


# -- damaged or replaced cache files: refused when the cache opens, in one line naming the folder and the file ----

@contextlib.contextmanager
def _fifo_released_after(fifo, seconds: float):
    """Yields a clock (seconds since entering). A child process opens `fifo` for writing after `seconds` (and again
    every half second): a reader blocked opening it is released, so code that blocks on the FIFO fails the test
    instead of hanging it. A process, not a thread: safetensors blocks in open() holding the GIL."""
    code = (f"import os, time\ntime.sleep({seconds})\nfor _ in range(600):\n"
            f"    try:\n        os.close(os.open({str(fifo)!r}, os.O_WRONLY | os.O_NONBLOCK))\n"
            f"    except OSError:\n        pass\n    time.sleep(0.5)\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    start = time.monotonic()
    try:
        yield lambda: time.monotonic() - start
    finally:
        child.kill()
        child.wait()


def _open_and_read(data, cache, model):
    ds = CachedFeatureDataset(data, cache, model)
    return [ds[i] for i in range(len(ds))]


def _refused(data, cache, model, pattern):
    """Opening the cache raises BrokenCacheError, one line starting with the cache folder and matching `pattern`."""
    with pytest.raises(BrokenCacheError) as exc:
        _open_and_read(data, cache, model)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{cache}: ") and len(msg) < 400, msg
    assert re.search(pattern, msg), msg
    return msg


def test_a_fifo_shard_or_manifest_is_refused_without_blocking(setup):
    model, data, cache = setup
    shard = cache / "shard-00001.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    with _fifo_released_after(shard, 20) as clock:
        msg = _refused(data, cache, model, r"shard-00001\.safetensors is a FIFO, not a regular file")
        assert clock() < 20
    assert msg == (f"{cache}: shard-00001.safetensors is a FIFO, not a regular file; rebuild it with "
                   f"sam-fast cache-features")
    (cache / "manifest.json").unlink()
    os.mkfifo(cache / "manifest.json")
    with _fifo_released_after(cache / "manifest.json", 20) as clock:
        _refused(data, cache, model, r"^\S+: manifest\.json is a FIFO, not a regular file")
        assert clock() < 20


def test_cache_features_refuses_an_output_whose_manifest_is_a_fifo(setup, tmp_path):
    from sam_fast.data.feature_cache import CacheOutputError

    model, data, _ = setup
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    with _fifo_released_after(out / "manifest.json", 20) as clock:
        with pytest.raises(CacheOutputError, match="out exists and is not a sam_fast feature cache"):
            build_feature_cache(model, data, out)
        assert clock() < 20
    assert stat.S_ISFIFO(os.lstat(out / "manifest.json").st_mode)  # left as it was


def _rewrite_shard(cache, sid, change):
    """Shard `sid` rewritten with `change(tensors)` (a dict key -> tensor), the manifest untouched."""
    from safetensors.torch import load_file, save_file

    path = cache / f"shard-{sid:05d}.safetensors"
    tensors = load_file(str(path))
    save_file(change(tensors), str(path))


def test_a_truncated_shard_is_refused(setup):
    model, data, cache = setup
    shard = cache / "shard-00000.safetensors"
    full = shard.read_bytes()
    shard.write_bytes(full[:-100])  # the header intact, the last tensor cut
    _refused(data, cache, model, r"^\S+: shard-00000\.safetensors \(image 'images/0001_2\.png'\): truncated: tensor "
                                 r"'3' ends at byte \d+ of the data, the file holds \d+")
    shard.write_bytes(full[:5])  # not even the header's length
    _refused(data, cache, model, r"shard-00000\.safetensors: truncated \(5 bytes")


def test_a_shard_of_another_dtype_is_refused(setup):
    model, data, cache = setup
    _rewrite_shard(cache, 0, lambda t: {k: v.half() for k, v in t.items()})
    _refused(data, cache, model, r"shard-00000\.safetensors \(image 'images/0000_0\.png'\): tensor '0' is 'F16', the "
                                 r"manifest says float32 \(F32\)")


def test_a_shard_of_another_shape_is_refused(setup):
    model, data, cache = setup
    _rewrite_shard(cache, 1, lambda t: {k: v[:-1] if k == "5" else v for k, v in t.items()})
    P, D = (28 // 14) ** 2 + 1, 48  # the tiny ViT's output
    _refused(data, cache, model, rf"shard-00001\.safetensors \(image 'images/0002_0\.png'\): tensor '5' has shape "
                                 rf"\[{P - 1}, {D}\], the manifest says \[{P}, {D}\]")


def test_a_shard_missing_a_key_is_refused(setup):
    model, data, cache = setup
    _rewrite_shard(cache, 0, lambda t: {k: v for k, v in t.items() if k != "2"})
    _refused(data, cache, model, r"shard-00000\.safetensors \(image 'images/0001_1\.png'\): no tensor '2' in the "
                                 r"shard, which the manifest lists")


def test_a_cut_manifest_is_refused(setup):
    model, data, cache = setup
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(text[: len(text) // 2])
    _refused(data, cache, model, r"^\S+: manifest\.json: not valid JSON \(")


def _edit_manifest(cache, edit):
    m = json.loads((cache / "manifest.json").read_text())
    m = edit(m)
    (cache / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: [m], r"manifest\.json: holds a JSON list, not an object"),
    (lambda m: "[" * 100_000 + "]" * 100_000, r"manifest\.json: nested too deeply"),
    (lambda m: {**m, "images": list(m["images"])}, r"manifest\.json: images = \['images/0000_0\.png', .*expected an "
                                                   r"object"),
    (lambda m: {**m, "P": "5"}, r"manifest\.json: P = '5', expected an integer >= 1"),
    (lambda m: {**m, "views": 1e9}, r"manifest\.json: views = 1000000000\.0, expected an integer >= 1"),
    (lambda m: {**m, "dtype": "float7"}, r"manifest\.json: dtype = 'float7', expected one of \["),
    (lambda m: {**m, "images": {**m["images"], "images/0000_0.png": [0, "0"]}},
     r"manifest\.json: images\['images/0000_0\.png'\] = \[0, '0'\], expected an object"),
    (lambda m: {**m, "images": {**m["images"], "images/0000_0.png": {**m["images"]["images/0000_0.png"], "key": 0}}},
     r"manifest\.json: images\['images/0000_0\.png'\]\.key = 0, expected a string"),
    (lambda m: {**m, "vision_fingerprint": {"x": "y" * 10**6}},  # a megabyte of it: 80 characters printed
     r"vision_fingerprint = \{'x': 'y[y.]{0,70}\.\.\., expected a string"),
])
def test_a_manifest_of_the_wrong_structure_is_refused(setup, edit, pattern):
    model, data, cache = setup
    _edit_manifest(cache, edit)
    _refused(data, cache, model, pattern)


def test_manifest_paths_leading_outside_the_cache_are_refused(setup, tmp_path):
    model, data, cache = setup
    first = {"images/0000_0.png"}
    _edit_manifest(cache, lambda m: {**m, "images": {k: {**v, "shard": "../../outside"} if k in first else v
                                                     for k, v in m["images"].items()}})
    _refused(data, cache, model, r"manifest\.json: images\['images/0000_0\.png'\]\.shard = '\.\./\.\./outside', "
                                 r"expected a shard number >= 0")
    _edit_manifest(cache, lambda m: {**m, "images": {k: {**v, "shard": 0} if k in first else v
                                                     for k, v in m["images"].items()}})
    _open_and_read(data, cache, model)  # restored: it opens
    outside = tmp_path / "elsewhere.safetensors"  # an intact shard, but outside the folder: not read
    (cache / "shard-00000.safetensors").rename(outside)
    (cache / "shard-00000.safetensors").symlink_to(outside)
    _refused(data, cache, model, rf"shard-00000\.safetensors leads to {re.escape(str(outside))}, outside the cache "
                                 rf"folder")
    (cache / "shard-00000.safetensors").unlink()
    (cache / "shard-00000.safetensors").symlink_to(cache / "shard-00001.safetensors")  # inside: read, then checked
    _refused(data, cache, model, r"shard-00000\.safetensors \(image '[^']+'\): no tensor '\d'")
